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

SMALL = ["--backbone", "resnet18", "--resize", "72", "--crop", "64", "--neighbors", "3", "--quiet"]


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "patchcore_jax.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_demo_writes_results_and_heatmaps(tmp_path):
    out = tmp_path / "demo"
    r = run("demo", "--out", str(out), "--train", "6", "--test-good", "3", "--test-defect", "4", *SMALL)
    assert r.returncode == 0, r.stderr
    assert "RANDOMLY initialised" in r.stdout
    for name in ("image AUROC", "pixel AUROC", "AU-PRO", "JAX vs float64 NumPy reference"):
        assert name in r.stdout
    results = json.loads((out / "results.json").read_text())
    assert set(results["metrics"]) == {"image_auroc", "pixel_auroc", "au_pro"}
    assert all(0.0 <= v <= 1.0 for v in results["metrics"].values())
    assert results["reference_agreement"]["image_scores_max_rel_diff"] < 1e-4
    assert results["pretrained_backbone"] is False
    pngs = os.listdir(out / "heatmaps")
    assert pngs and all(p.endswith(".png") for p in pngs)
    assert Image.open(out / "heatmaps" / pngs[0]).size == (64 * 3 + 8, 64)


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


def test_bad_usage_and_bad_input_exit_2_with_one_line(tmp_path):
    r = run("fit")
    assert r.returncode == 2 and "--train" in r.stderr
    r = run("predict", "--model", str(tmp_path / "absent"), str(tmp_path), "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "absent" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "broken.png").write_bytes(b"\x89PNG not really")
    r = run("fit", "--train", str(tmp_path / "train"), "--out", str(tmp_path / "m"), *SMALL)
    assert r.returncode == 2 and "broken.png" in r.stderr and "Traceback" not in r.stderr
    r = run("demo", "--coreset", "1.5")
    assert r.returncode == 2 and "coreset_fraction" in r.stderr
    r = run("convert-weights", "in.pth", "out.bin")
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
    for cmd in ("demo", "fit", "predict", "convert-weights", "evaluate"):
        assert cmd in r.stdout
