"""The first hour on a user's own images: one decision rule that the panel, scores.csv and the masks
all follow; a verdict from a plain fit; no waiting for compilers; an export that works on the plain
install; skipped unreadable files; a run record; logs that read well."""

import csv
import io
import json
import logging
import os
import pathlib
import subprocess
import sys
import time
import tomllib

import jax
import numpy as np
import pytest
from PIL import Image

from patchcore_jax._src.app import console, records, visualize
from patchcore_jax.data import make_synthetic
from tests.helpers import CLI_SMALL, cli_here, small_model

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "patchcore_jax.cli", *args], capture_output=True, text=True,
                          timeout=600, env=env, cwd=cwd)


def _write_pngs(folder, images):
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module")
def data():
    return make_synthetic(seed=5, n_train=6, n_test_good=3, n_test_defect=6, size=80, margin=16)


@pytest.fixture(scope="module")
def fitted(data):
    model = small_model()
    model.fit_calibrated(data["train"])
    return model


@pytest.fixture(scope="module")
def project(tmp_path_factory, data):
    """Training and test images on disk, and a model from a plain `fit` (no threshold options)."""
    root = tmp_path_factory.mktemp("first-hour")
    _write_pngs(root / "train", data["train"])
    _write_pngs(root / "test", data["test"])
    r = run("fit", "--train", str(root / "train"), "--out", str(root / "model"), *CLI_SMALL)
    assert r.returncode == 0, r.stderr
    root.joinpath("fit.stdout").write_text(r.stdout)
    return root


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# -- one decision rule ----------------------------------------------------------------------------------
def test_decide_never_contradicts_itself(fitted, data):
    preds = list(fitted.predict_iter(data["test"]))
    t, p = fitted.threshold, fitted.pixel_threshold.value
    try:
        for image_threshold, pixel_threshold in [(t, p), (0.0, 1e9), (1e9, 0.0), (t, 1e9), (0.0, -1e9)]:
            fitted.threshold = image_threshold
            fitted.pixel_threshold = type(fitted.pixel_threshold)(pixel_threshold, "test")
            for pred in preds:
                for amap in (pred.anomaly_map, fitted.frame_map(pred.anomaly_map, (70, 120))):
                    d = fitted.decide(pred.score, amap)
                    assert d.anomalous == bool(fitted.classify([pred.score])[0])
                    assert d.region.shape == amap.shape and d.region.dtype == bool
                    assert d.region.any() == d.anomalous, (image_threshold, pixel_threshold, d.rule)
                    assert not (d.region & ~np.isfinite(amap)).any()  # never outside the inspected crop
                    if d.anomalous and np.nanmax(amap) > pixel_threshold:
                        np.testing.assert_array_equal(d.region, np.nan_to_num(amap, nan=-np.inf) > pixel_threshold)
    finally:
        fitted.threshold = t
        fitted.pixel_threshold = type(fitted.pixel_threshold)(p, "restored")


def test_the_panel_outlines_the_decided_region(fitted, data, tmp_path, monkeypatch):
    drawn = []
    original = visualize.draw_panel

    def spy(path, **kw):
        drawn.append(kw)
        return original(path, **kw)

    monkeypatch.setattr(visualize, "draw_panel", spy)
    (pred,) = fitted.predict_iter(data["test"][-1:])
    for threshold in (0.0, 1e9):
        fitted.threshold, keep = threshold, fitted.image_threshold
        d = fitted.decide(pred.score, pred.anomaly_map)
        visualize.draw_panel(tmp_path / f"{threshold}.png", image=pred.crop, amap=pred.anomaly_map,
                             scale=fitted.color_scale(), score=pred.score, image_threshold=threshold, name="x",
                             decision=d)
        title = visualize.verdict(pred.score, threshold)[0]
        assert title.startswith("DEFECT" if d.anomalous else "fine") and d.region.any() == d.anomalous
        assert ("judged fine" in visualize.outline_title(d)) == (not d.anomalous)
    assert len(drawn) == 2


def test_scores_csv_masks_and_panels_agree(project, tmp_path):
    model = project / "model"
    cases = {"default": [], "all-anomalous": ["--threshold", "0", "--pixel-threshold", "1e9"],
             "all-fine": ["--threshold", "1e9", "--pixel-threshold=-1e9"]}
    for name, extra in cases.items():
        out = tmp_path / name
        r = cli_here("predict", "--model", str(model), str(project / "test"), "--out", str(out), "--save-masks",
                     "--no-heatmaps", *extra, "--quiet")
        assert r.returncode == 0, r.stderr
        rows = _rows(out / "scores.csv")
        assert len(rows) == 9
        for row in rows:
            stem = os.path.splitext(os.path.basename(row["path"]))[0]
            mask = np.asarray(Image.open(out / "masks" / f"{stem}.png"))
            assert row["anomalous"] in ("0", "1")
            assert mask.any() == (row["anomalous"] == "1"), (name, row)
        if name == "all-anomalous":
            assert all(r["anomalous"] == "1" for r in rows)
        if name == "all-fine":
            assert all(r["anomalous"] == "0" for r in rows)


