"""The backbones: Flax ports of torchvision's ResNets, ResNeXts and DenseNets, and their feature taps."""

from patchcore_jax._src.model.backbone import (  # noqa: F401 -- the public face
    ARCHITECTURES,
    RandomWeightsWarning,
    build,
    default_layers,
    feature_extractor,
    layer_names,
)

__all__ = ["ARCHITECTURES", "RandomWeightsWarning", "build", "default_layers", "feature_extractor", "layer_names"]
