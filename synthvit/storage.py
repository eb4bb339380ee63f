"""Where shards live: a local folder or an object-store URL (``s3://``, ``gs://``; ``https://`` read-only).

Remote locations go through fsspec (s3fs, gcsfs: the ``s3``/``gcs`` extras), the layer HF ``datasets`` and most
of the PyData stack already use: one API for listing, whole-object uploads and ranged reads, and each library's
standard credential chain (``AWS_ACCESS_KEY_ID``/``AWS_PROFILE``/instance roles, ``AWS_ENDPOINT_URL`` for MinIO or
SeaweedFS, ``GOOGLE_APPLICATION_CREDENTIALS``). webdataset's own URL openers shell out to ``curl``/``gsutil`` and
have none for ``s3://``, so their errors arrive as a broken pipe; here they arrive as exceptions we can classify,
retry and report. Nothing here ever holds a credential: URLs carrying one (``https://user:token@...``, signed
query strings) are refused, so what is written to configs, manifests, logs and errors is only ever the URL.

Guarantees kept from local disk:

- an object appears only whole: a shard is written to a local temporary file and uploaded in one PUT (or one
  multipart upload, completed atomically), so a killed upload leaves nothing under the final name;
- a transient error (connection refused or reset, timeout, 5xx) is retried ``SYNTHVIT_STORAGE_RETRIES`` times
  (default 3) with exponential backoff from ``SYNTHVIT_STORAGE_BACKOFF`` seconds (default 1); a read resumes at
  the byte it had reached. Then a :class:`StorageError` names the URL and what to check.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterator
from urllib.parse import urlsplit

from synthvit.io import SynthvitError, atomic_write_bytes

__all__ = ["StorageError", "Folder", "is_url", "redact", "open_stream", "register_webdataset_schemes"]

log = logging.getLogger("synthvit.storage")

WRITABLE = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}  # scheme -> the fsspec package it needs
READ_ONLY = {"http": "aiohttp", "https": "aiohttp"}
SCHEMES = WRITABLE | READ_ONLY
EXTRA = {"s3fs": "s3", "gcsfs": "gcs", "aiohttp": "s3"}  # package -> synthvit extra that installs it
READ_BLOCK = 8 << 20  # bytes per ranged GET: large enough that per-request latency is amortised
# Errors that retrying will not fix (raised by s3fs/gcsfs/botocore as these types or under these names).
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError, TypeError,
             ImportError)
PERMANENT_NAMES = {"NoCredentialsError", "PartialCredentialsError", "ClientError", "ParamValidationError",
                   "NoSuchBucket", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ProfileNotFound"}


class StorageError(SynthvitError, OSError):
    """An object store could not be read or written; the message names the URL (never a credential)."""


def is_url(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` locations other than ``file://`` (a local path)."""
    s = str(location)
    return "://" in s and not s.startswith("file://")


def redact(url: str) -> str:
    """``url`` without user info or query: safe to print even if someone put a token in it."""
    if not is_url(url):
        return str(url)
    p = urlsplit(url)
    host = p.hostname or ""
    host += f":{p.port}" if p.port else ""
    return f"{p.scheme}://{host}{p.path}"


def check_url(url: str, write: bool = False) -> None:
    p = urlsplit(url)
    accepted = (f"accepted: a local folder, {', '.join(f'{s}://' for s in WRITABLE)}bucket/prefix, or "
                f"https://host/path (read-only)")
    if p.scheme not in SCHEMES:
        raise StorageError(f"{redact(url)}: the scheme {p.scheme}:// is not supported; {accepted}")
    if p.username or p.password or "@" in p.netloc:
        raise StorageError(f"{redact(url)}: credentials in a URL are refused (they would be written to configs and "
                           f"logs); give them through the environment (AWS_ACCESS_KEY_ID / AWS_PROFILE, "
                           f"GOOGLE_APPLICATION_CREDENTIALS, ~/.netrc)")
    if p.query or p.fragment:
        raise StorageError(f"{redact(url)}: a URL with a query or fragment (a signed URL?) cannot name a dataset "
                           f"folder; give the folder's plain URL and credentials through the environment")
    if not p.netloc:
        raise StorageError(f"{url}: no bucket or host; {accepted}")
    if write and p.scheme in READ_ONLY:
        raise StorageError(f"{redact(url)}: {p.scheme}:// is read-only; write to a local folder, s3:// or gs://")


