"""Several processes (hosts) feeding one mesh: each process's share of the inputs, its rows of a global
batch, and the step protocol that keeps the processes' collective programs in line.

In a run of several processes joined by `jax.distributed`, every process runs the same program on the
same mesh, but each holds only its own images. A global batch is then `process_count x local_rows`
rows: each process places its own (padded) crops on its own devices with
`jax.make_array_from_process_local_data`, the backbone runs data-parallel over every device of every
process, and the results are gathered (`multihost_utils.process_allgather`) or scored collectively.

The step protocol: before each global batch the processes exchange how many real images they bring
(a small all-gather); a process with nothing left brings zero crops and takes part all the same; the
steps end when every process brings zero. So processes may hold different numbers of images (a share
of 5 files over 2 processes is 3 and 2), and every collective program is run by every process the
same number of times.
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from patchcore_jax._src.model.images import list_images


def process_share(items, *, process_index: int | None = None, process_count: int | None = None) -> list:
    """This process's share of `items`: a contiguous block, the blocks in process order.

    `items`: a sequence (the same on every process: file paths, names, arrays), or a folder, whose
    images are listed in sorted order (`patchcore_jax.data.list_images`). With `n` items over `P`
    processes, process `p` takes `n // P` items, plus one for `p < n % P`; the blocks concatenated in
    process order are `items` again, so a fit on the shares builds the bank of a fit on all of them.
    `process_index` and `process_count` default to JAX's (`jax.process_index()`, `jax.process_count()`).
    """
    if isinstance(items, (str, bytes, os.PathLike)):
        items = list_images(items)
    items = list(items)
    count = jax.process_count() if process_count is None else int(process_count)
    index = jax.process_index() if process_index is None else int(process_index)
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"process_index: expected 0 <= process_index < process_count, got {index} of {count}")
    base, extra = divmod(len(items), count)
    start = index * base + min(index, extra)
    return items[start : start + base + (index < extra)]


def spans_processes(mesh: Mesh | None) -> bool:
    """Whether `mesh` holds devices of other processes (then its arrays are not all addressable here)."""
    if mesh is None:
        return False
    here = jax.process_index()
    return any(d.process_index != here for d in mesh.devices.flat)


class GlobalBatch:
    """The layout of a global batch on a 1-D mesh spanning processes.

    Each process brings `local_rows` rows (its crops padded with zeros); `local_rows` is the batch
    size rounded up to a multiple of this process's devices in the mesh, so every device holds the
    same number of rows. The global batch has `process_count * local_rows` rows, row-sharded.
    """

    def __init__(self, mesh: Mesh, batch_size: int):
        self.mesh = mesh
        self.sharding = NamedSharding(mesh, P(mesh.axis_names[0]))
        per_process: dict[int, int] = {}
        for d in mesh.devices.flat:
            per_process[d.process_index] = per_process.get(d.process_index, 0) + 1
        if len(set(per_process.values())) != 1:
            raise ValueError(f"mesh: expected the same number of devices from every process, got {per_process}")
        self.processes = sorted(per_process)
        local = per_process[jax.process_index()]
        self.local_rows = -(-batch_size // local) * local
        self.shape0 = self.local_rows * len(self.processes)
        # The global rows of each process, in the order of its local data: the rows its devices
        # address, in ascending order (as `make_array_from_process_local_data` places local data).
        where = self.sharding.devices_indices_map((self.shape0,))
        self.rows = []
        for p in self.processes:
            starts = sorted(where[d][0].start or 0 for d in mesh.devices.flat if d.process_index == p)
            per_device = self.shape0 // mesh.size
            self.rows.append(np.concatenate([np.arange(s, s + per_device) for s in starts]))

    def exchange_counts(self, n: int) -> np.ndarray:
        """Every process's number of real rows in this step `(process_count,)` (a collective: every
        process calls it once per step)."""
        return np.asarray(multihost_utils.process_allgather(np.int32(n)), np.int64).reshape(-1)

    def place(self, local: np.ndarray) -> jax.Array:
        """This process's host rows `(n <= local_rows, ...)`, zero-padded to `local_rows`, as its part
        of a global row-sharded array `(process_count * local_rows, ...)`."""
        local = np.asarray(local)
        pad = self.local_rows - local.shape[0]
        if pad:
            local = np.concatenate([local, np.zeros((pad,) + local.shape[1:], local.dtype)])
        return jax.make_array_from_process_local_data(self.sharding, local, (self.shape0,) + local.shape[1:])

    def split(self, full: np.ndarray, counts: Sequence[int]) -> list[np.ndarray]:
        """A gathered global host array -> each process's real rows, in process order."""
        return [full[rows[:n]] for rows, n in zip(self.rows, counts)]

    def mine(self, full: np.ndarray, n: int) -> np.ndarray:
        """This process's first `n` rows of a gathered global host array."""
        return full[self.rows[self.processes.index(jax.process_index())][:n]]


def gather(x: jax.Array) -> np.ndarray:
    """A global array (not all addressable here) -> the whole array on this host (a collective)."""
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class ProcessFailed(RuntimeError):
    """Another process stopped with an error during a collective step (its own log says which)."""


def check_counts(counts: np.ndarray, processes: Sequence[int]) -> None:
    """Raises `ProcessFailed` when a process signalled an error (a negative count) in this step."""
    failed = [p for p, n in zip(processes, counts) if n < 0]
    if failed:
        raise ProcessFailed(f"process {failed[0]} stopped with an error (see its output); this process stops too")


def steps(batch: GlobalBatch, chunks, run, empty: np.ndarray):
    """The step protocol over this process's `chunks` (host arrays of at most `local_rows` rows):
    yields `(counts, run(global batch))` per step until every process is done, this process bringing
    zero rows (`empty`, shaped as a chunk) once its chunks are exhausted. An error while reading a
    chunk is announced to the other processes (they raise `ProcessFailed` at the same step) and then
    raised here."""
    it = iter(chunks)
    while True:
        try:
            chunk = next(it, None)
        except BaseException:
            batch.exchange_counts(-1)
            raise
        counts = batch.exchange_counts(0 if chunk is None else len(chunk))
        check_counts(counts, batch.processes)
        if not counts.any():
            return
        yield counts, run(batch.place(empty if chunk is None else chunk))


def drain(batch: GlobalBatch, empty: np.ndarray, run, *, failed: bool = False) -> None:
    """Takes part in the other processes' remaining steps with zero rows of `empty`'s shape, until
    every process is done (a process that failed says so once, and returns)."""
    while True:
        counts = batch.exchange_counts(-1 if failed else 0)
        if failed:
            return
        check_counts(counts, batch.processes)
        if not counts.any():
            return
        run(batch.place(empty))


def exchange_bytes(data: bytes) -> list[bytes]:
    """Every process's `data`, in process order (a collective: every process calls it the same number
    of times). The lengths are exchanged first; the bytes travel padded to a power of two, so payloads
    of similar sizes share one compiled gather."""
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(len(data))), np.int64).reshape(-1)
    width = 1 << max(int(sizes.max()), 1).bit_length()
    buf = np.zeros(width, np.uint8)
    buf[: len(data)] = np.frombuffer(data, np.uint8)
    got = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), width)
    return [got[i, : sizes[i]].tobytes() for i in range(len(sizes))]
