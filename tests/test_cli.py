import csv
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from patchcore_jax.data import make_synthetic

from tests.helpers import CLI_SMALL as SMALL, cli_here


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "patchcore_jax.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_demo_writes_results_and_heatmaps(tmp_path):
    out = tmp_path / "demo"
    r = run("demo", "--out", str(out), "--train", "6", "--test-good", "3", "--test-defect", "4", *SMALL)
    assert r.returncode == 0, r.stderr
    assert "RANDOMLY initialised" in r.stdout
    assert "thresholds from 1 held-out good image:" in r.stdout  # a fifth of the training images
    for name in ("image AUROC", "pixel AUROC", "AU-PRO", "JAX vs float64 NumPy reference"):
        assert name in r.stdout
    results = json.loads((out / "results.json").read_text())
    assert set(results["metrics"]) == {"image_auroc", "pixel_auroc", "au_pro"}
    assert all(0.0 <= v <= 1.0 for v in results["metrics"].values())
    assert results["reference_agreement"]["image_scores_max_rel_diff"] < 1e-4
    assert results["pretrained_backbone"] is False
    pngs = os.listdir(out / "heatmaps")
    assert pngs and all(p.endswith(".png") for p in pngs)
    assert Image.open(out / "heatmaps" / pngs[0]).size[0] > 3 * 64  # image | overlay | ground truth, colour bar


def _write_pngs(folder, images):
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:03d}.png")


def test_fit_then_predict_through_folders(tmp_path):
    data = make_synthetic(seed=2, n_train=6, n_test_good=2, n_test_defect=3, size=80, margin=16)
    _write_pngs(tmp_path / "train", data["train"][:4])
    _write_pngs(tmp_path / "held", data["train"][4:])
    _write_pngs(tmp_path / "test", data["test"])
    model = tmp_path / "model"
    r = run("fit", "--train", str(tmp_path / "train"), "--out", str(model), "--threshold-from", str(tmp_path / "held"), *SMALL)
    assert r.returncode == 0, r.stderr
    assert "threshold" in r.stdout
    r = run("predict", "--model", str(model), str(tmp_path / "test"), "--out", str(tmp_path / "pred"), "--quiet")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(tmp_path / "pred" / "scores.csv")))
    assert len(rows) == 5 and all(float(r["score"]) >= 0 for r in rows)
    assert all(r["anomalous"] in ("0", "1") for r in rows)
    assert len(os.listdir(tmp_path / "pred" / "heatmaps")) == 5
    assert [r["path"] for r in rows] == [str(tmp_path / "test" / f"{i:03d}.png") for i in range(5)]
    assert [r["heatmap"] for r in rows] == [f"heatmaps/{i:03d}.png" for i in range(5)]  # no doubled extension