def _settings() -> tuple[int, float]:
    try:
        return (max(0, int(os.environ.get("SYNTHVIT_STORAGE_RETRIES", "3"))),
                max(0.0, float(os.environ.get("SYNTHVIT_STORAGE_BACKOFF", "1"))))
    except ValueError as e:
        raise SynthvitError(f"SYNTHVIT_STORAGE_RETRIES / SYNTHVIT_STORAGE_BACKOFF: {e}; give an integer count and "
                            f"a number of seconds") from None


def transient(e: BaseException) -> bool:
    """Worth retrying: connection refused/reset, timeouts, server errors; not missing objects or refused access."""
    if isinstance(e, PERMANENT) or isinstance(e, SynthvitError):
        return False
    names = {c.__name__ for c in type(e).__mro__}
    if names & PERMANENT_NAMES:
        return False
    return isinstance(e, (OSError, TimeoutError, ConnectionError)) or any(
        c.__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "google")
        for c in type(e).__mro__)


def _reason(e: BaseException) -> str:
    names = {c.__name__ for c in type(e).__mro__}
    text = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    if isinstance(e, ImportError):
        return f"{e}"
    if "NoCredentialsError" in names or "PartialCredentialsError" in names:
        return ("no credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (and "
                "AWS_ENDPOINT_URL for a store other than AWS)")
    if isinstance(e, PermissionError):
        return f"access denied ({text}); check the credentials in the environment and the bucket's policy"
    if isinstance(e, FileNotFoundError):
        return f"not found ({text})"
    if transient(e):
        return (f"the object store did not answer ({text}); check AWS_ENDPOINT_URL (or the host) and the network, "
                f"then re-run: finished work is kept")
    return text


def storage_error(what: str, url: str, e: BaseException) -> StorageError:
    return StorageError(f"cannot {what} {redact(url)}: {_reason(e)}")


def with_retries(what: str, url: str, fn: Callable, *args, **kwargs):
    """``fn(*args)``, retried with exponential backoff while its errors are transient; then a StorageError."""
    retries, backoff = _settings()
    for attempt in range(retries + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not transient(e) or attempt == retries:
                raise storage_error(what, url, e) from e
            delay = backoff * 2 ** attempt
            log.warning("%s %s failed (%s); retry %d of %d in %.1f s", what, redact(url), type(e).__name__,
                        attempt + 1, retries, delay)
            time.sleep(delay)


class _OrphanedConnectionErrors(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" record (a traceback) when the exception is a lost
    connection: aiohttp, under s3fs, leaves a request's write task failing on a transport the server closed. The
    request it belonged to fails too, and synthvit retries it or reports the store in one line -- the traceback says
    nothing to fix, and a user must not see one."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        lost = isinstance(exc, OSError) or type(exc).__name__.startswith(("ClientConnection", "ServerDisconnected"))
        return not (lost and "never retrieved" in record.getMessage())


def _quiet_lost_connections() -> None:
    """Installs :class:`_OrphanedConnectionErrors` on the ``asyncio`` logger of this process (once)."""
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _OrphanedConnectionErrors) for f in logger.filters):
        logger.addFilter(_OrphanedConnectionErrors())


@functools.lru_cache(maxsize=None)
def _filesystem(scheme: str, pid: int):
    """One fsspec filesystem per scheme (``file``: local) and process (forked DataLoader workers make their own)."""
    package = SCHEMES.get(scheme, "fsspec")
    if scheme != "file":
        _quiet_lost_connections()
    try:
        import fsspec

        return fsspec.filesystem(scheme, skip_instance_cache=True)
    except ImportError as e:
        raise StorageError(f"{scheme}:// needs the {package} package ({e}); install it with "
                           f"pip install 'synthvit[{EXTRA.get(package, 's3')}]'") from None


def filesystem(url: str):
    """The fsspec filesystem for ``url``: its scheme's, or the local one for a path."""
    return _filesystem(urlsplit(url).scheme if is_url(url) else "file", os.getpid())


