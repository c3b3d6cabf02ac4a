"""The performance regression gate: a revision against the working tree, measured in the same job.

    python -m bench.gate --against main --quick        # before a merge: under 5 minutes on 2 cores
    python -m bench.gate --against HEAD~3              # full sizes (the 20k x 1024 search, WRN-sized aggregation)
    python -m bench.gate --save                        # bench/baselines/<device>.json from the working tree
    python -m bench.gate --baseline bench/baselines/cpu-....json --quick
    python -m bench.gate --against HEAD --smoke        # seconds: the test suite runs this, no timing verdict

REV is checked out into a temporary `git worktree`; the working tree is the candidate. Both are
measured by this tree's `bench/gate_stages.py` in fresh processes (PYTHONPATH set to the tree under
test), base and candidate alternating and repeated (as asv's `continuous` does: B C, C B, B C, ...),
so the load of a shared machine falls on both alike. The table gives per stage the best round's time
(CPU time by default), the ratio candidate / base with its 95% interval (`bench/gate_stats.py`), and
a verdict; compile time and peak memory are rows of their own. The same run compares every stage's
outputs between the two revisions against the tests' tolerance table (`tests/helpers.py`) and names
each stage whose numbers moved. Exit status: 1 when a stage got slower beyond the threshold or its
numbers drifted (or the candidate failed a stage), 0 otherwise, 2 for a misuse. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.helpers (the tolerance table) and the bench package

from bench import gate_stats  # noqa: E402
from bench.gate_stages import STAGES  # noqa: E402

WORKER = ROOT / "bench" / "gate_stages.py"
BASELINES = ROOT / "bench" / "baselines"
MODES = {  # warm rounds per revision, timed calls per stage (at least), seconds per stage (at least)
    "smoke": dict(size="smoke", rounds=0, repeats=1, min_time=0.0),
    "quick": dict(size="quick", rounds=4, repeats=5, min_time=0.3),
    "full": dict(size="full", rounds=5, repeats=3, min_time=1.0),
}
SAMPLE = 256  # elements of each output kept in a baseline file, evenly spaced


def _git(*args, cwd=ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def checkout(rev: str):
    """`rev` checked out (detached) into a temporary worktree, removed afterwards."""
    sha = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
    tmp = tempfile.mkdtemp(prefix="gate-base-")
    tree = os.path.join(tmp, "tree")
    _git("worktree", "add", "--detach", "--quiet", tree, sha)
    try:
        yield sha, tree
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", tree], cwd=ROOT, capture_output=True)
        subprocess.run(["git", "worktree", "prune"], cwd=ROOT, capture_output=True)
        with contextlib.suppress(OSError):
            os.rmdir(tmp)


def start(tree: str, mode: dict, work: str, tag: str, *, outputs: bool, label: str | None = None) -> tuple:
    """Starts one round: a fresh process that times every stage of `tree`'s patchcore_jax (`finish`
    collects it). The first round of each revision (`outputs=True`) compiles from nothing (the compile
    rows), keeps its outputs (the drift check) and measures memory (exact where XLA reports it, so once
    is enough); the later rounds read its compiled programs back from the revision's cache (`label`)."""
    out, npz, log = (os.path.join(work, f"{tag}.{ext}") for ext in ("json", "npz", "log"))
    cmd = [sys.executable, str(WORKER), "--size", mode["size"], "--repeats", str(mode["repeats"]),
           "--min-time", str(mode["min_time"]), "--out", out] + (["--outputs", npz] if outputs else ["--no-memory"])
    if mode.get("stages"):
        cmd += ["--only", *mode["stages"]]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = tree
    # Compiling is most of a process's time on a loaded machine, and the run time of a stage does not
    # depend on it: each revision gets a persistent compilation cache of its own (never one from the
    # environment: a test run or the command line may set one, and the revisions must not share), empty
    # for its cold round, which measures compiling (and fills it), read back by the warm rounds.
    # The smoke form gives no verdict, so its two revisions share one cache (the test run's, when it
    # sets one): identical programs compile once, which is what keeps the smoke run short.
    smoke_cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(work, "cache-smoke")
    cache = smoke_cache if mode["size"] == "smoke" else os.path.join(work, f"cache-{label or tag}")
    env.pop("PATCHCORE_JAX_COMPILATION_CACHE", None)
    env.update(JAX_ENABLE_COMPILATION_CACHE="true", JAX_COMPILATION_CACHE_DIR=cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    # glibc adapts its mmap threshold as a process frees large blocks, so one process maps (and
    # page-faults) a stage's output on every call and the next reuses heap pages: the same code then
    # ran anomaly_maps at 0.6 or 1.2 ms by process. A fixed threshold (the largest glibc takes) and no
    # trimming measure the arithmetic, for both revisions alike.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(32 * 2**20))
    env.setdefault("MALLOC_TRIM_THRESHOLD_", str(2**30))
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=err, stderr=subprocess.STDOUT)
    return proc, tree, out, npz, log, outputs