def test_bad_usage_and_bad_input_exit_2_with_one_line(tmp_path):
    r = cli_here("fit")
    assert r.returncode == 2 and "--train" in r.stderr
    r = cli_here("predict", "--model", str(tmp_path / "absent"), str(tmp_path), "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "absent" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "broken.png").write_bytes(b"\x89PNG not really")
    r = cli_here("fit", "--train", str(tmp_path / "train"), "--out", str(tmp_path / "m"), *SMALL)
    assert r.returncode == 2 and "broken.png" in r.stderr and "Traceback" not in r.stderr
    r = cli_here("demo", "--coreset", "1.5")
    assert r.returncode == 2 and "--coreset: expected a number in (0, 1], got 1.5" in r.stderr
    r = cli_here("convert-weights", "in.pth", "out.bin")
    assert r.returncode == 2 and "safetensors" in r.stderr


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_convert_weights_round_trip(tmp_path):
    import torch

    state = {"conv1.weight": torch.randn(4, 3, 7, 7), "bn1.running_var": torch.rand(4)}
    torch.save(state, tmp_path / "w.pth")
    r = run("convert-weights", str(tmp_path / "w.pth"), str(tmp_path / "w.safetensors"))
    assert r.returncode == 0, r.stderr
    from safetensors.numpy import load_file

    got = load_file(str(tmp_path / "w.safetensors"))
    np.testing.assert_array_equal(got["conv1.weight"], state["conv1.weight"].numpy())


def test_help_texts():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("demo", "fit", "predict", "convert-weights", "evaluate", "export"):
        assert cmd in r.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A user's project folder: training images, test images, a README; and a model fitted on them."""
    root = tmp_path_factory.mktemp("project")
    data = make_synthetic(seed=4, n_train=4, n_test_good=2, n_test_defect=2, size=80, margin=16)
    _write_pngs(root / "train", data["train"])
    _write_pngs(root / "test", data["test"])
    (root / "README.md").write_text("my project")
    r = run("fit", "--train", str(root / "train"), "--out", str(root / "model"), *SMALL)
    assert r.returncode == 0, r.stderr
    return root


def _tree(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def test_out_that_is_not_ours_is_refused_before_any_work(project, tmp_path):
    before = _tree(project)
    r = cli_here("fit", "--train", "train", "--out", ".", *SMALL, cwd=project)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "is not a patchcore-jax model" in r.stderr
    assert _tree(project) == before and (project / "README.md").read_text() == "my project"
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "config.json").write_text("{}")  # the old bug: any config.json made a folder replaceable
    (notes / "scores.csv").write_text("mine")
    for cmd in (["fit", "--train", str(project / "train"), *SMALL],
                ["predict", "--model", str(project / "model"), str(project / "test")],
                ["demo", "--train", "1", *SMALL]):
        r = cli_here(*cmd[:1], "--out", str(notes), *cmd[1:])
        assert r.returncode == 2, (cmd, r.stderr)
        assert "notes" in r.stderr and r.stderr.count("\n") == 1
    assert sorted(os.listdir(notes)) == ["config.json", "scores.csv"] and (notes / "scores.csv").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    r = cli_here("predict", "--model", str(project / "model"), str(project / "test"), "--out", str(tmp_path / "file"))
    assert r.returncode == 2 and "file: exists and is not a folder" in r.stderr


def test_arguments_are_checked_before_any_work(project, tmp_path):
    t = str(project / "train")
    cases = [
        (["fit", "--train", t, "--out", str(tmp_path / "m1"), "--quantile", "2"], "--quantile 2.0"),
        (["fit", "--train", t, "--out", str(tmp_path / "m2"), "--threshold-from", str(tmp_path / "nowhere")], "nowhere"),
        (["fit", "--train", t, "--out", str(tmp_path / "m3"), "--neighbors", "500"], "--neighbors 500"),
        (["fit", "--train", t, "--out", str(tmp_path / "m4"), "--seed", "100000000000000000000"], "--seed"),
        (["fit", "--train", t, "--out", str(tmp_path / "m5"), "--seed", "1e20"], "--seed: invalid int value: '1e20'"),
        (["fit", "--train", t, "--out", str(tmp_path / "m6"), "--weights", str(tmp_path / "w.pth")], "w.pth: no such file"),
        (["fit", "--train", t, "--out", str(tmp_path / "m7"), "--resize", "1000000"], "--resize: expected at most"),
        (["demo", "--train", "0", "--out", str(tmp_path / "d")], "--train 0: expected at least 1"),
        (["predict", "--model", str(project / "model"), t, "--out", str(tmp_path / "p"), "--threshold", "nan"], "--threshold nan"),
    ]
    for args, message in cases:
        pairs = [SMALL[i:i + 2] for i in range(0, len(SMALL) - 1, 2)]  # (option, value), then --quiet
        small = [a for pair in pairs if pair[0] not in args for a in pair] + ["--quiet"]
        r = cli_here(*args, *(small if args[0] != "predict" else ["--quiet"]))
        assert r.returncode == 2, (args[5:], r.stderr)
        assert message in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, (args, r.stderr)
    assert os.listdir(tmp_path) == []  # nothing was written for any of them


def test_debug_anywhere_and_version():
    r = run("demo", "--out", "x", "--train", "0", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr  # --debug after the subcommand is honoured
    r = run("--version")
    from patchcore_jax import __version__

    assert r.returncode == 0 and r.stdout.strip() == f"patchcore-jax {__version__}"


def test_predict_streams_mirrors_names_and_never_reads_its_own_output(project, tmp_path):
    from PIL import Image

    src = tmp_path / "in"
    img = np.asarray(Image.open(project / "test" / "000.png"))
    (src / "a").mkdir(parents=True)
    Image.fromarray(img).save(src / "a" / "b.png")
    Image.fromarray(img).save(src / "a_b.png")
    Image.fromarray(img).save(src / "x.png")
    Image.fromarray(img).save(src / "x.jpg")
    (src / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (src / "._x.png").write_bytes(b"\0\5\26\7")
    os.mkfifo(src / "fifo.png")
    weird = os.path.join(os.fsencode(src), b"caf\xe9.png")
    Image.fromarray(img).save(weird)
    out = src / "pred"  # inside the input folder
    for _ in range(2):
        r = run("predict", "--model", str(project / "model"), str(src), "--out", str(out), "--quiet")
        assert r.returncode == 0, r.stderr
        with open(out / "scores.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        names = [os.path.relpath(r["path"], src) for r in rows]
        assert names == ["a/b.png", "a_b.png", "caf\\xe9.png", "x.jpg", "x.png"]  # output not read back
        stems = ["a/b", "a_b", "caf\\xe9", "x_jpg", "x_png"]  # x.png and x.jpg keep their suffixes
        assert sorted(r["heatmap"] for r in rows) == sorted(f"heatmaps/{n}.png" for n in stems)
    heatmaps = _tree(out / "heatmaps")
    assert sorted(heatmaps) == ["a/b.png", "a_b.png", os.fsdecode(b"caf\xe9.png"), "x_jpg.png", "x_png.png"]
    # A rerun on fewer images leaves no stale heatmap of the earlier run, and keeps the user's own file.
    (out / "my-note.txt").write_text("mine")
    r = run("predict", "--model", str(project / "model"), str(src / "x.png"), "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert _tree(out) == sorted([".patchcore-jax-output.json", "heatmaps/x.png", "my-note.txt", "run.json",
                                 "scores.csv"])


KILLED_PREDICT = """
import os, sys
from patchcore_jax import cli, model
calls = {"n": 0}
original = model.PatchCore.launch
def launch_then_die(self, crops):
    calls["n"] += 1
    fetch = original(self, crops)
    if calls["n"] == 2:   # as kill -9, in the middle of the run: while the second batch is scored
        return lambda: os._exit(137)
    return fetch
model.PatchCore.launch = launch_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_killed_predict_leaves_the_rows_it_scored(project, tmp_path):
    files = [str(project / "test" / f"{i:03d}.png") for i in range(4)] * 3  # 12 images, batch size 4
    r = subprocess.run([sys.executable, "-c", KILLED_PREDICT, "predict", "--model", str(project / "model"), *files,
                        "--out", str(tmp_path / "o"), "--quiet"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 137, r.stderr
    with open(tmp_path / "o" / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == files[:4]  # the first batch, complete and in order
    assert all(float(r["score"]) >= 0 for r in rows)


def test_hostile_files_are_named_before_any_work(project, tmp_path):
    from PIL import Image

    from patchcore_jax._src.model import weights
    from patchcore_jax._src.model.backbone import build

    cases = {
        # A tiny 1 x 20000 file: at resize 72 it would become 72 x 1440000 pixels.
        "line.png": lambda p: Image.fromarray(np.zeros((1, 20000), np.uint8)).save(p),
        "huge.png": lambda p: Image.new("1", (12000, 12000)).save(p),  # 17 KB file, 144 M pixels
        "hdr.tif": lambda p: Image.fromarray(np.full((8, 8), 3.0, np.float32)).save(p),
    }
    for name, make in cases.items():
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        Image.fromarray(np.zeros((80, 80, 3), np.uint8)).save(folder / "ok.png")
        make(folder / name)
        r = cli_here("fit", "--train", str(folder), "--out", str(tmp_path / f"m-{name}"), *SMALL)
        assert r.returncode == 2 and name in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert not (tmp_path / f"m-{name}").exists()
    state = weights.state_dict_of(build("resnet18", ("layer2", "layer3")))
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = np.nan
    weights.save_safetensors(state, tmp_path / "nan.safetensors")
    r = cli_here("fit", "--train", str(project / "train"), "--out", str(tmp_path / "m-nan"), "--weights",
                 str(tmp_path / "nan.safetensors"), *SMALL)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "nan.safetensors" in r.stderr and "NaN or infinite values in 1 tensors: layer2.0.conv1.weight" in r.stderr
