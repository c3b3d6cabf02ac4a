"""Results a person can act on: calibration and thresholds stored in the model, readable panels with
fixed colours, F1-optimal thresholds, maps in the original frame, mask-less evaluation, weights by
name from the Hugging Face cache (never the network)."""

import csv
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from hypothesis import given, strategies as st
from PIL import Image

from patchcore_jax._src.app import cli
from patchcore_jax._src.io import hub
from patchcore_jax._src.stages import metrics
from patchcore_jax._src.model import preprocess
from patchcore_jax._src.app import visualize
from patchcore_jax._src.model import weights
from patchcore_jax._src.model.backbone import build
from patchcore_jax.data import make_synthetic
from patchcore_jax._src.api.patchcore import PatchCore
from tests import dataset_trees
from tests.helpers import CLI_SMALL, cli_here, small_model


@pytest.fixture(scope="module")
def data():
    return make_synthetic(seed=5, n_train=10, n_test_good=3, n_test_defect=6, size=96, margin=16)


@pytest.fixture(scope="module")
def calibrated(data):
    model = small_model().fit(data["train"][:7])
    model.calibrate(data["train"][7:])
    return model


# -- metrics ------------------------------------------------------------------------------------------
@given(labels=st.lists(st.booleans(), min_size=2, max_size=40).filter(lambda l: any(l)),
       seed=st.integers(0, 2**16), ties=st.booleans())
def test_f1_threshold_is_the_best_cut(labels, seed, ties):
    labels = np.array(labels)
    scores = np.random.default_rng(seed).normal(size=len(labels))
    if ties:
        scores = np.round(scores, 0)
    best = metrics.f1_optimal_threshold(labels, scores)
    brute = max(metrics.rates_at(labels, scores, t)["f1"] for t in np.concatenate([scores - 1e-9, [scores.max()]]))
    assert best["f1"] == pytest.approx(brute, abs=1e-12)
    again = metrics.rates_at(labels, scores, best["threshold"])  # `score > threshold` gives the same set
    for key in ("precision", "recall", "f1"):
        assert again[key] == pytest.approx(best[key], abs=1e-12)


@given(labels=st.lists(st.booleans(), min_size=2, max_size=40).filter(lambda l: 0 < sum(l) < len(l)),
       seed=st.integers(0, 2**16))
