"""Hostile cases against the commands: a shared output folder, names that are code (spreadsheet
formulas, terminal escapes)."""

import csv
import os
import signal
import shutil
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


def test_names_that_are_code_reach_neither_the_spreadsheet_nor_the_terminal(tiny_model, tmp_path, capsys, monkeypatch):
    _, model_dir, fixture_images = tiny_model
    images = tmp_path / "images"
    images.mkdir()
    names = ["=HYPERLINK(1).png", "+1.png", "-2.png", "@SUM(A1).png"]
    for name, i in zip(names, range(4)):
        shutil.copyfile(fixture_images / f"{i}.png", images / name)
    # Given as bare names (run inside the folder), so each cell would start with the formula's sign.
    monkeypatch.chdir(images)
    assert cli.main(["predict", "--model", str(model_dir), "--out", str(tmp_path / "pred"),
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
    assert cli.main(["predict", "--model", str(model_dir), str(evil), "--out", str(tmp_path / "pred2"),
                     "--quiet", "--no-heatmaps"]) == 2
    err = capsys.readouterr().err
    assert "\\x1b]0;owned\\x07.png" in err and "\x1b" not in err and "\x07" not in err


# -- the rest of issue 25: memory, full disks, names, nesting, evaluate's folder -----------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny-model")
    data = make_synthetic(seed=5, n_train=4, n_test_good=2, n_test_defect=2, size=80, margin=16)
    model = quiet_model(TINY).fit(data["train"])
    model.threshold = 1.0
    model.save(base / "model")
    images = base / "images"
    images.mkdir()
    for i, img in enumerate(data["test"]):
        Image.fromarray(img).save(images / f"{i}.png")
    return model, base / "model", images


def test_settings_that_need_more_memory_than_the_machine_has_are_refused_before_work(tiny_model, tmp_path, capsys):
    from patchcore_jax._src.app.console import UsageError, check_memory

    model, _, images = tiny_model
    check_memory(model, 4, available=1 << 40)  # fits
    with pytest.raises(UsageError, match=r"--crop 64 --batch-size 4: a fit on 4 images needs about .* GiB \(.* for "
                                         r"the backbone on one batch, .* for the memory bank\), but 0.0 GiB is available"):
        check_memory(model, 4, available=1 << 20)
    code = cli.main(["fit", "--train", str(images), "--out", str(tmp_path / "big"), "--backbone", "resnet18",
                     "--crop", "4096", "--resize", "4096", "--batch-size", "1024", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "--crop 4096 --batch-size 1024" in err and "GiB is available; use --batch-size" in err
    assert not (tmp_path / "big").exists()


TINY_ARGS = ["--backbone", "resnet18", "--layers", "layer2", "--resize", "72", "--crop", "64", "--pretrain-dim", "32",
             "--target-dim", "32", "--neighbors", "3", "--batch-size", "4"]


def test_predict_evaluate_and_sweep_that_need_more_memory_than_is_available_are_refused_before_work(
        tiny_model, tmp_path, capsys, monkeypatch):
    from patchcore_jax._src.app import console, memory
    from tests import dataset_trees

    model, model_dir, images = tiny_model
    # A loaded model: what predict still needs besides its bank, and the batch size that fits.
    e = memory.predict_estimate(model)
    assert e["activations"] > 0 and e["scoring"] > 0 and e["bank"] >= model.bank.nbytes
    needed = e["activations"] + e["scoring"] + e["host"]
    memory.check_predict(model, available=needed)  # fits
    with pytest.raises(console.UsageError, match=r"--batch-size 4 --crop 64 \(the model's\): predict needs about "
                                                 r".* MiB for the loaded bank\), but .* is available besides the bank; "
                                                 r"refit the model with --batch-size 2 or less"):
        memory.check_predict(model, available=needed // 2)
    root = dataset_trees.make_mvtec(str(tmp_path / "mvtec"))
    monkeypatch.setattr(console, "available_memory", lambda: 1 << 20)
    runs = {
        "predict": (["predict", "--model", str(model_dir), str(images), "--quiet"],
                    "predict needs about"),
        "evaluate": (["evaluate", "--dataset", "mvtec", "--root", root, "--quiet", *TINY_ARGS],
                     "category bottle (4 training images, 5 test images) needs about"),
        "sweep": (["sweep", "--dataset", "mvtec", "--root", root, "--grid", "coreset_fraction=0.05,0.2", "--quiet",
                   *TINY_ARGS], "the sweep's largest category, bottle, needs about"),
    }
    for command, (argv, named) in runs.items():
        out = tmp_path / command
        code = cli.main([*argv, "--out", str(out)])
        captured = capsys.readouterr()
        assert code == 2 and captured.err.count("\n") == 1 and not captured.out, (command, captured)
        assert named in captured.err and "1.0 MiB is available" in captured.err, captured.err
        assert not out.exists()  # refused before any output
    # --dry-run lists the estimate, and that the run would be refused, without refusing.
    out = tmp_path / "dry"
    assert cli.main([*runs["sweep"][0], "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "memory: about" in text and "1.0 MiB available: the run would be refused" in text and not out.exists()


def test_a_full_disk_names_the_file_and_no_row_points_at_a_missing_heatmap(tiny_model, tmp_path, capsys, monkeypatch):
    import errno

    from patchcore_jax._src.app import visualize

    _, model_dir, images = tiny_model
    drawn = []
    real = visualize.draw_panel

    def draw_until_full(path, **kwargs):
        if len(drawn) == 2:
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")  # as matplotlib raises it: no file named
        drawn.append(path)
        real(path, **kwargs)

    monkeypatch.setattr(visualize, "draw_panel", draw_until_full)
    out = tmp_path / "pred"
    assert cli.main(["predict", "--model", str(model_dir), str(images), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the random-backbone note
    assert err.startswith("patchcore-jax predict: error: No space left on device writing ")
    assert err.endswith(os.path.join(str(out), "heatmaps", "2.png") + "; free some space there (or write elsewhere: "
                        "--out; $TMPDIR for fit's temporary bank) and run it again")
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [str(images / "0.png"), str(images / "1.png")]
    assert all((out / r["heatmap"]).is_file() for r in rows)
    assert not [n for n in os.listdir(out / "heatmaps") if ".tmp-" in n]


def test_a_row_cut_short_is_cut_off_again(tmp_path, monkeypatch):
    import errno

    from patchcore_jax._src.io import outputs

    out = OutputDir.claim(tmp_path / "o", "predict")
    with out.open_rows("scores.csv", ["path", "score"]) as table:
        table.write(["a.png", 1.5])
        real, calls = os.write, []

        def half_then_full(fd, data):
            calls.append(len(data))
            if len(calls) == 1:
                return real(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(outputs.os, "write", half_then_full)
        with pytest.raises(OSError, match="scores.csv"):
            table.write(["b.png", 2.5])
        monkeypatch.setattr(outputs.os, "write", real)
        table.write(["c.png", 3.5])
    assert (tmp_path / "o" / "scores.csv").read_bytes() == b"path,score\r\na.png,1.5\r\nc.png,3.5\r\n"


def test_heatmap_names_never_collide_with_the_folders_of_others(tiny_model, tmp_path):
    from hypothesis import given, strategies as st

    from patchcore_jax._src.app.records import OUTPUT_SUFFIXES, output_names

    part = st.sampled_from(["x", "x.png", "x.jpg", "x.npy", "x_png", "x-2", "x.png.png", "y"])
    paths = st.lists(st.lists(part, min_size=1, max_size=3).map(lambda p: "/r/" + "/".join(p) + ".png"), min_size=1,
                     max_size=6, unique=True).filter(lambda ps: not any(q.startswith(p[:-4] + ".png/") for p in ps
                                                                        for q in ps))

    @given(paths)
    def check(ps):
        names = output_names(ps)
        files = {n + s for n in names for s in OUTPUT_SUFFIXES}
        assert len(set(names)) == len(names)
        for n in names:
            parent = os.path.dirname(n)
            while parent:
                assert parent not in files, (ps, names)
                parent = os.path.dirname(parent)

    check()
    _, model_dir, images = tiny_model
    tree = tmp_path / "in"
    (tree / "x.png").mkdir(parents=True)  # a folder named like x.jpg's heatmap
    (tree / "x.png" / "a.png").write_bytes((images / "0.png").read_bytes())
    Image.open(images / "1.png").save(tree / "x.jpg")
    out = tmp_path / "pred"
    assert cli.main(["predict", "--model", str(model_dir), str(tree), "--out", str(out), "--quiet", "--save-maps"]) == 0
    with open(out / "scores.csv", newline="") as f:
        assert all((out / r["heatmap"]).is_file() for r in csv.DictReader(f))


def test_names_with_tabs_and_dollars_draw_without_warnings_or_math(tmp_path):
    import warnings

    from patchcore_jax._src.app import visualize

    amap = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing glyph (the tab) or a math parse error would surface
        for name in ("a\tb.png", "$\\frac$.png", "x$y$z\x1b.png"):
            visualize.draw_panel(str(tmp_path / "p.png"), image=np.zeros((32, 32, 3), np.uint8), amap=amap,
                                 scale=(0.0, 0.5, 1.0), score=0.7, image_threshold=0.5, name=name)
    assert visualize.plain("a\tb$c") == "a\\x09b\\$c"


def test_json_nested_deeply_ends_in_one_line_exit_2(tiny_model, tmp_path, capsys):
    import shutil

    from patchcore_jax._src.io import atomic, model_files
    from patchcore_jax._src.io.exported import load_exported
    from patchcore_jax._src.io.export_format import ExportFileError, MAGIC, canonical

    model, model_dir, images = tiny_model
    deep = "[" * 100_000 + "]" * 100_000
    for name, edit in (("manifest.json", lambda text: deep),
                       ("config.json", lambda text: text.replace('"calibration": {', '"calibration": {"x": ' + deep + ", ", 1))):
        bad = tmp_path / name
        shutil.copytree(model_dir, bad)
        (bad / name).write_text(edit((bad / name).read_text()))
        if name != "manifest.json":
            files = {n: (bad / n).read_bytes() for n in model_files.FILES}
            (bad / model_files.MANIFEST).write_bytes(model_files.manifest_bytes(files))
        capsys.readouterr()
        assert cli.main(["predict", "--model", str(bad), str(images), "--out", str(tmp_path / f"o-{name}"),
                         "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{name}: not valid JSON (nested more than 32 levels deep)" in err, err
    # An export's metadata, sealed, 990 deep (the parser takes it; re-encoding it for the seal did not).
    export = tmp_path / "m.stablehlo"
    model.export(export)
    raw = export.read_bytes()
    end = raw.index(b"\n", len(MAGIC))
    meta = atomic.strict_json(raw[len(MAGIC):end], "meta")
    meta.pop("metadata_sha256")
    text = canonical(meta)[:-1] + b',"x":' + b"[" * 990 + b"]" * 990 + b"}"
    export.write_bytes(MAGIC + text + b"\n" + raw[end + 1:])
    with pytest.raises(ExportFileError, match="nested more than 32 levels deep"):
        load_exported(export)
    # An evaluate's kept category result.
    from tests import dataset_trees

    root = dataset_trees.make_mvtec(str(tmp_path / "mvtec"))
    out = tmp_path / "eval"
    OutputDir.claim(out, "evaluate").write_text(os.path.join("categories", "bottle.json"), '{"x": ' + deep + "}")
    capsys.readouterr()
    assert cli.main(["evaluate", "--dataset", "mvtec", "--root", root, "--out", str(out), "--categories", "bottle",
                     "--backbone", "resnet18", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bottle.json: corrupt category result" in err and "nested more than" in err, err


def test_an_evaluate_folder_in_use_is_refused_naming_the_run(tmp_path, capsys):
    from tests import dataset_trees

    root = dataset_trees.make_mvtec(str(tmp_path / "mvtec"))
    out = tmp_path / "eval"
    holder = _hold(out, "evaluate")
    try:
        assert cli.main(["evaluate", "--dataset", "mvtec", "--root", root, "--out", str(out), "--quiet"]) == 2
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"in use by 'patchcore-jax evaluate' (pid {holder.pid}" in err, err
