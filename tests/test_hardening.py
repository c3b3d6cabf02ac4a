"""Hostile cases against the commands: a shared output folder, names that are code (spreadsheet
formulas, terminal escapes)."""

import csv
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from patchcore_jax._src.app import cli
from patchcore_jax._src.io.outputs import OutputDir, csv_text
from patchcore_jax.data import make_synthetic
from tests.helpers import quiet_model

TINY = dict(backbone="resnet18", layers=("layer2",), resize=72, crop=64, pretrain_dim=32, target_dim=32,
            num_neighbors=3, batch_size=4)

HOLDER = textwrap.dedent("""
    import sys, time
    from patchcore_jax._src.io.outputs import OutputDir
    OutputDir.claim(sys.argv[1], sys.argv[2])
    print("held", flush=True)
    time.sleep(600)
""")


def _hold(path, command):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), command], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_folder_in_use_is_refused_naming_the_run_and_a_dead_runs_lock_is_recovered(tmp_path, capsys):
    out = tmp_path / "out"
    holder = _hold(out, "demo")
    try:
        with pytest.raises(ValueError, match=rf"out: in use by 'patchcore-jax demo' \(pid {holder.pid}, started "):
            OutputDir.claim(out, "demo")
        assert cli.main(["demo", "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "in use by 'patchcore-jax demo'" in err and err.count("\n") == 1
        (out / "mine.txt").write_text("kept")  # a user's file, never touched by either run
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    taken = OutputDir.claim(out, "demo")  # the dead run's lock went with it
    taken.write_text("result.txt", "new")
    assert (out / "mine.txt").read_text() == "kept" and (out / "result.txt").read_text() == "new"


def test_two_processes_racing_for_one_folder_one_wins(tmp_path):
    out = tmp_path / "race"
    script = textwrap.dedent("""
        import sys
        from patchcore_jax._src.io.outputs import OutputDir
        try:
            OutputDir.claim(sys.argv[1], "predict")
        except ValueError as err:
            print("refused", err, flush=True)
            sys.exit(2)
        print("won", flush=True)
        sys.stdin.read()  # hold the folder until the test closes stdin
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    lines = [p.stdout.readline() for p in procs]
    for p in procs:
        p.stdin.close()
        p.wait()
    assert sorted(line.split()[0] for line in lines) == ["refused", "won"], lines
    assert sorted(p.returncode for p in procs) == [0, 2]


def test_csv_cells_that_look_like_formulas_are_quoted():
    for text in ("=cmd|'/c calc'!A1", "+1", "-2", "@SUM(A1)", "\tx", "\rx"):
        assert csv_text(text) == "'" + text
    for text in ("a=b.png", "scratch/000.png", "", "1.5"):
        assert csv_text(text) == text


def test_names_that_are_code_reach_neither_the_spreadsheet_nor_the_terminal(tmp_path, capsys, monkeypatch):
    data = make_synthetic(seed=5, n_train=4, n_test_good=1, n_test_defect=1, size=80, margin=16)
    model = quiet_model(TINY).fit(data["train"])
    model.threshold = 1.0
    model.save(tmp_path / "model")
    images = tmp_path / "images"
    images.mkdir()
    names = ["=HYPERLINK(1).png", "+1.png", "-2.png", "@SUM(A1).png"]
    for name, img in zip(names, np.concatenate([data["test"], data["test"]])):
        Image.fromarray(img).save(images / name)
    # Given as bare names (run inside the folder), so each cell would start with the formula's sign.
    monkeypatch.chdir(images)
    assert cli.main(["predict", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "pred"),
                     "--quiet", "--", *names]) == 0
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "pred" / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["path"] for row in rows) == sorted("'" + name for name in names)
    for row in rows:
        assert row["heatmap"] and not row["heatmap"].startswith(("=", "+", "-", "@"))
    capsys.readouterr()
    # An unreadable file whose name sets the terminal's title and rings its bell: named, escaped.
    evil = images / "\x1b]0;owned\x07.png"
    evil.write_bytes(b"not an image")
    assert cli.main(["predict", "--model", str(tmp_path / "model"), str(evil), "--out", str(tmp_path / "pred2"),
                     "--quiet", "--no-heatmaps"]) == 2
    err = capsys.readouterr().err
    assert "\\x1b]0;owned\\x07.png" in err and "\x1b" not in err and "\x07" not in err
