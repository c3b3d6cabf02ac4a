"""Ctrl-C and `kill`: how a command stops when it is told to.

SIGINT and SIGTERM both raise `Interrupted` in the main thread, so every `finally` on the way out runs:
the bank's spill folder (`$TMPDIR/patchcore-bank-*`) and every temporary file are removed, a model
folder keeps its earlier complete model, and the output folder's lock goes with the process. The
command line then prints one line and ends with 128 + the signal's number (130, 143), by the signal
itself when it runs as the program.

Two things stood in the way, each found in a crashed or hung run:
- JAX compiles on a pool of XLA threads and waits for the result in a way a signal can interrupt, so
  the main thread could leave while a compilation was still running. Ending normally then tore the
  interpreter down, and with it XLA's client, under that compilation: a segmentation fault (exit 139)
  in `PjRtLoadedExecutable::Create`, seen in about one Ctrl-C in three during `fit` and `evaluate`.
  XLA offers no way to cancel or join a compilation, so an interrupted command, once its own cleanup
  has run and its output is flushed, ends by the signal itself (`end_process`): nothing is torn down
  under a running XLA thread.
- Python drops an exception raised inside a garbage-collector callback (JAX registers one), with
  "Exception ignored in: _xla_gc_callback": the signal was lost and the command ran on (then SIGKILL
  left its spill folder). `unraisable` sees such a drop and delivers the signal again. A signal that
  arrives while a module is imported is delivered once the import is over (`importing`).
A second signal while the first one's cleanup runs is ignored, so the cleanup is never cut short.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

SIGNALS = ("SIGINT", "SIGTERM")
REDELIVERY_SECONDS = 0.05


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread by SIGINT or SIGTERM; `signum` says which."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class _State:
    def __init__(self):
        self.signum: int | None = None  # the first signal received
        self.raised = False  # raised and not dropped
        self.active = True  # the block still runs: a signal delivered again is still wanted


@contextlib.contextmanager
def interruptible():
    """Within the block, SIGINT and SIGTERM raise `Interrupted` once (see the module docstring); the
    previous handlers come back after it. Outside the main thread it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    state = _State()

    def later():
        """The signal again a moment later, from another thread, so that it lands after the frames
        that must not see it have returned (should it land in another such place, it comes back)."""
        state.raised = False

        def deliver():
            if state.active:
                os.kill(os.getpid(), state.signum)

        again = threading.Timer(REDELIVERY_SECONDS, deliver)
        again.daemon = True
        again.start()

    def handler(signum, frame):
        if state.signum is None:
            state.signum = signum
        if state.raised:
            return  # a second signal during the cleanup of the first: ignored
        if importing(frame):
            later()
            return
        state.raised = True
        raise Interrupted(state.signum)

    def unraisable(info):
        if isinstance(info.exc_value, Interrupted) and state.signum is not None:
            later()  # dropped (in a gc callback, a __del__)
            return
        previous_hook(info)

    names = [n for n in SIGNALS if hasattr(signal, n)]
    previous = {n: signal.getsignal(getattr(signal, n)) for n in names}
    previous_hook = sys.unraisablehook
    for n in names:
        signal.signal(getattr(signal, n), handler)
    sys.unraisablehook = unraisable
    try:
        yield
    finally:
        state.active = False
        for n in names:
            signal.signal(getattr(signal, n), previous[n] if previous[n] is not None else signal.SIG_DFL)
        sys.unraisablehook = previous_hook


def importing(frame) -> bool:
    """Whether `frame` runs inside an import: an exception raised there can leave a half-initialised
    module behind, and an extension's initialisation turns it into an ImportError with a traceback
    (seen with NumPy's), so the signal waits until the import is over."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def end_process(signum: int) -> None:
    """Ends the process by the signal `signum` itself, with its default action: no interpreter
    teardown, which XLA threads still compiling or running cannot survive (see the module docstring),
    and the status a shell expects of a command stopped by a signal (130, 143: `$?`; a shell loop
    stops there, as it does not when a program merely exits 130). Only for a command that runs as
    the program, after its own cleanup has run and its output is flushed."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    raise SystemExit(128 + signum)  # only if the signal is blocked here
