"""PatchCore's configuration: one frozen, keyword-only dataclass, validated on creation.

It hashes, so it can be a static argument to `jax.jit`, and round-trips through JSON for model files.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from patchcore_jax.backbone import ARCHITECTURES, layer_names

_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PatchCoreConfig:
    """Settings of a PatchCore model; defaults are the paper's main configuration.

    Attributes:
      backbone: torchvision name (`backbone.ARCHITECTURES`); weights: state-dict path, or None (random, not pretrained).
      layers: feature hierarchies j, finest first, among `backbone.layer_names(backbone)`.
      resize, crop: shorter side resized to `resize`, then a centred `crop x crop` square.
      patch_size, stride, pretrain_dim, target_dim: the patch aggregation (API.md).
      coreset_fraction: the paper's PatchCore-n% (0.1 = 10%); 1.0 keeps the whole bank.
      projection_dim: width of the coreset's random projection psi; 0 measures in the full space.
      num_starts: random start points of the greedy coreset.
      num_neighbors: b of Eq. 7 (9); 1 gives the published code's plain maximum.
      sigma: Gaussian blur of the anomaly maps, in pixels of the crop.
      seed: the one seed from which the projection, start points and a random backbone are drawn.
      dtype: compute dtype of backbone and features; coreset_dtype: storage of the projected bank.
      batch_size: images per compiled step.
    """

    backbone: str = "wide_resnet50_2"
    weights: str | None = None
    layers: tuple[str, ...] = ("layer2", "layer3")
    resize: int = 256
    crop: int = 224
    patch_size: int = 3
    stride: int = 1
    pretrain_dim: int = 1024
    target_dim: int = 1024
    coreset_fraction: float = 0.1
    projection_dim: int = 128
    num_starts: int = 10
    num_neighbors: int = 9
    sigma: float = 4.0
    seed: int = 0
    dtype: str = "float32"
    coreset_dtype: str = "float32"
    batch_size: int = 8

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        if self.backbone not in ARCHITECTURES:
            raise ValueError(f"backbone: expected one of {sorted(ARCHITECTURES)}, got {self.backbone!r}")
        taps = layer_names(self.backbone)
        if not self.layers or any(name not in taps for name in self.layers):
            raise ValueError(f"layers: expected a non-empty tuple of {taps} for {self.backbone}, got {self.layers!r}")
        if list(self.layers) != sorted(self.layers, key=taps.index) or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers: expected distinct layers, finest first, got {self.layers!r}")
        for name in ("resize", "crop", "patch_size", "stride", "pretrain_dim", "target_dim", "num_starts",
                     "num_neighbors", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if self.crop > self.resize:
            raise ValueError(f"crop: expected at most resize ({self.resize}), got {self.crop}")
        if self.crop < 32:
            raise ValueError(f"crop: expected at least 32 pixels (the backbone downsamples 16x), got {self.crop}")
        if isinstance(self.projection_dim, bool) or not isinstance(self.projection_dim, int) or self.projection_dim < 0:
            raise ValueError(f"projection_dim: expected an integer >= 0, got {self.projection_dim!r}")
        if not isinstance(self.coreset_fraction, (int, float)) or not 0.0 < self.coreset_fraction <= 1.0:
            raise ValueError(f"coreset_fraction: expected a number in (0, 1], got {self.coreset_fraction!r}")
        if not isinstance(self.sigma, (int, float)) or not self.sigma > 0:
            raise ValueError(f"sigma: expected a positive number, got {self.sigma!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed: expected an integer, got {self.seed!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype: expected one of {_DTYPES}, got {self.dtype!r}")
        if self.coreset_dtype not in _DTYPES:
            raise ValueError(f"coreset_dtype: expected one of {_DTYPES}, got {self.coreset_dtype!r}")
        if self.weights is not None and not isinstance(self.weights, str):
            raise ValueError(f"weights: expected a path string or None, got {self.weights!r}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PatchCoreConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"config: unknown fields {unknown}")
        return cls(**data)

    def replace(self, **changes) -> "PatchCoreConfig":
        return dataclasses.replace(self, **changes)
