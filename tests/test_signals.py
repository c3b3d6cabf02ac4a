"""Ctrl-C and `kill` end every command cleanly: one line, exit 130 (SIGINT) or 143 (SIGTERM), no crash,
no spill folder or temporary file left, and no row of scores.csv pointing at a heatmap not written.

The first two tests pin the two causes found (see `patchcore_jax._src.app.signals`): a signal that lands
while XLA compiles (the interpreter's teardown then crashed under the compiling thread: exit 139), and
one that lands in a garbage-collector callback (Python dropped it and the command ran on). The last
ones send signals to real commands at several instants.
"""

import csv
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

from patchcore_jax._src.app import signals

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A command whose work is one long XLA compilation, signalled while it compiles.
COMPILING = textwrap.dedent("""
    import os, signal, sys, threading
    import jax, jax.numpy as jnp
    from patchcore_jax._src.app import cli, commands

    def heavy(x):
        for i in range(60):  # seconds of compiling, however fast the machine
            x = jnp.sin(x) * (i + 1.0) + jnp.cos(x @ x.T)[:, :1]
        return x

    SIGNUM = getattr(signal, sys.argv[1])

    def cmd_fit(args):
        timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), SIGNUM))
        timer.daemon = True
        timer.start()
        jax.jit(heavy).lower(jnp.ones((8, 8))).compile()
        print("compiled to the end: the signal came too late", file=sys.stderr)
        return 0

    commands.cmd_fit = cmd_fit
    sys.argv = ["patchcore-jax", "fit", "--train", "unused", "--out", "unused", "--no-compile-cache"]
    sys.exit(cli.main())
""")


def shell_status(returncode: int) -> int:
    """An exit status as a shell reports it: 128 + N for a process ended by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def _env(tmp_path):
    tmp = tmp_path / "tmpdir"
    tmp.mkdir(exist_ok=True)
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), TMPDIR=str(tmp),
                PYTHONFAULTHANDLER="1", JAX_PLATFORMS="cpu")


@pytest.mark.parametrize("name, status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_during_an_xla_compilation_ends_the_command_without_a_crash(tmp_path, name, status):
    # Before: "interrupted", then a segmentation fault (exit 139) once the compilation finished under
    # an interpreter tearing XLA's client down.
    proc = subprocess.run([sys.executable, "-c", COMPILING, name], env=_env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert shell_status(proc.returncode) == status, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"patchcore-jax fit: {'terminated' if status == 143 else 'interrupted'} ({name}); stopped "
                     "before the end, temporary files removed"], proc.stderr[-3000:]


DROPPED = textwrap.dedent("""
    import gc, os, signal, sys, time
    from patchcore_jax._src.app import signals

    slept = []

    def slow_callback(phase, info):  # as JAX's _xla_gc_callback: Python drops what it raises
        if phase == "start" and not slept:
            slept.append(1)
            time.sleep(1.0)

    with signals.interruptible():
        gc.callbacks.append(slow_callback)
        try:
            if os.fork() == 0:
                time.sleep(0.3)
                os.kill(os.getppid(), signal.SIGINT)
                os._exit(0)
            gc.collect()  # the signal lands in the callback
            for _ in range(300):
                time.sleep(0.01)  # where it must be delivered again
            print("ran on", flush=True)
        except signals.Interrupted as err:
            print("interrupted", err.name, flush=True)