def finish(started: tuple) -> dict:
    """The result of a round `start`ed: the worker's figures, `cold`, and `outputs` for the first round."""
    proc, tree, out, npz, log, outputs = started
    if proc.wait() != 0 or not os.path.exists(out):
        with open(log) as f:
            raise RuntimeError(f"the measuring process for {tree} failed:\n{f.read()[-3000:]}")
    with open(out) as f:
        result = json.load(f)
    found = result["env"]["patchcore_jax_file"]
    if not Path(found).resolve().is_relative_to(Path(tree).resolve()):
        raise RuntimeError(f"measuring {tree} imported patchcore_jax from {found} (an installed copy shadows it)")
    result["cold"] = outputs  # compiled from nothing: this round's first calls are the compile rows
    if outputs:
        with np.load(npz) as z:
            result["outputs"] = {k: z[k] for k in z.files}
    return result


def device_name(env: dict) -> str:
    """The baseline file's name: the device kind (on a CPU, the processor model and core count, since
    every CPU's device kind is "cpu"), lower case, letters and digits joined by '-'."""
    kind = env["device_kind"]
    if env["backend"] == "cpu":
        kind = f"cpu {env.get('cpu_model', '')} {env.get('cpu_count', '')} cores"
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or "unknown"


def per_round(results: list[dict]) -> dict:
    """`{stage: {"time": [...], "wall": [...], "compile": [...], "memory": [...], "error": str|None}}`
    from the rounds of one revision: each round's best call, the compile time of the round that
    compiled from nothing (CPU time of the first call less the best call) and the peak memory."""
    out = {}
    timed = [r for r in results if not r.get("cold", True)] or results  # the warm rounds, where there are any
    for name in (n for n in STAGES if any(n in r["stages"] for r in results)):
        rows = {"time": [], "wall": [], "compile": [], "memory": [], "error": None, "memory_source": "rss"}
        for r in results:
            s = r["stages"].get(name)
            if s is None:
                continue
            if "error" in s:
                rows["error"] = s["error"]
                continue
            if any(r is t for t in timed):
                rows["time"].append(min(s["cpu_s"]))
                rows["wall"].append(min(s["wall_s"]))
            if r.get("cold", True):  # the warm rounds read their programs from the cache
                rows["compile"].append(max(s["first_cpu_s"] - min(s["cpu_s"]), 0.0))
            if s.get("peak_mb") is not None:
                rows["memory"].append(s["peak_mb"])
                rows["memory_source"] = s.get("memory_source", "rss")
        out[name] = rows
    return out


