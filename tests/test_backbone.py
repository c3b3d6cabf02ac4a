import gzip
import importlib.util
import json
import os
import re

import jax
import numpy as np
import pytest
from flax import nnx

from tests import synthetic_weights as _synthetic_weights
from patchcore_jax._src.model import backbone
from patchcore_jax._src.model import weights

DATA = os.path.join(os.path.dirname(__file__), "data")
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
# Made by scripts/make_backbone_golden.py with torchvision (versions stored in the files).
GOLDEN_ARCHS = ["wide_resnet50_2", "resnet18", "resnext50_32x4d", "densenet121"]
with gzip.open(os.path.join(DATA, "backbone_structure.json.gz")) as f:
    STRUCTURE = json.load(f)["architectures"]


def rel_err(got, want):
    """max |got - want| / max |want|, the agreement measure of the backbone port."""
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def _synthetic_state(arch, seed, layers=None):
    shapes = weights.expected_keys(_abstract(arch, layers or backbone.default_layers(arch)))
    return _synthetic_weights.draw(shapes, seed)


def _abstract(arch, layers):
    """The model's structure (shapes only), without drawing its random initialisation."""
    return nnx.eval_shape(lambda: backbone.build(arch, layers))


@pytest.mark.parametrize("arch", GOLDEN_ARCHS)
def test_matches_torchvision_golden_fixture(arch, tmp_path):
    golden = np.load(os.path.join(DATA, f"backbone_golden_{arch}.npz"))
    taps = backbone.default_layers(arch)  # layer2 + layer3, or denseblock2 + denseblock3
    path = tmp_path / "w.safetensors"
    weights.save_safetensors(_synthetic_state(arch, int(golden["seed"])), path)
    extract = backbone.feature_extractor(arch, weights=str(path))  # layers=None: the default taps
    feats = extract(golden["images"])
    assert set(feats) == set(taps)
    for name in taps:
        assert feats[name].shape == golden[name].shape
        assert rel_err(feats[name], golden[name]) < 1e-4, name


@pytest.mark.parametrize("arch", sorted(backbone.ARCHITECTURES))
def test_structure_matches_torchvision(arch):
    # Every parameter and statistic of the full model under torchvision's key and shape, nothing
    # left over but the classifier head (and norm5) and step counters; every tap's shape at 224 px.
    # This is how CI checks the members too large for a value fixture (ResNeXt101, DenseNet169/201).
    want = STRUCTURE[arch]
    taps = backbone.layer_names(arch)
    model = _abstract(arch, taps)
    used = {k: tuple(v) for k, v in want["state"].items() if not weights._ignorable(k, model)}
    assert weights.expected_keys(model) == used
    head = ("fc.", "classifier.", "features.norm5.")
    assert all(k.endswith("num_batches_tracked") or k.startswith(head) for k in set(want["state"]) - set(used))
    graphdef, state = nnx.split(model)
    out = jax.eval_shape(lambda st, x: nnx.merge(graphdef, st)(x, taps), state,
                         jax.ShapeDtypeStruct((1, 224, 224, 3), np.float32))
    assert {k: [v.shape[3], v.shape[1], v.shape[2]] for k, v in out.items()} == want["taps_224"]


def test_densenet201_taps_of_the_published_ensemble():
    # sample_training.sh taps densenet201 at features.denseblock2 / denseblock3 (recorded from torchvision).
    assert backbone.default_layers("densenet201") == ("denseblock2", "denseblock3")
    taps = STRUCTURE["densenet201"]["taps_224"]
    assert taps["denseblock2"] == [512, 28, 28] and taps["denseblock3"] == [1792, 14, 14]


def test_stops_after_the_deepest_layer():
    model = backbone.build("resnet18", ("layer2",))
    assert hasattr(model, "layer2") and not hasattr(model, "layer3")
    dense = _abstract("densenet121", ("denseblock2",)).features
    assert hasattr(dense, "transition1") and hasattr(dense, "denseblock2")
    assert not hasattr(dense, "transition2") and not hasattr(dense, "denseblock3")
    with pytest.warns(backbone.RandomWeightsWarning, match="NOT pretrained"):
        extract = backbone.feature_extractor("resnet18", layers=("layer1", "layer2"))
    out = extract(np.zeros((1, 32, 32, 3), np.float32))
    assert {k: v.shape for k, v in out.items()} == {"layer1": (1, 8, 8, 64), "layer2": (1, 4, 4, 128)}


