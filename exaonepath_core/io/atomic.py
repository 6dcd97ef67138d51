"""Atomic file writes: write to a temp file in the target's folder, then rename over the target.

Readers (a resumed run, another shard, a notebook) never see a half-written file, and an interrupted write
leaves the previous version intact. Every stage writes its files through these helpers:

    atomic_path(path)             a temp path to write to by any means (h5py, np.save, savefig, to_csv)
    atomic_open(path, "w")        a file handle on such a temp path
    atomic_dir(path)              a temp folder, renamed onto `path` when complete (replaced only if asked)
    create_once(path, data)       create a file with `data` unless it exists (exactly one concurrent winner)
    write_bytes / write_text / write_json / write_csv / torch_save
    file_lock(path)               an flock held for a block (one trainer per folder, one runner per run)

`tempfile.mkstemp`/`mkdtemp` create 0600 files and 0700 folders whatever the umask, so a bare rename would
publish results that colleagues cannot read. Every helper here gives the result the mode a plain `open()` or
`mkdir()` would have: 0666 / 0777 minus the process umask (0644 / 0755 under the usual umask 022).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def current_umask() -> int:
    """The process umask, read without changing it (Linux /proc/self/status; elsewhere os.umask twice)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Setting and restoring is the only portable way; another thread creating a file in between would get
    # the temporary umask, so this is the fallback, not the default.
    previous = os.umask(0o022)
    os.umask(previous)
    return previous


def default_file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0o666 minus the umask."""
    return 0o666 & ~current_umask()


def default_dir_mode() -> int:
    """The mode `os.mkdir` gives a new folder: 0o777 minus the umask."""
    return 0o777 & ~current_umask()


def apply_default_mode(path: str | os.PathLike) -> Path:
    """chmod a file or folder created by mkstemp/mkdtemp (0600/0700) to what open()/mkdir() would give."""
    path = Path(path)
    os.chmod(path, default_dir_mode() if path.is_dir() else default_file_mode())
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success give it the default mode and rename it over `path`.

    On error the temp file is removed and `path` keeps its previous content. The temp file exists (empty)
    when the block starts; a writer may also replace it with a new file of the same name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """`open()` a temp file beside `path` for writing; it replaces `path` when the block ends without error."""
    if not any(flag in mode for flag in "wx") or "+" in mode:
        raise ValueError(f"atomic_open writes a new file: use mode 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode.replace("x", "w"), **open_kwargs) as handle:
        yield handle


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success rename it onto `path` (an existing `path` only if overwrite).

    Checks before and after the block that `path` may be written, so a refused overwrite costs no work. On
    error the temp folder is removed. With overwrite, the old folder is moved aside, the new one renamed in,
    then the old one deleted: a reader sees either the old or the new folder, never a mix.
    """
    path = Path(path)

    def check() -> None:
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")

    check()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        check()
        os.chmod(tmp, default_dir_mode())
        if path.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, trash / path.name)
            os.replace(tmp, path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def create_once(path: str | os.PathLike, data: bytes) -> bool:
    """Create `path` holding `data` unless it exists; True if this call created it.

    Concurrent callers (several shards creating a ledger header) produce exactly one complete file: the
    content is written to a temp file first and hard-linked into place, which fails if `path` exists.
    """
    path = Path(path)
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, default_file_mode())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Bytes to `path`, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """UTF-8 text to `path`, atomically (newlines written as given)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, payload: Any, indent: int = 2) -> Path:
    """JSON to `path`, atomically (non-JSON values via str)."""
    return write_text(path, json.dumps(payload, indent=indent, default=str) + "\n")


def write_csv(df: Any, path: str | os.PathLike) -> Path:
    """A pandas DataFrame as CSV without its index, atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


def torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save` to `path`, atomically."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def move_aside(path: str | os.PathLike, tag: str = "") -> Path:
    """Rename `path` to `<name>.superseded-<time>[-tag][-n]` beside it (a rename: no copy, nothing deleted)."""
    path = Path(path)
    stem = f"{path.name}.superseded-{time.strftime('%Y%m%d-%H%M%S')}" + (f"-{tag}" if tag else "")
    target, n = path.with_name(stem), 2
    while target.exists():
        target, n = path.with_name(f"{stem}-{n}"), n + 1
    path.rename(target)
    return target


class LockBusy(RuntimeError):
    """`file_lock` without waiting found the lock taken; `holder` is what its holder wrote in the file."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is held by {holder or 'another process'}")
        self.path, self.holder = path, holder


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, shared: bool = False, wait: bool = False, holder: str = ""
              ) -> Iterator[bool]:
    """Hold an flock on `path` for the block; yields True, or False where the file system has no flock.

    Exclusive unless `shared`. Without `wait`, a lock held elsewhere raises `LockBusy` carrying the text its
    holder wrote into the file; an exclusive holder writes `holder` there and empties it on release. The kernel
    releases the lock of a process that dies, so a crash never leaves a stale lock behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
        try:
            fcntl.flock(handle, mode)
        except BlockingIOError:
            handle.seek(0)
            raise LockBusy(path, handle.read().strip()) from None
        except OSError:  # e.g. a network file system mounted without flock: the caller decides what that means
            yield False
            return
        if holder and not shared:
            handle.seek(0)
            handle.truncate()
            handle.write(holder + "\n")
            handle.flush()
        try:
            yield True
        finally:
            if holder and not shared:
                handle.truncate(0)  # before the close that releases the lock
