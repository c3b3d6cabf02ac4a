"""Output folders that a command owns: it writes only inside them and deletes only what it wrote.

An output folder carries a marker file (`MARKER`): its first line names the command that owns it;
every later line is the relative path of a file the command is about to write, appended (and flushed)
before the file is created, so even a killed run leaves a complete record of what it may have written.
- `OutputDir.claim(path, command)` takes a folder that does not exist, an empty one, or an earlier
  output of the same command; anything else (a user's folder, another command's output, a file) is
  refused with one line naming it, before any work. On an earlier output, the files it recorded are
  removed (unless `keep=True`, for resumable commands), so no stale result survives beside new ones;
  files the user put there are left alone.
- Files are written atomically (a temporary sibling, then a rename) unless streamed on purpose
  (`open_stream`, e.g. `scores.csv`, whose rows appear as they are computed).
- One run at a time: `claim` locks the folder (`flock`) before it reads or removes anything, and the
  process holds the lock until it ends. A second run into a folder in use is refused at once, naming
  the run that holds it (from the marker: command, pid, start); a run that died released its lock
  with it, so its folder is taken again as an earlier output.
- Folders holding the marker are never read back as input (`data.images.list_images`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Callable

from patchcore_jax._src.io import atomic
from patchcore_jax._src.model.images import OUTPUT_MARKER, display

MARKER = OUTPUT_MARKER
_TMP = atomic.TMP_SUFFIX


class OutputDir:
    """A claimed output folder; see the module docstring."""

    def __init__(self, root: str, command: str, written: list[str]):
        self.root, self.command = root, command
        self._written = set(written)

    # -- claiming ----------------------------------------------------------------------------------
    @staticmethod
    def check(path, command: str) -> str:
        """Refuses (ValueError naming it) a path `claim` would not take; returns it absolute."""
        path = os.path.abspath(os.fsdecode(path))
        where = display(path)
        if os.path.islink(path) and not os.path.isdir(path):
            raise ValueError(f"{where}: is a broken symbolic link; refusing to write there")
        if not os.path.lexists(path):
            ancestor = os.path.dirname(path)
            while not os.path.exists(ancestor):
                ancestor = os.path.dirname(ancestor)
            if not os.path.isdir(ancestor):
                raise ValueError(f"{where}: cannot be created ({display(ancestor)} is a file)")
            if not os.access(ancestor, os.W_OK | os.X_OK):
                raise ValueError(f"{where}: cannot be created ({display(ancestor)} is not writable)")
            return path
        if not os.path.isdir(path):
            raise ValueError(f"{where}: exists and is not a folder; give a new or empty folder as --out")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{where}: is not writable")
        names = os.listdir(path)
        if not names:
            return path
        owner = _owner(path)
        if owner is None:
            raise ValueError(f"{where}: exists and is not empty, and was not written by patchcore-jax {command}; "
                             "give a new or empty folder as --out")
        if owner != command:
            raise ValueError(f"{where}: is an output of 'patchcore-jax {owner}', not of '{command}'; "
                             "give another folder as --out")
        return path

    @classmethod
    def claim(cls, path, command: str, *, keep: bool = False) -> "OutputDir":
        """Takes the folder for this process (see the module docstring); ValueError naming it, and the
        run that holds it, when another process is writing there."""
        path = cls.check(path, command)
        os.makedirs(path, exist_ok=True)
        _hold(path)
        marker = os.path.join(path, MARKER)
        written = _recorded(path) if os.path.exists(marker) else []
        if not keep:
            _remove(path, written)
            written = []
        with open(marker + _TMP, "w", encoding="utf-8") as f:
            f.write(json.dumps({"owner": "patchcore-jax", "command": command, "pid": os.getpid(),
                                "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
            for rel in written:
                f.write(json.dumps(rel) + "\n")
        os.replace(marker + _TMP, marker)
        return cls(path, command, written)

    # -- writing -----------------------------------------------------------------------------------
    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def _record(self, rel: str) -> str:
        rel = os.path.normpath(rel)
        if rel.startswith("..") or os.path.isabs(rel) or rel == MARKER:
            raise ValueError(f"{display(rel)}: not a path inside the output folder")
        if rel not in self._written:
            with open(self.path(MARKER), "a", encoding="utf-8") as f:
                f.write(json.dumps(rel) + "\n")
                f.flush()
            self._written.add(rel)
        target = self.path(rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        return target

    def write(self, rel: str, writer: Callable[[str], None]) -> str:
        """Atomically creates `rel`: `writer(temporary_path)` writes the content, then it is renamed."""
        return atomic.replace_file(self._record(rel), writer)

    def write_text(self, rel: str, text: str) -> str:
        def writer(tmp):
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())

        return self.write(rel, writer)

    def write_json(self, rel: str, data) -> str:
        return self.write_text(rel, json.dumps(data, indent=2, allow_nan=False) + "\n")

    def open_stream(self, rel: str, *, newline: str = ""):
        """A text file written as the work goes (line-buffered), e.g. `scores.csv`."""
        target = self._record(rel)
        return open(target, "w", encoding="utf-8", newline=newline, buffering=1)


# Folders this process holds: a lock (`flock` on the folder itself) per folder, taken by `claim`
# before anything in it is read or removed, and held until the process ends; the system releases it
# when a run dies, however it dies, so a stale lock never needs clearing.
_HELD: dict[str, int] = {}


def _hold(path: str) -> None:
    key = os.path.realpath(path)
    if key in _HELD:
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    if not atomic.lock(fd, block=False):
        os.close(fd)
        head = _head(path) or {}
        who = f"'patchcore-jax {head['command']}'" if isinstance(head.get("command"), str) else "another run"
        pid = f" (pid {head['pid']}, started {head.get('started', '?')})" if isinstance(head.get("pid"), int) else ""
        raise ValueError(f"{display(path)}: in use by {who}{pid}, which is still running; wait for it to end, "
                         "or give another folder as --out")
    _HELD[key] = fd


def _head(path: str) -> dict | None:
    try:
        with open(os.path.join(path, MARKER), encoding="utf-8") as f:
            head = json.loads(f.readline())
    except (OSError, ValueError):
        return None
    return head if isinstance(head, dict) else None


def _owner(path: str) -> str | None:
    head = _head(path)
    if head is not None and head.get("owner") == "patchcore-jax" and isinstance(head.get("command"), str):
        return head["command"]
    return None


def _recorded(path: str) -> list[str]:
    out = []
    with open(os.path.join(path, MARKER), encoding="utf-8") as f:
        next(f, None)
        for line in f:
            with contextlib.suppress(ValueError):
                rel = json.loads(line)
                if isinstance(rel, str):
                    out.append(rel)
    return out


def _remove(root: str, written: list[str]) -> None:
    """Deletes the recorded files (and their temporaries), then the folders they leave empty."""
    folders = set()
    for rel in written:
        rel = os.path.normpath(rel)
        if rel.startswith("..") or os.path.isabs(rel) or rel == MARKER:
            continue  # a damaged record never reaches outside the folder
        for p in (os.path.join(root, rel), os.path.join(root, rel) + _TMP):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError):
                os.remove(p)
        parent = os.path.dirname(rel)
        while parent:
            folders.add(parent)
            parent = os.path.dirname(parent)
    for folder in sorted(folders, key=len, reverse=True):
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(root, folder))  # only if empty


_FORMULA_LEAD = ("=", "+", "-", "@", "\t", "\r")


def csv_text(text: str) -> str:
    """A text cell for a CSV file that a spreadsheet may open: one starting like a formula (`=`, `+`,
    `-`, `@`, tab, carriage return) gets a leading apostrophe, the usual rule that makes it shown,
    not run. Numbers are written as numbers and never pass through here."""
    return "'" + text if text.startswith(_FORMULA_LEAD) else text
