"""PatchCore's configuration: one frozen, keyword-only dataclass, validated on creation.

It hashes, so it can be a static argument to `jax.jit`, and round-trips through JSON for model files.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from patchcore_jax._src.model.backbone import ARCHITECTURES, default_layers, layer_names
from patchcore_jax._src.model.geometry import ImageGeometry

_DTYPES = ("float32", "bfloat16")
GEOMETRIES = ("center_crop", "squash")
SEARCHES = ("auto", "brute", "clustered")
SAMPLERS = ("greedy", "random", "identity")
# Fields added after the first model files: a config.json without them loads with their defaults.
LATER_FIELDS = ("anomaly_scorer_num_nn", "sampler")
MAX_SEED = 2**32 - 1
MAX_SIZE = 4096  # pixels of resize and crop; far beyond any published setting, far below exhausting memory
_UPPER = {"resize": MAX_SIZE, "crop": MAX_SIZE, "batch_size": 1024, "pretrain_dim": 65536, "target_dim": 65536,
          "patch_size": 15, "stride": 15, "num_starts": 10000, "num_neighbors": 10000,
          "anomaly_scorer_num_nn": 10000}


@dataclasses.dataclass(frozen=True, kw_only=True)
class PatchCoreConfig:
    """Settings of a PatchCore model; defaults are the paper's main configuration.

    Attributes:
      backbone: torchvision name (`backbone.ARCHITECTURES`); weights: state-dict path, or None (random, not pretrained).
      layers: feature hierarchies j, finest first, among `backbone.layer_names(backbone)`; None (the
        default) takes the backbone's natural pair, `backbone.default_layers(backbone)`: layer2 +
        layer3, or denseblock2 + denseblock3 for DenseNet.
      resize, crop: shorter side resized to `resize`, then a centred `crop x crop` square.
      geometry: "center_crop" (the above, torchvision's Resize + CenterCrop) or "squash" (the whole
        image resized to `crop x crop`, ignoring its aspect, as the mSTC protocol does).
      patch_size, stride, pretrain_dim, target_dim: the patch aggregation (API.md).
      coreset_fraction: the paper's PatchCore-n% (0.1 = 10%); 1.0 keeps the whole bank.
      sampler: how the bank's `coreset_fraction` of rows is chosen: "greedy" (Algorithm 1, the
        default), "random" (the published RandomSampler baseline: a seeded uniform draw without
        replacement), or "identity" (every row; `coreset_fraction` is then ignored).
      projection_dim: width of the coreset's random projection psi; 0 measures in the full space.
      num_starts: random start points of the greedy coreset.
      num_neighbors: b of Eq. 7 (9); 1 gives the published code's plain maximum.
      anomaly_scorer_num_nn: k of the published NearestNeighbourScorer (1): a patch's score is the
        root mean square of its k nearest bank distances, `sqrt(mean_j d_j^2)`. The published code
        averages faiss's squared distances; the square root keeps this project's units (distances,
        not squared) and is monotone, so image scores rank exactly as the published ones. With
        b = num_neighbors > 1, Eq. 7 reweights that score: s* is the largest k-NN patch score and
        m* the nearest bank row of its patch. k = 1 is the plain nearest distance.
      sigma: Gaussian blur of the anomaly maps, in pixels of the crop.
      seed: the one seed (0 <= seed < 2**32) from which the projection, start points and a random backbone are drawn.
      dtype: compute dtype of backbone and features; coreset_dtype: storage of the projected bank.
      search: the exact nearest-neighbour index: "clustered" (prunes: built once at fit, saved with
        the model; fastest on a CPU), "brute" (tiled brute force; a matrix product, for GPU and TPU),
        or "auto" (clustered on a CPU, brute elsewhere, decided where the model runs). Same results.
      batch_size: images per compiled step.
    """

    backbone: str = "wide_resnet50_2"
    weights: str | None = None
    layers: tuple[str, ...] | None = None
    resize: int = 256
    crop: int = 224
    geometry: str = "center_crop"
    patch_size: int = 3
    stride: int = 1
    pretrain_dim: int = 1024
    target_dim: int = 1024
    coreset_fraction: float = 0.1
    projection_dim: int = 128
    num_starts: int = 10
    num_neighbors: int = 9
    anomaly_scorer_num_nn: int = 1
    sampler: str = "greedy"
    sigma: float = 4.0
    seed: int = 0
    dtype: str = "float32"
    coreset_dtype: str = "float32"
    search: str = "auto"
    batch_size: int = 8

    def __post_init__(self):
        if not isinstance(self.backbone, str) or self.backbone not in ARCHITECTURES:
            raise ValueError(f"backbone: expected one of {sorted(ARCHITECTURES)}, got {self.backbone!r}")
        if isinstance(self.layers, str):
            raise ValueError(f"layers: expected a sequence of layer names, got the string {self.layers!r}")
        layers = default_layers(self.backbone) if self.layers is None else tuple(self.layers)
        object.__setattr__(self, "layers", layers)
        taps = layer_names(self.backbone)
        if not self.layers or any(name not in taps for name in self.layers):
            raise ValueError(f"layers: expected a non-empty tuple of {taps} for {self.backbone}, got {self.layers!r}")
        if list(self.layers) != sorted(self.layers, key=taps.index) or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers: expected distinct layers, finest first, got {self.layers!r}")
        for name in ("resize", "crop", "patch_size", "stride", "pretrain_dim", "target_dim", "num_starts",
                     "num_neighbors", "anomaly_scorer_num_nn", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        for name, upper in _UPPER.items():
            if getattr(self, name) > upper:
                raise ValueError(f"{name}: expected at most {upper}, got {getattr(self, name)}")
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"geometry: expected one of {GEOMETRIES}, got {self.geometry!r}")
        if self.geometry == "center_crop" and self.crop > self.resize:
            raise ValueError(f"crop: expected at most resize ({self.resize}), got {self.crop}")
        if self.crop < 32:
            raise ValueError(f"crop: expected at least 32 pixels (the backbone downsamples 16x), got {self.crop}")
        if isinstance(self.projection_dim, bool) or not isinstance(self.projection_dim, int) or not 0 <= self.projection_dim <= 65536:
            raise ValueError(f"projection_dim: expected an integer in [0, 65536], got {self.projection_dim!r}")
        if not _is_real(self.coreset_fraction) or not 0.0 < self.coreset_fraction <= 1.0:
            raise ValueError(f"coreset_fraction: expected a number in (0, 1], got {self.coreset_fraction!r}")
        if not _is_real(self.sigma) or not 0.0 < self.sigma <= 1000.0:
            raise ValueError(f"sigma: expected a positive number (at most 1000), got {self.sigma!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed: expected an integer in [0, {MAX_SEED}], got {self.seed!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype: expected one of {_DTYPES}, got {self.dtype!r}")
        if self.coreset_dtype not in _DTYPES:
            raise ValueError(f"coreset_dtype: expected one of {_DTYPES}, got {self.coreset_dtype!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler: expected one of {SAMPLERS}, got {self.sampler!r}")
        if self.search not in SEARCHES:
            raise ValueError(f"search: expected one of {SEARCHES}, got {self.search!r}")
        if self.weights is not None and not isinstance(self.weights, str):
            raise ValueError(f"weights: expected a path string or None, got {self.weights!r}")

    @property
    def image_geometry(self) -> ImageGeometry:
        """`resize`, `crop` and `geometry` as the one value images, masks and maps go through."""
        return ImageGeometry(resize=self.resize, crop=self.crop, mode=self.geometry)

    @property
    def bank_rows_needed(self) -> int:
        """The fewest bank rows this config can score with: max(b, k)."""
        return max(self.num_neighbors, self.anomaly_scorer_num_nn)

    def bank_size(self, num_rows: int) -> int:
        """The bank's rows after sampling `num_rows` training patches (`sampler`, `coreset_fraction`)."""
        from patchcore_jax._src.stages.coreset import coreset_size

        return int(num_rows) if self.sampler == "identity" else coreset_size(num_rows, self.coreset_fraction)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "layers": list(self.layers)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, strict: bool = False) -> "PatchCoreConfig":
        """The inverse of `to_dict`. `strict` (model files): every field present, each of its JSON type
        (a list for `layers`), except the `LATER_FIELDS`, which model files written before them lack and
        which take their defaults; otherwise missing fields take their defaults."""
        if not isinstance(data, dict):
            raise ValueError(f"config: expected an object of settings, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"config: unknown fields {unknown}")
        if strict:
            missing = sorted(set(fields) - set(data) - set(LATER_FIELDS))
            if missing:
                raise ValueError(f"config: missing fields {missing}")
            for name, value in data.items():
                want = _JSON_TYPES[name]
                if isinstance(value, bool) or not isinstance(value, want):
                    raise ValueError(f"config.{name}: expected {_type_names(want)}, got {value!r}")
                if name == "layers" and not all(isinstance(v, str) for v in value):
                    raise ValueError(f"config.layers: expected a list of strings, got {value!r}")
        data = dict(data)
        if "layers" in data and isinstance(data["layers"], list):
            data["layers"] = tuple(data["layers"])
        return cls(**data)

    def replace(self, **changes) -> "PatchCoreConfig":
        return dataclasses.replace(self, **changes)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_JSON_TYPES = {
    "backbone": str, "weights": (str, type(None)), "layers": list, "resize": int, "crop": int, "geometry": str,
    "patch_size": int, "stride": int, "pretrain_dim": int, "target_dim": int, "coreset_fraction": (int, float),
    "projection_dim": int, "num_starts": int, "num_neighbors": int, "anomaly_scorer_num_nn": int, "sampler": str, "sigma": (int, float), "seed": int,
    "dtype": str, "coreset_dtype": str, "search": str, "batch_size": int,
}


def _type_names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    names = {str: "a string", int: "an integer", float: "a number", list: "a list", type(None): "null"}
    return " or ".join(names[t] for t in types)
