"""`PatchCore`: the public model, a thin facade over the fitted value, the executor and the detector.

- host: every input (file, PIL image, array of any size) -> `preprocess.preprocess_image` -> one uint8
  crop `(crop, crop, 3)`; the same function for every way in, so one picture gives one crop
  (`model.detector.Detector`).
- device: uint8 crops `(batch_size, crop, crop, 3)` (the last batch padded, so one compiled shape per
  configuration) -> ImageNet normalisation -> backbone -> patch aggregation -> (fit) the memory bank
  and greedy coreset, (predict) Eq. 6/7 scores and anomaly maps at the crop's size
  (`run.executor.Executor`, on one device or a mesh).
- what a fit produces is one value, `model.fitted.Fitted` (`PatchCore.fitted()`), which the model files
  store and `PatchCore.from_fitted` places again.
Inputs are validated on the host, once, at the public boundary; the device stages never pull an
array back to check it.
"""

from __future__ import annotations

import os

import numpy as np

from patchcore_jax._src.io import export as export_lib
from patchcore_jax._src.io import hub
from patchcore_jax._src.io import model_files
from patchcore_jax._src.io.atomic import file_sha256
from patchcore_jax._src.model import backbone
from patchcore_jax._src.model import fitted as fitted_lib
from patchcore_jax._src.model.config import PatchCoreConfig
from patchcore_jax._src.model.detector import Detector, Threshold
from patchcore_jax._src.run.executor import Executor
from patchcore_jax._src.stages import coreset


