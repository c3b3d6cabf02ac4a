"""Runs every benchmark in its own process, then merges the results into one pytest-benchmark JSON
file for `bench/report.py`: no contender shares a process (thread pools, allocators, two OpenBLAS
builds) with another.

    python -m bench.separate bench/bench_neighbors.py bench/bench_coreset.py --out bench.json [-k EXPR]

Each process gets the environment NOTES.md asks for: OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE removed
for NumPy, JAX and torch (their native kernels), kept for faiss (its own OpenBLAS build is fastest so).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile


def collect(paths: list[str], expr: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-o", "python_files=bench_*.py", *paths]
    if expr:
        cmd += ["-k", expr]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
    return [line.strip() for line in out.splitlines() if "::" in line and not line.startswith(" ")]


def environment(node: str) -> dict[str, str]:
    env = dict(os.environ)
    if "faiss" not in node:
        for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
            env.pop(name, None)
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("-k", dest="expr", default=None)
    args = parser.parse_args(argv)
    merged, failed = None, []
    with tempfile.TemporaryDirectory() as tmp:
        for i, node in enumerate(collect(args.paths, args.expr)):
            path = os.path.join(tmp, f"{i}.json")
            cmd = [sys.executable, "-m", "pytest", "-q", "-o", "python_files=bench_*.py", node,
                   f"--benchmark-json={path}"]
            print("running", node, flush=True)
            if subprocess.run(cmd, env=environment(node), check=False).returncode != 0 or not os.path.exists(path):
                failed.append(node)
                continue
            with open(path) as f:
                data = json.load(f)
            if merged is None:
                merged = data
            else:
                merged["benchmarks"].extend(data["benchmarks"])
    if merged is None:
        print("no benchmark ran", file=sys.stderr)
        return 1
    with open(args.out, "w") as f:
        json.dump(merged, f, indent=1)
    print(f"wrote {args.out}: {len(merged['benchmarks'])} benchmarks" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
