import json
import os
import warnings

import numpy as np
import pytest

from patchcore_jax._src.stages import metrics
from patchcore_jax._src.model.config import PatchCoreConfig
from patchcore_jax.data import make_synthetic
from patchcore_jax._src.api.patchcore import PatchCore
from patchcore_jax._src.model.preprocess import preprocess_masks

from tests.helpers import small_model


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


def test_every_input_form_gives_the_same_scores(fitted, data):
    """A batch array, a list of single images, floats in [0, 1], 16-bit, PIL images and files: one
    preprocessing, so bit-identical scores and maps."""
    from PIL import Image

    images = data["test"][:5]
    want_s, want_m = fitted.predict(images)
    forms = {
        "list": list(images),
        "float": images.astype(np.float32) / 255.0,
        "uint16": images.astype(np.uint16) * 257,
        "pil": [Image.fromarray(im) for im in images],
        "batches": iter([images[:2], images[2:]]),
        "list of batches and singles": [images[:2], images[2], images[3:]],
    }
    for label, form in forms.items():
        s, m = fitted.predict(form)
        np.testing.assert_array_equal(s, want_s, err_msg=label)
        np.testing.assert_array_equal(m, want_m, err_msg=label)


def test_streamed_fit_equals_whole_fit(data):
    whole = small_model().fit(data["train"])
    streamed = small_model().fit(iter([data["train"][:5], data["train"][5:]]))
    np.testing.assert_array_equal(np.asarray(whole.bank), np.asarray(streamed.bank))


def test_images_of_any_size_in_one_list_keep_their_order(fitted, data):
    """Differently sized images are preprocessed on the host to one crop shape: rows keep the input
    order and each image scores as it does alone."""
    big = np.repeat(np.repeat(data["test"][0], 2, axis=0), 2, axis=1)  # 192 x 192
    tall = data["test"][1][:, :60]  # 96 x 60
    gray = data["test"][2][..., 0]  # (H, W)
    images = [big, tall, gray, data["test"][3]]
    scores, maps = fitted.predict(images)
    assert scores.shape == (4,) and maps.shape == (4, 64, 64)
    for i, im in enumerate(images):
        alone, _ = fitted.predict([im])
        np.testing.assert_array_equal(alone, scores[i:i + 1])
    crop_gray = fitted.prepare(gray)
    assert crop_gray.shape == (64, 64, 3) and np.array_equal(crop_gray[..., 0], crop_gray[..., 2])


def test_one_compiled_shape_whatever_the_input_sizes(fitted, data):
    fitted.predict(data["test"][:1])
    before = fitted.embed_fn._cache_size()
    fitted.predict([data["test"][0][:70, :90], data["test"][1], np.zeros((33, 47, 3), np.uint8)] * 2)
    assert fitted.embed_fn._cache_size() == before


def test_bare_3d_arrays_are_refused_with_a_way_out(fitted, data):
    with pytest.raises(ValueError, match=r"ambiguous.*image\[None\]"):
        fitted.predict(np.zeros((224, 224, 3), np.uint8))
    with pytest.raises(ValueError, match="ambiguous"):
        small_model().fit(data["test"][:, :, :, 0])
    scores, _ = fitted.predict(np.zeros((224, 224, 3), np.uint8)[None])
    assert scores.shape == (1,)