def test_roc_curve_area_is_the_auroc(labels, seed):
    scores = np.round(np.random.default_rng(seed).normal(size=len(labels)), 1)  # with ties
    fpr, tpr = metrics.roc_curve(labels, scores)
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0 and np.all(np.diff(fpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(metrics.image_auroc(labels, scores), abs=1e-12)


# -- calibration and thresholds -----------------------------------------------------------------------
def test_calibration_fixes_thresholds_and_colours(calibrated, data, tmp_path):
    held = data["train"][7:]
    scores, maps = calibrated.predict(held)
    assert calibrated.threshold == pytest.approx(scores.max())  # quantile 1.0: every held-out good passes
    assert calibrated.pixel_threshold.value == pytest.approx(maps.max())
    assert not calibrated.classify(scores).any()
    assert "held-out good" in calibrated.image_threshold.rule
    good = calibrated.calibration["good_images"]
    assert good["count"] == 3 and good["image_score_quantiles"]["1.0"] == pytest.approx(scores.max())
    median, t = good["image_score_quantiles"]["0.5"], calibrated.threshold
    norm = calibrated.normalized_scores([median, t, 2 * t - median])
    np.testing.assert_allclose(norm, [0.0, 0.5, 1.0])  # not clipped: see test_first_hour
    low, mid, high = calibrated.color_scale()
    assert mid == calibrated.pixel_threshold.value and high - mid == pytest.approx(mid - low)
    calibrated.save(tmp_path / "m")
    loaded = PatchCore.load(tmp_path / "m", progress=False)
    assert loaded.color_scale() == calibrated.color_scale()
    assert loaded.image_threshold == calibrated.image_threshold and loaded.pixel_threshold == calibrated.pixel_threshold
    assert loaded.calibration == calibrated.calibration


def test_f1_calibration_from_a_labelled_set(data):
    model = small_model().fit(data["train"][:7])
    report = model.calibrate_f1(data["test"], data["labels"], list(data["masks"]))
    assert set(report) == {"images", "image", "pixel"}
    assert model.threshold == report["image"]["threshold"] and "F1-optimal" in model.image_threshold.rule
    assert model.pixel_threshold.value == report["pixel"]["threshold"]
    scores, _ = model.predict(data["test"])
    got = metrics.rates_at(data["labels"], scores, model.threshold)
    assert got["f1"] == pytest.approx(report["image"]["f1"])
    with pytest.raises(ValueError, match="one label per image"):
        model.calibrate_f1(data["test"], data["labels"][:2])


def test_panels_read_fine_and_defect_with_their_numbers(calibrated, data, tmp_path, monkeypatch):
    titles = []
    original = visualize.draw_panel

    def spy(path, **kw):
        titles.append(visualize.verdict(kw["score"], kw["image_threshold"])[0])
        return original(path, **kw)

    held = data["train"][7:]
    missing = data["test"][data["kinds"] == "missing"]
    scores = {}
    for name, image in [("held", held[0]), ("missing", missing[0])]:
        (pred,) = calibrated.predict_iter(image[None])
        scores[name] = pred.score
        monkeypatch.setattr(visualize, "draw_panel", spy)
        visualize.draw_panel(tmp_path / f"{name}.png", image=pred.crop, amap=pred.anomaly_map,
                             scale=calibrated.color_scale(), score=pred.score, image_threshold=calibrated.threshold,
                             name=name)
        assert Image.open(tmp_path / f"{name}.png").size[0] > 400
    t = calibrated.threshold
    assert titles[0] == f"fine: score {scores['held']:.4g} <= threshold {t:.4g}"
    assert titles[1] == f"DEFECT: score {scores['missing']:.4g} > threshold {t:.4g}"


def test_the_same_model_gives_the_same_colours_in_two_runs(calibrated, data, tmp_path):
    calibrated.save(tmp_path / "model")
    (tmp_path / "in").mkdir()
    for i, image in enumerate(data["test"][:3]):
        Image.fromarray(image).save(tmp_path / "in" / f"{i}.png")
    outs = []
    for run in range(2):
        out = tmp_path / f"out{run}"
        r = subprocess.run([sys.executable, "-m", "patchcore_jax.cli", "predict", "--model", str(tmp_path / "model"),
                            str(tmp_path / "in"), "--out", str(out), "--quiet", "--save-maps", "--save-masks"],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        outs.append(out)
    for rel in ("heatmaps/0.png", "heatmaps/2.png", "masks/1.png", "maps/1.npy"):
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel
    rows = list(csv.DictReader(open(outs[0] / "scores.csv")))
    assert [r["anomalous"] for r in rows] and all(np.isfinite(float(r["normalized_score"])) for r in rows)
    amap = np.load(outs[0] / "maps" / "1.npy")
    mask = np.asarray(Image.open(outs[0] / "masks" / "1.png"))
    assert amap.dtype == np.float32 and amap.shape == (64, 64)
    # The one decision rule: the saved mask is the region `decide` gives (empty for an image judged fine).
    np.testing.assert_array_equal(mask == 255, calibrated.decide(float(rows[1]["score"]), amap).region)
    assert (mask == 255).any() == (rows[1]["anomalous"] == "1")


# -- field of view ------------------------------------------------------------------------------------
@given(h=st.integers(20, 200), w=st.integers(20, 200), squash=st.booleans())
def test_maps_go_back_into_the_original_frame(h, w, squash):
    geometry = "squash" if squash else "center_crop"
    amap = np.random.default_rng(h * w).random((64, 64)).astype(np.float32)
    frame = preprocess.map_to_frame(amap, (h, w), resize=72, crop=64, geometry=geometry)
    assert frame.shape == (h, w) and frame.dtype == np.float32
    inspected = np.isfinite(frame)
    if squash:
        assert inspected.all()
    else:  # the inspected window is one rectangle: the crop's 64 pixels scaled back, to a pixel
        rows, cols = inspected.any(axis=1), inspected.any(axis=0)
        assert (inspected == np.outer(rows, cols)).all()
        rh, rw = preprocess.resized_shape(h, w, 72)
        assert abs(rows.sum() - 64 * h / rh) <= 1 and abs(cols.sum() - 64 * w / rw) <= 1
    assert np.nanmin(frame) >= amap.min() - 1e-6 and np.nanmax(frame) <= amap.max() + 1e-6


def test_predict_in_the_original_frame(calibrated, data):
    wide = np.concatenate([data["test"][0], data["test"][1]], axis=1)  # 96 x 192: the crop misses the sides
    scores, maps = calibrated.predict([wide, data["test"][2]], frame="original")
    assert [m.shape for m in maps] == [(96, 192), (96, 96)]
    # resized to 72 x 144, cropped at columns 40..104: columns 53..138 of the original, rows 5..90
    assert np.isnan(maps[0][:, :50]).all() and np.isnan(maps[0][:, 142:]).all()
    assert np.isfinite(maps[0][10:85, 60:130]).all()
    crop_scores, _ = calibrated.predict([wide, data["test"][2]])
    np.testing.assert_array_equal(scores, crop_scores)


# -- evaluate without masks ---------------------------------------------------------------------------
def test_evaluate_runs_on_a_maskless_tree(tmp_path, capsys):
    import shutil

    root = tmp_path / "mvtec"
    dataset_trees.make_mvtec(str(root))
    shutil.rmtree(root / "bottle" / "ground_truth")
    out = tmp_path / "out"
    code = cli.main(["evaluate", "--dataset", "mvtec", "--root", str(root), "--out", str(out), "--categories",
                     "bottle", "grid", "--heatmaps", "2", *CLI_SMALL])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "results.json").read_text())
    bottle, grid = report["categories"]["bottle"], report["categories"]["grid"]
    assert bottle["pixel_auroc"] is None and bottle["au_pro"] is None and bottle["masks"].startswith("not available")
    assert bottle["image_auroc"] is not None and bottle["image_threshold_f1"]["f1"] > 0
    assert bottle["pixel_threshold_f1"] is None
    assert grid["pixel_auroc"] is not None and grid["pixel_threshold_f1"] is not None
    assert Image.open(out / "summary.png").size[0] > 600
    row = next(csv.DictReader(open(out / "results.csv")))
    assert row["category"] == "bottle" and row["pixel_auroc"] == "" and float(row["image_f1"]) > 0
    assert "pixel AUROC n/a" in capsys.readouterr().out


# -- weights by name ----------------------------------------------------------------------------------
def _state_bytes(seed=0):
    from safetensors.numpy import save

    return save(weights.state_dict_of(build("resnet18", ("layer2", "layer3"), seed=seed)))


def _populate(cache, repo, data):
    sha = hashlib.sha256(data).hexdigest()
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "blobs").mkdir(parents=True)
    (base / "blobs" / sha).write_bytes(data)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text("c" * 40)
    (base / "snapshots" / ("c" * 40)).mkdir(parents=True)
    os.symlink(f"../../blobs/{sha}", base / "snapshots" / ("c" * 40) / "model.safetensors")
    return base / "blobs" / sha


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # never the network, even if offline were ignored
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "hub").mkdir()
    return tmp_path / "hub"