def test_random_init_is_seeded():
    x = np.ones((1, 32, 32, 3), np.float32)
    with pytest.warns(backbone.RandomWeightsWarning):
        a = backbone.feature_extractor("resnet18", seed=3)(x)["layer3"]
        b = backbone.feature_extractor("resnet18", seed=3)(x)["layer3"]
        c = backbone.feature_extractor("resnet18", seed=4)(x)["layer3"]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))


def test_deeper_keys_of_a_full_state_dict_are_accepted(tmp_path):
    full = _synthetic_state("resnet18", 0, layers=("layer4",))
    full["fc.weight"], full["fc.bias"] = np.zeros((1000, 512), np.float32), np.zeros(1000, np.float32)
    full["bn1.num_batches_tracked"] = np.array(5)
    model = backbone.build("resnet18", ("layer2", "layer3"))
    weights.load_into(model, full, arch="resnet18")
    np.testing.assert_array_equal(np.asarray(model.bn1.mean.get_value()), full["bn1.running_mean"])
    np.testing.assert_array_equal(
        np.asarray(model.layer2[0].downsample[0].kernel.get_value()),
        np.transpose(full["layer2.0.downsample.0.weight"], (2, 3, 1, 0)),
    )


def test_deeper_densenet_keys_are_accepted():
    full = _synthetic_state("densenet121", 0, layers=("denseblock4",))
    full["features.norm5.weight"] = np.ones(1024, np.float32)
    full["classifier.weight"], full["classifier.bias"] = np.zeros((1000, 1024), np.float32), np.zeros(1000, np.float32)
    model = _abstract("densenet121", ("denseblock2",))
    weights.load_into(model, full, arch="densenet121")
    np.testing.assert_array_equal(
        np.asarray(model.features.denseblock2.denselayer12.conv2.kernel.get_value()),
        np.transpose(full["features.denseblock2.denselayer12.conv2.weight"], (2, 3, 1, 0)),
    )


def test_legacy_densenet_keys_are_renamed():
    # torchvision's published DenseNet files name `denselayer1.norm.1.weight` what is now `norm1.weight`.
    modern = _synthetic_state("densenet121", 0, layers=("denseblock1",))
    legacy = {re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v for k, v in modern.items()}
    assert "features.denseblock1.denselayer3.norm.1.running_var" in legacy
    assert "features.denseblock1.denselayer6.conv.2.weight" in legacy
    assert not any(re.search(r"denselayer\d+\.(norm|conv)[12]\.", k) for k in legacy)
    assert "features.norm0.weight" in legacy and "features.conv0.weight" in legacy  # not dense-layer keys
    a, b = _abstract("densenet121", ("denseblock1",)), _abstract("densenet121", ("denseblock1",))
    weights.load_into(a, modern, arch="densenet121")
    weights.load_into(b, legacy, arch="densenet121")
    for (path, va), (_, vb) in zip(nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b))):
        np.testing.assert_array_equal(np.asarray(va.get_value()), np.asarray(vb.get_value()), err_msg=str(path))
    both = dict(modern)
    both["features.denseblock1.denselayer1.norm.1.weight"] = modern["features.denseblock1.denselayer1.norm1.weight"]
    with pytest.raises(ValueError, match=r"unexpected \(1\): features.denseblock1.denselayer1.norm.1.weight"):
        weights.load_into(a, both, arch="densenet121")


