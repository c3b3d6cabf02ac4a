import importlib.util
import os

import numpy as np
import pytest

from patchcore_jax import _synthetic_weights, backbone, weights

DATA = os.path.join(os.path.dirname(__file__), "data")
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


def rel_err(got, want):
    """max |got - want| / max |want|, the agreement measure of the backbone port."""
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def _synthetic_state(arch, seed, layers=("layer2", "layer3")):
    shapes = weights.expected_keys(backbone.build(arch, layers))
    return _synthetic_weights.draw(shapes, seed)


@pytest.mark.parametrize("arch", ["wide_resnet50_2", "resnet18"])
def test_matches_torchvision_golden_fixture(arch, tmp_path):
    # Made by scripts/make_backbone_golden.py with torchvision (versions stored in the file).
    golden = np.load(os.path.join(DATA, f"backbone_golden_{arch}.npz"))
    path = tmp_path / "w.safetensors"
    weights.save_safetensors(_synthetic_state(arch, int(golden["seed"])), path)
    extract = backbone.feature_extractor(arch, weights=str(path))
    feats = extract(golden["images"])
    assert set(feats) == {"layer2", "layer3"}
    for name in ("layer2", "layer3"):
        assert feats[name].shape == golden[name].shape
        assert rel_err(feats[name], golden[name]) < 1e-4, name


def test_stops_after_the_deepest_layer():
    model = backbone.build("resnet18", ("layer2",))
    assert hasattr(model, "layer2") and not hasattr(model, "layer3")
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


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is not installed")
@pytest.mark.parametrize("arch", ["wide_resnet50_2", "resnet50", "resnet18"])
def test_matches_live_torchvision_through_pth(arch, tmp_path):
    import torch
    import torchvision

    model = getattr(torchvision.models, arch)(weights=None).eval()
    state = _synthetic_weights.draw({k: tuple(v.shape) for k, v in model.state_dict().items()}, 7)
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
    path = tmp_path / "w.pth"
    torch.save(model.state_dict(), path)
    images = np.random.default_rng(0).normal(size=(1, 96, 80, 3)).astype(np.float32)
    feats = backbone.feature_extractor(arch, weights=str(path))(images)
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        x = model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x))))))
        want2 = x.permute(0, 2, 3, 1).numpy()
        want3 = model.layer3(x).permute(0, 2, 3, 1).numpy()
    assert rel_err(feats["layer2"], want2) < 1e-4
    assert rel_err(feats["layer3"], want3) < 1e-4