def test_titles_tell_close_scores_apart():
    assert visualize.verdict(6.66742, 6.66723)[0] == "DEFECT: score 6.6674 > threshold 6.6672"
    assert visualize.verdict(6.969, 6.667)[0] == "DEFECT: score 6.969 > threshold 6.667"
    assert visualize.verdict(1.0, 1.0)[0].startswith("fine: score 1 <= threshold 1")


# -- a verdict from a plain fit -------------------------------------------------------------------------
def test_a_plain_fit_sets_a_default_threshold_and_says_how(project, tmp_path):
    meta = json.loads((project / "model" / "config.json").read_text())
    rule = meta["thresholds"]["image"]["rule"]
    assert "a fold of 1 of the 6 training images" in rule and "held-out good image scores" in rule
    assert "default thresholds from the training images" in (project / "fit.stdout").read_text()
    out = tmp_path / "pred"
    r = cli_here("predict", "--model", str(project / "model"), str(project / "test"), "--out", str(out), "--quiet",
                 "--no-heatmaps")
    assert r.returncode == 0, r.stderr
    rows = _rows(out / "scores.csv")
    assert all(r["anomalous"] in ("0", "1") and r["normalized_score"] != "" for r in rows)
    record = json.loads((out / "run.json").read_text())
    assert record["thresholds"]["image"]["rule"] == rule
    assert record["counts"] == {"images": 9, "scored": 9, "skipped": 0,
                                "anomalous": sum(r["anomalous"] == "1" for r in rows)}
    assert "scored 9 images" in r.stdout


def test_fit_calibrated_holds_out_a_fold_then_fits_on_all(data):
    model = small_model()
    done = model.fit_calibrated(data["train"], held_out=0.34)
    assert done["held_out"] == 2 and done["images"] == 6
    assert model.num_patches_seen == 6 * 8 * 8  # the model kept is fitted on every image
    assert model.calibration["good_images"]["count"] == 2
    assert model.threshold == done["image_threshold"] and "a fold of 2 of the 6" in model.image_threshold.rule
    alone = small_model().fit(data["train"])
    np.testing.assert_array_equal(np.asarray(alone.bank), np.asarray(model.bank))
    assert small_model().fit_calibrated(data["train"][:1])["held_out"] == 0  # too few to hold any out
    with pytest.raises(ValueError, match="held_out"):
        small_model().fit_calibrated(data["train"], held_out=1.0)


