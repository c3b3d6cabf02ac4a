"""Flax ports of torchvision's ResNet, ResNeXt and DenseNet families, cut after the deepest tap asked for.

Choice of API: the modules are written with `flax.nnx` (Flax's recommended API: plain Python objects,
attribute names mirroring torchvision's state-dict keys, so the weight mapping is mechanical). They are
run through `nnx.split` once and a plain `jax.jit` over `(state, images)` with `nnx.merge` inside the
traced function: `nnx.jit` re-walks the object graph on every call, which costs several times more per
call than `jax.jit` on the split state.

torchvision semantics, exactly: explicit symmetric padding on every convolution (XLA's 'SAME' pads
asymmetrically under stride 2 and would not match); the stride on the 3x3 convolution of a bottleneck
(ResNet v1.5); grouped 3x3 convolutions in ResNeXt; max pooling padded with -inf; DenseNet's 2x2
average pooling without padding (odd sizes drop the last row and column, as `AvgPool2d(2, 2)` does);
BatchNorm in inference mode with epsilon 1e-5. Images are NHWC inside.

Feature taps, per family (`layer_names(arch)`, finest first):
- ResNet, Wide ResNet, ResNeXt: the outputs of `layer1`..`layer4`.
- DenseNet: `denseblock1`..`denseblock4`, the output of `features.denseblockN`: the block's input
  concatenated with every dense layer's new features, before `transitionN` (BatchNorm, ReLU, 1x1
  convolution, average pooling) and before `norm5`. The published PatchCore taps the same point: its
  forward hook on `features.denseblock2` / `features.denseblock3` sits on the block itself, since a
  dense block is a `ModuleDict`, not a `Sequential` (patchcore/common.py, NetworkFeatureAggregator).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

LAYER_NAMES = ("layer1", "layer2", "layer3", "layer4")  # the ResNet family's taps
DENSE_BLOCK_NAMES = ("denseblock1", "denseblock2", "denseblock3", "denseblock4")  # DenseNet's taps


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResNetSpec:
    """Architecture of one torchvision ResNet / Wide ResNet / ResNeXt variant."""

    block: str  # "basic" or "bottleneck"
    layers: tuple[int, int, int, int]
    width_per_group: int = 64
    groups: int = 1
    taps = LAYER_NAMES

    @property
    def expansion(self) -> int:
        return 1 if self.block == "basic" else 4


@dataclasses.dataclass(frozen=True, kw_only=True)
class DenseNetSpec:
    """Architecture of one torchvision DenseNet-BC variant."""

    block_config: tuple[int, int, int, int]
    growth_rate: int = 32
    num_init_features: int = 64
    bn_size: int = 4
    taps = DENSE_BLOCK_NAMES


ARCHITECTURES = {
    "resnet18": ResNetSpec(block="basic", layers=(2, 2, 2, 2)),
    "resnet34": ResNetSpec(block="basic", layers=(3, 4, 6, 3)),
    "resnet50": ResNetSpec(block="bottleneck", layers=(3, 4, 6, 3)),
    "resnet101": ResNetSpec(block="bottleneck", layers=(3, 4, 23, 3)),
    "wide_resnet50_2": ResNetSpec(block="bottleneck", layers=(3, 4, 6, 3), width_per_group=128),
    "wide_resnet101_2": ResNetSpec(block="bottleneck", layers=(3, 4, 23, 3), width_per_group=128),
    "resnext50_32x4d": ResNetSpec(block="bottleneck", layers=(3, 4, 6, 3), groups=32, width_per_group=4),
    "resnext101_32x8d": ResNetSpec(block="bottleneck", layers=(3, 4, 23, 3), groups=32, width_per_group=8),
    "densenet121": DenseNetSpec(block_config=(6, 12, 24, 16)),
    "densenet169": DenseNetSpec(block_config=(6, 12, 32, 32)),
    "densenet201": DenseNetSpec(block_config=(6, 12, 48, 32)),
}


def layer_names(arch: str) -> tuple[str, ...]:
    """The feature taps of `arch`, finest first (e.g. `("layer1", ..., "layer4")`)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch: expected one of {sorted(ARCHITECTURES)}, got {arch!r}")
    return ARCHITECTURES[arch].taps


