"""Ensembles: members with their own banks, two combination rules, one sealed folder, the CLI."""

import json
import os
import warnings

import numpy as np
import pytest

import patchcore_jax

from patchcore_jax._src.app import cli
from patchcore_jax._src.io import model_files as persistence
from patchcore_jax._src.model.config import PatchCoreConfig
from patchcore_jax.data import make_synthetic
from patchcore_jax._src.api.ensemble import PatchCoreEnsemble, combine_over_set
from patchcore_jax._src.api.patchcore import PatchCore
from tests import dataset_trees

BASE = dict(resize=72, crop=64, pretrain_dim=64, target_dim=64, num_neighbors=3, batch_size=4)
R18 = PatchCoreConfig(backbone="resnet18", **BASE)
DN121 = PatchCoreConfig(backbone="densenet121", layers=("denseblock1", "denseblock2"), **BASE)


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def data():
    return make_synthetic(seed=6, n_train=6, n_test_good=3, n_test_defect=5, size=80, margin=16)


@pytest.fixture(scope="module")
def pair(data):
    return quiet(PatchCoreEnsemble, [R18, DN121], progress=False).fit(data["train"])


def test_an_ensemble_of_one_ranks_exactly_as_the_single_model(data):
    single = quiet(PatchCore, R18, progress=False).fit(data["train"])
    one = quiet(PatchCoreEnsemble, [R18], progress=False).fit(data["train"])
    want, want_maps = single.predict(data["test"])
    got, got_maps = one.predict(data["test"])
    np.testing.assert_array_equal(np.argsort(got, kind="stable"), np.argsort(want, kind="stable"))
    q = single.calibration["fit"]["patch_score_quantiles"]
    np.testing.assert_allclose(got, (want - q["0.5"]) / (q["1.0"] - q["0.5"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_maps, (want_maps - q["0.5"]) / (q["1.0"] - q["0.5"]), rtol=1e-5, atol=1e-6)
    over_set, maps_over_set = combine_over_set([want], [want_maps])  # the evaluation's rule
    np.testing.assert_array_equal(np.argsort(over_set, kind="stable"), np.argsort(want, kind="stable"))
    assert over_set.min() == 0.0 and over_set.max() == 1.0 and maps_over_set.min() == 0.0


def test_a_single_image_score_does_not_depend_on_the_others(pair, data):
    together, _ = pair.predict(data["test"])
    for i in (0, 4):
        alone, _ = pair.predict(data["test"][i:i + 1])
        np.testing.assert_array_equal(alone, together[i:i + 1])
    assert len(pair.members) == 2 and pair.members[1].bank.shape[1] == 64
    assert pair.color_scale()[0] == 0.0 and pair.pixel_threshold.value == 1.0


def test_members_must_see_the_same_crops():
    with pytest.raises(ValueError, match=r"configs\[1\]\.crop: members must see the same crops"):
        quiet(PatchCoreEnsemble, [R18, R18.replace(crop=48)])
    with pytest.raises(ValueError, match="configs"):
        PatchCoreEnsemble([])


def test_saved_and_loaded_as_one_sealed_folder(pair, data, tmp_path):
    pair.calibrate(data["train"][-2:])
    pair.save(tmp_path / "ens")
    names = sorted(os.path.relpath(os.path.join(d, f), tmp_path / "ens") for d, _, fs in os.walk(tmp_path / "ens") for f in fs)
    assert names == ["ensemble.json", "manifest.json"] + [f"member-{i}/{f}" for i in (0, 1) for f in persistence.FILES]
    loaded = quiet(patchcore_jax.load, tmp_path / "ens", progress=False)
    assert isinstance(loaded, PatchCoreEnsemble) and loaded.threshold == pair.threshold
    want, want_maps = pair.predict(data["test"])
    got, got_maps = loaded.predict(data["test"])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_maps, want_maps)
    with pytest.raises(persistence.ModelFileError, match="an ensemble of 2 members"):
        PatchCore.load(tmp_path / "ens")
    (tmp_path / "ens" / "member-1" / "notes.txt").write_text("x")
    with pytest.raises(persistence.ModelFileError, match=r"member-1/notes\.txt: not part of the model"):
        persistence.read_model_files(tmp_path / "ens")
    os.remove(tmp_path / "ens" / "member-1" / "notes.txt")
    raw = bytearray((tmp_path / "ens" / "member-1" / "config.json").read_bytes())
    raw[10] ^= 1
    (tmp_path / "ens" / "member-1" / "config.json").write_bytes(bytes(raw))
    with pytest.raises(persistence.ModelFileError, match=r"member-1/config\.json: checksum differs"):
        persistence.read_model_files(tmp_path / "ens")
    pair.save(tmp_path / "ens")  # an earlier ensemble (even a damaged one) is replaced
    persistence.read_model_files(tmp_path / "ens")


def test_repeated_backbones_on_the_command_line(tmp_path, capsys):
    root = dataset_trees.make_mvtec(str(tmp_path / "mvtec"))
    small = ["--resize", "72", "--crop", "64", "--neighbors", "3", "--target-dim", "64", "--quiet"]
    model = tmp_path / "model"
    assert cli.main(["fit", "--train", f"{root}/bottle/train", "--out", str(model), "--backbone", "resnet18",
                     "--backbone", "resnet34", *small]) == 0
    assert "resnet18 bank" in capsys.readouterr().out and (model / "member-1" / "bank.safetensors").exists()
    assert cli.main(["predict", "--model", str(model), f"{root}/bottle/test", "--out", str(tmp_path / "p"),
                     "--quiet", "--no-heatmaps"]) == 0
    out = tmp_path / "eval"
    assert cli.main(["evaluate", "--dataset", "mvtec", "--root", root, "--out", str(out), "--categories", "bottle",
                     "--backbone", "resnet18", "--backbone", "resnet34", "--heatmaps", "1", *small]) == 0
    report = json.loads((out / "results.json").read_text())
    assert [c["backbone"] for c in report["config"]] == ["resnet18", "resnet34"]
    assert 0.0 <= report["categories"]["bottle"]["image_auroc"] <= 1.0
    code = cli.main(["fit", "--train", f"{root}/bottle/train", "--out", str(tmp_path / "m2"), "--backbone", "resnet18",
                     "--backbone", "resnet34", "--weights", "x.safetensors", *small])
    assert code == 2 and "give one per --backbone" in capsys.readouterr().err