def test_named_weights_load_from_the_cache_without_network(offline, data):
    blob = _populate(offline, "timm/resnet18.tv_in1k", _state_bytes())
    for name in ("timm/resnet18.tv_in1k", "r18"):
        model = small_model(weights=name).fit(data["train"][:3])
        assert model.weights_sha256 == blob.name and model.config.weights == name
    blob.write_bytes(_state_bytes(seed=1))  # damaged: no longer its sha256
    with pytest.raises(ValueError, match="do not match their sha256"):
        hub.resolve("r18")


def test_an_empty_cache_offline_fails_in_one_line(offline, tmp_path):
    (tmp_path / "train").mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "train" / "a.png")
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "patchcore_jax.cli", "fit", "--train", str(tmp_path / "train"), "--out",
                        str(tmp_path / "m"), "--weights", "wrn50"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "timm/wide_resnet50_2.tv_in1k" in r.stderr and "hf download" in r.stderr
    assert not (tmp_path / "m").exists()


def test_named_weights_download_once_from_a_local_hub(tmp_path, monkeypatch, data):
    """A stand-in for the Hub on 127.0.0.1: the first use downloads into the cache, later ones read it."""
    payload = _state_bytes()
    sha = hashlib.sha256(payload).hexdigest()
    served = {"body": payload}
    gets = []

    class Hub(http.server.BaseHTTPRequestHandler):
        def _headers(self):
            if not self.path.endswith("/timm/resnet18.tv_in1k/resolve/main/model.safetensors"):
                self.send_response(404)
                self.end_headers()
                return False
            self.send_response(200)
            for key, value in (("Content-Length", len(served["body"])), ("ETag", f'"{sha}"'), ("X-Repo-Commit", "d" * 40),
                               ("X-Linked-Etag", f'"{sha}"'), ("X-Linked-Size", len(served["body"]))):
                self.send_header(key, str(value))
            self.end_headers()
            return True

        def do_HEAD(self):
            self._headers()

        def do_GET(self):
            if self._headers():  # the weights file; other calls the Hub client may make are not downloads
                gets.append(self.path)
                self.wfile.write(served["body"])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # huggingface_hub reads it once, at import
        path = hub.resolve("r18")
        assert open(path, "rb").read() == payload and len(gets) == 1
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert hub.resolve("timm/resnet18.tv_in1k") == path and len(gets) == 1  # from the cache
        # A cache copied without links (cp -rL, zip, a Windows copy) still verifies against its blobs/;
        # a damaged copy, or one without blobs/, is refused, naming the way out.
        import shutil

        copied = tmp_path / "copied"
        shutil.copytree(tmp_path / "hub", copied, symlinks=False)
        copied_file = copied / os.path.relpath(path, tmp_path / "hub")
        assert not os.path.islink(copied_file)
        hub.verify(str(copied_file), "r18")
        copied_file.write_bytes(payload[:-1] + b"\1")
        with pytest.raises(ValueError, match="match no sha256 recorded"):
            hub.verify(str(copied_file), "r18")
        shutil.rmtree(copied / "models--timm--resnet18.tv_in1k" / "blobs")
        with pytest.raises(ValueError, match="pass the file itself as --weights FILE"):
            hub.verify(str(copied_file), "r18")
        # A transfer that does not match the sha256 the Hub announced is refused, by name.
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub2"))
        monkeypatch.delenv("HF_HUB_OFFLINE")
        served["body"] = payload[:-4] + b"\0\0\0\0"
        with pytest.raises(ValueError, match="do not match their sha256"):
            hub.resolve("r18")
    finally:
        server.shutdown()


