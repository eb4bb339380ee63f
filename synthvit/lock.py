"""One writer per output folder: an advisory ``fcntl`` lock on ``<folder>/.lock``, held for a run's whole life.

The kernel drops the lock when its process exits, however it exits (an error, Ctrl-C, SIGKILL, a crashed node
process), so a stale lock can never block a later run; a second process into the same folder fails at once with
the pid of the holder. The lock file itself is left behind (empty but for the holder's pid): removing it while a
holder runs would let a third process lock a new file of the same name.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from synthvit.io import SynthvitError, writable_dir

LOCK_FILE = ".lock"
__all__ = ["LOCK_FILE", "FolderBusyError", "folder_lock"]


class FolderBusyError(SynthvitError):
    """Another process holds the folder's lock."""


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, key: str = "out_dir") -> Iterator[Path]:
    """Create ``folder`` if needed (:func:`synthvit.io.writable_dir`) and hold its lock for the ``with`` block;
    another holder is an error naming ``key``, the folder and the holder's pid. A folder this call created is
    removed again when the block fails before writing anything into it (a refused run leaves nothing behind)."""
    created = not os.path.lexists(folder)
    folder = writable_dir(folder, key)
    path = folder / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise SynthvitError(f"{key}: cannot create the lock file {path} ({e.strerror}); give a folder you can "
                            f"write to") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            created = False  # the holder's folder
            raise FolderBusyError(f"{key}: {folder} is in use by another synthvit process (pid {holder}); wait "
                                  f"for it to end, or give another {key}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield folder
    except BaseException:
        if created and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    finally:
        os.close(fd)  # closing the descriptor releases the lock
