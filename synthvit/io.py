"""Small shared file helpers: atomic writes, hashing and strict JSON. Imports nothing heavy."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import numbers
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

__all__ = ["SynthvitError", "WriteError", "atomic_open", "atomic_write_bytes", "atomic_write_text", "sha256_file",
           "writable_dir", "TMP_SUFFIX", "INVALID_SUFFIX", "finite_json", "dumps_json"]

TMP_SUFFIX = ".tmp"
INVALID_SUFFIX = "_invalid"  # "<key>_invalid": why "<key>" is null in a JSON file synthvit wrote
NOT_FINITE = "not a finite number (NaN or infinity)"


class SynthvitError(RuntimeError):
    """An error the user can fix (bad input, full disk, foreign folder). The CLI prints it without a traceback."""


class WriteError(SynthvitError, OSError):
    """A file could not be written (a folder made read-only or removed mid-run); the message names the file.
    Also an ``OSError`` (errno, strerror, filename set) for callers that catch those."""

    def __str__(self) -> str:
        return str(self.args[0])


def _first_file(path: Path) -> Path | None:
    """``path`` or the nearest of its parents that exists as something other than a folder."""
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            return None if p.is_dir() else p
    return None


def writable_dir(path: str | os.PathLike, key: str) -> Path:
    """Create the folder ``path`` (and its parents) and prove a file can be written in it, before any work is done.

    Raises :class:`SynthvitError` naming ``key``, the path and why: it (or a parent) is a file, or it cannot be
    created or written (permissions, a read-only file system).
    """
    path = Path(path)
    hint = "give a folder you can write to (it is created if missing)"
    blocker = _first_file(path)
    if blocker is not None:
        kind = "a broken link" if not blocker.exists() else "a file"
        what = f"is {kind}" if blocker == path else f"cannot be created: {blocker} is {kind}"
        raise SynthvitError(f"{key}: {path} {what}, not a folder; {hint}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SynthvitError(f"{key}: cannot create the folder {path} ({e.strerror}); {hint}") from None
    try:
        with tempfile.TemporaryFile(dir=path, prefix=".write-probe"):
            pass
    except OSError as e:
        raise SynthvitError(f"{key}: the folder {path} is not writable ({e.strerror}); {hint}") from None
    return path


def _tmp_name(path: Path) -> Path:
    # A leading dot and a .tmp suffix: never matched by shard globs, easy to clean up on resume.
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Write to a temporary file beside ``path``; fsync and rename on success, delete on any failure.

    A crash or Ctrl-C therefore never leaves a file under the final name that looks whole.
    A full disk raises :class:`SynthvitError` naming the file.
    """
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with _open_tmp(tmp, path) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise _write_error(e, path) from e
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise SynthvitError(f"no space left on the device while writing {path}; free some space and re-run "
                                f"(finished files are kept, the partial one was removed)") from e
        raise


def _write_error(e: OSError, path: Path) -> WriteError:
    err = WriteError(f"cannot write {path}: {e.strerror}; check that its folder still exists and is writable, "
                     f"then re-run (finished files are kept)")
    err.errno, err.strerror, err.filename = e.errno, e.strerror, str(path)  # for callers that catch OSError
    return err


def _open_tmp(tmp: Path, path: Path) -> BinaryIO:
    try:
        return open(tmp, "wb")
    except OSError as e:  # the folder became read-only or went away mid-run
        raise _write_error(e, path) from e


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def finite_json(obj, reason: str = NOT_FINITE):
    """``obj`` (dicts, lists, tuples, scalars) with every non-finite float (NaN, +-infinity) replaced by ``None``,
    and beside each dict key whose value is one (or a list holding one) a ``<key>_invalid`` key giving ``reason``
    (one the caller set is kept). Strict JSON has no NaN: synthvit's files say null, and why."""
    return _finite(obj, reason)[0]


def _finite(obj, reason: str):
    """(cleaned ``obj``, whether it held a non-finite float)."""
    if isinstance(obj, numbers.Real) and not isinstance(obj, numbers.Integral) and not math.isfinite(obj):
        return None, True
    if isinstance(obj, dict):
        out, bad_any = {}, False
        for key, value in obj.items():
            out[key], bad = _finite(value, reason)
            if bad and not isinstance(value, dict):  # a nested dict holds its own reasons
                out.setdefault(f"{key}{INVALID_SUFFIX}", reason)  # a reason the caller gave (a later key) wins
            bad_any |= bad
        return out, bad_any
    if isinstance(obj, (list, tuple)):
        items = [_finite(v, reason) for v in obj]
        return [v for v, _ in items], any(bad for _, bad in items)
    return obj, False


def dumps_json(obj, reason: str = NOT_FINITE, **kwargs) -> str:
    """``json.dumps`` of :func:`finite_json` (``obj``), with ``allow_nan=False``: a NaN that slipped past fails loudly
    instead of writing a file that is not JSON."""
    return json.dumps(finite_json(obj, reason), allow_nan=False, **kwargs)