def compare(base: dict, cand: dict, *, metric: str = "time", verdicts: bool = True, threshold=None) -> list[dict]:
    """The table's rows: per stage its run time, then compile time and peak memory as rows of their own."""
    rows = []
    for name in (n for n in STAGES if n in cand):
        b, c = base.get(name), cand.get(name)
        source = (c or {}).get("memory_source", "rss")
        for kind, key, label in (("time", metric, name), ("compile", "compile", f"{name} [compile]"),
                                 ("memory", "memory", f"{name} [{'XLA' if source == 'xla' else 'RSS'} MiB]")):
            row = {"stage": label, "of": name, "kind": kind}
            if c is None or c["error"] or not c[key]:
                row.update(verdict="error" if c and c["error"] else "missing", error=c and c["error"])
            elif b is None or b["error"] or not b[key]:
                row.update(candidate=float(np.min(c[key])), verdict="no base")
            else:
                if kind == "memory" and b.get("memory_source", "rss") != source:
                    source = "rss"  # one side measured by the resident set: the coarser floor
                row.update(gate_stats.verdict(kind, b[key], c[key], threshold=threshold if kind == "time" else None,
                                              memory_source=source))
                if not verdicts:
                    row["verdict"] = "no verdict"
            rows.append(row)
    return rows


def drift(base_out: dict, cand_out: dict, *, sampled: bool = False) -> dict:
    """`{stage: message}` for every stage whose outputs moved beyond the tests' tolerances
    (`tests.helpers.assert_close`, by the candidate's dtype); integer outputs (indices) must be equal."""
    from tests.helpers import TOLERANCES, assert_close

    moved = {}
    for key in sorted(set(base_out) | set(cand_out)):
        stage = key.rsplit(".", 1)[0]
        if key not in base_out or key not in cand_out:
            continue  # a stage that failed or is missing on one side is reported in the table
        b, c = base_out[key], np.asarray(cand_out[key])
        try:
            if sampled:  # a baseline file keeps a sample of each output, and its shape
                if list(c.shape) != b["shape"]:
                    raise AssertionError(f"shape {c.shape} != {tuple(b['shape'])}")
                b, c = np.asarray(b["values"], dtype=b["dtype"]), _sample(c)["values"]
            b = np.asarray(b)
            if b.shape != c.shape:
                raise AssertionError(f"shape {c.shape} != {b.shape}")
            if c.dtype.kind in "iub":
                np.testing.assert_array_equal(c, b)
            else:
                dtype = c.dtype if np.dtype(c.dtype) in TOLERANCES else np.float32
                assert_close(c, b, dtype)
        except AssertionError as e:
            moved.setdefault(stage, f"output {key.rsplit('.', 1)[1]}: {str(e).strip().splitlines()[0][:160]}")
    return moved


def _sample(a: np.ndarray) -> dict:
    flat = np.asarray(a).ravel()
    idx = np.unique(np.linspace(0, max(flat.size - 1, 0), min(SAMPLE, flat.size)).astype(np.int64))
    return {"shape": list(np.shape(a)), "dtype": str(flat.dtype), "values": flat[idx] if flat.size else flat}


def _fmt(row: dict, key: str) -> str:
    v = row.get(key)
    if v is None:
        return "-"
    if row["kind"] == "memory":
        return f"{v:.1f}"
    return f"{v * 1e3:.2f} ms" if v < 1 else f"{v:.3f} s"


def table(rows: list[dict], drifted: dict, base_label: str, cand_label: str) -> str:
    lines = [f"{'stage':36s} {base_label[:14]:>14s} {cand_label[:14]:>14s} {'ratio [95% CI]':>24s}  verdict"]
    for r in rows:
        if "ratio" in r:
            ci = f"[{r['low']:.2f}, {r['high']:.2f}]" if r.get("low") is not None else ""
            ratio = f"{r['ratio']:.3f} {ci}"
        else:
            ratio = "-"
        verdict = r["verdict"]
        if r["kind"] == "time" and r["of"] in drifted:
            verdict += ", NUMBERS MOVED"
        lines.append(f"{r['stage']:36s} {_fmt(r, 'base'):>14s} {_fmt(r, 'candidate'):>14s} {ratio:>24s}  {verdict}")
    return "\n".join(lines)