def test_bad_state_dicts_name_every_problem():
    state = _synthetic_state("resnet18", 0)
    del state["layer1.0.conv1.weight"]
    state["layer2.0.conv9.weight"] = np.zeros((1,), np.float32)
    state["bn1.weight"] = np.zeros((3,), np.float32)
    with pytest.raises(ValueError) as err:
        weights.load_into(backbone.build("resnet18", ("layer3",)), state, arch="resnet18")
    msg = str(err.value)
    assert "missing (1): layer1.0.conv1.weight" in msg
    assert "unexpected (1): layer2.0.conv9.weight" in msg
    assert "mis-shaped (1): bn1.weight: (3,) != (64,)" in msg
    # A ResNet's ungrouped kernel does not fit ResNeXt's grouped one; a ResNet file does not fit a DenseNet.
    grouped = _synthetic_state("resnext50_32x4d", 0, layers=("layer1",))
    grouped["layer1.0.conv2.weight"] = np.zeros((128, 128, 3, 3), np.float32)
    msg = r"mis-shaped \(1\): layer1.0.conv2.weight: \(128, 128, 3, 3\) != \(128, 4, 3, 3\)"
    with pytest.raises(ValueError, match=msg):
        weights.load_into(_abstract("resnext50_32x4d", ("layer1",)), grouped, arch="resnext50_32x4d")
    with pytest.raises(ValueError, match=r"do not fit densenet121: missing \(\d+\): features.conv0.weight.*unexpected"):
        weights.load_into(_abstract("densenet121", ("denseblock1",)), state, arch="densenet121")


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="no such weights file"):
        weights.read_state_dict(tmp_path / "absent.safetensors")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        weights.read_state_dict(empty)
    good = tmp_path / "good.safetensors"
    weights.save_safetensors({"a": np.ones((64, 64), np.float32)}, good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated.safetensors.*truncated or corrupt"):
        weights.read_state_dict(truncated)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match="junk.safetensors"):
        weights.read_state_dict(junk)
    other = tmp_path / "w.npz"
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match="expected a .safetensors or .pth"):
        weights.read_state_dict(other)


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
def test_pth_without_torch_says_how_to_convert(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(b"not really")
    with pytest.raises(ValueError, match="convert-weights"):
        weights.read_state_dict(path)


def test_bad_images():
    with pytest.warns(backbone.RandomWeightsWarning):
        extract = backbone.feature_extractor("resnet18")
    with pytest.raises(ValueError, match="images.*\\(B, H, W, 3\\)"):
        extract(np.zeros((1, 32, 32)))
    with pytest.raises(ValueError, match="arch"):
        backbone.build("vgg16", ("layer2",))
    with pytest.raises(ValueError, match="layers"):
        backbone.build("resnet18", ("layer5",))
    with pytest.raises(ValueError, match=r"layers: .*'denseblock1', 'denseblock2'.* for densenet121"):
        backbone.build("densenet121", ("layer2",))
    with pytest.raises(ValueError, match="arch"):
        backbone.layer_names("densenet")


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is not installed")
@pytest.mark.parametrize("arch", ["wide_resnet50_2", "resnet50", "resnet18", "resnext50_32x4d", "resnext101_32x8d",
                                  "densenet121", "densenet169", "densenet201"])
def test_matches_live_torchvision_through_pth(arch, tmp_path):
    import torch

    model = _synthetic_weights.torchvision_model(arch, 7)
    path = tmp_path / "w.pth"
    torch.save(model.state_dict(), path)
    images = np.random.default_rng(0).normal(size=(1, 96, 80, 3)).astype(np.float32)
    taps = backbone.default_layers(arch)
    feats = backbone.feature_extractor(arch, weights=str(path), layers=taps)(images)
    want = _synthetic_weights.torchvision_taps(model, images, taps)
    for name in taps:
        assert feats[name].shape == want[name].shape
        assert rel_err(feats[name], want[name]) < 1e-4, name


def test_densenet_config_runs_through_the_model(tmp_path):
    # The published ensemble's DenseNet taps (denseblock2: 512 channels, denseblock3: 1024 for
    # densenet121) through aggregation, coreset, scores and maps, on tiny images.
    from patchcore_jax._src.model.config import PatchCoreConfig
    from patchcore_jax._src.api.patchcore import PatchCore

    path = tmp_path / "densenet121.safetensors"
    weights.save_safetensors(_synthetic_state("densenet121", 0), path)
    cfg = PatchCoreConfig(backbone="densenet121", layers=("denseblock2", "denseblock3"), weights=str(path), resize=64,
                          crop=64, pretrain_dim=64, target_dim=32, coreset_fraction=1.0, num_neighbors=3, batch_size=4)
    images = np.random.default_rng(0).uniform(size=(4, 72, 64, 3)).astype(np.float32)
    model = PatchCore(cfg, progress=False).fit(images[:3])
    assert model.bank.shape == (3 * 8 * 8, 32)  # denseblock2's grid: 64 / 8
    scores, maps = model.predict(images)
    assert scores.shape == (4,) and maps.shape == (4, 64, 64)
    assert np.all(np.isfinite(scores)) and np.all(np.isfinite(maps))
    np.testing.assert_allclose(np.asarray(scores[:3]), 0.0, atol=1e-3)  # whole bank kept: training images score 0
    assert scores[3] > 1e-2