class RetryingReader(io.RawIOBase):
    """A sequential read stream over one remote object that survives dropped connections: a failed read is
    retried (with backoff) from the byte it had reached, by reopening the object with a ranged read."""

    def __init__(self, url: str):
        super().__init__()
        self.url, self.fs, self.path, self.pos, self._f = url, filesystem(url), _fs_path(url), 0, None

    def readable(self) -> bool:
        return True

    def _read(self, n: int) -> bytes:
        if self._f is None:
            self._f = self.fs.open(self.path, "rb", block_size=READ_BLOCK, cache_type="readahead")
            if self.pos:
                self._f.seek(self.pos)
        try:
            return self._f.read(n)
        except BaseException:
            with contextlib.suppress(Exception):
                self._f.close()
            self._f = None
            raise

    def readinto(self, b) -> int:
        data = with_retries("read", self.url, self._read, len(b))
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)

    def close(self) -> None:
        if self._f is not None:
            with contextlib.suppress(Exception):
                self._f.close()
            self._f = None
        super().close()


def open_stream(location: str, buffer: int = 1 << 20) -> BinaryIO:
    """A buffered binary read stream over a local file or a remote object (retrying, see :class:`RetryingReader`)."""
    if not is_url(location):
        return open(location, "rb")
    check_url(location)
    return io.BufferedReader(RetryingReader(location), buffer_size=buffer)


def _fs_path(url: str) -> str:
    """The path ``url`` has in its fsspec filesystem (an absolute path for a local one)."""
    if not is_url(url):
        return os.path.abspath(url)
    p = urlsplit(url)
    return url if p.scheme in READ_ONLY else f"{p.netloc}{p.path}".rstrip("/")


