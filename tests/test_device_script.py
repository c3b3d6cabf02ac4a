"""The prepared device script (`python -m bench.device`) in its tiny form, so that it cannot rot: every
agreement check it makes must pass here too, and every bench must produce a time."""

import json

from bench import device


def test_tiny_device_run_writes_one_passing_report(tmp_path):
    # The budget is for a lent device machine's minutes; here every bench must run, however loaded the CPU.
    assert device.main(["--out", str(tmp_path), "--tiny", "--budget-s", "3600"]) == 0
    report = json.loads((tmp_path / "device.json").read_text())
    assert report["all_checks_ok"] and not report["errors"] and not report["skipped"]
    assert set(report["checks"]) == {"search", "coreset", "scores_and_maps"}
    assert report["checks"]["search"]["clustered_near_duplicates_find_themselves"] is True
    assert all(b["median_s"] > 0 for b in report["benches"].values())
    assert report["auto_method"] == "lazy"  # the CPU's choice
    # The gate's stages ran here too (smoke sizes), keyed by this device, with JAX's versions.
    gate = report["gate"]
    assert gate["mode"] == "smoke" and gate["device"].startswith("cpu")
    assert all(gate["env"][k] for k in ("backend", "device_kind", "jax", "jaxlib"))
    assert all(fig["time"] and not fig["error"] for fig in gate["figures"].values())
