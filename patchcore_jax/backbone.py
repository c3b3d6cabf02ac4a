"""Flax ports of torchvision's ResNet family, cut after the deepest layer that is asked for.

Choice of API: the modules are written with `flax.nnx` (Flax's recommended API: plain Python objects,
attribute names mirroring torchvision's state-dict keys, so the weight mapping is mechanical). They are
run through `nnx.split` once and a plain `jax.jit` over `(state, images)` with `nnx.merge` inside the
traced function: `nnx.jit` re-walks the object graph on every call, which costs several times more per
call than `jax.jit` on the split state.

torchvision semantics, exactly: explicit symmetric padding on every convolution (XLA's 'SAME' pads
asymmetrically under stride 2 and would not match); the stride on the 3x3 convolution of a bottleneck
(ResNet v1.5); max pooling padded with -inf; BatchNorm in inference mode with epsilon 1e-5. Images are
NHWC inside.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LAYER_NAMES = ("layer1", "layer2", "layer3", "layer4")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResNetSpec:
    """Architecture of one torchvision ResNet variant."""

    block: str  # "basic" or "bottleneck"
    layers: tuple[int, int, int, int]
    width_per_group: int = 64

    @property
    def expansion(self) -> int:
        return 1 if self.block == "basic" else 4


ARCHITECTURES = {
    "resnet18": ResNetSpec(block="basic", layers=(2, 2, 2, 2)),
    "resnet34": ResNetSpec(block="basic", layers=(3, 4, 6, 3)),
    "resnet50": ResNetSpec(block="bottleneck", layers=(3, 4, 6, 3)),
    "resnet101": ResNetSpec(block="bottleneck", layers=(3, 4, 23, 3)),
    "wide_resnet50_2": ResNetSpec(block="bottleneck", layers=(3, 4, 6, 3), width_per_group=128),
    "wide_resnet101_2": ResNetSpec(block="bottleneck", layers=(3, 4, 23, 3), width_per_group=128),
}


def _conv(cin, cout, k, stride, pad, rngs, precision, dtype):
    return nnx.Conv(
        cin, cout, (k, k), strides=(stride, stride), padding=((pad, pad), (pad, pad)), use_bias=False,
        precision=precision, dtype=dtype, rngs=rngs,
        kernel_init=nnx.initializers.variance_scaling(2.0, "fan_out", "normal"),  # torchvision's kaiming_normal_
    )


def _bn(c, rngs, dtype):
    return nnx.BatchNorm(c, use_running_average=True, epsilon=1e-5, momentum=0.9, dtype=dtype, rngs=rngs)


class BasicBlock(nnx.Module):
    def __init__(self, cin, planes, stride, *, width_per_group, rngs, precision, dtype):
        del width_per_group
        self.conv1 = _conv(cin, planes, 3, stride, 1, rngs, precision, dtype)
        self.bn1 = _bn(planes, rngs, dtype)
        self.conv2 = _conv(planes, planes, 3, 1, 1, rngs, precision, dtype)
        self.bn2 = _bn(planes, rngs, dtype)
        self.downsample = _downsample(cin, planes, stride, rngs, precision, dtype)

    def __call__(self, x):
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample[1](self.downsample[0](x))
        return jax.nn.relu(out + identity)


class Bottleneck(nnx.Module):
    def __init__(self, cin, planes, stride, *, width_per_group, rngs, precision, dtype):
        width = planes * width_per_group // 64
        self.conv1 = _conv(cin, width, 1, 1, 0, rngs, precision, dtype)
        self.bn1 = _bn(width, rngs, dtype)
        self.conv2 = _conv(width, width, 3, stride, 1, rngs, precision, dtype)  # v1.5: stride here
        self.bn2 = _bn(width, rngs, dtype)
        self.conv3 = _conv(width, planes * 4, 1, 1, 0, rngs, precision, dtype)
        self.bn3 = _bn(planes * 4, rngs, dtype)
        self.downsample = _downsample(cin, planes * 4, stride, rngs, precision, dtype)

    def __call__(self, x):
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = jax.nn.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample[1](self.downsample[0](x))
        return jax.nn.relu(out + identity)


def _downsample(cin, cout, stride, rngs, precision, dtype):
    if stride == 1 and cin == cout:
        return None
    return nnx.List([_conv(cin, cout, 1, stride, 0, rngs, precision, dtype), _bn(cout, rngs, dtype)])


class ResNetFeatures(nnx.Module):
    """torchvision's ResNet up to `LAYER_NAMES[depth - 1]`; returns the requested layers' outputs."""

    def __init__(self, spec: ResNetSpec, depth: int, *, rngs: nnx.Rngs, precision=None, dtype=jnp.float32):
        block = BasicBlock if spec.block == "basic" else Bottleneck
        self.depth = depth
        self.conv1 = _conv(3, 64, 7, 2, 3, rngs, precision, dtype)
        self.bn1 = _bn(64, rngs, dtype)
        cin = 64
        for i in range(depth):
            planes, stride = 64 * 2**i, 1 if i == 0 else 2
            blocks = []
            for b in range(spec.layers[i]):
                blocks.append(block(cin, planes, stride if b == 0 else 1, width_per_group=spec.width_per_group,
                                    rngs=rngs, precision=precision, dtype=dtype))
                cin = planes * spec.expansion
            setattr(self, LAYER_NAMES[i], nnx.List(blocks))

    def __call__(self, x, layers: Sequence[str]):
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        # DECISION: max pooling pads with -inf (reduce_window's init value), as torch does.
        x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))
        out = {}
        for i in range(self.depth):
            for blk in getattr(self, LAYER_NAMES[i]):
                x = blk(x)
            if LAYER_NAMES[i] in layers:
                out[LAYER_NAMES[i]] = x
        return out


def build(arch: str, layers: Sequence[str], *, seed: int = 0, precision=None, dtype=jnp.float32) -> ResNetFeatures:
    """A randomly initialised (torchvision's init) model computing up to the deepest of `layers`."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch: expected one of {sorted(ARCHITECTURES)}, got {arch!r}")
    layers = tuple(layers)
    if not layers or any(name not in LAYER_NAMES for name in layers):
        raise ValueError(f"layers: expected a non-empty subset of {LAYER_NAMES}, got {layers!r}")
    depth = max(LAYER_NAMES.index(name) for name in layers) + 1
    return ResNetFeatures(ARCHITECTURES[arch], depth, rngs=nnx.Rngs(seed), precision=precision, dtype=dtype)


def feature_extractor(
    arch: str = "wide_resnet50_2",
    *,
    weights: "str | Mapping[str, np.ndarray] | None" = None,
    layers: Sequence[str] = ("layer2", "layer3"),
    seed: int = 0,
    precision: str | None = "highest",
    dtype=jnp.float32,
) -> Callable[[jax.Array], dict[str, jax.Array]]:
    """A jitted function `images (B, H, W, 3) float32, ImageNet-normalised -> {layer: (B, h, w, C)}`.

    Args:
      arch: a torchvision ResNet name (`ARCHITECTURES`), e.g. "wide_resnet50_2" (the paper's).
      weights: a torchvision/timm state dict file (`.safetensors`, or `.pth` when torch is installed),
        such a state dict already read (a mapping of names to arrays), or None for a seeded random
        initialisation (a warning says so: such features are not pretrained).
      layers: torchvision layer names to return; computation stops after the deepest.
      precision: matmul/conv precision; "highest" keeps float32 accuracy on GPU (no TF32) and TPU.
    """
    from patchcore_jax import weights as weights_lib

    model = build(arch, layers, seed=seed, precision=precision, dtype=dtype)
    if weights is None:
        warnings.warn(
            f"{arch}: no weights given, using a random initialisation (seed {seed}); its features are NOT "
            "pretrained and anomaly detection will be weak. Pass a torchvision/timm state dict.",
            RandomWeightsWarning, stacklevel=2,
        )
    elif isinstance(weights, Mapping):
        weights_lib.load_into(model, weights, arch=arch)
    else:
        try:
            weights_lib.load_into(model, weights_lib.read_state_dict(weights), arch=arch)
        except ValueError as err:
            message = str(err)
            raise ValueError(message if message.startswith(str(weights)) else f"{weights}: {message}") from None
    graphdef, state = nnx.split(model)
    layers = tuple(layers)

    @jax.jit
    def apply(state, images):
        return nnx.merge(graphdef, state)(images, layers)

    def extract(images: jax.Array) -> dict[str, jax.Array]:
        shape = tuple(images.shape)
        if len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"images: expected (B, H, W, 3), got shape {shape}")
        return apply(state, jnp.asarray(images, dtype))

    extract.state = state  # exposed for sharding and inspection
    extract.apply = apply
    extract.state_dict = lambda: weights_lib.state_dict_of(model)  # what the model file stores
    return extract


class RandomWeightsWarning(UserWarning):
    """The backbone runs on random weights: its features are not pretrained."""
