"""Peak memory of the streaming bank builder on a stream far larger than memory (a bench, run alone):

    python -m bench.bank_memory --rows 4000000 --dim 1024 --fraction 0.1 --spill-dir /tmp

The stream is `rows x dim` float32 Gaussian rows made batch by batch from a seed (16 GB at the default
size), never held whole. Prints one JSON line: peak resident memory of this process (`ru_maxrss`), the
time of each stage, and the bytes the stream and the spill files held.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np


def stream(rows: int, dim: int, batch: int, seed: int):
    rng = np.random.default_rng(seed)
    for start in range(0, rows, batch):
        yield rng.standard_normal((min(batch, rows - start), dim), dtype=np.float32)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4_000_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=6272)  # 8 images of 28 x 28 patches
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--projection-dim", type=int, default=128)
    parser.add_argument("--spill-dir", default=None)
    args = parser.parse_args(argv)

    from patchcore_jax._src.stages import coreset
    from patchcore_jax._src.stages.bank import build_memory_bank

    stages: dict[str, float] = {}
    clock = [time.perf_counter()]

    def progress(stage, count):
        if stage == "coreset":
            stages["stream_and_project_s"] = stages.pop("_stream", 0.0)
            stages["coreset_s"] = round(time.perf_counter() - clock[0] - stages["stream_and_project_s"], 1)
        else:
            stages["_stream"] = round(time.perf_counter() - clock[0], 1)

    proj = coreset.random_projection(0, args.dim, args.projection_dim)
    start = time.perf_counter()
    bank, selected = build_memory_bank(stream(args.rows, args.dim, args.batch, 0), coreset_fraction=args.fraction,
                                       projection=proj, seed=0, spill_dir=args.spill_dir, progress=progress)
    total = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "rows": args.rows, "dim": args.dim, "fraction": args.fraction, "stream_gb": round(args.rows * args.dim * 4 / 1e9, 2),
        "bank_rows": int(len(bank)), "peak_rss_gb": round(peak_kib * 1024 / 1e9, 3), "total_s": round(total, 1),
        "gather_s": round(max(0.0, total - stages.get("stream_and_project_s", 0) - stages.get("coreset_s", 0)), 1),
        **{k: v for k, v in stages.items() if not k.startswith("_")},
    }))


if __name__ == "__main__":
    main()