class Folder:
    """A dataset folder: a local directory or an object-store prefix, with the few operations synthvit needs, all
    through one fsspec filesystem (``file`` for a local folder). Local and remote differ only in the last section.
    ``str(folder)`` is safe to print. Picklable (worker processes rebuild their own filesystem client).
    """

    def __init__(self, location: str | os.PathLike, write: bool = False):
        self.remote = is_url(location)
        if self.remote:
            self.location = str(location).rstrip("/")
            check_url(self.location, write=write)
        else:
            s = str(location)
            self.location = s[len("file://"):] if s.startswith("file://") else s

    def __str__(self) -> str:
        return redact(self.location)

    def __repr__(self) -> str:
        return f"Folder({str(self)!r})"

    @property
    def fs(self):
        return filesystem(self.location)

    @property
    def listable(self) -> bool:
        return not self.remote or urlsplit(self.location).scheme in WRITABLE

    def url(self, name: str) -> str:
        """What a reader opens for member ``name``: a local path or a full URL."""
        return f"{self.location}/{name}" if self.remote else str(Path(self.location) / name)

    def _path(self, name: str = "") -> str:
        base = _fs_path(self.location)
        return f"{base}/{name}" if name else base

    # ------------------------------------------------------------------------------------------ reading
    def names(self) -> set[str] | None:
        """Names of the files directly in the folder (None for an https:// folder: HTTP cannot list)."""
        if not self.listable:
            return None
        base = self._path()

        def ls():
            self.fs.invalidate_cache(base)
            try:
                entries = self.fs.ls(base, detail=True)
            except (FileNotFoundError, NotADirectoryError):
                return set()
            # "folder/" marker objects (left by some stores and consoles) are not files of the folder
            return {e["name"].rsplit("/", 1)[-1] for e in entries
                    if e.get("type") == "file" and not e["name"].endswith("/") and e["name"] != base}
        return self._call("list", self.location, ls)

    def exists(self, name: str) -> bool:
        if self.listable:
            return name in self.names()
        return self._call("check", self.url(name), self.fs.exists, self._path(name))

    def read_bytes(self, name: str) -> bytes:
        """The whole member; FileNotFoundError (local or remote) when it is not there."""
        try:
            return self._call("read", self.url(name), self.fs.cat_file, self._path(name))
        except StorageError as e:
            if isinstance(e.__cause__, FileNotFoundError):
                raise FileNotFoundError(str(e)) from None
            raise

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def open(self, name: str) -> BinaryIO:
        return open_stream(self.url(name))

    def sha256(self, name: str) -> str:
        h = hashlib.sha256()
        with self.open(name) as f:
            while block := f.read(1 << 20):
                h.update(block)
        return h.hexdigest()

    # ------------------------------------------------------------------------------------------ writing
    def check_writable(self) -> None:
        """Create a local folder / reach the bucket, and prove a write works, before any work is done."""
        self._create()
        probe = ".write-probe.tmp"
        try:
            self.write_bytes(probe, b"")
            self.remove(probe)
        except StorageError as e:
            missing = isinstance(e.__cause__, FileNotFoundError)
            hint = f"; create the bucket {urlsplit(self.location).netloc} first" if missing else ""
            raise StorageError(f"out_dir {self} is not writable: {e}{hint}") from None
        except OSError as e:
            raise SynthvitError(f"out_dir {self} is not writable ({e.strerror}); choose a writable folder") from None

    def write_bytes(self, name: str, data: bytes) -> None:
        """Atomic: a reader sees the old member or the whole new one (staged under a temporary name, then
        published whole)."""
        with self.staging() as folder:
            atomic_write_bytes(folder / name, data)
            self._publish(folder / name, name, "write")

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))

    def upload(self, local: Path, name: str) -> None:
        """Publish a finished file from :meth:`staging` as member ``name``, visible only once whole."""
        self._publish(local, name, "upload to")

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._call("remove", self.url(name), self.fs.rm_file, self._path(name))

    # ------------------------------------------------------------------------ where local and remote differ
    def _call(self, what: str, url: str, fn: Callable, *args):
        """``fn(*args)``. Local: an error is raised as it is (a full disk does not heal by waiting). Remote: transient
        errors are retried with backoff, then a StorageError names the URL (see :func:`with_retries`)."""
        if not self.remote:
            return fn(*args)
        return with_retries(what, url, fn, *args)

    def _publish(self, local: Path, name: str, what: str) -> None:
        """Make a finished staged file member ``name``: locally an atomic rename within the folder (a no-op when it
        was staged under that name); remotely one upload (visible only once complete), then the staged copy goes."""
        if not self.remote:
            os.replace(local, Path(self.location) / name)
            return
        self._call(what, self.url(name), self.fs.put_file, str(local), self._path(name))
        local.unlink()

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """Where to write files before :meth:`upload`: the folder itself when local, a private temporary
        folder (removed afterwards, whatever happens) when remote."""
        if not self.remote:
            yield Path(self.location)
            return
        tmp = Path(tempfile.mkdtemp(prefix="synthvit-upload-"))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def is_dir(self) -> bool:
        """Local: the folder exists. Remote: always (a prefix exists as soon as anything is under it: what is
        missing is reported when read)."""
        return self.remote or self.fs.isdir(self._path())

    def _create(self) -> None:
        """Create a local folder (remote: nothing; a bucket is never created here, the write probe names it)."""
        if self.remote:
            return
        try:
            self.fs.makedirs(self._path(), exist_ok=True)
        except OSError as e:
            raise SynthvitError(f"cannot create out_dir {self}: {e.strerror}; choose a writable folder") from None
        if not self.is_dir():
            raise SynthvitError(f"out_dir {self} exists and is not a folder")

    def __getstate__(self):
        return {"remote": self.remote, "location": self.location}


def _wds_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    if mode != "rb":
        check_url(url, write=True)
        return filesystem(url).open(_fs_path(url), mode)
    return open_stream(url)


def register_webdataset_schemes(schemes=tuple(WRITABLE)) -> None:
    """Let webdataset's ``gopen`` (and so timm's ``wds/`` reader and ``wds.WebDataset``) open ``s3://`` and
    ``gs://`` URLs through this module: fsspec clients, the standard credential chain, retries."""
    import importlib

    gopen = importlib.import_module("webdataset.gopen")  # the module (the package re-exports a function of its name)
    for scheme in schemes:
        gopen.gopen_schemes[scheme] = _wds_gopen
