"""Shard writing: a plan of shards, one atomic tar per shard, and a pool of worker processes with progress.

Backends only render samples; this module owns the files. A shard is rendered and written by a single worker
to a temporary name and renamed when complete (or, for an object store, uploaded in one piece from a local
temporary file), so an interrupted run leaves whole shards or none.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing as mp
import queue
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import webdataset as wds

from generate.backends import Backend, create_backend
from generate.schema import encode_sample, shard_filename
from synthvit.io import TMP_SUFFIX, atomic_open, sha256_file
from synthvit.progress import progress_bar
from synthvit.storage import Folder

log = logging.getLogger("synthvit.generate")


TAR_MTIME = 0  # int, never 0.0: see _write_tar


def tune_allocator() -> None:
    """Keep freed frame buffers in the heap instead of returning them to the OS after every sample.

    Rendering allocates many short-lived multi-MB arrays; with glibc's defaults each one is a fresh mmap whose
    pages fault in on first touch, which made rendering 3-4x slower than the arithmetic itself. No-op elsewhere.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: serve allocations up to 32 MiB (glibc's maximum) from the heap
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: do not hand the heap top back to the OS eagerly
    libc.mallopt(-2, 64 << 20)  # M_TOP_PAD: grow the heap in 64 MiB steps


@dataclass(frozen=True)
class ShardPlan:
    index: int
    start: int  # first global sample index
    stop: int  # one past the last

    @property
    def num_samples(self) -> int:
        return self.stop - self.start


def plan_shards(num_samples: int, samples_per_shard: int) -> list[ShardPlan]:
    return [ShardPlan(k, s, min(num_samples, s + samples_per_shard))
            for k, s in enumerate(range(0, num_samples, samples_per_shard))]


def remove_stale_temporaries(out_dir: Path) -> list[Path]:
    """Delete the temporary files of an interrupted run (``.<final name>.<pid>.tmp``)."""
    stale = sorted(p for p in out_dir.glob(f".*{TMP_SUFFIX}") if p.is_file())
    for p in stale:
        p.unlink()
    return stale


def index_batches(start: int, stop: int, size: int) -> list[list[int]]:
    """``range(start, stop)`` cut at multiples of ``size``: a batch's members depend on the indices alone (not on
    where a shard starts), so batched backends see the same batches for any worker count when the shard size is
    a multiple of the batch size."""
    cuts = [start, *range((start // size + 1) * size, stop, size), stop]
    return [list(range(a, b)) for a, b in zip(cuts, cuts[1:]) if b > a]


class WrittenShard(NamedTuple):
    """A shard on disk, as ``_info.json`` lists it."""
    filename: str
    num_samples: int
    sha256: str


def write_shard(backend: Backend, shard: ShardPlan, out: Folder | Path, cfg, progress=None) -> WrittenShard:
    """Render and write one shard atomically; returns what ``_info.json`` lists of it. Remote: the shard is
    written to a local temporary folder, hashed, uploaded, and only then returned (counted)."""
    out = out if isinstance(out, Folder) else Folder(out)
    fname = shard_filename(cfg.name, shard.index)
    with out.staging() as folder:
        path = folder / fname
        _write_tar(backend, shard, path, cfg, progress)
        digest = sha256_file(path)
        out.upload(path, fname)  # local: already in place
    return WrittenShard(fname, shard.num_samples, digest)


def _write_tar(backend: Backend, shard: ShardPlan, path: Path, cfg, progress) -> None:
    size = backend.batch_size
    with atomic_open(path) as f:
        # Fixed mtime/owner: the same samples give the same tar bytes on any machine, any day. An *integer* mtime:
        # Python's tarfile stores a float one in a PAX extended header before every member (+1 KiB each, and a
        # second header for every reader to parse: the pretraining stream spent a third of its time in tarfile).
        writer = wds.TarWriter(f, encoder=False, mtime=TAR_MTIME, user="synthvit", group="synthvit")
        try:
            for batch in index_batches(shard.start, shard.stop, size):
                samples = backend.render_batch(batch)
                for i, sample in zip(batch, samples):
                    writer.write(encode_sample(i, sample, cfg.image_format, cfg.jpeg_quality))
                if progress is not None:
                    progress(len(batch))
        except BaseException:
            # Close the tar stream now, into the partial file atomic_open then deletes: left open, tarfile flushes
            # it when collected, after the file is closed ("Exception ignored ... write to closed file" after
            # Ctrl-C's clean message).
            with contextlib.suppress(Exception):
                writer.close()
            raise
        writer.close()


# ---------------------------------------------------------------- worker processes
_WORKER: dict = {}


def _init_worker(cfg, out: Folder, progress_queue) -> None:
    # Ctrl-C reaches the whole process group: only the main process reacts (it terminates the pool), so no
    # worker dies mid-task and gets replaced by a fresh one that keeps writing shards.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tune_allocator()
    _WORKER.update(cfg=cfg, out=out, queue=progress_queue,
                   backend=create_backend(cfg.backend, cfg), pending=0, last=time.monotonic())


def _report(n: int) -> None:
    _WORKER["pending"] += n
    now = time.monotonic()
    if now - _WORKER["last"] > 0.2:
        _WORKER["queue"].put(_WORKER["pending"])
        _WORKER["pending"], _WORKER["last"] = 0, now


def _work(shard: ShardPlan) -> tuple[int, WrittenShard]:
    result = write_shard(_WORKER["backend"], shard, _WORKER["out"], _WORKER["cfg"], progress=_report)
    if _WORKER["pending"]:
        _WORKER["queue"].put(_WORKER["pending"])
        _WORKER["pending"] = 0
    return shard.index, result


def write_shards(cfg, shards: list[ShardPlan], out: Folder, desc: str = "generate",
                 backend: Backend | None = None) -> dict[int, WrittenShard]:
    """Write ``shards`` with ``cfg.num_workers`` processes (0: in this process), showing a progress bar.

    ``backend``: an already created backend for the in-process path. Backends that set ``in_process`` (neural
    ones: one model per GPU, batched) always render in this process.
    """
    results: dict[int, WrittenShard] = {}
    total = sum(s.num_samples for s in shards)
    in_process = backend is not None and backend.in_process
    if in_process and cfg.num_workers > 1:
        log.warning("num_workers=%d has no effect with backend %s: it renders batches in this process (use "
                    "`accelerate launch` for several GPUs)", cfg.num_workers, cfg.backend)
    with progress_bar(total=total, desc=desc, unit="img", smoothing=0.1) as bar:
        if cfg.num_workers == 0 or len(shards) <= 1 or in_process:
            tune_allocator()
            backend = backend or create_backend(cfg.backend, cfg)
            for s in shards:
                results[s.index] = write_shard(backend, s, out, cfg, progress=bar.update)
            return results
        ctx = mp.get_context("spawn")
        progress_queue = ctx.Queue()
        workers = min(cfg.num_workers, len(shards))
        with ctx.Pool(workers, initializer=_init_worker, initargs=(cfg, out, progress_queue)) as pool:
            async_results = [pool.apply_async(_work, (s,)) for s in shards]
            while any(not r.ready() for r in async_results) or not progress_queue.empty():
                try:
                    bar.update(progress_queue.get(timeout=0.1))
                except queue.Empty:
                    pass
                for r in async_results:
                    if r.ready() and not r.successful():
                        r.get()  # re-raises the worker's error here; the pool is terminated on exit
            for r in async_results:
                index, result = r.get()
                results[index] = result
        bar.n = total
        bar.refresh()
    return results
