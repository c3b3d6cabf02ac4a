"""The performance regression gate (`python -m bench.gate`), so that it cannot rot: its statistics on
fixed numbers, its drift check on fixed arrays, and one smoke run end to end (tiny sizes, one round,
no timing verdict) of HEAD against the working tree, with a saved baseline compared back. No timing
is asserted anywhere."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bench import gate, gate_stats
from bench.gate_stages import STAGES

ROOT = Path(__file__).resolve().parents[1]


def test_mann_whitney_interval_ranks():
    # The exact null distribution of U: P(U <= 0) = 1/70 for 4 and 4 rounds (so the interval is the
    # range of the 16 pairwise ratios, 97% coverage), 4/252 <= 2.5% < 7/252 for 5 and 5; 3 and 3
    # rounds cannot reach 95% (1/20 = 5% on each side).
    assert gate_stats.mw_rank(4, 4) == 1
    assert gate_stats.mw_rank(5, 5) == 3
    assert gate_stats.mw_rank(3, 3) == 0
    assert sum(gate_stats._u_counts(4, 4)) == 70


def test_ratio_and_verdicts():
    base = [1.00, 1.02, 0.99, 1.05]
    est, low, high = gate_stats.ratio_interval(base, [2 * b for b in base])
    assert est == pytest.approx(2.0, rel=0.05) and low > 1.8 and high < 2.2
    assert gate_stats.verdict("time", base, [2 * b for b in base])["verdict"] == "slower"
    assert gate_stats.verdict("time", base, [b / 2 for b in base])["verdict"] == "faster"
    # Real but below the threshold: every candidate round slower by 5%, not named.
    assert gate_stats.verdict("time", base, [1.05 * b for b in base])["verdict"] == "same"
    # Large but not real: one noisy round does not make a verdict.
    assert gate_stats.verdict("time", base, [1.0, 1.5, 0.98, 1.03])["verdict"] == "same"
    # Every candidate round above every base round, ratio 1.15, but the rounds overlap within 5%: not named.
    assert gate_stats.verdict("time", [1.0, 1.01, 1.02, 1.03], [1.06, 1.15, 1.2, 1.25])["verdict"] == "same"
    assert gate_stats.verdict("time", [1.0, 1.01, 1.02, 1.03], [1.09, 1.15, 1.2, 1.25])["verdict"] == "slower"
    assert gate_stats.verdict("time", [1.0], [2.0])["verdict"] == "no verdict"
    # Compiling is measured once per revision: a coarse guard, 50% and half a second of CPU time.
    assert gate_stats.verdict("compile", [2.0], [3.5])["verdict"] == "slower"
    assert gate_stats.verdict("compile", [2.0], [2.8])["verdict"] == "same"
    assert gate_stats.verdict("compile", [0.2], [0.6])["verdict"] == "same"
    assert gate_stats.verdict("memory", [100.0], [130.0], memory_source="xla")["verdict"] == "slower"
    assert gate_stats.verdict("memory", [100.0], [120.0], memory_source="rss")["verdict"] == "same"  # < 32 MiB


def test_drift_uses_the_tests_tolerances_and_exact_indices():
    base = {"search_brute.0": np.array([[1.0], [2.0]], np.float32), "search_brute.1": np.array([[3], [4]], np.int32),
            "anomaly_maps.0": np.ones((2, 4, 4), np.float32)}
    same = {k: v.copy() for k, v in base.items()}
    same["anomaly_maps.0"] = same["anomaly_maps.0"] + 1e-6  # within float32's 2e-5
    assert gate.drift(base, same) == {}
    moved = {k: v.copy() for k, v in base.items()}
    moved["anomaly_maps.0"][0, 0, 0] += 1e-3
    moved["search_brute.1"][1, 0] = 5
    assert set(gate.drift(base, moved)) == {"anomaly_maps", "search_brute"}
    # A baseline file keeps a sample of each output and its shape.
    sampled = {k: {**s, "values": s["values"].tolist()} for k, s in ((k, gate._sample(v)) for k, v in base.items())}
    assert gate.drift(sampled, same, sampled=True) == {}
    assert set(gate.drift(sampled, moved, sampled=True)) == {"anomaly_maps", "search_brute"}


def test_device_names_are_file_names():
    assert gate.device_name({"backend": "gpu", "device_kind": "NVIDIA H100 80GB HBM3"}) == "nvidia-h100-80gb-hbm3"
    assert gate.device_name({"backend": "cpu", "device_kind": "cpu", "cpu_model": "Intel(R) Xeon(R) 8480",
                             "cpu_count": 2}) == "cpu-intel-r-xeon-r-8480-2-cores"


def _git_checkout() -> bool:
    if shutil.which("git") is None:
        return False
    probe = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=ROOT, capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _git_checkout(), reason="the gate checks out a revision: needs git and a checkout")
def test_smoke_gate_of_head_against_the_working_tree(tmp_path):
    report_path, baseline = tmp_path / "gate.json", tmp_path / "baseline.json"
    status = gate.main(["--against", "HEAD", "--smoke", "--json", str(report_path), "--save", str(baseline)])
    report = json.loads(report_path.read_text())
    rows = {r["stage"]: r for r in report["rows"]}
    assert [r["of"] for r in report["rows"] if r["kind"] == "time"] == list(STAGES)
    assert not report["failed"], report["failed"]
    assert all(r["verdict"] == "no verdict" for r in rows.values())  # smoke: no timing verdict
    assert all(r["base"] > 0 and r["candidate"] > 0 for r in rows.values() if r["kind"] != "memory")
    for key in ("backend", "device_kind", "jax", "jaxlib"):
        assert report["candidate_env"][key] and report["base_env"][key]
    # The array stages' memory comes from XLA, exactly: the same code gives the same figure.
    assert rows["search_brute [XLA MiB]"]["base"] == rows["search_brute [XLA MiB]"]["candidate"] > 0
    changed = subprocess.run(["git", "status", "--porcelain", "--", "patchcore_jax"], cwd=ROOT, capture_output=True,
                             text=True).stdout.strip()
    if not changed:  # unchanged numerics: nothing may drift, and the gate passes
        assert report["drifted"] == {} and status == 0

    # The saved baseline is keyed by this device and its JAX; compared back against a new run of two
    # stages, with one stage's stored outputs moved: that stage, and only that one, is named.
    record = json.loads(baseline.read_text())
    assert record["mode"] == "smoke" and record["device"] == gate.device_name(record["env"])
    assert all(record["env"][k] for k in ("backend", "device_kind", "jax", "jaxlib"))
    assert set(record["rounds"]) == set(STAGES) and record["commit"]
    moved = record["outputs"]["anomaly_maps.0"]
    moved["values"] = [v + 1.0 for v in moved["values"]]
    baseline.write_text(json.dumps(record))
    status = gate.main(["--smoke", "--baseline", str(baseline), "--stages", "aggregate_patches", "anomaly_maps",
                        "--json", str(report_path)])
    report = json.loads(report_path.read_text())
    assert {r["of"] for r in report["rows"]} == {"aggregate_patches", "anomaly_maps"}
    assert set(report["drifted"]) == {"anomaly_maps"} and status == 1
    # A baseline of another mode is refused (exit 2) rather than compared.
    assert gate.main(["--quick", "--baseline", str(baseline), "--stages", "anomaly_maps"]) == 2