def run_rounds(trees: dict, mode: dict, work: str, log) -> dict:
    """`{label: [round results]}`: first one cold round per revision, all of them at once (each compiles
    from nothing: the compile rows, the outputs and the memory; compiling is one thread, so together
    they keep 2 cores busy, and the load falls on them alike); then `mode["rounds"]` warm rounds each,
    the revisions alternating and swapping order every round (B C, C B, ...): the time rows. With no
    warm rounds (smoke), the cold round gives the time rows too, and the revisions run one after the
    other: they share one compilation cache there (`start`), so the second reads back every program
    the first compiled (unchanged code compiles once)."""
    labels = list(trees)
    t0 = time.perf_counter()
    if mode["rounds"]:
        started = [start(trees[lb], mode, work, f"{lb}-cold", outputs=True, label=lb) for lb in labels]
        results = {lb: [finish(st)] for lb, st in zip(labels, started)}
    else:
        results = {lb: [finish(start(trees[lb], mode, work, f"{lb}-cold", outputs=True, label=lb))] for lb in labels}
    how = "together" if mode["rounds"] else "one after the other"
    log(f"compiled and measured {', '.join(labels)} from nothing, {how}, in {time.perf_counter() - t0:.1f} s")
    for r in range(mode["rounds"]):
        for label in (labels if r % 2 == 0 else labels[::-1]):
            t0 = time.perf_counter()
            results[label].append(finish(start(trees[label], mode, work, f"{label}-{r}", outputs=False, label=label)))
            log(f"round {r + 1}/{mode['rounds']}: {label} measured in {time.perf_counter() - t0:.1f} s")
    return results


def baseline_record(results: list[dict], mode_name: str, sha: str | None) -> dict:
    env = results[0]["env"]
    return {"format": 1, "device": device_name(env), "env": env, "mode": mode_name, "commit": sha,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "rounds": per_round(results),
            "outputs": {k: {**s, "values": s["values"].tolist()}
                        for k, s in ((k, _sample(v)) for k, v in results[0]["outputs"].items())}}


