"""The PatchCore model: the one place where the stages are strung together.

Two stages, one boundary:
- host: every input (file, PIL image, array of any size) -> `preprocess.preprocess_image` -> one uint8
  crop `(crop, crop, 3)`; the same function for every way in, so one picture gives one crop.
- device: uint8 crops `(batch_size, crop, crop, 3)` (the last batch padded, so one compiled shape per
  configuration) -> ImageNet normalisation -> backbone -> patch aggregation -> (fit) the memory bank
  and greedy coreset, (predict) Eq. 6/7 scores and anomaly maps at the crop's size.
Inputs are validated on the host, once, at the public boundary; the device stages never pull an
array back to check it. What leaves the device (features at fit, scores and maps at predict) is
checked on the host, where it has to go anyway.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from patchcore_jax import aggregate, backbone, coreset, neighbors, scoring, segmentation
from patchcore_jax.config import PatchCoreConfig
from patchcore_jax.detector import (  # noqa: F401 -- re-exported: the model's public names
    CALIBRATION_QUANTILES, Detector, Prediction, Threshold, check_quantile, check_threshold,
)
from patchcore_jax.persistence import ModelFileError  # noqa: F401 -- re-exported: model files raise it

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
# Nominal patch scores recorded at fit (a seeded sample of training patches against the bank).
CALIBRATION_SAMPLE = 4096


def normalise(crops: jax.Array) -> jax.Array:
    """uint8 crops `(B, H, W, 3)` -> float32, ImageNet-normalised (torchvision's ToTensor + Normalize)."""
    return (crops.astype(jnp.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


class PatchCore(Detector):
    """PatchCore anomaly detection (Roth et al., CVPR 2022).

    Example:
      model = PatchCore(PatchCoreConfig(weights="wide_resnet50_2.safetensors")).fit("train/good")
      scores, maps = model.predict(test_images)   # (B,), (B, crop, crop)

    Images may be given as a batch array `(B, H, W, C)`, a list of single images `(H, W[, C])` of any
    sizes, PIL images, file paths, or a folder (see `patchcore_jax.preprocess`); uint8, uint16 or
    float in [0, 1]. A bare 3-D array is refused (one image or a grayscale batch?): pass `image[None]`.
    """

    def __init__(self, config: PatchCoreConfig | None = None, *, progress: bool = True, mesh=None,
                 backbone_weights=None):
        """`mesh`: None (one device), a `jax.sharding.Mesh` with one axis, or "all" for a mesh over
        every device of every process; with a mesh the bank is row-sharded and extraction is
        data-parallel. `backbone_weights`: a state dict already read (a model file's own copy), used
        instead of reading `config.weights` (a file, or a name such as "timm/wide_resnet50_2.tv_in1k"
        or "wrn50", see `patchcore_jax.hub`)."""
        self.config = config or PatchCoreConfig()
        self.progress = progress
        if isinstance(mesh, str):
            if mesh != "all":
                raise ValueError(f"mesh: expected None, a Mesh or 'all', got {mesh!r}")
            from patchcore_jax import sharding

            mesh = sharding.make_mesh()
        self.mesh = mesh
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        self.weights_sha256 = None
        source = backbone_weights
        if backbone_weights is None and cfg.weights is not None:
            from patchcore_jax import hub

            source = hub.resolve(cfg.weights)  # a file path, or a named file from the Hub cache
            self.weights_sha256 = _sha256(source) if os.path.isfile(source) else None
        self._extract = backbone.feature_extractor(cfg.backbone, weights=source, layers=cfg.layers, seed=cfg.seed,
                                                   dtype=dtype)
        self.bank: jax.Array | None = None
        self.index: neighbors.BankIndex | None = None
        self.image_threshold: Threshold | None = None
        self.pixel_threshold: Threshold | None = None
        self.num_patches_seen = 0
        # Statistics that fix the score scale: "fit" (nominal patch scores of training patches
        # against the bank) and, after `calibrate`, "good_images" (held-out good images' scores and
        # map values). Quantiles are keyed by str(q).
        self.calibration: dict = {}
        self._scorer: concurrent.futures.ThreadPoolExecutor | None = None  # made on the first predict
        apply = self._extract.apply

        @jax.jit
        def embed(state, crops):
            feats = apply(state, normalise(crops).astype(dtype))
            return aggregate._aggregate(
                tuple(feats[name] for name in cfg.layers), patch_size=cfg.patch_size, stride=cfg.stride,
                pretrain_dim=cfg.pretrain_dim, target_dim=cfg.target_dim,
            ).astype(jnp.float32)

        self._embed_fn = embed
        self._state = self._extract.state
        if self.mesh is not None:
            from patchcore_jax import sharding

            self._state = sharding.replicate(self._state, self.mesh)  # once, not per batch

    # -- shapes ------------------------------------------------------------------------------------
    @functools.cached_property
    def feature_grid(self) -> tuple[int, int]:
        """`(h, w)` of the patch grid of one crop (no computation: shapes only)."""
        crops = jax.ShapeDtypeStruct((1, self.config.crop, self.config.crop, 3), jnp.uint8)
        out = jax.eval_shape(self._embed_fn, self._state, crops)
        return int(out.shape[1]), int(out.shape[2])

    def bank_size_for(self, num_images: int) -> int:
        """The memory bank's rows after fitting on `num_images` images."""
        h, w = self.feature_grid
        return self.bank_size_for_rows(num_images * h * w)

    def bank_size_for_rows(self, n: int) -> int:
        """The memory bank's rows after fitting on `n` training patches."""
        return n if self.config.coreset_fraction >= 1.0 else max(1, int(n * self.config.coreset_fraction))

    def _require_fitted(self) -> None:
        if self.index is None:
            raise ValueError("model: not fitted; call fit(images) or PatchCore.load(path) first")

    def _scale_low(self) -> float:
        return self.calibration["fit"]["patch_score_quantiles"]["0.5"]

    def describe(self) -> str:
        """One line about the bank, e.g. "bank 3136 x 1024 from 31360 patches"."""
        self._require_fitted()
        return f"bank {self.bank.shape[0]} x {self.bank.shape[1]} from {self.num_patches_seen} patches"

    # -- the device stage --------------------------------------------------------------------------
    def embed_crops(self, crops) -> jax.Array:
        """uint8 crops `(B, crop, crop, 3)` (host or device array) -> patch features
        `(B, h, w, target_dim)` float32 on the device; batches are padded to `batch_size`."""
        b = self._check_crops(crops)
        size = self.config.batch_size
        outs = []
        for start in range(0, b, size):
            chunk = _rows(crops, start, min(start + size, b))
            n = chunk.shape[0]
            if self.mesh is not None:
                from patchcore_jax import sharding

                host = jax.device_get(chunk) if isinstance(chunk, jax.Array) else np.asarray(chunk)
                outs.append(_rows(sharding.embed_data_parallel(self._embed_fn, self._state, _pad_host(host, size), self.mesh), 0, n))
                continue
            if isinstance(chunk, jax.Array):
                padded = _pad_device(chunk, size) if n < size else chunk
            else:
                padded = jax.device_put(_pad_host(np.asarray(chunk), size))
            outs.append(_rows(self._embed_fn(self._state, padded), 0, n))
        return outs[0] if len(outs) == 1 else jnp.concatenate(outs)

    def _check_crops(self, crops) -> int:
        c = self.config.crop
        shape = tuple(getattr(crops, "shape", ()))
        if len(shape) != 4 or shape[1:] != (c, c, 3) or shape[0] == 0 or np.dtype(crops.dtype) != np.uint8:
            raise ValueError(f"crops: expected uint8 crops of shape (B, {c}, {c}, 3) (see PatchCore.prepare), got "
                             f"{getattr(crops, 'dtype', type(crops).__name__)} {shape}")
        return shape[0]

    def score_crops(self, crops) -> tuple[np.ndarray, np.ndarray]:
        """The device stage of `predict`: uint8 crops `(B, crop, crop, 3)` -> image scores `(B,)` and
        anomaly maps `(B, crop, crop)`, float32 host arrays."""
        return self._launch(crops)()

    def _launch(self, crops):
        """Starts `score_crops`: the backbone is dispatched from this thread, the search, scores and
        maps from the model's scoring thread; returns the call that waits for the result (and checks
        it). `predict_iter` prepares and dispatches the next batch meanwhile.

        DECISION: a scoring thread, because XLA runs programs dispatched from different threads at the
        same time and the exact search with the clustered index is a loop on one CPU core: on a CPU,
        batch i's search then runs beside batch i + 1's backbone, which uses every core (predict end to
        end, WRN50-2 at 224 on 2 cores: 166 ms per image against 179 ms dispatched from one thread)."""
        self._require_fitted()
        feats = self.embed_crops(crops)
        return self._scoring_thread().submit(self._score_features, feats).result

    def _scoring_thread(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._scorer is None:
            self._scorer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="patchcore-jax-scoring")
        return self._scorer

    def _score_features(self, feats):
        """Patch features `(B, h, w, D)` on the device -> checked host `(scores (B,), maps (B, crop, crop))`."""
        b, h, w, d = feats.shape
        # The device stage makes no implicit transfer (as `fit`, tested under the same guard).
        with jax.transfer_guard("disallow"):
            if self.mesh is not None:
                from patchcore_jax import sharding

                s, patch = sharding.image_scores(self.index, feats.reshape(b, h * w, d),
                                                 num_neighbors=self.config.num_neighbors)
            else:
                s, patch = scoring.image_scores_from_index(self.index, feats.reshape(b, h * w, d),
                                                           num_neighbors=self.config.num_neighbors)
            maps = segmentation.anomaly_maps(patch.reshape(b, h, w), (self.config.crop, self.config.crop),
                                             sigma=self.config.sigma)
            scores, host_maps = jax.device_get((s, maps))
        if not (np.isfinite(scores).all() and np.isfinite(host_maps).all()):
            raise ValueError(
                "scores: the device returned NaN or infinite scores; the features overflow float32 or are NaN "
                f"(backbone weights: {self.config.weights or 'random initialisation'})"
            )
        return np.asarray(scores, np.float32), np.asarray(host_maps, np.float32)

    # -- fitting -----------------------------------------------------------------------------------
    def fit(self, images) -> "PatchCore":
        """Builds the memory bank from defect-free images (any input form, see the class docstring)."""
        with self._bar(images, "extracting train features") as bar:
            def crops():
                for _, batch, _ in self._crop_batches(images):
                    yield batch
                    bar.update(len(batch))

            return self.fit_crops(crops())

    def fit_crops(self, batches) -> "PatchCore":
        """The device stage of `fit`: an iterable of uint8 crop batches `(b, crop, crop, 3)`.

        On one device with a projection and a coreset (the default), the features stream through
        `bank.build_memory_bank`: only the projected rows stay in memory, full rows are spilled to a
        temporary folder (`$TMPDIR`) and the chosen ones read back, so the bank before subsampling
        need not fit in memory. Otherwise (a mesh, `projection_dim=0`, `coreset_fraction=1`) the
        features are gathered in memory, one copy at a time.
        """
        from patchcore_jax import bank as bank_lib

        cfg = self.config
        sample = _Reservoir(CALIBRATION_SAMPLE, seed=cfg.seed + 1)
        counts = [0]

        def features():
            for batch in batches:
                feats = np.asarray(jax.device_get(self.embed_crops(batch)))
                rows = feats.reshape(-1, feats.shape[-1])
                finite = np.isfinite(rows)
                if not finite.all():
                    raise ValueError(
                        f"features: the backbone produced {int(rows.size - finite.sum())} NaN or infinite values "
                        f"(backbone weights: {cfg.weights or 'random initialisation'}); check the weights file")
                sample.feed(rows)
                counts[0] += len(rows)
                yield rows

        streaming = self.mesh is None and cfg.projection_dim > 0 and cfg.coreset_fraction < 1.0
        if streaming:
            projection = coreset.random_projection(cfg.seed, cfg.target_dim, cfg.projection_dim)
            with tqdm(desc="greedy coreset", unit="step", disable=not self.progress, leave=False) as bar:
                def report(stage, count, bar=bar):
                    if stage == "coreset":
                        bar.update(count - bar.n)

                try:
                    bank, _ = bank_lib.build_memory_bank(
                        features(), coreset_fraction=cfg.coreset_fraction, projection=projection, seed=cfg.seed,
                        num_starts=cfg.num_starts, store_dtype=cfg.coreset_dtype, progress=report)
                except ValueError as err:
                    if counts[0] == 0 and str(err).startswith("batches:"):  # the stream was empty
                        raise ValueError("images: expected at least one training image, got none") from None
                    raise
        else:
            bank = _gather(features())
            if bank is None:
                raise ValueError("images: expected at least one training image, got none")
        n = counts[0]
        self.num_patches_seen = n
        if len(bank) < cfg.num_neighbors:
            raise ValueError(f"images: {n} training patches give a bank of {len(bank)} rows, fewer than num_neighbors "
                             f"({cfg.num_neighbors}); fit on more images, raise coreset_fraction or lower num_neighbors")
        if not streaming:
            bank = self._subsample(bank)
        self.set_bank(bank)
        self.calibration = {"fit": self._nominal_patch_scores(sample.rows())}
        top = self.calibration["fit"]["patch_score_quantiles"]["1.0"]
        self.image_threshold = None
        self.pixel_threshold = Threshold(top, f"fit: the largest nominal patch score of {self.calibration['fit']['patch_sample']} "
                                              "sampled training patches")
        return self

    def _subsample(self, bank: np.ndarray) -> np.ndarray:
        """The in-memory coreset (a mesh, or no projection); the same start-point rule as the stream."""
        cfg = self.config
        n = len(bank)
        if cfg.coreset_fraction >= 1.0:
            return bank
        num = self.bank_size_for_rows(n)
        rng = np.random.default_rng(cfg.seed)
        starts = tuple(rng.choice(n, size=min(cfg.num_starts, n), replace=False).tolist())
        projection = None
        if cfg.projection_dim:
            projection = coreset.random_projection(cfg.seed, bank.shape[1], cfg.projection_dim)
        with tqdm(total=num, desc="greedy coreset", unit="step", disable=not self.progress, leave=False) as bar:
            def advance(done, bar=bar):
                bar.update(done - bar.n)

            if self.mesh is not None:
                from patchcore_jax import sharding

                idx = sharding.greedy_coreset(bank, num, projection=projection, start_indices=starts, mesh=self.mesh,
                                              store_dtype=cfg.coreset_dtype)
            else:
                idx = coreset.greedy_coreset(jax.device_put(bank), num, projection=projection, start_indices=starts,
                                             store_dtype=cfg.coreset_dtype if projection is not None else None,
                                             progress=advance, chunk=max(64, num // 50))
        return bank[np.sort(np.asarray(jax.device_get(idx)))]

    def _nominal_patch_scores(self, sample: np.ndarray) -> dict:
        """Nominal patch scores: a seeded sample of the training patches against the bank (a coreset
        row scores 0; the others measure how far nominal patches sit from the bank)."""
        if self.mesh is not None:
            from patchcore_jax import sharding

            dist, _ = sharding._search_jit(self.index, sample, k=1, mesh=self.mesh)
        else:
            dist, _ = neighbors.search(self.index, jax.device_put(sample), 1)
        dist = np.asarray(jax.device_get(dist), np.float64)[:, 0]
        return {"patch_score_quantiles": {str(q): float(np.quantile(dist, q)) for q in CALIBRATION_QUANTILES},
                "patch_sample": int(len(sample))}

    def set_bank(self, bank, *, clustered_index=None) -> None:
        """Installs a memory bank `(M, target_dim)` directly (as `load` does), and builds its search
        index (`search_kind`); `clustered_index`: one already built for this bank (a model file's)."""
        bank = np.asarray(bank, np.float32)
        if bank.ndim != 2 or bank.shape[1] != self.config.target_dim or len(bank) == 0:
            raise ValueError(f"bank: expected shape (M, {self.config.target_dim}) with M >= 1, got {bank.shape}")
        if not np.isfinite(bank).all():
            raise ValueError("bank: holds NaN or infinite values")
        if len(bank) < self.config.num_neighbors:
            raise ValueError(
                f"bank: {len(bank)} rows are fewer than num_neighbors ({self.config.num_neighbors}); "
                "fit on more images, raise coreset_fraction or lower num_neighbors"
            )
        if self.mesh is not None:
            from patchcore_jax import sharding

            self.bank = jax.device_put(bank)
            self.index = sharding.build_index(bank, self.mesh)
        elif self.search_kind() == "clustered":
            from patchcore_jax import clustered

            self.index = clustered_index if clustered_index is not None else clustered.build_clustered_index(
                bank, seed=self.config.seed)
            self.bank = jax.device_put(bank)
        else:
            self.index = neighbors.build_index(bank)  # checked on the host, then put on the device
            self.bank = jax.device_put(bank)

    def search_kind(self) -> str:
        """The index this model searches with here: `config.search`, "auto" resolved by the backend
        (and a mesh, which always searches by sharded brute force)."""
        if self.mesh is not None:
            return "brute"
        if self.config.search != "auto":
            return self.config.search
        return "clustered" if jax.default_backend() == "cpu" else "brute"

    # -- model files -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Writes the model folder `path` (see `patchcore_jax.persistence`): sealed by a manifest of
        sha256 sums, with the backbone weights inside, replacing an earlier model atomically."""
        from patchcore_jax import persistence

        persistence.save_model(self, path)

    def export(self, path: str | os.PathLike, *, format: str = "stablehlo", batch: int | None = None) -> dict:
        """Writes the fitted model as one self-contained program to the new file `path`: "stablehlo"
        (`jax.export`) or "onnx" (needs the `export` extra). Input uint8 crops `(B, crop, crop, 3)` as
        `prepare` gives them; outputs `score_crops`'s scores and maps. `batch`: None for any batch, or a
        fixed size. Returns the metadata written with it; see `patchcore_jax.export`."""
        from patchcore_jax import export as export_lib

        return export_lib.export_model(self, path, format=format, batch=batch)

    @classmethod
    def load(cls, path: str | os.PathLike, *, progress: bool = True, mesh=None) -> "PatchCore":
        """Reads a model folder written by `save`; `persistence.ModelFileError` names what is wrong."""
        from patchcore_jax import persistence

        return persistence.load_model(path, progress=progress, mesh=mesh)


class _Reservoir:
    """A uniform sample of up to `size` rows of a stream (Algorithm R, seeded): the same rows for the
    same stream, whatever its batching, with memory bounded by `size` rows."""

    def __init__(self, size: int, *, seed: int):
        self.size, self.rng, self.seen, self.buffer = size, np.random.default_rng(seed), 0, None

    def feed(self, rows: np.ndarray) -> None:
        if self.buffer is None:
            self.buffer = np.empty((self.size, rows.shape[1]), rows.dtype)
        positions = np.arange(self.seen, self.seen + len(rows))
        fill = positions < self.size
        self.buffer[positions[fill]] = rows[fill]
        if not fill.all():
            # Row t (0-based) replaces slot j ~ U{0..t} when j < size; in stream order, the later wins.
            j = self.rng.integers(0, positions[~fill] + 1)
            late = rows[~fill][j < self.size]
            j = j[j < self.size]
            # NumPy does not promise which of repeated indices wins an assignment: keep the last each.
            _, last_reversed = np.unique(j[::-1], return_index=True)
            last = len(j) - 1 - last_reversed
            self.buffer[j[last]] = late[last]
        self.seen += len(rows)

    def rows(self) -> np.ndarray:
        return self.buffer[: min(self.seen, self.size)]


def _gather(chunks) -> np.ndarray | None:
    """Concatenates a stream of `(n_i, D)` arrays holding one copy at a time: each chunk is freed as it
    is copied into the result (a plain concatenate would hold the chunks and the result together)."""
    held = list(chunks)
    if not held:
        return None
    out = np.empty((sum(len(c) for c in held), held[0].shape[1]), np.float32)
    at = 0
    while held:
        chunk = held.pop(0)
        out[at : at + len(chunk)] = chunk
        at += len(chunk)
    return out


def _rows(x, start: int, stop: int):
    """`x[start:stop]` along the first axis; for a device array a static slice (an indexing with
    Python ints would move the indices to the device implicitly)."""
    if start == 0 and stop == x.shape[0]:
        return x
    if isinstance(x, jax.Array):
        return jax.lax.slice_in_dim(x, start, stop, axis=0)
    return x[start:stop]


def _pad_host(x: np.ndarray, size: int) -> np.ndarray:
    n = x.shape[0]
    return x if n == size else np.concatenate([x, np.zeros((size - n,) + x.shape[1:], x.dtype)])


@functools.partial(jax.jit, static_argnames=("size",))
def _pad_device(x, size):
    return jnp.pad(x, ((0, size - x.shape[0]), (0, 0), (0, 0), (0, 0)))


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
