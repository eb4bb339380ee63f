"""Small shared file helpers: atomic writes and hashing. Imports nothing heavy."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from pathlib import Path
from typing import BinaryIO, Iterator

__all__ = ["SynthvitError", "atomic_open", "atomic_write_bytes", "atomic_write_text", "sha256_file",
           "TMP_SUFFIX"]

TMP_SUFFIX = ".tmp"


class SynthvitError(RuntimeError):
    """An error the user can fix (bad input, full disk, foreign folder). The CLI prints it without a traceback."""


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
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise SynthvitError(f"no space left on the device while writing {path}; free some space and re-run "
                                f"(finished files are kept, the partial one was removed)") from e
        raise


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
