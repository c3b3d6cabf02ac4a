"""Exact brute-force search against faiss-cpu `IndexFlatL2`, interleaved in one process.

    python -m bench.brute_ratio [--rounds 5] [--rev REV ...]

Data of issue 24: a Gaussian bank of 20,000 x 1024 and 3,136 queries, float32, k = 1. Contenders run
one after another in each round (so load on a shared machine hits all of them alike), each after a
warm-up; the figure is the minimum over rounds of wall time and of process CPU time, and the ratio is
faiss's time over the contender's (above 1: faster than faiss flat).

Contenders:
- `faiss flat`: faiss-cpu `IndexFlatL2.search` (its own OpenBLAS sgemm and argmin);
- `brute force (P)`: `build_index` once, then `search` (what the issue timed; `brute_fused`), with the
  product `build_index` chose (`bfloat16x3` on CPUs with AMX, else `highest`);
- `brute force (highest)`: the same with `product="highest"` (float32 products at full precision);
- `matmul floor`: XLA's matrix product on the search's own tiles followed by a plain row minimum, no
  candidates and no certificate: the least any exact search built on XLA's product can take;
- `running list`: `brute.search_block` (what one device ran before the fused search; the sharded
  search still does) on the query tiles of `common.QUERY_BLOCK`;
- `--rev REV`: the brute force of an older revision with a flat `patchcore_jax/neighbors.py`
  (before the layered layout, e.g. 2b09e22: k = 1 by argmin, no certificate), read with `git show`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import patchcore_jax as pj  # noqa: E402
from patchcore_jax._src.stages.search import brute, brute_fused, common  # noqa: E402

N, Q, D = 20_000, 3_136, 1024


def matmul_floor(index, queries):
    """XLA's product on the search's tiles (`brute.search_jit`'s query tiles x `brute_fused.layout`'s
    sub-blocks of the bank), then a row minimum."""
    sub, _ = brute_fused.layout(index)
    blocks = brute.query_blocks(index, queries, common.QUERY_BLOCK * (index.block // sub), multiple=brute_fused.CHUNK)
    rows = index.rows.reshape(index.rows.shape[0] // sub, sub, -1)

    def tile(qb):
        def body(best, b_rows):
            prod = jnp.dot(qb, b_rows.T, precision=jax.lax.Precision.HIGHEST)
            return jnp.minimum(best, jnp.min(prod, axis=1)), None

        return jax.lax.scan(body, jnp.full((qb.shape[0],), jnp.inf, qb.dtype), rows)[0]

    return jax.lax.map(tile, blocks)


def running_list(index, queries):
    """The search of one shard (`brute.search_block`: blocks of `index.block` rows, a running top list)
    on the query tiles of `common.QUERY_BLOCK`: the one-device search before `brute_fused`."""
    blocks = brute.query_blocks(index, queries, common.QUERY_BLOCK)
    dist, idx = jax.lax.map(lambda qb: brute.search_block(qb, index, 1), blocks)
    return dist.reshape(-1, 1)[: queries.shape[0]], idx.reshape(-1, 1)[: queries.shape[0]]


def old_brute(rev: str):
    """The `neighbors` module of revision `rev` (a flat layout), loaded under its own name."""
    src = subprocess.run(["git", "show", f"{rev}:patchcore_jax/neighbors.py"], capture_output=True, text=True,
                         check=True).stdout
    path = os.path.join(tempfile.mkdtemp(), f"neighbors_{rev}.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(f"neighbors_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rev", action="append", default=[], help="an older revision's brute force too")
    args = parser.parse_args(argv)

    import faiss

    bank = np.random.default_rng(0).normal(size=(N, D)).astype(np.float32)
    queries = np.random.default_rng(1).normal(size=(Q, D)).astype(np.float32)
    flat = faiss.IndexFlatL2(D)
    flat.add(bank)
    b, q = jnp.asarray(bank), jnp.asarray(queries)
    index = pj.build_index(b)
    highest = pj.build_index(b, product="highest")
    floor_fn = jax.jit(matmul_floor)
    runs = {
        "faiss flat": lambda: flat.search(queries, 1),
        f"brute force ({index.product})": lambda: jax.block_until_ready(pj.search(index, q, 1)),
        "brute force (highest)": lambda: jax.block_until_ready(pj.search(highest, q, 1)),
        "matmul floor": lambda: jax.block_until_ready(floor_fn(index, q)),
        "running list": (lambda fn: lambda: jax.block_until_ready(fn(index, q)))(jax.jit(running_list)),
    }
    for rev in args.rev:
        module = old_brute(rev)
        old_index = module.build_index(b)
        runs[f"brute force {rev}"] = (lambda m, i: lambda: jax.block_until_ready(m.search(i, q, 1)))(module, old_index)

    want = np.asarray(runs["faiss flat"]()[1]).ravel()
    for name, run in runs.items():  # warm-up (compiles), and the indices checked against faiss
        out = run()
        if name != "matmul floor":
            same = float(np.mean(np.asarray(out[1]).ravel() == want))
            print(f"{name}: indices equal to faiss flat's for {same:.4f} of the queries", flush=True)
    wall = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            c0, t0 = time.process_time(), time.perf_counter()
            run()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    fw, fc = min(wall["faiss flat"]), min(cpu["faiss flat"])
    print(f"bank {N} x {D}, {Q} queries, k = 1, {args.rounds} rounds, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}; jax {jax.__version__}, faiss {faiss.__version__}")
    print(f"{'contender':28s} {'wall min':>9s} {'cpu min':>8s} {'faiss/this wall':>16s} {'faiss/this cpu':>15s}")
    for name in runs:
        w, c = min(wall[name]), min(cpu[name])
        print(f"{name:28s} {w:8.3f}s {c:7.3f}s {fw / w:15.2f}x {fc / c:14.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
