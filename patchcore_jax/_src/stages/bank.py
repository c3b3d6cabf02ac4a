"""Building the memory bank from a stream of patch features, with only the projected rows in memory.

PatchCore's bank before subsampling is every training patch: MVTec's largest category gives 245k rows of
1024 floats (1 GB), and larger sets reach millions of rows (4M x 1024 is 16 GB). The greedy coreset only
ever looks at the projected rows (`N x 128`), and the chosen full rows are needed only at the end. So:
each batch's full rows go to disk as they arrive (one `.npy` file per batch, plain NumPy format), its
projected rows stay in memory, the coreset runs on those, and the chosen full rows are read back.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from patchcore_jax._src.stages import coreset as coreset_lib
from patchcore_jax._src.stages import checks as _checks

_HIGHEST = jax.lax.Precision.HIGHEST


@jax.jit
def _project(batch, projection):
    return jnp.dot(batch.astype(projection.dtype), projection, precision=_HIGHEST)


def _aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """An uninitialised host array on a 64-byte boundary: JAX's CPU backend can then use it in place
    (`jnp.from_dlpack`), so the projected bank is never copied to "the device" on a CPU."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + align, np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def _to_device(host: np.ndarray) -> jax.Array:
    if jax.default_backend() == "cpu":
        try:
            return jnp.from_dlpack(host)  # zero-copy on the CPU when aligned
        except Exception:  # an older jaxlib or an unaligned buffer: a plain copy
            pass
    return jax.device_put(host)