def default_layers(arch: str) -> tuple[str, ...]:
    """The published PatchCore's taps for `arch`: its second and third (layer2 + layer3, or
    denseblock2 + denseblock3 for DenseNet, as in its sample_training.sh)."""
    return layer_names(arch)[1:3]


_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                          dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """`lax.conv_general_dilated`, with an unpadded, ungrouped, undilated 1x1 convolution computed as
    the matrix product it is (after subsampling for a stride). XLA's CPU convolution runs these
    1.2x to 2.1x slower than its matrix product (8 x 56 x 56 x 256 -> 128: 20.3 ms against 9.5 ms);
    the values are the same to float32 rounding, and the 3x3 and 7x7 convolutions are left to XLA."""
    one_by_one = (
        rhs.shape[:2] == (1, 1) and feature_group_count == 1 and lhs.ndim == 4
        and tuple(map(tuple, padding)) == ((0, 0), (0, 0)) if not isinstance(padding, str) else False
    )
    plain = all(d in (None, 1) for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
    if one_by_one and plain and dimension_numbers == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC):
        sy, sx = window_strides
        x = lhs[:, ::sy, ::sx] if (sy, sx) != (1, 1) else lhs
        return jnp.dot(x, rhs[0, 0], precision=precision, preferred_element_type=kwargs.get("preferred_element_type"))
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                                        feature_group_count, precision=precision, **kwargs)


def _conv(cin, cout, k, stride, pad, rngs, precision, dtype, *, groups=1, mode="fan_out"):
    return nnx.Conv(
        cin, cout, (k, k), strides=(stride, stride), padding=((pad, pad), (pad, pad)), use_bias=False,
        feature_group_count=groups, precision=precision, dtype=dtype, rngs=rngs,
        kernel_init=nnx.initializers.variance_scaling(2.0, mode, "normal"),  # torchvision's kaiming_normal_
        conv_general_dilated=_conv_general_dilated,
    )


def _bn(c, rngs, dtype):
    return nnx.BatchNorm(c, use_running_average=True, epsilon=1e-5, momentum=0.9, dtype=dtype, rngs=rngs)


def _max_pool_3x3_s2(x):
    # DECISION: max pooling pads with -inf (reduce_window's init value), as torch does.
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))


# -- ResNet, Wide ResNet, ResNeXt -------------------------------------------------------------------
class BasicBlock(nnx.Module):
    def __init__(self, cin, planes, stride, *, width_per_group, groups, rngs, precision, dtype):
        del width_per_group, groups  # torchvision's BasicBlock supports only 64 and 1
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
    def __init__(self, cin, planes, stride, *, width_per_group, groups, rngs, precision, dtype):
        width = planes * width_per_group // 64 * groups  # torchvision: int(planes * (base_width / 64.)) * groups
        self.conv1 = _conv(cin, width, 1, 1, 0, rngs, precision, dtype)
        self.bn1 = _bn(width, rngs, dtype)
        self.conv2 = _conv(width, width, 3, stride, 1, rngs, precision, dtype, groups=groups)  # v1.5: stride here
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
        # State-dict prefixes of what this truncated model does not compute (see weights.load_into).
        self.unused_prefixes = ("fc.",) + tuple(f"{name}." for name in LAYER_NAMES[depth:])
        self.conv1 = _conv(3, 64, 7, 2, 3, rngs, precision, dtype)
        self.bn1 = _bn(64, rngs, dtype)
        cin = 64
        for i in range(depth):
            planes, stride = 64 * 2**i, 1 if i == 0 else 2
            blocks = []
            for b in range(spec.layers[i]):
                blocks.append(block(cin, planes, stride if b == 0 else 1, width_per_group=spec.width_per_group,
                                    groups=spec.groups, rngs=rngs, precision=precision, dtype=dtype))
                cin = planes * spec.expansion
            setattr(self, LAYER_NAMES[i], nnx.List(blocks))

    def __call__(self, x, layers: Sequence[str]):
        x = _max_pool_3x3_s2(jax.nn.relu(self.bn1(self.conv1(x))))
        out = {}
        for i in range(self.depth):
            for blk in getattr(self, LAYER_NAMES[i]):
                x = blk(x)
            if LAYER_NAMES[i] in layers:
                out[LAYER_NAMES[i]] = x
        return out