def test_fit_with_a_validation_set_and_predict_in_the_full_frame(tmp_path):
    import shutil

    root = tmp_path / "mvtec"
    dataset_trees.make_mvtec(str(root))
    val = tmp_path / "val"
    shutil.copytree(root / "bottle" / "test", val)
    shutil.copytree(root / "bottle" / "ground_truth", val / "ground_truth")
    model = tmp_path / "model"
    r = cli_here("fit", "--train", str(root / "bottle" / "train"), "--out", str(model), "--validation", str(val),
                 *CLI_SMALL)
    assert r.returncode == 0, r.stderr
    assert "image threshold" in r.stdout and "pixel threshold" in r.stdout and "F1-optimal on 5 validation" in r.stdout
    meta = json.loads((model / "config.json").read_text())
    assert meta["thresholds"]["image"]["rule"].startswith("F1-optimal on a validation set of 5 images")
    assert meta["thresholds"]["pixel"]["rule"].startswith("F1-optimal over the pixels")
    wide = tmp_path / "wide"
    wide.mkdir()
    Image.fromarray(np.zeros((60, 150, 3), np.uint8) + 128).save(wide / "strip.png")
    out = tmp_path / "pred"
    r = cli_here("predict", "--model", str(model), str(wide), "--out", str(out), "--full-frame", "--save-maps",
                 "--save-masks", "--quiet")
    assert r.returncode == 0, r.stderr
    amap = np.load(out / "maps" / "strip.npy")
    assert amap.shape == (60, 150) and np.isnan(amap[:, :20]).all() and np.isfinite(amap[5:55, 60:90]).all()
    assert np.asarray(Image.open(out / "masks" / "strip.png")).shape == (60, 150)
    assert Image.open(out / "heatmaps" / "strip.png").size[0] > 600