def test_save_load_round_trip_is_bit_identical(fitted, data, tmp_path):
    fitted.fit_threshold([0.5, 1.0, 2.0])
    path = tmp_path / "model"
    fitted.save(path)
    assert sorted(os.listdir(path)) == ["backbone.safetensors", "bank.safetensors", "config.json", "index.safetensors",
                                        "manifest.json"]
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
    with pytest.raises(ValueError, match=r"images\[0\]\[0\]: expected one image .*got shape \(64, 3, 2\)"):
        fitted.predict([np.zeros((64, 64, 3, 2), np.uint8)])
    with pytest.raises(ValueError, match=r"images\[0\].*NaN"):
        fitted.predict(np.full((1, 64, 64, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"images\[0\].*\[0, 1\]"):
        fitted.predict(np.full((1, 64, 64, 3), 255.0, np.float32))
    with pytest.raises(ValueError, match=r"0\.\.65535"):
        fitted.predict(np.full((1, 8, 8, 3), 70000, np.int64))
    with pytest.raises(ValueError, match="boolean"):
        fitted.predict(np.zeros((1, 8, 8, 3), bool))
    with pytest.raises(ValueError, match="at least one training image"):
        small_model().fit(iter([]))
    with pytest.raises(ValueError, match=r"images\[1\]\[0\]: expected uint8"):
        small_model().fit(iter([np.zeros((1, 64, 64, 3), np.uint8), np.zeros((1, 64, 64, 3), np.complex64)]))
    with pytest.raises(ValueError, match="fewer than num_neighbors"):
        small_model(coreset_fraction=0.001).fit(np.zeros((1, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="expected an array"):
        fitted.predict({"a": 1})
    with pytest.raises(ValueError, match="more than the limit"):
        fitted.predict([np.zeros((1, 20000), np.uint8)])  # 1 x 20000 -> 72 x 1440000 after the resize
    with pytest.raises(ValueError, match="threshold"):
        fitted.threshold = float("nan")
    with pytest.raises(ValueError, match="threshold"):
        fitted.threshold = "abc"


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


def test_fit_and_predict_on_device_arrays_make_no_implicit_transfer(data):
    """The device stages run under `jax.transfer_guard("disallow")`: nothing is pulled to the host to be
    checked, and every move between host and device is an explicit one. Same results as host input."""
    import jax

    host = small_model()
    crops = np.stack([host.prepare(x) for x in data["train"]])
    test = np.stack([host.prepare(x) for x in data["test"]])
    want_s, want_m = host.fit_crops([crops[:5], crops[5:]]).score_crops(test)
    device = small_model()
    batches, test_d = [jax.device_put(crops[:5]), jax.device_put(crops[5:])], jax.device_put(test)
    images_d = jax.device_put(data["test"])
    with jax.transfer_guard("disallow"):
        device.fit_crops(batches)
        got_s, got_m = device.score_crops(test_d)
        via_images, _ = device.predict(images_d)  # raw device images: one explicit device_get, then the host stage
    np.testing.assert_array_equal(got_s, want_s)
    np.testing.assert_array_equal(got_m, want_m)
    np.testing.assert_array_equal(via_images, want_s)


def test_fit_streams_its_bank_and_the_indexes_agree(data):
    """`fit` builds the bank through the streaming builder (full rows spilled, projected rows kept);
    it equals the in-memory coreset on the same features. The clustered index (the CPU default) and
    brute force give the same scores and maps."""
    from patchcore_jax._src.run.executor import gather

    model = small_model(search="brute")
    crops = [np.stack([model.prepare(x) for x in data["train"][i:i + 4]]) for i in range(0, 8, 4)]
    model.fit_crops(iter(crops))
    features = gather(np.asarray(model.embed_crops(c)).reshape(-1, 64) for c in crops)
    np.testing.assert_array_equal(np.asarray(model.bank), model.executor.subsample(features))
    clustered = small_model(search="clustered").fit_crops(iter(crops))
    assert type(clustered.index).__name__ == "ClusteredIndex" and type(model.index).__name__ == "BankIndex"
    s_brute, m_brute = model.predict(data["test"])
    s_clust, m_clust = clustered.predict(data["test"])
    np.testing.assert_allclose(s_clust, s_brute, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(m_clust, m_brute, rtol=1e-6, atol=1e-6)
    assert small_model().search_kind() == "clustered"  # "auto" on a CPU


def test_predict_iter_overlaps_batches_and_loses_nothing_before_a_bad_file(fitted, data, tmp_path):
    """The next batch is prepared while the device scores the current one: predictions come in input
    order, equal `score_crops` batch by batch, and an unreadable file in a later batch is reported only
    after every image before its batch has been yielded."""
    from PIL import Image

    paths = []
    for i, image in enumerate(data["test"][:7]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image).save(paths[-1])
    crops = np.stack([fitted.prepare(p) for p in paths])
    want = np.concatenate([fitted.score_crops(crops[i:i + 4])[0] for i in range(0, 7, 4)])
    got = list(fitted.predict_iter(paths))
    assert [p.name for p in got] == paths
    np.testing.assert_array_equal([p.score for p in got], want)
    (tmp_path / "5.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")  # in the second batch (4..6)
    seen = []
    with pytest.raises(ValueError, match="5.png"):
        for pred in fitted.predict_iter(paths):
            seen.append(pred.name)
    assert seen == paths[:4]


def test_a_scoring_thread_error_reaches_the_caller_and_the_thread_stays_usable(fitted, data, monkeypatch):
    """The search, scores and maps run on the model's scoring thread: NaN features from the device are
    reported to the caller of `predict` (not lost in the thread), and the next call works."""
    import jax.numpy as jnp

    want, _ = fitted.predict(data["test"][:3])
    real_embed = fitted.executor.embed_padded  # what launch embeds with (the batch padded to batch_size)
    monkeypatch.setattr(fitted.executor, "embed_padded", lambda crops: real_embed(crops) * jnp.nan)
    with pytest.raises(ValueError, match="NaN or infinite scores"):
        fitted.predict(data["test"][:3])
    monkeypatch.undo()
    got, _ = fitted.predict(data["test"][:3])
    np.testing.assert_array_equal(got, want)
