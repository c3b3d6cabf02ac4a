"""The executor: where a model's device stages run, on one device or across a mesh.

It owns what the model code must not know: the devices and shardings (a mesh, the replicated backbone
state, data-parallel embedding, the row-sharded bank and its collective coreset and search), the
padding of every batch to the compiled batch size, the scoring thread, and, on a mesh over several
processes, the steps in which each process brings its own images (`run.multihost`). The stages are
the same functions either way (`patchcore_jax._src.stages`); the model layer (`model.fitted`) gives
the pure embed function and the maps. Progress goes out through callbacks `progress(stage, done, total)`,
never to a terminal (the command line draws the bars).
"""

from __future__ import annotations

import concurrent.futures
import functools
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from patchcore_jax._src.model import fitted as fitted_lib
from patchcore_jax._src.model.config import PatchCoreConfig
from patchcore_jax._src.run import jaxprs, multihost, sharding
from patchcore_jax._src.stages import bank as bank_lib
from patchcore_jax._src.stages import coreset, scoring
from patchcore_jax._src.stages.search import brute, clustered
from patchcore_jax._src.stages.search import index as index_lib

Progress = Callable[[str, int, "int | None"], None]


def no_progress(stage: str, done: int, total: int | None) -> None:
    """The default progress callback: reports nowhere."""


def resolve_mesh(mesh):
    """None (one device), a one-axis `jax.sharding.Mesh`, or "all" (every device of every process)."""
    if isinstance(mesh, str):
        if mesh != "all":
            raise ValueError(f"mesh: expected None, a Mesh or 'all', got {mesh!r}")
        return sharding.make_mesh()
    return mesh