def build_memory_bank(
    batches: Iterable,
    *,
    coreset_fraction: float,
    projection,
    start_indices: Sequence[int] | None = None,
    seed: int = 0,
    num_starts: int = 10,
    method: str = "auto",
    store_dtype=None,
    block: int = 1024,
    spill_dir: str | os.PathLike | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The subsampled memory bank of a stream of patch features, holding only `N x P` in memory.

    Contract (what `PatchCore.fit` relies on):
      - `batches`: an iterable of `(n_i, D)` arrays (NumPy or JAX; float, finite), e.g. one per image
        batch. It is read once. Rows are numbered in stream order, 0 .. N - 1.
      - Each batch's full rows are written to a private temporary folder inside `spill_dir` (default:
        the system's temporary folder) as `.npy` files, with ordinary buffered writes (page cache, not
        process memory). The folder is removed when the function returns, whether it succeeds or fails;
        nothing else in `spill_dir` is touched. Disk needed: `N x D x 4` bytes.
      - Memory: the projected rows `N x P` in `store_dtype` (float32: 2 GB for 4M x 128), the
        coreset loop's `N`-long vectors, and the result. Full rows are held one batch at a time; the
        projected rows are spilled too while the stream lasts (`N x P x 4` bytes more disk) and read
        back once into one array.
      - `projection`: `(D, P)`, drawn by the caller (`coreset.random_projection`), as for
        `coreset.greedy_coreset`; it is required here (a full-space coreset needs the full rows in
        memory: use `coreset.greedy_coreset` on the bank for that).
      - `start_indices`: as `coreset.greedy_coreset`'s, checked against N once the stream ends; when
        None they are drawn once N is known as `np.random.default_rng(seed).choice(N,
        size=min(num_starts, N), replace=False)` -- the rule `PatchCore` uses in memory, so a stream and
        a concatenated bank get the same start points.
      - Coreset size `max(1, int(N * coreset_fraction))`; `coreset_fraction >= 1` keeps every row.
      - `method`, `store_dtype`, `block`: as `coreset.greedy_coreset` ("auto" picks by backend).
    Returns:
      `(bank, selected)`: `selected` `(M,)` int64 row numbers in the order the coreset chose them;
      `bank` `(M, D)` float32, the full rows of `np.sort(selected)` (ascending row number).
    The selection equals `coreset.greedy_coreset(concatenated_batches, M, projection=projection,
    start_indices=...)` up to float32 rounding of the projected rows (batch-wise products, a float64
    mean): on data without near-ties the indices are the same (tested).
    """
    if projection is None:
        raise ValueError("projection: required by the streaming bank builder (a full-space coreset needs every "
                         "full row in memory; call coreset.greedy_coreset on the bank instead)")
    if isinstance(coreset_fraction, bool) or not isinstance(coreset_fraction, (int, float)) or not coreset_fraction > 0:
        raise ValueError(f"coreset_fraction: expected a number > 0, got {coreset_fraction!r}")
    proj_shape = _checks.check_array("projection", projection, ndim=2)
    dim, width = proj_shape
    projection = (projection.astype(jnp.float32) if isinstance(projection, jax.Array)
                  else jax.device_put(np.asarray(projection, np.float32)))  # explicitly, once
    method = coreset_lib.resolve_method(method)
    store = np.dtype(jnp.dtype(jnp.float32 if store_dtype is None else store_dtype))
    block = _checks.check_int("block", block, low=1)
    report = progress or (lambda stage, count: None)

    spill = tempfile.mkdtemp(prefix="patchcore-bank-", dir=None if spill_dir is None else os.fspath(spill_dir))
    try:
        files, counts = [], []
        col_sum = np.zeros(width, np.float64)
        # The projected rows go to disk too, appended as raw float32: held in many small arrays they
        # would fragment the heap (observed: 3.8 GB resident for 2 GB of rows at 4M x 128); read back
        # once into one array when N is known, they cost exactly N x P.
        projected_path = os.path.join(spill, "projected.f32")
        projected = open(projected_path, "wb")
        for i, batch in enumerate(batches):
            name = f"batches[{i}]"
            n_i, d_i = _checks.check_array(name, batch, ndim=2)
            if d_i != dim:
                raise ValueError(f"{name}: expected shape (n, {dim}) to match projection ({dim}, {width}), got {(n_i, d_i)}")
            host = np.asarray(batch, np.float32)
            path = os.path.join(spill, f"{i:08d}.npy")
            psi = np.asarray(jax.device_get(_project(jax.device_put(host), projection)))
            try:
                np.save(path, host)
                np.ascontiguousarray(psi, np.float32).tofile(projected)
            except OSError as err:  # a full disk: name the spill folder, which the user can move ($TMPDIR)
                if err.filename is not None or not err.errno:
                    raise
                raise OSError(err.errno, err.strerror, path) from None
            del host
            col_sum += psi.sum(axis=0, dtype=np.float64)
            del psi
            files.append(path)
            counts.append(n_i)
            report("rows", sum(counts))
        projected.close()
        if not files:
            raise ValueError("batches: expected at least one batch of patch features, got none")
        n = int(sum(counts))
        num = coreset_lib.coreset_size(n, coreset_fraction)
        if start_indices is None:
            start_indices = coreset_lib.start_points(seed, n, num_starts)
        starts = _checks.check_indices("start_indices", start_indices, n)

        # The projected bank, centred (the projection is linear: the same as centring the bank), in the
        # lazy loop's block layout, assembled batch by batch so that no second copy is ever alive.
        mean = (col_sum / n).astype(np.float32)
        n_pad = -(-n // block) * block if method == "lazy" else n
        layout = _aligned_empty((n_pad, width), store)
        step = max(1, (64 << 20) // (4 * width))  # 64 MB of projected rows at a time
        with open(projected_path, "rb") as f:
            for at in range(0, n, step):
                rows = np.fromfile(f, np.float32, count=min(step, n - at) * width).reshape(-1, width)
                layout[at : at + len(rows)] = (rows - mean).astype(store)
        del rows
        layout[n:] = 0
        selected = _greedy(layout, n, num, starts, method=method, block=block)
        report("coreset", num)
        del layout

        # Gather the chosen full rows, one spilled batch at a time, in ascending row order.
        chosen = np.sort(selected)
        bank = np.empty((num, dim), np.float32)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        for j, path in enumerate(files):
            lo, hi = np.searchsorted(chosen, [offsets[j], offsets[j + 1]])
            if hi > lo:
                rows = np.load(path, mmap_mode="r")
                bank[lo:hi] = rows[chosen[lo:hi] - offsets[j]]
                del rows
        return bank, selected
    finally:
        shutil.rmtree(spill, ignore_errors=True)


def _greedy(layout: np.ndarray, n: int, num: int, starts, *, method: str, block: int) -> np.ndarray:
    """`coreset.greedy_coreset`'s loops on an already projected, centred bank (host memory, used in
    place on a CPU: every reshape happens inside one jitted call, so nothing copies it)."""
    psi = _to_device(layout)
    norms, min_dist = _start_distances(psi, jax.device_put(np.asarray(starts, np.int32)), n=n)
    if method == "lazy":
        return np.asarray(_lazy_on_layout(psi, norms, min_dist, num=num, block=block), np.int64)
    _, selected = coreset_lib.run_steps(min_dist, jnp.zeros((num,), jnp.int32), 0, psi, norms, num_steps=num)
    return np.asarray(selected, np.int64)


@functools.partial(jax.jit, static_argnames=("num", "block"))
def _lazy_on_layout(psi, norms, min_dist, *, num, block):
    n_pad, width = psi.shape
    pad = n_pad - norms.shape[0]
    rows = psi.reshape(n_pad // block, block, width)
    row_norms = jnp.pad(norms, (0, pad)).reshape(-1, block)
    # DECISION: padding rows carry -inf, so they are never selected (as coreset.lazy_prepare).
    dist = jnp.pad(min_dist, (0, pad), constant_values=-jnp.inf).reshape(-1, block)
    state = coreset_lib.lazy_state(dist, num, width, psi.dtype, norms.dtype)
    body = functools.partial(coreset_lib.lazy_step, rows=rows, row_norms=row_norms)
    return jax.lax.fori_loop(0, num, body, state)["selected"]


@functools.partial(jax.jit, static_argnames=("n",))
def _start_distances(psi, starts, *, n):
    """Squared norms of the real rows and the mean distance to the start points (as `_prepare`).
    Computed over the whole layout (padding rows are zeros) and cut afterwards: slicing the `N x P`
    operand first would copy it (measured at 4M rows: 4.5 GB peak with the slice, 2.6 GB without)."""
    acc = coreset_lib.accumulation_dtype(psi.dtype)
    norms = jnp.sum(jnp.square(psi.astype(acc)), axis=1)
    sq = jax.vmap(lambda s: coreset_lib.sq_dist_to(psi, norms, s))(starts)
    # DECISION: as the published sampler (and coreset._prepare), the mean distance to the start points.
    return norms[:n], jnp.mean(jnp.sqrt(jnp.maximum(sq, 0.0)), axis=0)[:n]
