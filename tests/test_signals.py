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
