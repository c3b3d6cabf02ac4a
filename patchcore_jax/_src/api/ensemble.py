"""Ensembles of PatchCore models, as the published PatchCore's best results use them.

Each member is a `PatchCore` with its own backbone, feature taps, weights, memory bank and coreset.
All members see the same crops (they share `resize`, `crop` and `geometry`). Their scores and maps
are combined by one of two rules:

- Single images (`predict`, `predict_iter`, `score_crops`; the `predict` command): each member's image
  scores and maps are normalised by statistics the member recorded at fit, its nominal patch scores
  (`x -> (x - median) / (largest - median)`), then averaged over the members. An image's combined
  score depends on that image only, never on the others scored with it. On this scale 0 is a typical
  nominal patch and 1 the largest nominal patch seen at fit.
- A scored set (`combine_over_set`; the `evaluate` command): each member's raw scores and maps are
  min-max normalised over the whole evaluated set, then averaged, as the published evaluation does
  (run_patchcore.py).

Both rules are increasing affine maps of each member's scores, so an ensemble of one member ranks
images exactly as that member does. Thresholds, calibration and colours work as for one model, on the
combined scale.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from patchcore_jax._src.api.patchcore import PatchCore, place
from patchcore_jax._src.io import model_files
from patchcore_jax._src.model.config import PatchCoreConfig
from patchcore_jax._src.model.detector import Detector, Threshold
from patchcore_jax._src.model.fitted import FittedEnsemble


class PatchCoreEnsemble(Detector):
    """Several PatchCore members whose scores and maps are combined (see the module docstring).

    Example (the published best MVTec AD configuration; accuracy needs the pretrained weights):
      shared = dict(resize=320, crop=320, coreset_fraction=0.01, num_neighbors=1, target_dim=384)
      ensemble = PatchCoreEnsemble([
          PatchCoreConfig(backbone="wide_resnet101_2", weights="wrn101", **shared),
          PatchCoreConfig(backbone="resnext101_32x8d", weights="rx101", **shared),
          PatchCoreConfig(backbone="densenet201", weights="dn201", **shared),
      ]).fit("train/good")
    """

    def __init__(self, configs: Sequence[PatchCoreConfig] = (), *, progress=None, mesh=None, members=None):
        if members is None:
            configs = list(configs)
            if not configs or not all(isinstance(c, PatchCoreConfig) for c in configs):
                raise ValueError("configs: expected a non-empty sequence of PatchCoreConfig, one per member")
            members = [PatchCore(c, progress=progress, mesh=mesh) for c in configs]
        self.members = list(members)
        if any(m.collective for m in self.members):  # its members' collective steps would interleave
            raise ValueError("mesh: an ensemble on a mesh over several processes is not supported; use one "
                             "PatchCore per run there, or a mesh over this process's devices")
        first = self.members[0].config
        for i, m in enumerate(self.members[1:], 1):
            for field in ("resize", "crop", "geometry"):
                if getattr(m.config, field) != getattr(first, field):
                    raise ValueError(f"configs[{i}].{field}: members must see the same crops; expected "
                                     f"{getattr(first, field)!r} like configs[0], got {getattr(m.config, field)!r}")
        self.config = first  # the host stage (geometry, batch size) is the first member's
        self.progress = progress
        self.image_threshold: Threshold | None = None
        self.pixel_threshold: Threshold | None = None
        self.calibration: dict = {}
        if all(m.index is not None for m in self.members) and self.pixel_threshold is None:
            self._after_fit()

    @property
    def configs(self) -> list[PatchCoreConfig]:
        return [m.config for m in self.members]

    def require_fitted(self) -> None:
        for m in self.members:
            m.require_fitted()

    def scale_low(self) -> float:
        return 0.0  # the members' median nominal patch score, after their normalisation

    def bank_size_for(self, num_images: int) -> int:
        """The smallest member bank after fitting on `num_images` images."""
        return min(m.bank_size_for(num_images) for m in self.members)

    def describe(self) -> str:
        return "; ".join(f"{m.config.backbone} {m.describe()}" for m in self.members)

    # -- fitting -----------------------------------------------------------------------------------
    def fit(self, images) -> "PatchCoreEnsemble":
        """Fits every member on the same crops (decoded and preprocessed once)."""
        batches, total = [], self.count(images)
        for _, crops, _ in self.crop_batches(images):
            batches.append(crops)
            self.report("preparing train images", sum(len(b) for b in batches), total)
        if not batches:
            raise ValueError("images: expected at least one training image, got none")
        for m in self.members:
            m.fit_crops(iter(batches))
        self._after_fit()
        return self

    def _after_fit(self) -> None:
        """The combined scale's calibration: each member's nominal quantiles, normalised, averaged
        (the median is 0 and the largest 1 by construction); the pixel threshold starts at 1."""
        quantiles = self.members[0].calibration["fit"]["patch_score_quantiles"]
        self.calibration = {"fit": {
            "patch_score_quantiles": {q: self._combined_quantile(q) for q in quantiles},
            "patch_sample": min(m.calibration["fit"]["patch_sample"] for m in self.members),
        }}
        self.image_threshold = None
        self.pixel_threshold = Threshold(1.0, "fit: the members' largest nominal patch scores (normalised)")

    def _combined_quantile(self, q: str) -> float:
        """A nominal quantile on the combined scale: the mean of the members' normalised ones."""
        values = []
        for m in self.members:
            quant = m.calibration["fit"]["patch_score_quantiles"]
            lo, hi = quant["0.5"], quant["1.0"]
            values.append((quant[q] - lo) / max(hi - lo, 1e-12))
        return float(np.mean(values))

    # -- scoring -----------------------------------------------------------------------------------
    def member_scores(self, crops) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each member's raw `(scores (B,), maps (B, crop, crop))` on the same uint8 crops."""
        self.require_fitted()
        return [m.score_crops(crops) for m in self.members]

    def launch(self, crops):
        """Starts the combined scores and maps of single images (the fit-statistics rule)."""
        self.require_fitted()
        fetches = [m.launch(crops) for m in self.members]  # every member dispatched before any waits

        def fetch():
            parts = [f() for f in fetches]
            scores = np.mean([self._normalise(i, s) for i, (s, _) in enumerate(parts)], axis=0)
            maps = np.mean([self._normalise(i, m) for i, (_, m) in enumerate(parts)], axis=0)
            return scores.astype(np.float32), maps.astype(np.float32)

        return fetch

    def _normalise(self, i: int, x: np.ndarray) -> np.ndarray:
        quant = self.members[i].calibration["fit"]["patch_score_quantiles"]
        lo, hi = quant["0.5"], quant["1.0"]
        return (np.asarray(x, np.float64) - lo) / max(hi - lo, 1e-12)

    # -- model files -------------------------------------------------------------------------------
    def fitted(self) -> FittedEnsemble:
        """What the fit produced, as one value: the members' and the combined scale's."""
        self.require_fitted()
        return FittedEnsemble(members=tuple(m.fitted() for m in self.members), calibration=self.calibration,
                              image_threshold=self.image_threshold, pixel_threshold=self.pixel_threshold)

    @classmethod
    def from_fitted(cls, value: FittedEnsemble, folder: str = "", *, progress=None, mesh=None) -> "PatchCoreEnsemble":
        """An ensemble placed from a fitted value; errors name the member's weights file in `folder`."""
        members = [place(m, os.path.join(folder, f"member-{i}", "backbone.safetensors"), progress=progress, mesh=mesh)
                   for i, m in enumerate(value.members)]
        ensemble = cls(members=members, progress=progress)
        ensemble.calibration = value.calibration
        ensemble.image_threshold, ensemble.pixel_threshold = value.image_threshold, value.pixel_threshold
        return ensemble

    def save(self, path: str | os.PathLike) -> None:
        """One sealed folder: `ensemble.json` and `member-i/` per member (see `io.model_files`)."""
        model_files.save_model(self.fitted(), path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, progress=None, mesh=None) -> "PatchCoreEnsemble":
        """Reads an ensemble folder (or a single model's, as an ensemble of one)."""
        value = model_files.load_fitted(path)
        if isinstance(value, FittedEnsemble):
            return cls.from_fitted(value, os.fsdecode(path), progress=progress, mesh=mesh)
        member = place(value, os.path.join(os.fsdecode(path), "backbone.safetensors"), progress=progress, mesh=mesh)
        return cls(members=[member], progress=progress)


def combine_over_set(member_scores: Sequence[np.ndarray], member_maps: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The published evaluation's rule: each member's scores `(N,)` and maps `(N, H, W)` min-max
    normalised over the whole set, then averaged over the members."""

    def minmax(x):
        x = np.asarray(x, np.float64)
        lo, hi = x.min(), x.max()
        return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)

    scores = np.mean([minmax(s) for s in member_scores], axis=0)
    maps = np.mean([minmax(m) for m in member_maps], axis=0)
    return scores, maps