class PatchCore(Detector):
    """PatchCore anomaly detection (Roth et al., CVPR 2022).

    Example:
      model = PatchCore(PatchCoreConfig(weights="wide_resnet50_2.safetensors")).fit("train/good")
      scores, maps = model.predict(test_images)   # (B,), (B, crop, crop)

    Images may be given as a batch array `(B, H, W, C)`, a list of single images `(H, W[, C])` of any
    sizes, PIL images, file paths, or a folder (see `patchcore_jax.preprocess`); uint8, uint16 or
    float in [0, 1]. A bare 3-D array is refused (one image or a grayscale batch?): pass `image[None]`.
    """

    def __init__(self, config: PatchCoreConfig | None = None, *, progress=None, mesh=None, backbone_weights=None):
        """`progress`: a callback `progress(stage, done, total)` for long work (a bool is accepted and
        means none: the library never prints). `mesh`: None (one device), a `jax.sharding.Mesh` with
        one axis, or "all" for a mesh over every device of every process; with a mesh the bank is
        row-sharded and extraction is data-parallel. `backbone_weights`: a state dict already read (a
        model file's own copy), used instead of reading `config.weights` (a file, or a name such as
        "timm/wide_resnet50_2.tv_in1k" or "wrn50", see `patchcore_jax.hub`)."""
        self.config = cfg = config or PatchCoreConfig()
        self.progress = progress
        self.weights_sha256 = None
        source = backbone_weights
        if backbone_weights is None and cfg.weights is not None:
            source = hub.resolve(cfg.weights)  # a file path, or a named file from the Hub cache
            self.weights_sha256 = file_sha256(source) if os.path.isfile(source) else None
        import jax.numpy as jnp

        self.extractor = backbone.feature_extractor(cfg.backbone, weights=source, layers=cfg.layers, seed=cfg.seed,
                                                    dtype=jnp.dtype(cfg.dtype))
        self.embed_fn = fitted_lib.make_embed(self.extractor.apply, cfg)
        self.executor = Executor(cfg, self.embed_fn, self.extractor.state, mesh=mesh)
        self.bank = None
        self.index = None
        self.clustered_index = None
        self.image_threshold: Threshold | None = None
        self.pixel_threshold: Threshold | None = None
        self.num_patches_seen = 0
        # Statistics that fix the score scale: "fit" (nominal patch scores of training patches
        # against the bank) and, after `calibrate`, "good_images" (held-out good images' scores and
        # map values). Quantiles are keyed by str(q).
        self.calibration: dict = {}

    @property
    def mesh(self):
        return self.executor.mesh

    # -- shapes ------------------------------------------------------------------------------------
    @property
    def feature_grid(self) -> tuple[int, int]:
        """`(h, w)` of the patch grid of one crop (no computation: shapes only)."""
        return self.executor.feature_grid

    def bank_size_for(self, num_images: int) -> int:
        """The memory bank's rows after fitting on `num_images` images."""
        h, w = self.feature_grid
        return self.bank_size_for_rows(num_images * h * w)

    def bank_size_for_rows(self, n: int) -> int:
        """The memory bank's rows after fitting on `n` training patches."""
        return coreset.coreset_size(n, self.config.coreset_fraction)

    def require_fitted(self) -> None:
        if self.index is None:
            raise ValueError("model: not fitted; call fit(images) or PatchCore.load(path) first")

    def scale_low(self) -> float:
        return self.calibration["fit"]["patch_score_quantiles"]["0.5"]

    def describe(self) -> str:
        """One line about the bank, e.g. "bank 3136 x 1024 from 31360 patches"."""
        self.require_fitted()
        return f"bank {self.bank.shape[0]} x {self.bank.shape[1]} from {self.num_patches_seen} patches"

    # -- the device stage --------------------------------------------------------------------------
    def embed_crops(self, crops):
        """uint8 crops `(B, crop, crop, 3)` (host or device array) -> patch features
        `(B, h, w, target_dim)` float32 on the device; batches are padded to `batch_size`."""
        self.check_crops(crops)
        return self.executor.embed(crops)

    def check_crops(self, crops) -> int:
        """The number of crops; ValueError unless uint8 `(B, crop, crop, 3)` with B >= 1."""
        c = self.config.crop
        shape = tuple(getattr(crops, "shape", ()))
        if len(shape) != 4 or shape[1:] != (c, c, 3) or shape[0] == 0 or np.dtype(crops.dtype) != np.uint8:
            raise ValueError(f"crops: expected uint8 crops of shape (B, {c}, {c}, 3) (see PatchCore.prepare), got "
                             f"{getattr(crops, 'dtype', type(crops).__name__)} {shape}")
        return shape[0]

    def launch(self, crops):
        """Starts scoring uint8 crops (see `Executor.launch`); returns the call that waits for
        `(scores (B,), maps (B, crop, crop))`. `predict_iter` prepares the next batch meanwhile."""
        self.require_fitted()
        self.check_crops(crops)
        return self.executor.launch(self.index, crops)

    def finish_launches(self, error: BaseException | None = None) -> None:
        """See `Detector.finish_launches`: on a mesh over several processes, takes part in the other
        processes' remaining scoring steps (`Executor.finish`)."""
        if self.index is not None:
            self.executor.finish(self.index, error)

    @property
    def collective(self) -> bool:
        return self.executor.hosts is not None

    # -- fitting -----------------------------------------------------------------------------------
    def fit(self, images) -> "PatchCore":
        """Builds the memory bank from defect-free images (any input form, see the class docstring)."""
        total = self.count(images)

        def crops():
            done = 0
            for _, batch, _ in self.crop_batches(images):
                yield batch
                done += len(batch)
                self.report("extracting train features", done, total)

        return self.fit_crops(crops())

    def fit_crops(self, batches) -> "PatchCore":
        """The device stage of `fit`: an iterable of uint8 crop batches `(b, crop, crop, 3)` (see
        `Executor.fit_bank` for how the bank is built)."""
        def checked():
            for batch in batches:
                self.check_crops(batch)
                yield batch

        bank, seen, sample = self.executor.fit_bank(checked(), progress=self.report)
        self.set_bank(bank)
        self.num_patches_seen = seen
        self.calibration = {"fit": fitted_lib.nominal_calibration(self.executor.nearest_distances(self.index, sample))}
        self.image_threshold = None
        self.pixel_threshold = fitted_lib.fit_pixel_threshold(self.calibration["fit"])
        return self

    def set_bank(self, bank, *, clustered_index=None) -> None:
        """Installs a memory bank `(M, target_dim)` directly (as `load` does), and builds its search
        index (`search_kind`); `clustered_index`: one already built for this bank (a model file's)."""
        bank = fitted_lib.check_bank(bank, self.config)
        if self.search_kind() != "clustered":
            clustered_index = None
        self.bank, self.index = self.executor.build_index(bank, clustered_index=clustered_index)
        self.clustered_index = self.index if self.search_kind() == "clustered" else None

    def search_kind(self) -> str:
        """The index this model searches with here: `config.search`, "auto" resolved by the backend
        (and a mesh, which always searches by sharded brute force)."""
        return self.executor.search_kind()

    # -- the fitted value ----------------------------------------------------------------------------
    def fitted(self) -> fitted_lib.Fitted:
        """What the fit produced, as one value (host arrays): what `save` writes."""
        self.require_fitted()
        import jax

        return fitted_lib.Fitted(
            config=self.config, weights=self.extractor.state_dict(), bank=np.asarray(jax.device_get(self.bank)),
            clustered_index=self.clustered_index, calibration=self.calibration,
            image_threshold=self.image_threshold, pixel_threshold=self.pixel_threshold,
            num_patches_seen=int(self.num_patches_seen), weights_sha256=self.weights_sha256)

    @classmethod
    def from_fitted(cls, value: fitted_lib.Fitted, *, progress=None, mesh=None) -> "PatchCore":
        """A model placed from a fitted value (on one device, or on `mesh`)."""
        model = cls(value.config, progress=progress, mesh=mesh, backbone_weights=value.weights)
        model.set_bank(value.bank, clustered_index=value.clustered_index)
        model.calibration = value.calibration
        model.image_threshold, model.pixel_threshold = value.image_threshold, value.pixel_threshold
        model.num_patches_seen = value.num_patches_seen
        model.weights_sha256 = value.weights_sha256
        return model

    # -- model files -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Writes the model folder `path` (see `patchcore_jax._src.io.model_files`): sealed by a
        manifest of sha256 sums, with the backbone weights inside, replacing an earlier model atomically."""
        model_files.save_model(self.fitted(), path)

    def export(self, path: str | os.PathLike, *, format: str = "stablehlo", batch: int | None = None) -> dict:
        """Writes the fitted model as one self-contained program to the new file `path`: "stablehlo"
        (`jax.export`) or "onnx" (needs the `export` extra). Input uint8 crops `(B, crop, crop, 3)` as
        `prepare` gives them; outputs `score_crops`'s scores and maps. `batch`: None for any batch, or a
        fixed size. Returns the metadata written with it; see `patchcore_jax.export`."""
        return export_lib.export_model(self, path, format=format, batch=batch)

    @classmethod
    def load(cls, path: str | os.PathLike, *, progress=None, mesh=None) -> "PatchCore":
        """Reads a model folder written by `save`; `ModelFileError` names what is wrong."""
        value = model_files.load_fitted(path)
        if not isinstance(value, fitted_lib.Fitted):
            raise model_files.ModelFileError(
                f"{model_files.where(path)}: an ensemble of {len(value.members)} members; load it with "
                "patchcore_jax.load or PatchCoreEnsemble.load")
        return place(value, os.path.join(os.fsdecode(path), "backbone.safetensors"), progress=progress, mesh=mesh)


def place(value: fitted_lib.Fitted, where: str, *, progress=None, mesh=None) -> PatchCore:
    """`PatchCore.from_fitted` for a model file's value: its errors name `where` (the weights file)."""
    try:
        return PatchCore.from_fitted(value, progress=progress, mesh=mesh)
    except ValueError as err:
        raise model_files.ModelFileError(f"{model_files.where(where)}: {err}") from None
