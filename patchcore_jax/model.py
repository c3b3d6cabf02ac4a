"""The PatchCore model: the one place where the stages are strung together.

fit: images -> resize, centre crop, ImageNet normalisation -> backbone -> patch aggregation, streamed
in batches into a host-side bank (memory grows with the bank only) -> greedy coreset -> a prepared
search index. predict: the same embedding -> Eq. 6/7 scores -> anomaly maps at the crop's size.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from patchcore_jax import aggregate, backbone, coreset, neighbors, scoring, segmentation
from patchcore_jax.config import PatchCoreConfig

FORMAT_NAME = "patchcore-jax"
FORMAT_VERSION = 1
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


class ModelFileError(ValueError):
    """A model directory that is missing, truncated, tampered with or of a newer format."""


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision's `Resize(size)`: the shorter side becomes `size`, the longer keeps the aspect."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def preprocess(images: jax.Array, *, resize: int, crop: int) -> jax.Array:
    """`(B, H, W, 3)` floats in [0, 1] -> `(B, crop, crop, 3)` ImageNet-normalised.

    Bilinear resizing with antialiasing (the triangle filter PIL's bilinear resize applies when
    shrinking), then torchvision's centre crop (`top = round((h - crop) / 2)`).
    """
    b, h, w, c = images.shape
    rh, rw = resized_shape(h, w, resize)
    if (rh, rw) != (h, w):
        images = jax.image.resize(images, (b, rh, rw, c), method="linear", antialias=True)
    top, left = int(round((rh - crop) / 2.0)), int(round((rw - crop) / 2.0))
    images = images[:, top : top + crop, left : left + crop]
    return (images - IMAGENET_MEAN) / IMAGENET_STD


def as_float_images(batch, *, name: str = "images") -> np.ndarray:
    """uint8 `[0, 255]` or float `[0, 1]` images, `(B, H, W, 3)`, `(B, H, W, 1)` or grayscale
    `(B, H, W)` -> float32 `(B, H, W, 3)` in [0, 1]; ValueError naming what is wrong otherwise."""
    x = np.asarray(batch)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"{name}: expected (B, H, W, 3), (B, H, W, 1) or (B, H, W) images, got shape {x.shape}")
    if 0 in x.shape:
        raise ValueError(f"{name}: expected a non-empty batch, got shape {x.shape}")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    elif x.dtype.kind == "f":
        if not np.isfinite(x).all():
            raise ValueError(f"{name}: found NaN or infinite pixel values")
        if x.min() < 0.0 or x.max() > 1.0:
            raise ValueError(f"{name}: float images must lie in [0, 1], got [{x.min():.3g}, {x.max():.3g}]")
        x = x.astype(np.float32)
    else:
        raise ValueError(f"{name}: expected uint8 or float images, got dtype {x.dtype}")
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return x


def iter_batches(images, batch_size: int) -> Iterator[np.ndarray]:
    """One array (split into `batch_size` chunks) or an iterable of batches -> float batches."""
    if hasattr(images, "shape"):
        x = as_float_images(images)
        for start in range(0, len(x), batch_size):
            yield x[start : start + batch_size]
        return
    if isinstance(images, (str, bytes)) or not isinstance(images, Iterable):
        raise ValueError(f"images: expected an array or an iterable of image batches, got {type(images).__name__}")
    for i, batch in enumerate(images):
        yield as_float_images(batch, name=f"images (batch {i})")


def _count(images) -> int | None:
    return len(images) if hasattr(images, "shape") or hasattr(images, "__len__") else None


class PatchCore:
    """PatchCore anomaly detection (Roth et al., CVPR 2022).

    Example:
      model = PatchCore(PatchCoreConfig(weights="wide_resnet50_2.safetensors")).fit(train_images)
      scores, maps = model.predict(test_images)   # (B,), (B, crop, crop)
    """

    def __init__(self, config: PatchCoreConfig | None = None, *, progress: bool = True, mesh=None):
        """`mesh`: None (one device), a `jax.sharding.Mesh` with one axis, or "all" for a mesh over
        every device of every process; with a mesh the bank is row-sharded and extraction is
        data-parallel."""
        self.config = config or PatchCoreConfig()
        self.progress = progress
        if isinstance(mesh, str):
            if mesh != "all":
                raise ValueError(f"mesh: expected None, a Mesh or 'all', got {mesh!r}")
            from patchcore_jax import sharding

            mesh = sharding.make_mesh()
        self.mesh = mesh
        dtype = jnp.dtype(self.config.dtype)
        self._extract = backbone.feature_extractor(
            self.config.backbone, weights=self.config.weights, layers=self.config.layers, seed=self.config.seed, dtype=dtype
        )
        self.bank: jax.Array | None = None
        self.index: neighbors.BankIndex | None = None
        self.threshold: float | None = None
        self.num_patches_seen = 0
        cfg, apply = self.config, self._extract.apply

        @jax.jit
        def embed(state, images):
            x = preprocess(images, resize=cfg.resize, crop=cfg.crop).astype(dtype)
            feats = apply(state, x)
            return aggregate._aggregate(
                tuple(feats[name] for name in cfg.layers), patch_size=cfg.patch_size, stride=cfg.stride,
                pretrain_dim=cfg.pretrain_dim, target_dim=cfg.target_dim,
            ).astype(jnp.float32)

        self._embed_fn = embed
        self._state = self._extract.state
        if self.mesh is not None:
            from patchcore_jax import sharding

            self._state = sharding.replicate(self._state, self.mesh)  # once, not per batch

    # -- embedding ---------------------------------------------------------------------------------
    def embed(self, batch) -> jax.Array:
        """Images `(B, H, W, 3)` -> patch features `(B, h, w, target_dim)` float32."""
        x = as_float_images(batch)
        if self.mesh is not None:
            from patchcore_jax import sharding

            return sharding.embed_data_parallel(self._embed_fn, self._state, x, self.mesh)
        return self._embed_fn(self._state, jnp.asarray(x))

    def _bar(self, total, desc):
        return tqdm(total=total, desc=desc, unit="img", disable=not self.progress, leave=False)

    # -- fitting -----------------------------------------------------------------------------------
    def fit(self, images) -> "PatchCore":
        """Builds the memory bank from defect-free images (one array or an iterable of batches)."""
        chunks = []
        with self._bar(_count(images), "extracting train features") as bar:
            for batch in iter_batches(images, self.config.batch_size):
                feats = self.embed(batch)
                chunks.append(np.asarray(feats).reshape(-1, feats.shape[-1]))
                bar.update(len(batch))
        if not chunks:
            raise ValueError("images: expected at least one training image, got none")
        bank = np.concatenate(chunks)
        del chunks
        self.num_patches_seen = len(bank)
        self.set_bank(self._subsample(bank))
        return self

    def _subsample(self, bank: np.ndarray) -> np.ndarray:
        cfg = self.config
        n = len(bank)
        if cfg.coreset_fraction >= 1.0:
            return bank
        num = max(1, int(n * cfg.coreset_fraction))
        rng = np.random.default_rng(cfg.seed)
        starts = tuple(rng.choice(n, size=min(cfg.num_starts, n), replace=False).tolist())
        projection = None
        if cfg.projection_dim:
            projection = coreset.random_projection(jax.random.key(cfg.seed), bank.shape[1], cfg.projection_dim)
        with tqdm(total=num, desc="greedy coreset", unit="step", disable=not self.progress, leave=False) as bar:
            def advance(done, bar=bar):
                bar.update(done - bar.n)

            if self.mesh is not None:
                from patchcore_jax import sharding

                idx = sharding.greedy_coreset(bank, num, projection=projection, start_indices=starts, mesh=self.mesh,
                                              store_dtype=cfg.coreset_dtype)
            else:
                idx = coreset.greedy_coreset(jnp.asarray(bank), num, projection=projection, start_indices=starts,
                                             store_dtype=cfg.coreset_dtype if projection is not None else None,
                                             progress=advance, chunk=max(64, num // 50))
        return bank[np.sort(np.asarray(idx))]

    def set_bank(self, bank) -> None:
        """Installs a memory bank `(M, target_dim)` directly (as `load` does)."""
        bank = np.asarray(bank, np.float32)
        if bank.ndim != 2 or bank.shape[1] != self.config.target_dim or len(bank) == 0:
            raise ValueError(f"bank: expected shape (M, {self.config.target_dim}) with M >= 1, got {bank.shape}")
        if len(bank) < self.config.num_neighbors:
            raise ValueError(
                f"bank: {len(bank)} rows are fewer than num_neighbors ({self.config.num_neighbors}); "
                "fit on more images, raise coreset_fraction or lower num_neighbors"
            )
        self.bank = jnp.asarray(bank)
        if self.mesh is not None:
            from patchcore_jax import sharding

            self.index = sharding.build_index(self.bank, self.mesh)
        else:
            self.index = neighbors.build_index(self.bank)

    # -- prediction --------------------------------------------------------------------------------
    def predict(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Image scores `(B,)` (Eq. 7) and anomaly maps `(B, crop, crop)` for test images."""
        if self.index is None:
            raise ValueError("model: not fitted; call fit(images) or PatchCore.load(path) first")
        scores, maps = [], []
        with self._bar(_count(images), "scoring") as bar:
            for batch in iter_batches(images, self.config.batch_size):
                s, m = self._predict_batch(batch)
                scores.append(s)
                maps.append(m)
                bar.update(len(batch))
        if not scores:
            raise ValueError("images: expected at least one test image, got none")
        return np.concatenate(scores), np.concatenate(maps)

    def _predict_batch(self, batch) -> tuple[np.ndarray, np.ndarray]:
        feats = self.embed(batch)
        b, h, w, d = feats.shape
        if self.mesh is not None:
            from patchcore_jax import sharding

            s, patch = sharding.image_scores(self.index, feats.reshape(b, h * w, d), num_neighbors=self.config.num_neighbors)
        else:
            s, patch = scoring.image_scores_from_index(self.index, feats.reshape(b, h * w, d), num_neighbors=self.config.num_neighbors)
        maps = segmentation.anomaly_maps(patch.reshape(b, h, w), (self.config.crop, self.config.crop), sigma=self.config.sigma)
        return np.asarray(s), np.asarray(maps)

    # -- decisions ---------------------------------------------------------------------------------
    def fit_threshold(self, good_scores, *, quantile: float = 1.0, margin: float = 0.0) -> float:
        """Sets the decision threshold from scores of held-out *good* images: their `quantile`
        (1.0 = the maximum, so every held-out good image passes), times `1 + margin`."""
        scores = np.asarray(good_scores, np.float64).ravel()
        if scores.size == 0 or not np.isfinite(scores).all():
            raise ValueError("good_scores: expected a non-empty array of finite scores")
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"quantile: expected a value in [0, 1], got {quantile}")
        self.threshold = float(np.quantile(scores, quantile) * (1.0 + margin))
        return self.threshold

    def classify(self, scores) -> np.ndarray:
        """Boolean labels (True = anomalous): score strictly above the threshold."""
        if self.threshold is None:
            raise ValueError("threshold: not set; call fit_threshold(scores of held-out good images) first")
        return np.asarray(scores) > self.threshold

    # -- model files -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Writes `path/` (config.json + bank.safetensors) atomically: a temporary directory beside
        it, renamed into place, so a crash never leaves a half-written model looking complete."""
        from safetensors.numpy import save_file

        if self.bank is None:
            raise ValueError("model: nothing to save; fit it first")
        path = os.path.abspath(os.fspath(path))
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        if os.path.exists(path) and not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"{path}: exists and is not a patchcore-jax model directory; refusing to replace it")
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
        try:
            bank_file = os.path.join(tmp, "bank.safetensors")
            save_file({"bank": np.asarray(self.bank, np.float32)}, bank_file)
            meta = {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "config": json.loads(self.config.to_json()),
                "threshold": self.threshold,
                "bank_shape": list(self.bank.shape),
                "bank_sha256": _sha256(bank_file),
                "num_patches_seen": self.num_patches_seen,
            }
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(meta, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            old = None
            if os.path.exists(path):
                old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
                os.replace(path, os.path.join(old, "model"))
            os.replace(tmp, path)
            if old:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, *, progress: bool = True, mesh=None) -> "PatchCore":
        """Reads a directory written by `save`; ModelFileError names what is wrong with it."""
        from safetensors.numpy import load_file

        path = os.fspath(path)
        meta_file, bank_file = os.path.join(path, "config.json"), os.path.join(path, "bank.safetensors")
        for f in (meta_file, bank_file):
            if not os.path.isfile(f):
                raise ModelFileError(f"{f}: missing; {path} is not a complete patchcore-jax model")
        try:
            with open(meta_file) as f:
                meta = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ModelFileError(f"{meta_file}: not valid JSON (truncated?): {err}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise ModelFileError(f"{meta_file}: not a patchcore-jax model description")
        version = meta.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ModelFileError(f"{meta_file}: format version {version!r} is newer than this library reads ({FORMAT_VERSION}); upgrade patchcore-jax")
        if _sha256(bank_file) != meta.get("bank_sha256"):
            raise ModelFileError(f"{bank_file}: checksum differs from config.json (truncated or modified)")
        try:
            config = PatchCoreConfig.from_dict(dict(meta["config"], layers=tuple(meta["config"]["layers"])))
            bank = load_file(bank_file)["bank"]
        except (KeyError, TypeError, ValueError) as err:
            raise ModelFileError(f"{path}: unreadable model: {err}") from None
        if list(bank.shape) != meta.get("bank_shape"):
            raise ModelFileError(f"{bank_file}: bank shape {bank.shape} differs from config.json's {meta.get('bank_shape')}")
        model = cls(config, progress=progress, mesh=mesh)
        model.set_bank(bank)
        model.threshold = meta.get("threshold")
        model.num_patches_seen = int(meta.get("num_patches_seen", 0))
        return model


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def reference_agreement(model: PatchCore, train_images, test_images, *, max_train: int = 6, max_test: int = 4) -> dict:
    """Runs the JAX stages and the float64 NumPy reference on the *same* backbone features of a few
    images (aggregation -> coreset with the same projection and start points -> Eq. 7 scores -> maps)
    and reports how far apart they land. The backbone is shared: this checks the PatchCore numerics."""
    import reference

    cfg = model.config

    def backbone_features(images):
        x = preprocess(jnp.asarray(as_float_images(images)), resize=cfg.resize, crop=cfg.crop)
        feats = model._extract(x.astype(jnp.dtype(cfg.dtype)))
        return [np.asarray(feats[name], np.float32) for name in cfg.layers]

    opts = dict(patch_size=cfg.patch_size, stride=cfg.stride, pretrain_dim=cfg.pretrain_dim, target_dim=cfg.target_dim)
    train_maps, test_maps = backbone_features(train_images[:max_train]), backbone_features(test_images[:max_test])
    bank_j = np.asarray(aggregate.aggregate_patches(train_maps, **opts)).reshape(-1, cfg.target_dim)
    bank_r = reference.aggregate_patches(train_maps, **opts).reshape(-1, cfg.target_dim)
    feats_j = np.asarray(aggregate.aggregate_patches(test_maps, **opts))
    feats_r = reference.aggregate_patches(test_maps, **opts)
    b, h, w, d = feats_r.shape

    n = len(bank_r)
    num = max(cfg.num_neighbors, int(n * cfg.coreset_fraction))
    starts = tuple(np.random.default_rng(cfg.seed).choice(n, size=min(cfg.num_starts, n), replace=False).tolist())
    proj = None
    if cfg.projection_dim:
        proj = np.asarray(coreset.random_projection(jax.random.key(cfg.seed), d, cfg.projection_dim))
    idx_j = np.asarray(coreset.greedy_coreset(jnp.asarray(bank_j), num, projection=proj, start_indices=starts))
    idx_r = reference.greedy_coreset(bank_r, num, projection=proj, start_indices=starts)
    radius_j = reference.covering_radius(bank_r, idx_j, projection=proj)
    radius_r = reference.covering_radius(bank_r, idx_r, projection=proj)

    s_j, p_j = scoring.image_scores(jnp.asarray(bank_j[idx_j]), feats_j.reshape(b, h * w, d), num_neighbors=cfg.num_neighbors)
    s_r, p_r = reference.image_scores(bank_r[idx_r], feats_r.reshape(b, h * w, d), num_neighbors=cfg.num_neighbors)
    m_j = np.asarray(segmentation.anomaly_maps(p_j.reshape(b, h, w), (cfg.crop, cfg.crop), sigma=cfg.sigma))
    m_r = reference.anomaly_maps(p_r.reshape(b, h, w), (cfg.crop, cfg.crop), sigma=cfg.sigma)

    def rel(a, r):
        return float(np.max(np.abs(np.asarray(a, np.float64) - r)) / max(np.max(np.abs(r)), 1e-30))

    return {
        "images": {"train": len(train_maps[0]), "test": b},
        "features_max_rel_diff": rel(feats_j, feats_r),
        "coreset_same_indices": float(np.mean(idx_j == idx_r)),
        "coreset_radius_rel_diff": abs(radius_j - radius_r) / max(radius_r, 1e-30),
        "image_scores_max_rel_diff": rel(s_j, s_r),
        "anomaly_maps_max_rel_diff": rel(m_j, m_r),
    }
