"""Atomic files and checksums: the one place where this library writes a user's files safely and seals
what it writes.

- `canonical_json`: the byte-exact JSON that seals are computed over (model manifests use the indented
  layout, export metadata the compact one; both sorted, ASCII, no NaN);
- `sha256`, `file_sha256`: hex digests of bytes and of a file read in blocks;
- `strict_json`: JSON that refuses NaN/Infinity, duplicate keys and deep nesting (`nesting`);
- `write_new`: create a file that must not exist yet, atomically (temporary sibling, fsync, link);
- `replace_file`: write a file's new content through a temporary sibling and one rename;
- `write_in`: create one file in a folder opened as a descriptor, fsynced;
- `naming`: OSErrors (a full disk) raised again naming the file being written;
- `fsync_dir`, `umask`, `exchange` (Linux `renameat2(RENAME_EXCHANGE)`), `lock` (`flock`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import tempfile
from typing import Any, Callable

from patchcore_jax._src.model.images import display

TMP_SUFFIX = ".tmp-patchcore-jax"


def canonical_json(obj: Any, *, compact: bool = False) -> bytes:
    """`obj` as the exact bytes a seal is computed over: sorted keys, ASCII, no NaN; indented one space
    per level with a final newline (model files), or `compact` without spaces (export metadata)."""
    if compact:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=True, allow_nan=False) + "\n").encode("ascii")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str) -> str:
    """The sha256 of a file's content, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


MAX_DEPTH = 32  # this library's files nest 5 levels at most
_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def nesting(data: bytes, limit: int = MAX_DEPTH) -> int:
    """How deep the arrays and objects of JSON text nest (brackets inside strings do not count),
    counted without parsing and up to `limit + 1`: a file nested 100,000 deep costs one scan, not a
    RecursionError in the parser or in any code that walks the result."""
    depth = deepest = 0
    for m in _TOKENS.finditer(data):
        token = m.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        elif token in (b"]", b"}"):
            depth -= 1
    return deepest


def strict_json(data: bytes, where: str, error: type[Exception] = ValueError) -> Any:
    """Parses UTF-8 JSON, refusing NaN/Infinity, duplicate keys and nesting deeper than `MAX_DEPTH`;
    `error(f"{where}: ...")` otherwise."""
    def no_constants(name):
        raise ValueError(f"{name} is not allowed")

    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        if len(keys) != len(set(keys)):
            raise ValueError(f"duplicate keys {sorted({k for k in keys if keys.count(k) > 1})}")
        return dict(pairs)

    if nesting(data) > MAX_DEPTH:
        raise error(f"{where}: not valid JSON (nested more than {MAX_DEPTH} levels deep)")
    try:
        return json.loads(data.decode("utf-8"), parse_constant=no_constants, object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        reason = "nested too deeply" if isinstance(err, RecursionError) else err
        raise error(f"{where}: not valid JSON ({reason})") from None


def umask() -> int:
    """The process's umask, read without changing it where /proc allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(path: str) -> None:
    """Makes a folder's entries (a rename, a new file) durable; silently skipped where unsupported."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_in(dir_fd: int, name: str, data: bytes) -> None:
    """Creates `name` (exclusively; `sub/name` makes `sub` first) in the folder open as `dir_fd`,
    writes `data` and fsyncs it. Modes follow the umask."""
    if "/" in name:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name.split("/", 1)[0], 0o777, dir_fd=dir_fd)
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666, dir_fd=dir_fd)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_new(path: str, data: bytes) -> None:
    """Creates `path` with `data`, atomically and never over an existing file: a temporary sibling,
    fsynced, then hard-linked to the name (which fails if the name appeared meanwhile). ValueError
    naming the path if it exists."""
    parent, base = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp's 0600, to what a new file would have
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise ValueError(f"{display(path)}: exists; refusing to overwrite it (give a new file name)") from None
        except OSError:  # a file system without hard links: a rename, checked just before
            if os.path.lexists(path):
                raise ValueError(f"{display(path)}: exists; refusing to overwrite it (give a new file name)") from None
            os.rename(tmp, path)
        fsync_dir(parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def replace_file(target: str, writer: Callable[[str], None]) -> str:
    """Writes `target` atomically: `writer(temporary_path)` writes the content into a sibling, which
    is then renamed over `target` (readers see the old or the new file, never a part)."""
    tmp = target + TMP_SUFFIX
    try:
        with naming(target):
            writer(tmp)
            os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    return target


@contextlib.contextmanager
def naming(path: str):
    """Within the block, an OSError that names no file (a full disk met inside a library's writer,
    e.g. "[Errno 28] No space left on device") is raised again naming `path`."""
    try:
        yield
    except OSError as err:
        if err.filename is not None or not err.errno:
            raise
        raise OSError(err.errno, err.strerror or str(err), display(path)) from None


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: str, b: str) -> bool:
    """Atomically swaps two paths (Linux `renameat2(RENAME_EXCHANGE)`); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), display(b))


def lock(fd: int, *, block: bool) -> bool:
    """An exclusive `flock` on an open file or folder; False if another process holds it. Without
    flock (Windows) a non-blocking attempt always fails, so leftovers are never taken for stale."""
    try:
        import fcntl
    except ImportError:
        return block
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        return True
    except OSError:
        return False
