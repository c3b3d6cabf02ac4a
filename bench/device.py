"""The prepared device script: on a GPU or TPU machine, the agreement checks that matter there and the
stage benches, in one command, written to one JSON file, in under 8 minutes:

    python -m bench.device --out DIR            # DIR/device.json
    python -m bench.device --out DIR --tiny     # seconds, any machine (the test suite runs this)

Agreement: every numerical stage against the float64 NumPy reference on the device's own arithmetic
(a GPU's or TPU's matrix units round differently from a CPU's), including the cases that go wrong
silently when they go wrong: near-duplicate rows and extreme magnitudes in the exact search, the lazy
and dense coreset loops choosing the same rows, bfloat16 storage of the projected bank. float64
checks run where the backend has float64 (not on TPU).

Benches (compile excluded, median of a few rounds, `jax.block_until_ready`): exact search by brute
force and by the clustered index, the coreset's lazy and dense loops in float32 and bfloat16 (the
measurement that `coreset.resolve_method("auto")` waits for), patch aggregation, anomaly maps and the
WRN50-2 backbone. A time budget stops starting new benches in time; skipped ones are listed.

The regression gate's stages (`bench/gate_stages.py`, full sizes; smoke sizes with --tiny), a few
rounds of fresh processes, compared with the stored baseline of this device kind
(`bench/baselines/<device>.json`, see `python -m bench.gate --save`) when there is one: the table
is printed and its rows, verdicts and any drift go into device.json under "gate". `--save-baseline
DIR` writes this run's figures as such a baseline into DIR (bring it back and commit it under
bench/baselines/ to give the device kind one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

import numpy as np

FULL = dict(search_bank=20_000, search_queries=6272, dim=1024, coreset=[(100_000, 0.01), (100_000, 0.10)],
            x64_coreset=4000, agg_batch=8, agg_channels=(512, 1024), maps_batch=8, backbone_batch=8, rounds=3,
            stores=("float32", "bfloat16"))
TINY = dict(search_bank=400, search_queries=64, dim=32, coreset=[(1500, 0.05)], x64_coreset=300, agg_batch=1,
            agg_channels=(16, 32), maps_batch=2, backbone_batch=0, rounds=1, stores=("float32",))


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def _mixture(seed, n, d, centres=16, spread=0.4):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(centres, d)) * 3.0
    return (means[rng.integers(0, centres, n)] + rng.normal(size=(n, d)) * spread).astype(np.float32)


# -- agreement ------------------------------------------------------------------------------------
def check_search(size, x64: bool) -> dict:
    import patchcore_jax as pj
    import reference
    from tests.helpers import x64 as x64_ctx

    n, q, d = size["search_bank"], min(size["search_queries"], 512), size["dim"]
    bank, queries = _mixture(0, n, d), _mixture(1, q, d, spread=0.6)
    want_d, want_i = reference.nearest_neighbors(bank, queries, 3)
    out = {}
    for name, index in (("brute", pj.build_index(bank)), ("clustered", pj.build_clustered_index(bank))):
        got_d, got_i = pj.search(index, queries, 3)
        true_d = np.linalg.norm(bank.astype(np.float64)[np.asarray(got_i)] - queries[:, None], axis=-1)
        out[f"{name}_float32_distance_rel"] = _rel(got_d, want_d)
        out[f"{name}_float32_chosen_rows_rel"] = _rel(true_d, want_d)
        out[f"{name}_float32_same_indices"] = float(np.mean(np.asarray(got_i) == want_i))
    if x64:
        with x64_ctx():
            for name, build in (("brute", pj.build_index), ("clustered", pj.build_clustered_index)):
                got_d, got_i = pj.search(build(bank.astype(np.float64)), queries.astype(np.float64), 3)
                out[f"{name}_float64_same_indices"] = float(np.mean(np.asarray(got_i) == want_i))
    # Near duplicates: 40 rows within 1e-3 (float32 keys cannot rank them); each must find itself.
    rng = np.random.default_rng(3)
    dups = (rng.normal(size=(1, 24)) * 4 + rng.normal(size=(40, 24)) * 1e-3).astype(np.float32)
    for name, index in (("brute", pj.build_index(dups)), ("clustered", pj.build_clustered_index(dups, leaf_size=8))):
        dd, di = pj.search(index, dups, 1)
        out[f"{name}_near_duplicates_find_themselves"] = bool(np.all(np.asarray(di)[:, 0] == np.arange(40))
                                                              and np.all(np.asarray(dd) == 0))
    # Magnitudes whose squares overflow (1e19) or underflow (1e-25) float32.
    for scale in (1e19, 1e-25):
        b, qq = (_mixture(4, 300, 32) * scale), (_mixture(5, 40, 32, spread=0.7) * scale)
        wd, wi = reference.nearest_neighbors(b.astype(np.float64), qq.astype(np.float64), 1)
        gd, gi = pj.search(pj.build_index(b), qq, 1)
        out[f"magnitude_{scale:g}_same_indices"] = float(np.mean(np.asarray(gi) == wi))
        out[f"magnitude_{scale:g}_distance_rel"] = _rel(np.asarray(gd, np.float64) / scale, wd / scale)
    ok = all(v >= 1.0 for k, v in out.items() if k.endswith("same_indices") and "float32" not in k)
    ok &= all(v < 2e-5 for k, v in out.items() if k.endswith("_rel"))
    ok &= all(v for k, v in out.items() if k.endswith("themselves"))
    return {"ok": bool(ok), **out}


def check_coreset(size, x64: bool) -> dict:
    import jax.numpy as jnp

    import patchcore_jax as pj
    import reference
    from tests.helpers import x64 as x64_ctx

    n, frac = size["coreset"][0]
    n = min(n, 20_000)
    bank = np.random.default_rng(0).normal(size=(n, size["dim"])).astype(np.float32)
    proj = np.asarray(pj.random_projection(0, size["dim"], 128))
    num, starts = int(n * frac), tuple(range(10))
    out = {}
    runs = {}
    for method in ("lazy", "dense"):
        for store in ("float32", "bfloat16"):
            idx = pj.greedy_coreset(jnp.asarray(bank), num, projection=proj, start_indices=starts, method=method,
                                    store_dtype=store)
            runs[method, store] = np.asarray(idx)
    radius = {k: reference.covering_radius(bank, v, projection=proj) for k, v in runs.items()}
    out["lazy_dense_same_float32"] = float(np.mean(runs["lazy", "float32"] == runs["dense", "float32"]))
    out["float32_radius_rel_lazy_vs_dense"] = abs(radius["lazy", "float32"] / radius["dense", "float32"] - 1)
    out["bfloat16_radius_change"] = radius["lazy", "bfloat16"] / radius["lazy", "float32"] - 1
    if x64:
        with x64_ctx():
            m = size["x64_coreset"]
            want = reference.greedy_coreset(bank.astype(np.float64)[:m], m // 100, projection=proj.astype(np.float64),
                                            start_indices=starts)
            for method in ("lazy", "dense"):
                got = pj.greedy_coreset(bank.astype(np.float64)[:m], m // 100, projection=proj.astype(np.float64),
                                        start_indices=starts, method=method, block=128)
                out[f"{method}_float64_equals_reference"] = bool(np.array_equal(np.asarray(got), want))
    ok = out["float32_radius_rel_lazy_vs_dense"] < 1e-4 and abs(out["bfloat16_radius_change"]) < 0.01
    ok &= all(v for k, v in out.items() if k.endswith("equals_reference"))
    return {"ok": bool(ok), **out}


def check_scores_and_maps(size, x64: bool) -> dict:
    import patchcore_jax as pj
    import reference

    bank, feats = _mixture(6, 500, size["dim"]), _mixture(7, 3 * 49, size["dim"], spread=0.8).reshape(3, 49, -1)
    want_s, want_p = reference.image_scores(bank.astype(np.float64), feats.astype(np.float64), num_neighbors=9)
    out = {}
    for name, index in (("brute", pj.build_index(bank)), ("clustered", pj.build_clustered_index(bank))):
        got_s, got_p = pj.image_scores_from_index(index, feats, num_neighbors=9)
        out[f"{name}_scores_rel"], out[f"{name}_patch_scores_rel"] = _rel(got_s, want_s), _rel(got_p, want_p)
    maps = np.abs(np.random.default_rng(8).normal(size=(2, 28, 28)))
    out["anomaly_maps_rel"] = _rel(pj.anomaly_maps(maps.astype(np.float32), (224, 224)), reference.anomaly_maps(maps, (224, 224)))
    rng = np.random.default_rng(9)
    c2, c3 = size["agg_channels"]
    fm = [rng.normal(size=(1, 28, 28, c2)).astype(np.float32), rng.normal(size=(1, 14, 14, c3)).astype(np.float32)]
    opts = dict(pretrain_dim=c3, target_dim=c3)
    out["aggregate_rel"] = _rel(pj.aggregate_patches(fm, **opts), reference.aggregate_patches([f.astype(np.float64) for f in fm], **opts))
    return {"ok": bool(all(v < 2e-5 for v in out.values())), **out}


# -- benches --------------------------------------------------------------------------------------
def _time(fn, rounds: int) -> dict:
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return {"first_call_s": round(first, 4), "median_s": round(float(np.median(times)), 5), "rounds": rounds}


def benches(size):
    """Yields `(name, thunk)`; each thunk returns a dict of figures."""
    import jax.numpy as jnp

    import patchcore_jax as pj
    from patchcore_jax._src.stages.search import clustered

    r = size["rounds"]
    n, q, d = size["search_bank"], size["search_queries"], size["dim"]

    def search(kind):
        bank, queries = _mixture(10, n, d), jnp.asarray(_mixture(11, q, d, spread=0.6))
        index = pj.build_index(bank) if kind == "brute" else pj.build_clustered_index(bank)
        out = _time(lambda: pj.search(index, queries, 1), r)
        if kind == "clustered":
            out["visited_fraction"] = round(clustered.visited_fraction(index, queries), 4)
        return out

    yield "search_brute", lambda: search("brute")
    yield "search_clustered", lambda: search("clustered")
    for cn, frac in size["coreset"]:
        for method in ("lazy", "dense"):
            for store in size["stores"]:
                def run(cn=cn, frac=frac, method=method, store=store):
                    bank = jnp.asarray(np.random.default_rng(cn).normal(size=(cn, d)).astype(np.float32))
                    proj = pj.random_projection(0, d, 128)
                    return _time(lambda: pj.greedy_coreset(bank, int(cn * frac), projection=proj,
                                                           start_indices=tuple(range(10)), method=method,
                                                           store_dtype=store), max(1, r - 1))
                yield f"coreset_{cn}_{frac:g}_{method}_{store}", run

    def aggregate():
        b, (c2, c3) = size["agg_batch"], size["agg_channels"]
        fm = [jnp.asarray(np.random.default_rng(0).normal(size=(b, 28, 28, c2)).astype(np.float32)),
              jnp.asarray(np.random.default_rng(1).normal(size=(b, 14, 14, c3)).astype(np.float32))]
        return _time(lambda: pj.aggregate_patches(fm, pretrain_dim=c3, target_dim=c3), r)

    def maps():
        s = jnp.asarray(np.abs(np.random.default_rng(0).normal(size=(size["maps_batch"], 28, 28))).astype(np.float32))
        return _time(lambda: pj.anomaly_maps(s, (224, 224)), r)

    yield "aggregate", aggregate
    yield "anomaly_maps", maps
    if size["backbone_batch"]:
        def backbone():
            import warnings

            from patchcore_jax._src.model import backbone as bb

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                extract = bb.feature_extractor("wide_resnet50_2")
            x = jnp.asarray(np.random.default_rng(0).normal(size=(size["backbone_batch"], 224, 224, 3)).astype(np.float32))
            out = _time(lambda: extract(x), r)
            out["images_per_second"] = round(size["backbone_batch"] / out["median_s"], 1)
            return out

        yield "backbone_wrn50_layer2_3", backbone


def gate_check(tiny: bool, save_dir: str | None = None) -> dict:
    """The gate's stages on this device, compared with its stored baseline when there is one."""
    import tempfile

    from bench import gate

    mode_name = "smoke" if tiny else "full"
    mode = dict(gate.MODES[mode_name], rounds=0 if tiny else 4)
    with tempfile.TemporaryDirectory(prefix="device-gate-") as work:
        results = gate.run_rounds({"candidate": str(gate.ROOT)}, mode, work, log=lambda msg: None)["candidate"]
    env = results[0]["env"]
    device = gate.device_name(env)
    out = {"device": device, "mode": mode_name, "rounds": mode["rounds"], "env": env,
           "figures": gate.per_round(results), "baseline": None}
    if save_dir:
        os.makedirs(save_dir, exist_ok=True)
        path = os.path.join(save_dir, f"{device}.json")
        with open(path, "w") as f:
            json.dump(gate.baseline_record(results, mode_name, None), f, indent=1)
        out["saved_baseline"] = path
    stored_path = gate.BASELINES / f"{device}.json"
    if not stored_path.exists():
        return out
    with open(stored_path) as f:
        stored = json.load(f)
    problem = gate.comparable(stored, env, mode_name)
    out["baseline"] = str(stored_path)
    if problem:
        out["baseline_problem"] = problem
        return out
    rows = gate.compare(stored["rounds"], out["figures"], verdicts=not tiny)
    drifted = gate.drift(stored["outputs"], results[0]["outputs"], sampled=True)
    print(gate.table(rows, drifted, f"saved {str(stored.get('commit'))[:8]}", "this run"))
    out.update(rows=rows, drifted=drifted, slower=[r["stage"] for r in rows if r["verdict"] == "slower"])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for device.json")
    parser.add_argument("--tiny", action="store_true", help="small sizes (seconds; what the test suite runs)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no new bench after this many seconds")
    parser.add_argument("--save-baseline", metavar="DIR", help="write the gate stages' figures as a baseline here")
    args = parser.parse_args(argv)

    import jax

    start = time.perf_counter()
    size = TINY if args.tiny else FULL
    backend = jax.default_backend()
    x64 = backend != "tpu"
    result = {
        "backend": backend, "devices": [str(d.device_kind) for d in jax.devices()], "jax": jax.__version__,
        "jaxlib": __import__("jaxlib").__version__,
        "python": platform.python_version(), "machine": platform.machine(), "tiny": args.tiny,
        "auto_method": __import__("patchcore_jax._src.stages.coreset", fromlist=["resolve_method"]).resolve_method("auto"),
        "checks": {}, "benches": {}, "skipped": [], "errors": {},
    }
    for name, check in (("search", check_search), ("coreset", check_coreset), ("scores_and_maps", check_scores_and_maps)):
        try:
            result["checks"][name] = check(size, x64)
        except Exception:  # recorded, and the run goes on: one JSON with everything that could be learnt
            result["errors"][name] = traceback.format_exc(limit=5)
    for name, thunk in benches(size):
        if time.perf_counter() - start > args.budget_s:
            result["skipped"].append(name)
            continue
        try:
            result["benches"][name] = thunk()
        except Exception:
            result["errors"][name] = traceback.format_exc(limit=5)
    if time.perf_counter() - start > args.budget_s:
        result["skipped"].append("gate")
    else:
        try:
            result["gate"] = gate_check(args.tiny, args.save_baseline)
        except Exception:
            result["errors"]["gate"] = traceback.format_exc(limit=5)
    result["all_checks_ok"] = bool(result["checks"]) and all(c["ok"] for c in result["checks"].values()) and not any(
        k in result["errors"] for k in ("search", "coreset", "scores_and_maps"))
    result["wall_s"] = round(time.perf_counter() - start, 1)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "device.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}: checks {'OK' if result['all_checks_ok'] else 'FAILED'}, {len(result['benches'])} benches, "
          f"{len(result['skipped'])} skipped, {len(result['errors'])} errors, {result['wall_s']} s")
    return 0 if result["all_checks_ok"] and not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
