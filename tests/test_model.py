import json
import os
import warnings

import numpy as np
import pytest

from patchcore_jax import metrics
from patchcore_jax.config import PatchCoreConfig
from patchcore_jax.data import make_synthetic, preprocess_masks
from patchcore_jax.model import ModelFileError, PatchCore

SMALL = dict(backbone="resnet18", resize=72, crop=64, pretrain_dim=64, target_dim=64, num_neighbors=3, batch_size=4)


def small_model(**changes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PatchCore(PatchCoreConfig(**{**SMALL, **changes}), progress=False)


@pytest.fixture(scope="module")
def data():
    return make_synthetic(seed=1, n_train=8, n_test_good=4, n_test_defect=8, size=96, margin=16)


@pytest.fixture(scope="module")
def fitted(data):
    return small_model().fit(data["train"])


def test_fit_predict_shapes_and_detection(fitted, data):
    scores, maps = fitted.predict(data["test"])
    assert scores.shape == (12,) and maps.shape == (12, 64, 64)
    assert np.all(scores >= 0) and np.all(maps >= 0)
    # Even a random backbone separates most of these blatant synthetic defects (the demo's data set);
    # at 64 pixels a thin scratch can vanish, so this asks for clearly better than chance, not perfect.
    assert metrics.image_auroc(data["labels"], scores) >= 0.8
    # Missing pieces (flat dark blocks) are never subtle: each outscores every good image.
    missing = data["kinds"] == "missing"
    assert scores[missing].min() > scores[data["labels"] == 0].max()
    # Localisation: the peak of each missing piece's map lies on the defect or within 6 pixels of it.
    masks = preprocess_masks(data["masks"], resize=72, crop=64)
    for i in np.nonzero(missing)[0]:
        peak = np.unravel_index(np.argmax(maps[i]), maps[i].shape)
        ys, xs = np.nonzero(masks[i])
        assert np.min(np.hypot(ys - peak[0], xs - peak[1])) <= 6.0


def test_coreset_size_follows_the_fraction(fitted):
    # 8 images of 8 x 8 patches (64 / 8), 10% of 512 -> 51 rows.
    assert fitted.num_patches_seen == 8 * 8 * 8
    assert fitted.bank.shape == (51, 64)


def test_training_images_score_zero_with_the_whole_bank(data):
    model = small_model(coreset_fraction=1.0).fit(data["train"][:3])
    scores, maps = model.predict(data["train"][:2])
    np.testing.assert_allclose(scores, 0.0, atol=1e-3)
    assert maps.max() < 1e-2


def test_batches_grayscale_and_floats_are_accepted(data):
    whole = small_model().fit(data["train"])
    streamed = small_model().fit(iter([data["train"][:5], data["train"][5:]]))
    np.testing.assert_array_equal(np.asarray(whole.bank), np.asarray(streamed.bank))
    s_uint8, _ = whole.predict(data["test"][:2])
    s_float, _ = whole.predict(data["test"][:2].astype(np.float32) / 255.0)
    np.testing.assert_allclose(s_uint8, s_float, rtol=1e-6)
    gray = data["test"][:2, ..., 0]
    s_gray, maps = whole.predict(gray)
    assert s_gray.shape == (2,) and maps.shape == (2, 64, 64)


def test_save_load_round_trip_is_bit_identical(fitted, data, tmp_path):
    fitted.fit_threshold([0.5, 1.0, 2.0])
    path = tmp_path / "model"
    fitted.save(path)
    assert sorted(os.listdir(path)) == ["bank.safetensors", "config.json"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary left behind
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PatchCore.load(path, progress=False)
    assert loaded.config == fitted.config and loaded.threshold == 2.0
    s1, m1 = fitted.predict(data["test"])
    s2, m2 = loaded.predict(data["test"])
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(m1, m2)
    fitted.save(path)  # replacing an existing model works
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert PatchCore.load(path, progress=False).bank.shape == fitted.bank.shape


def test_broken_model_files(fitted, tmp_path):
    path = tmp_path / "model"
    fitted.save(path)
    meta = json.loads((path / "config.json").read_text())

    bank = (path / "bank.safetensors").read_bytes()
    (path / "bank.safetensors").write_bytes(bank[:-8] + b"\x00" * 8)
    with pytest.raises(ModelFileError, match="checksum"):
        PatchCore.load(path)
    (path / "bank.safetensors").write_bytes(bank[: len(bank) // 2])
    with pytest.raises(ModelFileError, match="checksum"):
        PatchCore.load(path)
    (path / "bank.safetensors").write_bytes(bank)

    (path / "config.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ModelFileError, match="newer"):
        PatchCore.load(path)
    (path / "config.json").write_text(json.dumps(meta)[:40])
    with pytest.raises(ModelFileError, match="not valid JSON"):
        PatchCore.load(path)
    os.remove(path / "config.json")
    with pytest.raises(ModelFileError, match="config.json: missing"):
        PatchCore.load(path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not a patchcore-jax model directory"):
        fitted.save(other)
    assert (other / "keep.txt").exists()


def test_threshold_helper(fitted):
    with pytest.raises(ValueError, match="threshold"):
        small_model().classify([1.0])
    fitted.fit_threshold(np.array([1.0, 2.0, 3.0, 4.0]), quantile=0.5)
    assert fitted.threshold == pytest.approx(2.5)
    np.testing.assert_array_equal(fitted.classify([2.0, 2.6]), [False, True])
    with pytest.raises(ValueError, match="good_scores"):
        fitted.fit_threshold([])


def test_bad_input(fitted):
    with pytest.raises(ValueError, match="not fitted"):
        small_model().predict(np.zeros((1, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="images.*shape"):
        fitted.predict(np.zeros((64, 64, 3, 2), np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        fitted.predict(np.full((1, 64, 64, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fitted.predict(np.full((1, 64, 64, 3), 255.0, np.float32))
    with pytest.raises(ValueError, match="at least one training image"):
        small_model().fit(iter([]))
    with pytest.raises(ValueError, match="batch 1"):
        small_model().fit(iter([np.zeros((1, 64, 64, 3), np.uint8), np.zeros((1, 64, 64, 3), np.int64)]))
    with pytest.raises(ValueError, match="fewer than num_neighbors"):
        small_model(coreset_fraction=0.001).fit(np.zeros((1, 64, 64, 3), np.uint8))


@pytest.mark.parametrize("changes, match", [
    (dict(backbone="vgg"), "backbone"), (dict(layers=("layer3", "layer2")), "finest first"),
    (dict(crop=300), "crop"), (dict(coreset_fraction=0.0), "coreset_fraction"), (dict(sigma=-1.0), "sigma"),
    (dict(num_neighbors=0), "num_neighbors"), (dict(dtype="float16"), "dtype"), (dict(projection_dim=-1), "projection_dim"),
])
def test_config_validation(changes, match):
    with pytest.raises(ValueError, match=match):
        PatchCoreConfig(**changes)
    assert hash(PatchCoreConfig()) == hash(PatchCoreConfig())
    assert PatchCoreConfig.from_dict(json.loads(PatchCoreConfig().to_json())) == PatchCoreConfig()
