import pytest

from patchcore_jax._src.model import backbone
from patchcore_jax._src.model.config import PatchCoreConfig


@pytest.mark.parametrize("arch", sorted(backbone.ARCHITECTURES))
def test_each_backbone_takes_its_own_taps(arch):
    taps = backbone.layer_names(arch)
    assert PatchCoreConfig(backbone=arch, layers=backbone.default_layers(arch)).layers == taps[1:3]
    assert PatchCoreConfig(backbone=arch, layers=taps).layers == taps
    assert PatchCoreConfig(backbone=arch).layers == backbone.default_layers(arch)  # the default follows the backbone


@pytest.mark.parametrize("changes, match", [
    (dict(backbone="densenet201", layers=("layer2", "layer3")),
     r"layers: .*'denseblock2'.* for densenet201, got \('layer2', 'layer3'\)"),
    (dict(backbone="densenet201", layers="denseblock2"), "the string"),
    (dict(backbone="resnext101_32x8d", layers=("denseblock2",)), "layers: .*'layer1'.* for resnext101_32x8d"),
    (dict(backbone="densenet121", layers=("denseblock3", "denseblock2")), "finest first"),
    (dict(backbone="densenet121", layers=("denseblock2", "denseblock2")), "distinct"),
    (dict(backbone="densenet", layers=("denseblock2",)), "backbone: expected one of"),
])
def test_layers_must_be_taps_of_the_backbone(changes, match):
    with pytest.raises(ValueError, match=match):
        PatchCoreConfig(**changes)