""")


def test_a_signal_dropped_in_a_garbage_collector_callback_is_delivered_again(tmp_path):
    # Before: "Exception ignored in: <function _xla_gc_callback ...>" and the command ran to its end.
    proc = subprocess.run([sys.executable, "-c", DROPPED], env=_env(tmp_path), capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.strip() == "interrupted SIGINT", (proc.stdout, proc.stderr)
    assert "Exception ignored" not in proc.stderr


def test_handlers_are_restored_and_a_second_signal_never_cuts_the_cleanup():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    cleaned = []
    with pytest.raises(signals.Interrupted) as caught:
        with signals.interruptible():
            try:
                signal.raise_signal(signal.SIGTERM)
                time.sleep(0.01)
            finally:
                signal.raise_signal(signal.SIGINT)  # a second one during the cleanup: ignored
                time.sleep(0.01)
                cleaned.append(True)
    assert caught.value.signum == signal.SIGTERM and caught.value.exit_status == 143 and cleaned == [True]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


# -- real commands, signalled at several instants ---------------------------------------------------------
TINY = ["--backbone", "resnet18", "--layers", "layer2", "--resize", "72", "--crop", "64", "--pretrain-dim", "32",
        "--target-dim", "32", "--neighbors", "3", "--batch-size", "4"]
BAD = ("Traceback", "Exception ignored", "Fatal Python error", "Segmentation fault")


class Run:
    """A command started now and sent `sig` `delay` seconds after its stderr first shows `after` (at
    once when None), if it is still running then."""

    def __init__(self, args, tmp_path, *, after, sig, delay=0.0):
        import threading

        self.tmpdir = tmp_path / f"tmp-{len(list(tmp_path.iterdir()))}"
        self.tmpdir.mkdir()
        env = dict(_env(tmp_path), TMPDIR=str(self.tmpdir))
        self.sig, self.sent, self.lines = sig, False, []
        self.proc = subprocess.Popen([sys.executable, "-m", "patchcore_jax.cli", *args], env=env, text=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.reader = threading.Thread(target=self._read, args=(after, delay), daemon=True)
        self.reader.start()

    def _read(self, after, delay):
        if after is None:
            self._send(delay)
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if after is not None and not self.sent and after in line:
                self._send(delay)

    def _send(self, delay):
        time.sleep(delay)
        if self.proc.poll() is None:
            self.sent = True
            self.proc.send_signal(self.sig)

    def finish(self, command):
        self.proc.wait(timeout=600)
        self.reader.join(timeout=60)
        text = "\n".join(self.lines)
        assert not any(bad in text for bad in BAD), text[-3000:]
        assert os.listdir(self.tmpdir) == [], (os.listdir(self.tmpdir), text[-2000:])  # no patchcore-bank-*
        if not self.sent:  # it ended before the instant came: a plain run
            assert self.proc.returncode == 0, text[-3000:]
            return
        status = 128 + self.sig
        assert shell_status(self.proc.returncode) == status, text[-3000:]
        word = "terminated" if self.sig == signal.SIGTERM else "interrupted"
        assert self.lines[-1] == (f"patchcore-jax {command}: {word} ({signal.Signals(self.sig).name}); stopped "
                                  "before the end, temporary files removed"), text[-3000:]


def _images(folder, n, seed):
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray((rng.random((72, 72, 3)) * 80 + 90).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def _no_temporaries(folder):
    left = [os.path.join(d, n) for d, _, names in os.walk(folder) for n in names if ".tmp-" in n]
    assert left == []


def test_commands_stopped_at_several_instants_end_cleanly(tmp_path):
    from patchcore_jax._src.io import model_files
    from tests import dataset_trees

    train = _images(tmp_path / "train", 16, 0)
    test = _images(tmp_path / "test", 24, 1)
    model = tmp_path / "model"
    assert subprocess.run([sys.executable, "-m", "patchcore_jax.cli", "fit", "--train", str(train), "--out", str(model),
                           "--quiet", *TINY], env=_env(tmp_path), capture_output=True).returncode == 0
    root = dataset_trees.make_mvtec(str(tmp_path / "mvtec"))
    fits = {f"fit-{i}": (after, sig, delay) for i, (after, sig, delay) in enumerate([
        (None, signal.SIGINT, 1.0),  # while Python and JAX load
        ("NOTE", signal.SIGINT, 0.0),  # as the backbone compiles
        ("extracting train features", signal.SIGTERM, 0.0),
        ("greedy coreset", signal.SIGINT, 0.0),
    ])}
    runs = {name: Run(["fit", "--train", str(train), "--out", str(tmp_path / name), *TINY], tmp_path, after=after,
                      sig=sig, delay=delay) for name, (after, sig, delay) in fits.items()}
    runs["predict"] = Run(["predict", "--model", str(model), str(test), "--out", str(tmp_path / "pred"), "--save-maps"],
                          tmp_path, after="scoring", sig=signal.SIGINT, delay=0.3)
    runs["evaluate"] = Run(["evaluate", "--dataset", "mvtec", "--root", root, "--out", str(tmp_path / "eval"), *TINY],
                           tmp_path, after="extracting train features", sig=signal.SIGINT, delay=0.0)
    for name, run in runs.items():
        run.finish(name.split("-")[0])
    assert sum(run.sent for run in runs.values()) >= 4  # most instants came before the end
    for name in fits:
        folder = tmp_path / name
        if folder.exists():  # stopped after the save: a whole model
            assert model_files.read_model_files(folder)["kind"] == "model"
    assert not any(n.startswith(".fit-") for n in os.listdir(tmp_path))  # no half-written model beside them
    pred = tmp_path / "pred"
    if (pred / "scores.csv").exists():
        with open(pred / "scores.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        for row in rows:  # every row's heatmap was written before the row
            assert (pred / row["heatmap"]).is_file(), row
        _no_temporaries(pred)
    _no_temporaries(tmp_path / "eval")
