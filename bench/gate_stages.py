"""The stages the regression gate times, and the worker that times them in a fresh process.

Run by `bench/gate.py` as a script, with PYTHONPATH set to the tree under test, so this file must
import nothing but NumPy, JAX and the public face of `patchcore_jax` (any revision whose public
API is today's works, the layout before `_src` included):

    PYTHONPATH=<tree> python bench/gate_stages.py --size quick --repeats 5 --min-time 0.3 --out RESULT.json [--outputs OUT.npz]

For every stage: the first call (compile and run), then at least `repeats` timed calls and at least
`min_time` seconds of them (at most 200 calls), each timed to completion (`jax.block_until_ready`)
in CPU time (`time.process_time`, every thread of the process) and wall time; then the peak memory
of one more call (`_Memory`). A stage that raises is recorded with its error and the others go on.
The worker writes one JSON object; with `--outputs`, each stage's outputs too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
import warnings

import numpy as np

# name -> sizes. SMOKE: seconds, for the test suite (no timing verdict). QUICK: the gate before a
# merge (a few seconds a process after compiling). FULL: the sizes the issues quote (a 20k x 1024
# bank, 3136 queries; WRN50-2-sized aggregation).
SIZES = {
    "smoke": dict(agg_batch=1, agg_grid=8, agg_channels=(32, 64), agg_dim=64, coreset=(600, 32, 0.1),
                  search=(600, 32, 64), clustered=(600, 32, 64), scores=(2, 16, 32), maps=(2, 8, 32),
                  model=dict(resize=72, crop=64, pretrain_dim=64, target_dim=64, batch_size=2),
                  fit_images=4, predict_images=2),
    "quick": dict(agg_batch=2, agg_grid=28, agg_channels=(512, 1024), agg_dim=1024, coreset=(10_000, 256, 0.05),
                  search=(8192, 512, 1568), clustered=(8192, 512, 1568), scores=(2, 784, 512), maps=(32, 28, 224),
                  model=dict(resize=80, crop=64, pretrain_dim=128, target_dim=128, batch_size=4),
                  fit_images=8, predict_images=4),
    "full": dict(agg_batch=8, agg_grid=28, agg_channels=(512, 1024), agg_dim=1024, coreset=(20_000, 1024, 0.1),
                 search=(20_000, 1024, 3136), clustered=(20_000, 1024, 6272), scores=(8, 784, 1024),
                 maps=(8, 28, 224), model=dict(resize=256, crop=224, pretrain_dim=1024, target_dim=1024,
                                              batch_size=8),
                 fit_images=16, predict_images=8),
}

# The gate's rows, in order; the worker yields them in this order.
STAGES = ("embed", "aggregate_patches", "greedy_coreset", "search_brute", "search_clustered", "image_scores",
          "anomaly_maps", "fit", "predict")


def _gaussian(seed, shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _mixture(seed, n, d, centres=32, spread=0.3):
    """Clustered rows (the geometry the clustered index is for), continuous: no exact ties."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(centres, d))
    return (means[rng.integers(0, centres, n)] + rng.normal(size=(n, d)) * spread).astype(np.float32)