def comparable(stored: dict, env: dict | None, mode_name: str) -> str | None:
    """Why a stored baseline cannot be compared with this run (None when it can); env None: the mode only."""
    if stored["mode"] != mode_name:
        return f"the baseline was measured in {stored['mode']} mode, this run is {mode_name}"
    if env is None:
        return None
    if stored["device"] != device_name(env) or stored["env"]["backend"] != env["backend"]:
        return f"the baseline is of {stored['device']} ({stored['env']['backend']}), this device is {device_name(env)}"
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", metavar="REV", help="the base revision (any git revision)")
    parser.add_argument("--baseline", metavar="FILE", help="compare with a saved baseline instead of a revision")
    parser.add_argument("--save", nargs="?", const="", metavar="FILE",
                        help="save the working tree's figures (default bench/baselines/<device>.json)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes, 4 warm rounds each: under 5 minutes on 2 cores")
    size.add_argument("--smoke", action="store_true", help="tiny sizes, 1 round, no timing verdict (the tests)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, metavar="STAGE",
                        help=f"these stages only (default all: {', '.join(STAGES)})")
    parser.add_argument("--rounds", type=int, help="warm rounds per revision, after the cold one (default: 4 quick, 5 full)")
    parser.add_argument("--metric", choices=("time", "wall"), default="time",
                        help="time: CPU time of the process (default; steadier under load); wall: elapsed")
    parser.add_argument("--threshold", type=float, help=f"run-time threshold (default {gate_stats.THRESHOLDS['time']})")
    parser.add_argument("--json", metavar="FILE", help="write every figure and verdict here")
    args = parser.parse_args(argv)
    if args.against and args.baseline:
        parser.error("--against and --baseline are two different comparisons: give one")
    if not (args.against or args.baseline or args.save is not None):
        parser.error("nothing to compare: give --against REV, --baseline FILE or --save")
    mode_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    mode = dict(MODES[mode_name])
    if args.rounds:
        mode["rounds"] = args.rounds
    if args.stages:
        mode["stages"] = list(args.stages)
    verdicts = mode_name != "smoke"
    start = time.perf_counter()

    def log(msg):
        print(f"[gate {time.perf_counter() - start:6.1f} s] {msg}", file=sys.stderr, flush=True)

    stored = None
    if args.baseline:
        with open(args.baseline) as f:
            stored = json.load(f)
        problem = comparable(stored, None, mode_name)
        if problem:  # before measuring anything
            print(f"gate: cannot compare with {args.baseline}: {problem}", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="gate-") as work, contextlib.ExitStack() as stack:
        trees, base_label, sha = {"candidate": str(ROOT)}, None, None
        if args.against:
            sha, base_tree = stack.enter_context(checkout(args.against))
            trees = {"base": base_tree, "candidate": str(ROOT)}
            base_label = f"base {sha[:10]}"
            log(f"base {args.against} = {sha[:10]} in {base_tree}; candidate: the working tree {ROOT}")
        results = run_rounds(trees, mode, work, log)
    cand_env = results["candidate"][0]["env"]
    report = {"mode": mode_name, "rounds": mode["rounds"], "metric": args.metric, "candidate_env": cand_env}
    status = 0
    if args.against or stored is not None:
        if stored is not None:
            problem = comparable(stored, cand_env, mode_name)
            if problem:
                print(f"gate: cannot compare with {args.baseline}: {problem}", file=sys.stderr)
                return 2
            base_rounds, base_label = stored["rounds"], f"saved {str(stored.get('commit'))[:8]}"
            base_env = stored["env"]
            drifted = drift(stored["outputs"], results["candidate"][0]["outputs"], sampled=True)
        else:
            base_rounds, base_env = per_round(results["base"]), results["base"][0]["env"]
            drifted = drift(results["base"][0]["outputs"], results["candidate"][0]["outputs"])
        for key in ("jax", "jaxlib", "backend", "device_kind"):
            if base_env.get(key) != cand_env.get(key):
                print(f"gate: warning: {key} differs: base {base_env.get(key)}, candidate {cand_env.get(key)}",
                      file=sys.stderr)
        rows = compare(base_rounds, per_round(results["candidate"]), metric=args.metric, verdicts=verdicts,
                       threshold=args.threshold)
        print(f"JAX {cand_env['jax']} (jaxlib {cand_env['jaxlib']}), backend {cand_env['backend']}, device "
              f"{cand_env['device_kind']} ({device_name(cand_env)}); {mode_name} sizes, {mode['rounds']} round(s) per "
              f"revision, {'CPU' if args.metric == 'time' else 'wall'} time, best call of each round")
        print(table(rows, drifted, base_label, "candidate"))
        slower = [r["stage"] for r in rows if r["verdict"] == "slower"]
        failed = sorted({r["of"] for r in rows if r["verdict"] == "error"})
        for stage, msg in drifted.items():
            print(f"NUMBERS MOVED in {stage}: {msg}")
        if failed:
            print("FAILED in the candidate: " + ", ".join(failed))
        if slower:
            print("SLOWER beyond the threshold: " + ", ".join(slower))
        status = 1 if (slower or drifted or failed) else 0
        print("gate: " + ("FAIL" if status else "pass") + f" ({time.perf_counter() - start:.0f} s)")
        report.update(base_env=base_env, rows=rows, drifted=drifted, slower=slower, failed=failed, status=status,
                      per_round={"base": base_rounds, "candidate": per_round(results["candidate"])},
                      base=sha or args.baseline)
    if args.save is not None:
        record = baseline_record(results["candidate"], mode_name, _git("rev-parse", "HEAD"))
        path = Path(args.save) if args.save else BASELINES / f"{record['device']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)
        print(f"gate: saved the working tree's figures to {path}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return status


if __name__ == "__main__":
    sys.exit(main())
