"""`sweep`: cells equal `evaluate`, coreset prefixes equal direct coresets, resume after kill -9, and
bad grids refused before any work."""

import csv
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import patchcore_jax
from patchcore_jax._src.app import cli, evaluate
from patchcore_jax._src.app.sweep_report import columns
from patchcore_jax._src.model.config import PatchCoreConfig
from patchcore_jax._src.stages import bank as bank_lib
from patchcore_jax._src.stages import coreset
from tests.dataset_trees import make_mvtec
from tests.helpers import SMALL, gaussian, xla_flags

BASE = PatchCoreConfig(**SMALL)
MODEL_ARGS = ["--backbone", "resnet18", "--resize", "72", "--crop", "64", "--pretrain-dim", "64", "--target-dim", "64",
              "--neighbors", "3", "--batch-size", "4"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_mvtec(str(tmp_path_factory.mktemp("mvtec")))


@pytest.fixture(scope="module")
def swept(tree, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sweep") / "S")
    grid = {"coreset_fraction": [0.05, 0.2], "anomaly_scorer_num_nn": [1, 3]}
    report = patchcore_jax.sweep("mvtec", tree, BASE, out=out, grid=grid, seeds=[0])
    return out, grid, report


def test_every_cell_equals_evaluate_with_the_same_settings(swept, tree, tmp_path):
    out, _, report = swept
    assert report["ran"] == 8 and report["kept"] == 0
    # The smaller coreset fraction comes from the larger one's greedy order: check it against evaluate.
    for values in ({"coreset_fraction": "0.05", "anomaly_scorer_num_nn": "3"},
                   {"coreset_fraction": "0.2", "anomaly_scorer_num_nn": "1"}):
        cfg = BASE.replace(coreset_fraction=float(values["coreset_fraction"]),
                           anomaly_scorer_num_nn=int(values["anomaly_scorer_num_nn"]))
        want = evaluate.evaluate("mvtec", tree, cfg, out=str(tmp_path / f"e{values['coreset_fraction']}"), heatmaps=0)
        for cat, res in want["categories"].items():
            row = next(r for r in report["results"] if r["category"] == cat and r["values"] == values)
            got = row["result"]
            assert got["bank_size"] == res["bank_size"] and got["n_train"] == res["n_train"]
            for m in ("image_auroc", "pixel_auroc", "au_pro"):
                assert got[m] == pytest.approx(res[m], abs=1e-9), (cat, values, m)


def test_results_table_and_plots(swept):
    out, grid, report = swept
    with open(os.path.join(out, "results.csv"), newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == columns(list(grid))
    assert rows[0][:7] == ["category", "coreset_fraction", "anomaly_scorer_num_nn", "seed", "image_auroc",
                           "pixel_auroc", "au_pro"]
    assert len(rows) == 1 + 8 and {r[1] for r in rows[1:]} == {"0.05", "0.2"}
    table = open(os.path.join(out, "table.md"), encoding="utf-8").read()
    assert "| **mean** |" in table and "coreset_fraction=0.05, anomaly_scorer_num_nn=3" in table
    for metric in ("image_auroc", "pixel_auroc", "au_pro"):
        for key in grid:
            with open(os.path.join(out, "plots", f"{metric}-{key}.png"), "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _two_processes(args, env):
    """Runs `patchcore-jax sweep ARGS` as processes 0 and 1 of a cluster on localhost (gloo, 2 host
    devices each); returns [(exit status, stdout, stderr)] in process order."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**env, "XLA_FLAGS": xla_flags(2)}
    procs = [subprocess.Popen([sys.executable, "-m", "patchcore_jax._src.app.cli", "sweep", *a, "--coordinator",
                               f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, a in enumerate(args)]
    outs = [p.communicate(timeout=600) for p in procs]
    return [(p.returncode, *o) for p, o in zip(procs, outs)]


def test_two_processes_run_the_same_sweep_and_write_it_once(swept, tree, tmp_path):
    out, grid, _ = swept
    # An earlier sweep with one category's units and every feature gone: process 0 decides what is left.
    copy = str(tmp_path / "S")
    shutil.copytree(out, copy)
    shutil.rmtree(os.path.join(copy, "units", "grid"))
    shutil.rmtree(os.path.join(copy, "features"))
    with open(os.path.join(out, "results.csv"), newline="") as f:
        want = list(csv.reader(f))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    args = ["--dataset", "mvtec", "--root", tree, "--out", copy, "--grid", "coreset_fraction=0.05,0.2", "--grid",
            "anomaly_scorer_num_nn=1,3", "--quiet", *MODEL_ARGS]
    done = _two_processes([args, args], env)
    assert [d[0] for d in done] == [0, 0], done[0][2][-2000:] + done[1][2][-2000:]
    lines = done[0][1].splitlines()
    assert [line.split()[0] for line in lines if re.match(r"\[\d+/\d+\] ", line)] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert "4 units run over 2 processes, 4 kept from before" in done[0][1]
    assert not [line for line in done[1][1].splitlines() if not line.startswith("[Gloo]")]  # process 1 says nothing
    with open(os.path.join(copy, "results.csv"), newline="") as f:
        got = list(csv.reader(f))
    timed = {i for i, c in enumerate(want[0]) if c.endswith("_s") or c == "seconds"}
    assert [[c for i, c in enumerate(r) if i not in timed] for r in got] == \
        [[c for i, c in enumerate(r) if i not in timed] for r in want]  # the same rows and metrics
    assert len(os.listdir(os.path.join(copy, "units", "grid"))) == 4
    leftovers = [f for d, _, fs in os.walk(copy) for f in fs if "tmp" in f]
    assert not leftovers
    # One process failing (here its data set is missing) stops both, neither waiting for the other.
    bad = [a if a != tree else str(tmp_path / "missing") for a in args]
    failed = _two_processes([args, bad], env)
    assert failed[1][0] == 2 and "missing" in failed[1][2]
    assert failed[0][0] == 1 and "process 1 stopped with an error" in failed[0][2]


def test_a_finished_sweep_returns_at_once_and_changes_recompute_only_what_they_touch(swept, tree):
    out, grid, _ = swept
    again = patchcore_jax.sweep("mvtec", tree, BASE, out=out, grid=grid, seeds=[0])
    assert again["ran"] == 0 and again["kept"] == 8
    more = patchcore_jax.sweep("mvtec", tree, BASE, out=out, grid={**grid, "anomaly_scorer_num_nn": [1, 3, 5]}, seeds=[0])
    assert more["ran"] == 4 and more["kept"] == 8  # the new value only, on features and coresets kept on disk
    # Touching one category's file recomputes that category's units only.
    image = os.path.join(tree, "grid", "test", "good", "000.png")
    os.utime(image, ns=(time.time_ns(), time.time_ns()))
    touched = patchcore_jax.sweep("mvtec", tree, BASE, out=out, grid=grid, seeds=[0])
    assert touched["ran"] == 4 and touched["kept"] == 4


def test_the_feature_store_is_reused_and_removable(swept, tree):
    out, grid, _ = swept
    features = os.path.join(out, "features")
    seals = [os.path.join(d, f) for d, _, fs in os.walk(features) for f in fs if f.endswith(".seal.json")]
    assert seals  # one sealed array per category and layer
    done = patchcore_jax.sweep("mvtec", tree, BASE, out=out, grid=grid, seeds=[0], remove_features=True)
    assert done["ran"] == 0 and not os.path.exists(features)


@pytest.mark.parametrize("n, seed", [(300, 0), (517, 3)])
def test_greedy_prefixes_equal_direct_coresets(n, seed):
    rows = gaussian(seed, (n, 24))
    projection = coreset.random_projection(seed, 24, 8)
    batches = lambda: (rows[i : i + 64] for i in range(0, n, 64))  # noqa: E731
    _, largest = bank_lib.build_memory_bank(batches(), coreset_fraction=0.25, projection=projection, seed=seed)
    for fraction in (0.01, 0.1, 0.2):
        _, direct = bank_lib.build_memory_bank(batches(), coreset_fraction=fraction, projection=projection, seed=seed)
        np.testing.assert_array_equal(direct, largest[: len(direct)])
    starts = coreset.start_points(seed, n, 10)
    whole = np.asarray(coreset.greedy_coreset(rows, 60, projection=projection, start_indices=starts))
    np.testing.assert_array_equal(np.asarray(coreset.greedy_coreset(rows, 17, projection=projection,
                                                                    start_indices=starts)), whole[:17])


@pytest.mark.parametrize("grid, named", [
    ("colour=1,2", "--grid colour: unknown key"),
    ("sampler=greedy,kmeans", "--grid sampler=kmeans"),
    ("patch_size=3,x", "--grid patch_size=x"),
    ("seed=1,2", "--seeds"),
])
def test_bad_grids_are_refused_before_any_work(tree, tmp_path, capsys, grid, named):
    out = tmp_path / "S"
    code = cli.main(["sweep", "--dataset", "mvtec", "--root", tree, "--out", str(out), "--grid", grid, *MODEL_ARGS])
    err = capsys.readouterr().err
    assert code == 2 and named in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("options, named", [
    (["--coordinator", "127.0.0.1:1"], "give all three"),
    (["--distributed", "--num-processes", "2"], "not both"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"], "--process-id: expected"),
    (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"], "--coordinator: expected HOST:PORT"),
])
def test_bad_cluster_options_are_refused_before_joining(tree, tmp_path, capsys, options, named):
    out = tmp_path / "S"
    code = cli.main(["sweep", "--dataset", "mvtec", "--root", tree, "--out", str(out), "--grid", "patch_size=3",
                     *options, *MODEL_ARGS])
    err = capsys.readouterr().err
    assert code == 2 and named in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_dry_run_lists_cells_and_does_nothing(tree, tmp_path, capsys):
    out = tmp_path / "S"
    code = cli.main(["sweep", "--dataset", "mvtec", "--root", tree, "--out", str(out), "--grid",
                     "coreset_fraction=0.01,0.1", "--grid", "layers=layer2+layer3,layer1+layer2+layer3", "--seeds",
                     "0,1", "--dry-run", *MODEL_ARGS])
    text = capsys.readouterr().out
    assert code == 0 and not out.exists()
    assert "4 cells x 2 seeds x 2 categories = 16 units" in text and "layer1+layer2+layer3" in text
    assert "prefixes" in text


# Runs the sweep of `test_resume_after_kill_9` and stops for good after its first unit, so the kill
# lands mid-run at a known point (one unit done, three not).
DRIVER = """
import sys, time
import patchcore_jax
from patchcore_jax import PatchCoreConfig
from tests.helpers import SMALL

def log(line):
    print(line, flush=True)
    if line.startswith("[1/"):
        time.sleep(600)

patchcore_jax.sweep("mvtec", sys.argv[1], PatchCoreConfig(**SMALL), out=sys.argv[2],
                    grid=["coreset_fraction=0.05,0.2"], log=log)
"""


def test_resume_after_kill_9(tree, tmp_path):
    out = str(tmp_path / "S")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, tree, out], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("[1/4]"):
            break
    assert proc.poll() is None, "".join(lines)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    units = os.path.join(out, "units")
    assert len([f for d, _, fs in os.walk(units) for f in fs if f.endswith(".json")]) == 1
    command = [sys.executable, "-m", "patchcore_jax._src.app.cli", "sweep", "--dataset", "mvtec", "--root", tree,
               "--out", out, "--grid", "coreset_fraction=0.05,0.2", "--quiet", *MODEL_ARGS]
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "3 units run, 1 kept from before" in again.stdout
    with open(os.path.join(out, "results.csv"), newline="") as f:
        rows = list(csv.reader(f))
    assert len(rows) == 5 and len({tuple(r[:3]) for r in rows[1:]}) == 4