def _images(seed, n, side):
    """Smooth random textures as uint8 images (the public API's most common input)."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, size=(n, side // 8 + 1, side // 8 + 1, 3))
    big = np.repeat(np.repeat(small, 8, axis=1), 8, axis=2)[:, :side, :side]
    return np.clip(big + rng.normal(size=big.shape) * 12, 0, 255).astype(np.uint8)


def stages(size: dict):
    """Yields `(name, setup)`; `setup()` prepares the inputs (not timed) and returns the thunk to time,
    or `(thunk, fn, args)` where `thunk() == fn(*args)` and `fn` traces (the memory of its compiled
    program is then read from XLA). Thunks return their outputs (arrays, or tuples of arrays) for the
    drift check."""
    import jax.numpy as jnp

    import patchcore_jax as pj

    shared = {}

    def model():
        """One model for embed, fit and predict (what they compile is shared, as in one user's process)."""
        from patchcore_jax import PatchCore, PatchCoreConfig

        if "model" not in shared:
            with warnings.catch_warnings():  # random-init weights: nothing to download, a warning to hush
                warnings.simplefilter("ignore")
                shared["model"] = PatchCore(PatchCoreConfig(backbone="resnet18", num_neighbors=3,
                                                            coreset_fraction=0.1, **size["model"]), progress=False)
        return shared["model"]

    def embed():
        m = model()
        crop, b = size["model"]["crop"], size["model"]["batch_size"]
        crops = _images(1, b, crop)
        return lambda: m.embed_crops(crops)

    def aggregate():
        b, g, (c2, c3), dim = size["agg_batch"], size["agg_grid"], size["agg_channels"], size["agg_dim"]
        fm = [jnp.asarray(_gaussian(2, (b, g, g, c2))), jnp.asarray(_gaussian(3, (b, g // 2, g // 2, c3)))]
        fn = lambda fm: pj.aggregate_patches(fm, pretrain_dim=dim, target_dim=dim)  # noqa: E731
        return (lambda: fn(fm)), fn, (fm,)

    def coreset():
        n, d, frac = size["coreset"]
        bank = jnp.asarray(_gaussian(4, (n, d)))
        proj = pj.random_projection(0, d, min(128, d))
        fn = lambda bank, proj: pj.greedy_coreset(bank, int(n * frac), projection=proj,  # noqa: E731
                                                  start_indices=tuple(range(10)))
        return (lambda: fn(bank, proj)), fn, (bank, proj)

    def search_brute():
        n, d, q = size["search"]
        index = pj.build_index(jnp.asarray(_gaussian(5, (n, d))))
        queries = jnp.asarray(_gaussian(6, (q, d)))
        fn = lambda index, queries: pj.search(index, queries, 1)  # noqa: E731
        return (lambda: fn(index, queries)), fn, (index, queries)

    def search_clustered():
        n, d, q = size["clustered"]
        index = pj.build_clustered_index(_mixture(7, n, d))
        queries = jnp.asarray(_mixture(8, q, d, spread=0.35))
        fn = lambda index, queries: pj.search(index, queries, 1)  # noqa: E731
        return (lambda: fn(index, queries)), fn, (index, queries)

    def scores():
        b, p, d = size["scores"]
        index = pj.build_index(jnp.asarray(_mixture(9, size["search"][0], d)))
        feats = jnp.asarray(_mixture(10, b * p, d, spread=0.35).reshape(b, p, d))
        fn = lambda index, feats: pj.image_scores_from_index(index, feats, num_neighbors=9)  # noqa: E731
        return (lambda: fn(index, feats)), fn, (index, feats)

    def maps():
        b, g, out = size["maps"]
        s = jnp.asarray(np.abs(_gaussian(11, (b, g, g))))
        fn = lambda s: pj.anomaly_maps(s, (out, out))  # noqa: E731
        return (lambda: fn(s)), fn, (s,)

    def fit():
        m = model()
        images = _images(12, size["fit_images"], size["model"]["resize"])
        return lambda: np.asarray(m.fit(images).bank)

    def predict():
        m = model()
        if getattr(m, "bank", None) is None:  # the fit stage failed or was left out
            m.fit(_images(12, size["fit_images"], size["model"]["resize"]))
        images = _images(13, size["predict_images"], size["model"]["resize"])
        return lambda: m.predict(images)

    yield from zip(STAGES, (embed, aggregate, coreset, search_brute, search_clustered, scores, maps, fit, predict))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """What a result is only comparable within: the JAX backend, the device kind, the versions."""
    import jax
    import jaxlib

    import patchcore_jax

    device = jax.devices()[0]
    return {"backend": jax.default_backend(), "device_kind": str(device.device_kind),
            "device_count": jax.device_count(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "numpy": np.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpu_model": _cpu_model(),
            "patchcore_jax_file": os.path.dirname(os.path.abspath(patchcore_jax.__file__))}


class _Memory:
    """The peak memory of one call of a stage, measured on its own after the timed calls.

    A stage that traces (the array stages): its compiled program's temporaries and outputs, from
    XLA's buffer assignment (`memory_analysis()`): exact, the same in every process and under any
    load, and what a device has to hold. The model stages (embed, fit, predict) do host work and do
    not trace; for them:

    CPU: the resident set's peak above where it started (Linux resets the peak through
    /proc/self/clear_refs). Before this pass glibc is told to map every block of 64 KiB or more on
    its own and to unmap it when freed (`mallopt(M_MMAP_THRESHOLD)`, which also stops the threshold
    from adapting): otherwise freed buffers stay resident and a call that reuses them shows no
    footprint, and which ones stay depends on the threads' timing. Accelerators: the device's peak bytes in use, a
    running peak that cannot be reset (read it as the largest footprint so far)."""

    def __init__(self):
        import ctypes
        import ctypes.util

        import jax

        self.device = jax.devices()[0]
        self.accelerator = jax.default_backend() != "cpu"
        self.trim = None
        if not self.accelerator:
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
                self.trim = libc.malloc_trim
            except (OSError, AttributeError):
                pass

    @staticmethod
    def _status(field):
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def xla_mb(self, fn, args):
        import jax

        stats = jax.jit(fn).lower(*args).compile().memory_analysis()
        return (stats.temp_size_in_bytes + stats.output_size_in_bytes) / 2**20

    def peak_mb(self, call):
        import gc

        if self.accelerator:
            call()
            stats = self.device.memory_stats() or {}
            peak = stats.get("peak_bytes_in_use")
            return None if peak is None else peak / 2**20
        gc.collect()
        if self.trim is not None:
            self.trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return None
        base = self._status("VmRSS:")
        call()
        hwm = self._status("VmHWM:")
        return None if hwm is None or base is None else max(hwm - base, 0) / 2**20


def _host(tree):
    if isinstance(tree, (tuple, list)):
        return [_host(t) for t in tree]
    return [np.asarray(tree)]


def run(size_name: str, repeats: int, only=None, outputs: dict | None = None, min_time: float = 0.0,
        memory: bool = True) -> dict:
    """Times every stage in this process; returns `{"env": ..., "stages": {name: figures}}`."""
    import jax

    size = SIZES[size_name]
    thunks = {}
    result = {"env": environment(), "size": size_name, "repeats": repeats, "stages": {}}
    for name, setup in stages(size):
        if only and name not in only:
            continue
        try:
            thunk = setup()
            traced = None
            if isinstance(thunk, tuple):
                thunk, *traced = thunk
            c0, t0 = time.process_time(), time.perf_counter()
            out = jax.block_until_ready(thunk())
            first_cpu, first_wall = time.process_time() - c0, time.perf_counter() - t0
            cpu, wall = [], []
            while len(cpu) < repeats or (sum(wall) < min_time and len(cpu) < 200):
                c0, t0 = time.process_time(), time.perf_counter()
                jax.block_until_ready(thunk())
                cpu.append(time.process_time() - c0)
                wall.append(time.perf_counter() - t0)
            result["stages"][name] = {"cpu_s": cpu, "wall_s": wall, "first_cpu_s": first_cpu,
                                      "first_wall_s": first_wall, "peak_mb": None}
            thunks[name] = thunk, traced
            if outputs is not None:
                for i, arr in enumerate(_host(out)):
                    outputs[f"{name}.{i}"] = arr
        except Exception:  # recorded; the other stages still run
            result["stages"][name] = {"error": traceback.format_exc(limit=4)}
    if not memory:
        return result
    memory = _Memory()  # after the timings: its allocator setting would slow them down
    for name, (thunk, traced) in thunks.items():
        stage = result["stages"][name]
        try:
            if traced:
                stage["peak_mb"], stage["memory_source"] = memory.xla_mb(*traced), "xla"
                continue
        except Exception:  # a revision whose function does not trace: measured as the model stages are
            pass
        try:
            # The largest of three: a call that happens to reuse pages still resident shows less.
            stage["peak_mb"] = max(memory.peak_mb(lambda: jax.block_until_ready(thunk())) for _ in range(3))
            stage["memory_source"] = "rss"
        except Exception:
            stage["error"] = traceback.format_exc(limit=4)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="quick")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-time", type=float, default=0.0, help="seconds of timed calls per stage, at least")
    parser.add_argument("--only", nargs="*", help="these stages only")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory pass (it compiles again)")
    parser.add_argument("--out", required=True, help="the JSON result")
    parser.add_argument("--outputs", help="an .npz of every stage's outputs (the drift check)")
    args = parser.parse_args(argv)
    outputs = {} if args.outputs else None
    result = run(args.size, args.repeats, args.only, outputs, args.min_time, memory=not args.no_memory)
    if args.outputs:
        np.savez(args.outputs, **outputs)
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