# -- no waiting for compilers ---------------------------------------------------------------------------
def test_help_answers_without_importing_jax():
    code = ("import sys, runpy\nsys.argv = ['patchcore-jax', '--help']\n"
            "try:\n    runpy.run_module('patchcore_jax.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('JAX LOADED' if 'jax' in sys.modules else 'NO JAX')")
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    took = time.perf_counter() - start
    assert r.returncode == 0 and "predict" in r.stdout and r.stdout.strip().endswith("NO JAX"), r.stdout + r.stderr
    assert took < 1.5, f"--help took {took:.2f} s"
    r = subprocess.run([sys.executable, "-c", "import patchcore_jax, sys; assert 'jax' not in sys.modules; "
                        "patchcore_jax.PatchCore; assert 'jax' in sys.modules; print(sorted(patchcore_jax.__all__)[:2])"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_predict_compiles_nothing_after_the_first_call(fitted, data):
    fitted.predict(data["test"][:4])  # the first call compiles
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    logger = logging.getLogger("jax")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    jax.config.update("jax_log_compiles", True)
    try:
        for n in (3, 1, 9, 2, 4):  # short, padded, more than one batch (batch size 4)
            scores, maps = fitted.predict(data["test"][:n])
            assert scores.shape == (n,) and maps.shape == (n, 64, 64)
    finally:
        jax.config.update("jax_log_compiles", False)
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    compiled = [line for line in buf.getvalue().splitlines() if line.startswith("Compiling")]
    assert compiled == []


def test_the_compilation_cache_folder_follows_the_environment(tmp_path):
    home = {"HOME": str(tmp_path)}
    assert console.compilation_cache_dir(home) == str(tmp_path / ".cache" / "patchcore-jax" / "jax")
    assert console.compilation_cache_dir({**home, "XDG_CACHE_HOME": "/c"}) == "/c/patchcore-jax/jax"
    assert console.compilation_cache_dir({**home, "JAX_COMPILATION_CACHE_DIR": "/j"}) == "/j"
    assert console.compilation_cache_dir({**home, console.CACHE_ENV: "/p", "JAX_COMPILATION_CACHE_DIR": "/j"}) == "/p"
    for off in ("0", "off", "no"):
        assert console.compilation_cache_dir({**home, console.CACHE_ENV: off}) is None


def test_the_cli_keeps_compiled_programs_unless_told_not_to(project, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", console.CACHE_ENV)}
    image = str(project / "test" / "000.png")
    env_on = {**env, "XDG_CACHE_HOME": str(tmp_path / "on")}
    r = run("predict", "--model", str(project / "model"), image, "--out", str(tmp_path / "p1"), "--quiet", env=env_on)
    assert r.returncode == 0, r.stderr
    assert len(os.listdir(tmp_path / "on" / "patchcore-jax" / "jax")) > 0
    env_off = {**env, "XDG_CACHE_HOME": str(tmp_path / "off")}
    r = run("predict", "--model", str(project / "model"), image, "--out", str(tmp_path / "p2"), "--quiet",
            "--no-compile-cache", env=env_off)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "off" / "patchcore-jax").exists()


# -- StableHLO export on the plain install ----------------------------------------------------------------
NO_EXTRAS_EXPORT = """
import sys, warnings
class NoExtras:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("onnx", "jax2onnx", "onnxruntime", "onnx_ir", "onnxscript"):
            raise ImportError(f"{name} is not installed (the export extra is absent)")
        return None
sys.meta_path.insert(0, NoExtras())
sys.path.insert(0, sys.argv[2])
from tests.helpers import small_model
from patchcore_jax.data import make_synthetic
from patchcore_jax.export import load_exported
model = small_model().fit(make_synthetic(seed=1, n_train=3, n_test_good=1, n_test_defect=1, size=72, margin=8)["train"])
meta = model.export(sys.argv[1], format="stablehlo")  # verified against the model before it is written
assert meta["verification"]["crops"] > 0
assert load_exported(sys.argv[1]).program == "stablehlo"
assert "flatbuffers" in sys.modules and not any(m.split(".")[0] in ("onnx", "jax2onnx") for m in sys.modules)
print("EXPORTED")
"""


def test_stablehlo_export_needs_no_extra(tmp_path):
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("flatbuffers") for d in deps)  # jax.export's serialiser, declared
    r = subprocess.run([sys.executable, "-c", NO_EXTRAS_EXPORT, str(tmp_path / "m.stablehlo"), str(ROOT)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "EXPORTED" in r.stdout, r.stderr[-3000:]


# -- unreadable files, the run record, names --------------------------------------------------------------
def test_skip_unreadable_scores_the_rest_and_names_what_it_skipped(project, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    good = (project / "test" / "000.png").read_bytes()
    (src / "a.png").write_bytes(good)
    (src / "b.png").write_bytes(good)
    (src / "garbage.png").write_bytes(b"\x89PNG not an image at all")
    (src / "truncated.png").write_bytes(good[: len(good) // 2])  # a good header, half the pixels
    r = cli_here("predict", "--model", str(project / "model"), str(src), "--out", str(tmp_path / "strict"), "--quiet")
    assert r.returncode == 2 and "garbage.png" in r.stderr  # without the option: as before, nothing written
    assert not (tmp_path / "strict").exists()
    out = tmp_path / "skip"
    r = cli_here("predict", "--model", str(project / "model"), str(src), "--out", str(out), "--quiet",
                 "--skip-unreadable")
    assert r.returncode == 3, r.stderr
    assert "garbage.png" in r.stderr and "truncated.png" in r.stderr and "skipped 2 unreadable files" in r.stderr
    assert [os.path.basename(row["path"]) for row in _rows(out / "scores.csv")] == ["a.png", "b.png"]
    record = json.loads((out / "run.json").read_text())
    assert [os.path.basename(s["path"]) for s in record["skipped"]] == ["garbage.png", "truncated.png"]
    assert record["counts"]["skipped"] == 2 and record["counts"]["scored"] == 2 and record["settings"]["skip_unreadable"]


def test_output_names_do_not_double_extensions():
    assert records.output_names(["/d/a/b.png", "/d/c.jpg"]) == ["a/b", "c"]
    assert records.output_names(["/d/x.png", "/d/x.jpg", "/d/y.tif"]) == ["x_png", "x_jpg", "y"]
    names = records.output_names(["/d/x.png", "/d/x.jpg", "/d/x_png.bmp"])
    assert len(set(names)) == 3
    assert records.output_names(["/d/x.png", "/d/x.png"]) == ["x_png", "x_png-2"]  # one file given twice


def test_normalized_scores_are_not_clipped(fitted):
    good = fitted.calibration["good_images"]["image_score_quantiles"]["0.5"]
    t = fitted.threshold
    norm = fitted.normalized_scores([good, t, 2 * t - good, good - (t - good), 10 * t])
    np.testing.assert_allclose(norm[:4], [0.0, 0.5, 1.0, -0.5], atol=1e-9)
    assert norm[4] > 1.0


# -- logs -------------------------------------------------------------------------------------------------
class _Pipe(io.StringIO):
    def isatty(self):
        return False


def test_progress_is_plain_lines_when_not_a_terminal():
    stream = _Pipe()
    bars = console.ProgressBars(stream, every=3600)
    for done in range(1, 6):
        bars("scoring", done, 5)
    bars("greedy coreset", 1, None)
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text
    assert text.splitlines() == ["scoring: 1/5 images", "scoring: 5/5 images", "greedy coreset: 1 step"]
    assert console.plural(1, "image") == "1 image" and console.plural(2, "image") == "2 images"


def test_an_empty_folder_is_named_by_the_library(fitted, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="expected at least one test image in .*empty"):
        fitted.predict(str(tmp_path / "empty"))


# -- --validation in MVTec's layout; evaluate shows every defect type ----------------------------------------
def test_validation_takes_the_mvtec_layout_and_refuses_what_it_cannot_read(tmp_path):
    from patchcore_jax._src.io.data.datasets import labelled_folder, validation_layout
    from tests import dataset_trees

    root = tmp_path / "mvtec"
    dataset_trees.make_mvtec(str(root))
    bottle = root / "bottle"
    for given in (bottle, bottle / "test"):  # the category folder, or its test/ beside ground_truth/
        test, gt = validation_layout(str(given))
        assert test == str(bottle / "test") and gt == str(bottle / "ground_truth")
        paths, labels, masks = labelled_folder(str(given))
        assert len(paths) == 5 and labels.sum() == 3 and all((m is None) == (l == 0) for m, l in zip(masks, labels))
    model = tmp_path / "model"
    r = run("fit", "--train", str(bottle / "train"), "--out", str(model), "--validation", str(bottle), *CLI_SMALL)
    assert r.returncode == 0, r.stderr
    assert f"masks from {bottle / 'ground_truth'}" in r.stdout and "pixel threshold" in r.stdout
    meta = json.loads((model / "config.json").read_text())
    assert meta["thresholds"]["pixel"]["rule"].startswith("F1-optimal over the pixels")
    (bottle / "ground_truth" / "scratch" / "001_mask.png").unlink()
    r = cli_here("fit", "--train", str(bottle / "train"), "--out", str(tmp_path / "m2"), "--validation", str(bottle),
                 *CLI_SMALL)
    assert r.returncode == 2 and "001_mask.png" in r.stderr and r.stderr.count("\n") == 1
    (bottle / "ground_truth" / "scratch" / "001_mask.png").write_bytes(b"not a png")
    r = cli_here("fit", "--train", str(bottle / "train"), "--out", str(tmp_path / "m3"), "--validation",
                 str(bottle / "test"), *CLI_SMALL)
    assert r.returncode == 2 and "001_mask.png" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "m2").exists() and not (tmp_path / "m3").exists()


def test_evaluate_draws_every_defect_type_writes_scores_and_saves_models(tmp_path, capsys):
    from patchcore_jax._src.app import cli
    from tests import dataset_trees

    root = tmp_path / "mvtec"
    dataset_trees.make_mvtec(str(root))
    out = tmp_path / "out"
    code = cli.main(["evaluate", "--dataset", "mvtec", "--root", str(root), "--out", str(out), "--categories",
                     "bottle", "--heatmaps", "1", "--save-models", *CLI_SMALL])
    assert code == 0, capsys.readouterr().err
    panels = sorted(p.name for p in (out / "heatmaps" / "bottle").rglob("*.png"))
    kinds = sorted({p.parent.name for p in (out / "heatmaps" / "bottle").rglob("*.png")})
    assert kinds == ["good", "scratch", "spot"] and len(panels) == 3
    rows = _rows(out / "scores.csv")
    assert len(rows) == 5 and {r["kind"] for r in rows} == {"good", "scratch", "spot"}
    assert all(r["category"] == "bottle" and r["anomalous"] in ("0", "1") for r in rows)
    assert (out / "models" / "bottle" / "config.json").is_file()
    from patchcore_jax import load

    model = load(out / "models" / "bottle")
    assert model.threshold is not None


def test_the_random_weights_note_names_the_backbone_in_use():
    from patchcore_jax import PatchCoreConfig

    note = console.random_backbone_note([PatchCoreConfig(backbone="resnet18")])
    assert "RANDOMLY initialised" in note and "--weights r18" in note and "wide_resnet50_2" not in note