# -- DenseNet ---------------------------------------------------------------------------------------
class DenseLayer(nnx.Module):
    """norm1, relu1, conv1 (1x1 to bn_size * growth_rate), norm2, relu2, conv2 (3x3 to growth_rate)."""

    def __init__(self, cin, growth_rate, bn_size, *, rngs, precision, dtype):
        width = bn_size * growth_rate
        self.norm1 = _bn(cin, rngs, dtype)
        self.conv1 = _conv(cin, width, 1, 1, 0, rngs, precision, dtype, mode="fan_in")
        self.norm2 = _bn(width, rngs, dtype)
        self.conv2 = _conv(width, growth_rate, 3, 1, 1, rngs, precision, dtype, mode="fan_in")

    def __call__(self, x):
        out = self.conv1(jax.nn.relu(self.norm1(x)))
        return self.conv2(jax.nn.relu(self.norm2(out)))


class DenseBlock(nnx.Module):
    """`denselayer1..N`; each sees the concatenation of the block input and all earlier new features."""

    def __init__(self, num_layers, cin, growth_rate, bn_size, *, rngs, precision, dtype):
        self.num_layers = num_layers
        for i in range(num_layers):
            layer = DenseLayer(cin + i * growth_rate, growth_rate, bn_size, rngs=rngs, precision=precision, dtype=dtype)
            setattr(self, f"denselayer{i + 1}", layer)

    def __call__(self, x):
        # torchvision concatenates the whole list before every layer; growing one array by each
        # layer's output gives the same values (concatenation only copies) with a linear-size graph.
        for i in range(self.num_layers):
            x = jnp.concatenate([x, getattr(self, f"denselayer{i + 1}")(x)], axis=-1)
        return x


class Transition(nnx.Module):
    """norm, relu, conv (1x1, halving the channels), pool (2x2 average, stride 2)."""

    def __init__(self, cin, cout, *, rngs, precision, dtype):
        self.norm = _bn(cin, rngs, dtype)
        self.conv = _conv(cin, cout, 1, 1, 0, rngs, precision, dtype, mode="fan_in")

    def __call__(self, x):
        x = self.conv(jax.nn.relu(self.norm(x)))
        # DECISION: no padding, so odd sizes drop the last row/column (torch's AvgPool2d(2, 2), floor mode).
        return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") * 0.25