class Executor:
    """Runs one model's device stages.

    Args:
      config: the model's settings (batch size, crop, search, coreset).
      embed: the pure jitted `embed(state, crops)` of `model.fitted.make_embed`.
      state: the backbone's state, as `embed` takes it.
      mesh: None, a one-axis mesh, or "all".
    """

    def __init__(self, config: PatchCoreConfig, embed, state, *, mesh=None):
        self.config = config
        self.embed_fn = embed
        self.mesh = resolve_mesh(mesh)
        # Replicated once, not per batch.
        self.state = state if self.mesh is None else sharding.replicate(state, self.mesh)
        # A mesh over several processes: each brings its own images to every global batch.
        self.hosts = None
        if multihost.spans_processes(self.mesh):
            self.hosts = multihost.GlobalBatch(self.mesh, config.batch_size)
        self._scorer: concurrent.futures.ThreadPoolExecutor | None = None  # made on the first launch

    # -- shapes --------------------------------------------------------------------------------------
    @functools.cached_property
    def feature_grid(self) -> tuple[int, int]:
        """`(h, w)` of the patch grid of one crop (no computation: shapes only)."""
        crops = jax.ShapeDtypeStruct((1, self.config.crop, self.config.crop, 3), jnp.uint8)
        out = jax.eval_shape(self.embed_fn, self.state, crops)
        return int(out.shape[1]), int(out.shape[2])

    def memory_estimate(self, num_images: int) -> dict[str, int]:
        """Bytes a fit on `num_images` images needs at its peak, estimated from shapes alone (nothing
        is compiled or run): `activations`, the backbone's working memory for one batch (a trace of
        one image: 3 times its largest intermediate array -- a layer's input, its output and a
        residual -- times `batch_size`), and `bank`, the patches held while the bank is built (the
        streaming builder's projected rows and the coreset's vectors; every full row without a
        projection or on a mesh) and the bank itself."""
        cfg = self.config
        crops = jax.ShapeDtypeStruct((1, cfg.crop, cfg.crop, 3), jnp.uint8)
        largest = max(jaxprs.largest_value(jax.make_jaxpr(self.embed_fn)(self.state, crops).jaxpr), 1)
        h, w = self.feature_grid
        n = num_images * h * w
        m = coreset.coreset_size(n, cfg.coreset_fraction)
        streaming = self.mesh is None and cfg.projection_dim > 0 and cfg.coreset_fraction < 1.0
        held = n * (cfg.projection_dim * np.dtype(cfg.coreset_dtype).itemsize + 3 * 4) if streaming \
            else 2 * n * cfg.target_dim * 4
        return {"activations": 3 * largest * cfg.batch_size, "bank": held + m * cfg.target_dim * 4}

    def search_kind(self) -> str:
        """The index searched here: `config.search`, "auto" resolved by the backend (a mesh always
        searches by sharded brute force)."""
        if self.mesh is not None:
            return "brute"
        if self.config.search != "auto":
            return self.config.search
        return "clustered" if jax.default_backend() == "cpu" else "brute"

    # -- embedding -----------------------------------------------------------------------------------
    def embed(self, crops) -> jax.Array:
        """uint8 crops `(B, crop, crop, 3)` (host or device array) -> patch features `(B, h, w, D)`
        float32 on the device; every call runs the one compiled batch size (the last chunk padded).

        On a mesh over several processes this is a collective call (every process calls it, each with
        its own crops, any number): it returns this process's features as a host array."""
        if self.hosts is not None:
            parts = [self.hosts.mine(multihost.gather(f), c[self.me]) for c, f in self.steps(self.chunks([crops]))]
            empty = np.zeros((0, *self.feature_grid, self.config.target_dim), np.float32)
            return np.concatenate(parts) if parts else empty
        b = crops.shape[0]
        size = self.config.batch_size
        outs = []
        for start in range(0, b, size):
            chunk = rows(crops, start, min(start + size, b))
            outs.append(rows(self.embed_padded(chunk), 0, chunk.shape[0]))
        return outs[0] if len(outs) == 1 else jnp.concatenate(outs)

    # -- the bank and its index ----------------------------------------------------------------------
    def build_index(self, bank: np.ndarray, *, clustered_index=None):
        """The search index of a checked host bank `(M, D)` (`search_kind`); `clustered_index`: one
        already built for this bank (a model file's). Returns `(device bank, index)`."""
        if self.mesh is not None:
            return jax.device_put(bank), sharding.build_index(bank, self.mesh)
        if self.search_kind() == "clustered":
            index = clustered_index if clustered_index is not None else clustered.build_clustered_index(
                bank, seed=self.config.seed)
            return jax.device_put(bank), index
        return jax.device_put(bank), brute.build_index(bank)  # checked on the host, then put on the device

    def nearest_distances(self, index, queries: np.ndarray) -> np.ndarray:
        """Distances `(Q,)` float64 of host queries `(Q, D)` to their nearest bank rows."""
        if self.mesh is not None:
            dist, _ = sharding.nearest_neighbors(index, queries, 1, mesh=self.mesh)
        else:
            dist, _ = index_lib.search(index, jax.device_put(queries), 1)
        return np.asarray(jax.device_get(dist), np.float64)[:, 0]

    def fit_bank(self, batches: Iterable, *, progress: Progress = no_progress):
        """The device stage of fitting: an iterable of uint8 crop batches -> `(bank (M, D) float32 host,
        patches seen, a seeded sample of training patches (the calibration's))`.

        On one device with a projection and a coreset (the default), the features stream through
        `stages.bank.build_memory_bank`: only the projected rows stay in memory, full rows are spilled
        to a temporary folder (`$TMPDIR`) and the chosen ones read back. Otherwise (a mesh,
        `projection_dim=0`, `coreset_fraction=1`) the features are gathered in memory, one copy at a time.
        """
        cfg = self.config
        sample = fitted_lib.Reservoir(fitted_lib.CALIBRATION_SAMPLE, seed=cfg.seed + 1)
        counts = [0]

        def features() -> Iterator[np.ndarray]:
            for feats in self.host_features(batches):
                rows_ = feats.reshape(-1, feats.shape[-1])
                finite = np.isfinite(rows_)
                if not finite.all():
                    raise ValueError(
                        f"features: the backbone produced {int(rows_.size - finite.sum())} NaN or infinite values "
                        f"(backbone weights: {cfg.weights or 'random initialisation'}); check the weights file")
                sample.feed(rows_)
                counts[0] += len(rows_)
                yield rows_

        streaming = (self.mesh is None and cfg.projection_dim > 0 and cfg.coreset_fraction < 1.0
                     and cfg.sampler == "greedy")
        if streaming:
            projection = coreset.random_projection(cfg.seed, cfg.target_dim, cfg.projection_dim)

            def report(stage, count):
                if stage == "coreset":
                    progress("greedy coreset", count, None)

            try:
                bank, _ = bank_lib.build_memory_bank(
                    features(), coreset_fraction=cfg.coreset_fraction, projection=projection, seed=cfg.seed,
                    num_starts=cfg.num_starts, store_dtype=cfg.coreset_dtype, progress=report)
            except ValueError as err:
                if counts[0] == 0 and str(err).startswith("batches:"):  # the stream was empty
                    raise ValueError("images: expected at least one training image, got none") from None
                raise
        else:
            bank = gather(features())
            if bank is None:
                raise ValueError("images: expected at least one training image, got none")
        n = counts[0]
        if cfg.bank_size(n) < cfg.bank_rows_needed:
            raise ValueError(f"images: {n} training patches give a bank of {cfg.bank_size(n)} rows, fewer than "
                             f"num_neighbors / anomaly_scorer_num_nn ({cfg.bank_rows_needed}); fit on more images, "
                             "raise coreset_fraction or lower num_neighbors")
        if not streaming:
            bank = self.subsample(bank, progress=progress)
        return bank, n, sample.rows()

    def host_features(self, batches: Iterable) -> Iterator[np.ndarray]:
        """Patch features `(b, h, w, D)` float32 on the host, batch by batch, in input order.

        On a mesh over several processes each process brings its own batches, and every process gets
        the features of all of them: process 0's in its order, then process 1's, and so on (the order
        of one process given the processes' shares concatenated, see `multihost.process_share`)."""
        if self.hosts is None:
            for batch in batches:
                yield np.asarray(jax.device_get(self.embed(batch)))
            return
        per_process = [[] for _ in self.hosts.processes]
        for counts, feats in self.steps(self.chunks(batches)):
            for held, part in zip(per_process, self.hosts.split(multihost.gather(feats), counts)):
                held.append(part)
        for held in per_process:
            while held:
                yield held.pop(0)

    # -- several processes ---------------------------------------------------------------------------
    @property
    def me(self) -> int:
        """This process's position among the mesh's processes."""
        return self.hosts.processes.index(jax.process_index())

    def chunks(self, batches: Iterable) -> Iterator[np.ndarray]:
        """Host crop batches of any size -> host chunks of at most `batch_size` crops."""
        size = self.config.batch_size
        for batch in batches:
            host = np.asarray(jax.device_get(batch)) if isinstance(batch, jax.Array) else np.asarray(batch)
            for start in range(0, host.shape[0], size):
                yield host[start : start + size]

    def empty_crops(self) -> np.ndarray:
        return np.zeros((0, self.config.crop, self.config.crop, 3), np.uint8)

    def steps(self, chunks):
        """`(counts, global features)` per collective step (`multihost.steps`)."""
        return multihost.steps(self.hosts, chunks, lambda x: self.embed_fn(self.state, x), self.empty_crops())

    def finish(self, index, error: BaseException | None = None) -> None:
        """After this process's last `launch`: takes part in the other processes' remaining scoring
        steps (a mesh over several processes; nothing otherwise). With `error`, announces it instead."""
        if self.hosts is None or isinstance(error, multihost.ProcessFailed):
            return
        def score(x):
            return self.score_features(index, self.embed_fn(self.state, x))

        multihost.drain(self.hosts, self.empty_crops(), score, failed=error is not None)

    def subsample(self, bank: np.ndarray, *, progress: Progress = no_progress) -> np.ndarray:
        """The in-memory coreset (a mesh, or no projection); the same rules as the stream's."""
        cfg = self.config
        n = len(bank)
        if cfg.bank_size(n) == n:
            return bank
        num = cfg.bank_size(n)
        if cfg.sampler == "random":
            return bank[coreset.random_subset(cfg.seed, n, num)]
        starts = coreset.start_points(cfg.seed, n, cfg.num_starts)
        projection = None
        if cfg.projection_dim:
            projection = coreset.random_projection(cfg.seed, bank.shape[1], cfg.projection_dim)
        if self.mesh is not None:
            idx = sharding.greedy_coreset(bank, num, projection=projection, start_indices=starts, mesh=self.mesh,
                                          store_dtype=cfg.coreset_dtype)
        else:
            idx = coreset.greedy_coreset(jax.device_put(bank), num, projection=projection, start_indices=starts,
                                         store_dtype=cfg.coreset_dtype if projection is not None else None,
                                         progress=lambda done: progress("greedy coreset", done, num),
                                         chunk=max(64, num // 50))
        return bank[np.sort(np.asarray(jax.device_get(idx)))]

    # -- scoring -------------------------------------------------------------------------------------
    def launch(self, index, crops):
        """Starts scoring uint8 crops `(B, crop, crop, 3)`: the backbone is dispatched from this thread,
        the search, scores and maps from the scoring thread; returns the call that waits for the
        checked host `(scores (B,), maps (B, crop, crop))`.

        Every stage runs the one compiled batch size: a short batch is padded to `batch_size` before
        the backbone and the padded rows are dropped on the host, so after a model's first call no
        number of images compiles anything more.

        DECISION: a scoring thread, because XLA runs programs dispatched from different threads at the
        same time and the exact search with the clustered index is a loop on one CPU core: on a CPU,
        batch i's search then runs beside batch i + 1's backbone, which uses every core (predict end to
        end, WRN50-2 at 224 on 2 cores: 166 ms per image against 179 ms dispatched from one thread)."""
        if self.hosts is not None:
            return self.launch_steps(index, crops)
        b, size = crops.shape[0], self.config.batch_size
        fetches = []
        for start in range(0, b, size):
            chunk = rows(crops, start, min(start + size, b))
            n = chunk.shape[0]
            feats = self.embed_padded(chunk)
            fetches.append((n, self._scoring_thread().submit(self.score_features, index, feats).result))

        def fetch():
            parts = [(s[:n], m[:n]) for n, f in fetches for s, m in [f()]]
            if len(parts) == 1:
                return parts[0]
            return np.concatenate([s for s, _ in parts]), np.concatenate([m for _, m in parts])

        return fetch

    def launch_steps(self, index, crops):
        """`launch` on a mesh over several processes: one collective step per chunk (every process
        scores its own crops; `finish` after the last); returns this process's scores and maps."""
        parts = []
        for chunk in self.chunks([crops]):
            counts = self.hosts.exchange_counts(len(chunk))
            multihost.check_counts(counts, self.hosts.processes)
            scores, maps = self.score_features(index, self.embed_fn(self.state, self.hosts.place(chunk)))
            parts.append((self.hosts.mine(scores, len(chunk)), self.hosts.mine(maps, len(chunk))))
        result = (np.concatenate([s for s, _ in parts]), np.concatenate([m for _, m in parts]))
        return lambda: result

    def embed_padded(self, chunk) -> jax.Array:
        """uint8 crops `(n, crop, crop, 3)` with `n <= batch_size` -> patch features `(batch_size, h, w, D)`
        on the device, the rows after `n` those of zero crops."""
        size = self.config.batch_size
        if self.mesh is not None:
            host = jax.device_get(chunk) if isinstance(chunk, jax.Array) else np.asarray(chunk)
            return sharding.embed_data_parallel(self.embed_fn, self.state, pad_host(host, size), self.mesh)
        if isinstance(chunk, jax.Array):
            return self.embed_fn(self.state, pad_device(chunk, size) if chunk.shape[0] < size else chunk)
        return self.embed_fn(self.state, jax.device_put(pad_host(np.asarray(chunk), size)))

    def _scoring_thread(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._scorer is None:
            self._scorer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="patchcore-jax-scoring")
        return self._scorer

    def score_features(self, index, feats):
        """Patch features `(B, h, w, D)` on the device -> checked host `(scores (B,), maps (B, crop, crop))`."""
        cfg = self.config
        b, h, w, d = feats.shape
        # The device stage makes no implicit transfer (as `fit`, tested under the same guard).
        with jax.transfer_guard("disallow"):
            if self.mesh is not None:
                s, patch = sharding.image_scores(index, feats.reshape(b, h * w, d), num_neighbors=cfg.num_neighbors,
                                                 anomaly_scorer_num_nn=cfg.anomaly_scorer_num_nn)
            else:
                s, patch = scoring.image_scores_from_index(index, feats.reshape(b, h * w, d),
                                                           num_neighbors=cfg.num_neighbors,
                                                           anomaly_scorer_num_nn=cfg.anomaly_scorer_num_nn)
            maps = fitted_lib.anomaly_maps(patch, (h, w), cfg)
            if self.hosts is None:
                scores, host_maps = jax.device_get((s, maps))
        if self.hosts is not None:  # every process's rows, on every process
            scores, host_maps = multihost.gather(s), multihost.gather(maps)
        if not (np.isfinite(scores).all() and np.isfinite(host_maps).all()):
            raise ValueError(
                "scores: the device returned NaN or infinite scores; the features overflow float32 or are NaN "
                f"(backbone weights: {cfg.weights or 'random initialisation'})")
        return np.asarray(scores, np.float32), np.asarray(host_maps, np.float32)


def gather(chunks) -> np.ndarray | None:
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


def rows(x, start: int, stop: int):
    """`x[start:stop]` along the first axis; for a device array a static slice (an indexing with
    Python ints would move the indices to the device implicitly)."""
    if start == 0 and stop == x.shape[0]:
        return x
    if isinstance(x, jax.Array):
        return jax.lax.slice_in_dim(x, start, stop, axis=0)
    return x[start:stop]


def pad_host(x: np.ndarray, size: int) -> np.ndarray:
    n = x.shape[0]
    return x if n == size else np.concatenate([x, np.zeros((size - n,) + x.shape[1:], x.dtype)])


@functools.partial(jax.jit, static_argnames=("size",))
def pad_device(x, size):
    return jnp.pad(x, ((0, size - x.shape[0]), (0, 0), (0, 0), (0, 0)))
