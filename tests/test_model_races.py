"""Loading and saving one model folder from two processes at once: every load yields the old or the
new model, and a reader never removes a writer's files.

Two processes for `PATCHCORE_JAX_RACE_SECONDS` (default 4; the issue asked for runs of 30 s and more,
which the same test does with the variable set): one saves two models into one folder in turn, the
other loads it over and over. Before: about 1 load in 1,000 failed with a raw FileNotFoundError or
"changed while it was read" (two attempts were not enough while a writer kept replacing the folder),
and a reader's tidy-up could delete the writer's freshly created temporary folder, killing the save.
"""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest

from patchcore_jax._src.io import model_files
from patchcore_jax._src.model.detector import Threshold

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECONDS = float(os.environ.get("PATCHCORE_JAX_RACE_SECONDS", "4"))

WRITER = textwrap.dedent("""
    import sys, time
    from patchcore_jax._src.io import model_files
    a, b, target, seconds, exchange = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]
    if exchange == "no":
        model_files.exchange = lambda one, other: False  # the fallback of systems without renameat2
    values = [model_files.load_fitted(a), model_files.load_fitted(b)]
    print("ready", flush=True)
    sys.stdin.readline()
    saves, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        model_files.save_model(values[saves % 2], target)
        saves += 1
    print(saves, flush=True)
""")

READER = textwrap.dedent("""
    import json, os, sys
    from patchcore_jax._src.io import model_files
    target, stop = sys.argv[1], sys.argv[2]
    seen, failures = {}, []
    print("ready", flush=True)
    sys.stdin.readline()
    while not os.path.exists(stop):
        try:
            value = model_files.read_model_files(target)["meta"]["thresholds"]["image"]["value"]
            seen[str(value)] = seen.get(str(value), 0) + 1
        except Exception as err:
            failures.append(f"{type(err).__name__}: {err}")
    print(json.dumps({"seen": seen, "failures": failures[:5], "failed": len(failures)}), flush=True)
""")


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Two model folders that differ in their image threshold (1.0, 2.0): the test fixture's model."""
    base = tmp_path_factory.mktemp("race-models")
    value = model_files.load_fitted(os.path.join(ROOT, "tests", "data", "model-0.2.0"))
    for name, threshold in (("a", 1.0), ("b", 2.0)):
        model_files.save_model(dataclasses.replace(value, image_threshold=Threshold(threshold, "manual")), base / name)
    return base / "a", base / "b"


@pytest.mark.parametrize("exchange", ["yes", "no"])
def test_loads_racing_saves_from_another_process_always_yield_a_whole_model(two_models, tmp_path, exchange):
    a, b = two_models
    target, stop = tmp_path / "model", tmp_path / "stop"
    model_files.save_model(model_files.load_fitted(a), target)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    seconds = SECONDS if exchange == "yes" else SECONDS / 2
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(a), str(b), str(target), str(seconds), exchange],
                              env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reader = subprocess.Popen([sys.executable, "-c", READER, str(target), str(stop)], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "ready" and reader.stdout.readline().strip() == "ready"
        for proc in (writer, reader):
            proc.stdin.write("go\n")
            proc.stdin.flush()
        saves, writer_err = writer.communicate(timeout=seconds + 120)
        stop.write_text("")
        report, reader_err = reader.communicate(timeout=120)
    finally:
        for proc in (writer, reader):
            if proc.poll() is None:
                proc.kill()
    assert writer.returncode == 0, writer_err[-3000:]
    assert reader.returncode == 0, reader_err[-3000:]
    report = json.loads(report)
    assert report["failed"] == 0, report
    assert set(report["seen"]) <= {"1.0", "2.0"} and sum(report["seen"].values()) > 0, report
    assert int(saves) > 1
    print(f"{seconds} s, exchange {exchange}: {int(saves)} saves, {sum(report['seen'].values())} loads, no failure")
    assert model_files.read_model_files(target)["kind"] == "model"
    assert sorted(os.listdir(tmp_path)) == ["model", "stop"]  # no temporary folder left behind