class DenseNetTrunk(nnx.Module):
    """torchvision's `DenseNet.features`, up to `denseblock{depth}` (no transition after it, no norm5)."""

    def __init__(self, spec: DenseNetSpec, depth: int, *, rngs: nnx.Rngs, precision, dtype):
        self.depth = depth
        c = spec.num_init_features
        self.conv0 = _conv(3, c, 7, 2, 3, rngs, precision, dtype, mode="fan_in")
        self.norm0 = _bn(c, rngs, dtype)
        for i in range(depth):
            setattr(self, DENSE_BLOCK_NAMES[i], DenseBlock(spec.block_config[i], c, spec.growth_rate, spec.bn_size,
                                                           rngs=rngs, precision=precision, dtype=dtype))
            c += spec.block_config[i] * spec.growth_rate
            if i + 1 < depth:
                setattr(self, f"transition{i + 1}", Transition(c, c // 2, rngs=rngs, precision=precision, dtype=dtype))
                c //= 2

    def __call__(self, x, layers: Sequence[str]):
        x = _max_pool_3x3_s2(jax.nn.relu(self.norm0(self.conv0(x))))
        out = {}
        for i in range(self.depth):
            x = getattr(self, DENSE_BLOCK_NAMES[i])(x)
            if DENSE_BLOCK_NAMES[i] in layers:
                out[DENSE_BLOCK_NAMES[i]] = x
            if i + 1 < self.depth:
                x = getattr(self, f"transition{i + 1}")(x)
        return out


class DenseNetFeatures(nnx.Module):
    """torchvision's DenseNet up to `DENSE_BLOCK_NAMES[depth - 1]`; its trunk sits under `features`,
    as in torchvision's state dict (`features.denseblock1.denselayer1.norm1.weight`, ...)."""

    def __init__(self, spec: DenseNetSpec, depth: int, *, rngs: nnx.Rngs, precision=None, dtype=jnp.float32):
        self.unused_prefixes = ("classifier.", "features.norm5.") + tuple(
            f"features.{name}." for name in DENSE_BLOCK_NAMES[depth:]) + tuple(
            f"features.transition{i}." for i in range(depth, 4))
        self.features = DenseNetTrunk(spec, depth, rngs=rngs, precision=precision, dtype=dtype)

    def __call__(self, x, layers: Sequence[str]):
        return self.features(x, layers)


def build(arch: str, layers: Sequence[str], *, seed: int = 0, precision=None,
          dtype=jnp.float32) -> ResNetFeatures | DenseNetFeatures:
    """A randomly initialised (torchvision's init) model computing up to the deepest of `layers`."""
    taps = layer_names(arch)
    layers = tuple(layers)
    if not layers or any(name not in taps for name in layers):
        raise ValueError(f"layers: expected a non-empty subset of {taps} for {arch}, got {layers!r}")
    depth = max(taps.index(name) for name in layers) + 1
    spec = ARCHITECTURES[arch]
    cls = DenseNetFeatures if isinstance(spec, DenseNetSpec) else ResNetFeatures
    return cls(spec, depth, rngs=nnx.Rngs(seed), precision=precision, dtype=dtype)


def feature_extractor(
    arch: str = "wide_resnet50_2",
    *,
    weights: "str | Mapping[str, object] | None" = None,
    layers: Sequence[str] | None = None,
    seed: int = 0,
    precision: str | None = "highest",
    dtype=jnp.float32,
) -> Callable[[jax.Array], dict[str, jax.Array]]:
    """A jitted function `images (B, H, W, 3) float32, ImageNet-normalised -> {layer: (B, h, w, C)}`.

    Args:
      arch: a torchvision name (`ARCHITECTURES`), e.g. "wide_resnet50_2" (the paper's),
        "resnext101_32x8d" or "densenet201" (the published ensemble's).
      weights: a torchvision/timm state dict file (`.safetensors`, or `.pth` when torch is installed),
        such a state dict already read (a mapping of names to arrays), or None for a seeded random
        initialisation (a warning says so: such features are not pretrained).
      layers: taps to return (`layer_names(arch)`); computation stops after the deepest. None gives
        `default_layers(arch)`: layer2 + layer3, or denseblock2 + denseblock3.
      precision: matmul/conv precision; "highest" keeps float32 accuracy on GPU (no TF32) and TPU.
    """
    from patchcore_jax._src.model import weights as weights_lib

    layers = default_layers(arch) if layers is None else tuple(layers)
    if weights is None:
        model = build(arch, layers, seed=seed, precision=precision, dtype=dtype)
        warnings.warn(
            f"{arch}: no weights given, using a random initialisation (seed {seed}); its features are NOT "
            "pretrained and anomaly detection will be weak. Pass a torchvision/timm state dict.",
            RandomWeightsWarning, stacklevel=2,
        )
    else:
        # Shapes only: load_into fills every variable, so drawing the random initialisation first
        # (hundreds of small eager ops) would be wasted time.
        model = nnx.eval_shape(lambda: build(arch, layers, seed=seed, precision=precision, dtype=dtype))
        if isinstance(weights, Mapping):
            weights_lib.load_into(model, weights, arch=arch)
        else:
            try:
                weights_lib.load_into(model, weights_lib.read_state_dict(weights), arch=arch)
            except ValueError as err:
                message = str(err)
                raise ValueError(message if message.startswith(str(weights)) else f"{weights}: {message}") from None
    graphdef, state = nnx.split(model)

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
