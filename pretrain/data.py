"""The training stream: public ``webdataset`` stages over synthvit shards, deterministic for any resume point.

Each (rank, worker role) owns a slot. Per epoch, a slot draws shards with a ``random.Random`` seeded by
(seed, epoch, slot) -- with replacement (``resample``) or as a shuffled pass over its own disjoint share of the
shards -- then ``tarfile_to_samples -> shuffle (seeded) -> decode + augment (seeded per sample) -> batched``, and
``with_epoch`` gives every slot the same number of batches, so every rank gets the same number per epoch and DDP
never waits on a rank that ran dry. webdataset's own ``ResampledShards`` draws from an unseeded generator, hence
the small sampler here.

Batches per epoch are a multiple of the worker count; the DataLoader takes batches from workers round-robin, so
global batch ``i`` always comes from role ``i % workers``. Resuming at batch ``c`` rotates the roles by
``c % workers`` and each role skips, *before decoding*, the samples it had already served: the stream continues
exactly where it stopped.
"""
from __future__ import annotations

import io
import logging
import math
import random
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from generate.schema import CLS_KEY, IMAGE_KEYS, MASK_KEY, read_info, tar_members
from synthvit.io import SynthvitError
from synthvit.storage import Folder, open_stream, redact

log = logging.getLogger("synthvit.pretrain")


MAX_CLASSES = 256  # masks are 8-bit


@dataclass
class Source:
    folder: str  # as given: a local folder or an object-store URL (printable: URLs carrying secrets are refused)
    urls: list[str]
    weight: float
    num_samples: int
    class_map: tuple[int, ...] = ()  # this dataset's class id -> the run's (empty: the same ids)
    real_ids: dict | None = None  # real-data folder -> ids of the real images the set drew on (backgrounds, defects)


def load_sources(folders: list[str], weights: list[float], expected_classes: list[str]) -> tuple[list[Source], list]:
    """Read every dataset's ``_info.json``. Datasets with other class lists are mixed over their union: the first
    dataset's classes in order, then each later dataset's new names (id 0, defect-free, is shared); a later
    dataset's masks and labels are mapped into it. The union must match ``expected_classes`` when given."""
    sources, class_names = [], []
    for i, location in enumerate(folders):
        folder = Folder(location)
        info = read_info(folder)
        names = list(info.class_names)
        if not class_names:
            class_names = list(names)
        elif names[:1] != class_names[:1]:
            raise SynthvitError(f"dataset {folder} calls class 0 {names[0]!r}, {folders[0]} {class_names[0]!r}: "
                                f"datasets mixed in one run must share their defect-free class 0")
        class_names += [n for n in names if n not in class_names]
        if len(class_names) > MAX_CLASSES:
            raise SynthvitError(f"the datasets {', '.join(folders)} have {len(class_names)} classes together; "
                                f"masks hold at most {MAX_CLASSES}")
        class_map = tuple(class_names.index(n) for n in names)
        urls = [folder.url(f) for f in info.filenames]
        present = folder.names()  # one listing (None over https: missing shards are then skipped and counted)
        missing = [folder.url(f) for f in info.filenames if present is not None and f not in present]
        if missing:
            raise SynthvitError(f"{len(missing)} shard(s) listed in {folder}/_info.json are missing, e.g. "
                                f"{redact(missing[0])}; run `synthvit generate out_dir={folder} verify=true`")
        sources.append(Source(str(folder), urls, weights[i] if weights else 1.0, info.num_samples,
                              () if class_map == tuple(range(len(names))) else class_map,
                              {k: sorted(v) for k, v in info.real_ids().items()}))
    if expected_classes and expected_classes != class_names:
        raise SynthvitError(f"class_names in the config {expected_classes} differ from the data's {class_names} "
                            f"({folders[0]}/_info.json); fix class_names or leave it empty to take the data's")
    return sources, class_names


@dataclass
class StreamSpec:
    """Everything a worker needs to rebuild its slice of the stream (picklable)."""
    sources: list[Source]
    batch_size: int
    image_size: int
    in_chans: int
    scale: tuple[float, float]
    jitter: float
    with_mask: bool
    seed: int
    rank: int
    world: int
    workers: int  # >= 1 (0 workers -> 1 role, in the main process)
    resample: bool
    shuffle_buffer: int
    batches_per_epoch: int  # per rank, a multiple of workers
    start_batch: int = 0  # batches this rank had consumed before (resume)
    cache_bytes: int = 0  # per role: samples kept in memory across epochs (``SampleCache``; 0: off)

    @property
    def slots(self) -> int:
        return self.world * self.workers


def batches_per_epoch(total_samples: int, batch_size: int, world: int, workers: int) -> int:
    per_rank = math.ceil(total_samples / (batch_size * world))
    return max(1, math.ceil(per_rank / workers)) * workers


def check_shard_counts(sources: list[Source], world: int, workers: int, resample: bool) -> None:
    slots = world * workers
    for s in sources:
        if len(s.urls) >= slots:
            continue
        msg = (f"{s.folder} has {len(s.urls)} shard(s) for {world} rank(s) x {workers} worker(s) = {slots} "
               f"readers")
        if not resample:
            raise SynthvitError(f"{msg}: without resampling each reader needs its own shard. Write more, smaller "
                                f"shards (samples_per_shard), use fewer num_workers, or set resample=true")
        log.warning("%s: readers share shards, so ranks do not see disjoint samples", msg)


class SkipCounter:
    """Handler for webdataset stages: log a corrupt shard/sample, count it, continue."""

    def __init__(self):
        self.count = 0

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        log.warning("skipping unreadable data (%d so far): %r", self.count, exn)
        return True


class SampleCache:
    """One loader role's samples kept in memory across epochs, up to ``budget`` bytes.

    A shard enters whole or not at all: its samples are collected as they stream by and kept only if the shard was
    read to its end without a skip (a damaged shard is read, and counted, again every epoch, as without the cache)
    and its bytes fit. Each kept sample also keeps the images decoded from it (``decoded``, keyed by mode and the
    JPEG's DCT scale: exactly what decoding it again would give), charged to the same budget. Nothing is evicted: an
    epoch visits every shard, so evicting would only trade one miss for another. A cached shard is yielded as the
    very dicts first read, so a later epoch's batches are the uncached ones, byte for byte.

    On a CPU with no core to spare for loading, reading the tar and decoding its JPEGs is most of a sample's data
    time (BENCHMARKS.md); a set that fits is then read and decoded once per run instead of once per epoch.
    """

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self.shards: dict[str, list[dict]] = {}

    def charge(self, nbytes: int) -> bool:
        if self.used + nbytes > self.budget:
            return False
        self.used += nbytes
        return True

    def through(self, src, read, skipped: SkipCounter):
        """Samples of the shards named by ``src`` (``{"url": ...}`` dicts): from memory, or ``read`` one shard at a
        time (``read(iterable of one source)`` -> samples) and keep it when it was whole and fits."""
        for source in src:
            url = source["url"]
            if url in self.shards:
                yield from self.shards[url]
                continue
            kept, size, errors = [], 0, skipped.count
            for sample in read([source]):
                if kept is not None:
                    size += sum(len(v) for v in sample.values() if isinstance(v, bytes))
                    if self.used + size <= self.budget:
                        kept.append(sample)
                    else:
                        kept = None
                yield sample
            if kept is not None and skipped.count == errors and self.charge(size):
                for sample in kept:  # the very dicts yielded: those still waiting to be decoded get a memo too
                    sample["__decoded__"] = {}
                self.shards[url] = kept


def tar_samples(handler, cache: SampleCache | None = None):
    """``webdataset.tarfile_to_samples`` with synthvit's opener -- local files as webdataset opens them, remote
    objects through :func:`synthvit.storage.open_stream` (fsspec, retried with backoff, resumed at the byte
    reached) -- and :func:`generate.schema.tar_members` for Python's ``tarfile`` (~4x less time per member). An error
    that outlives the retries, or a damaged archive, reaches ``handler``: the rest of that shard is skipped, counted.
    With ``cache`` (and ``handler`` a :class:`SkipCounter`), shards read whole before come from memory."""
    def opened(src):
        stream = None
        try:
            for sample in src:
                if stream is not None:  # the expander is done with the previous shard
                    stream.close()
                    stream = None
                try:
                    stream = open_stream(sample["url"])
                except Exception as e:
                    if handler(e):
                        continue
                    raise
                yield dict(sample, stream=stream)
        finally:
            if stream is not None:
                stream.close()

    def expand(src):  # webdataset's tar_file_expander, with the ustar reader of the shard contract
        for source in src:
            try:
                for name, data in tar_members(source["stream"]):
                    if "/" not in name and name.startswith("__") and name.endswith("__"):
                        continue  # archive metadata, as webdataset skips it
                    yield {"fname": name, "data": data, "__url__": source["url"]}
            except Exception as e:
                e.args = (*e.args, source["url"])
                if not handler(e):
                    raise
            yield {}  # the end of a shard: no sample spans two

    def read(src):
        return wds.tariterators.group_by_keys(expand(opened(src)), handler=handler)
    return read if cache is None else lambda src: cache.through(src, read, handler)


def _shard_urls(spec: StreamSpec, slot: int, epoch: int):
    rng = random.Random(f"synthvit/{spec.seed}/{epoch}/{slot}")
    shares = [s.urls[slot::spec.slots] if len(s.urls) >= spec.slots else s.urls for s in spec.sources]
    weights = [s.weight for s in spec.sources]
    if spec.resample:
        while True:
            k = rng.choices(range(len(shares)), weights)[0] if len(shares) > 1 else 0
            yield {"url": rng.choice(shares[k])}
    while True:  # passes without replacement over this slot's own shards
        order = [(k, u) for k, share in enumerate(shares) for u in share]
        rng.shuffle(order)
        for _, url in order:
            yield {"url": url}


def augment(image: Image.Image, mask: Image.Image | None, rng: np.random.Generator, spec: StreamSpec,
            decoded: dict | None = None, charge=None):
    """Random resized crop at the model size, 90-degree rotations and flips; the mask gets the same crop
    (nearest), rotation and flip. Brightness/contrast jitter factors are drawn here and applied batch-wise on the
    device (``jitter_batch``). JPEGs are decoded at the smallest DCT scale that still covers the crop.

    ``decoded`` (a cached sample's memo) holds the image already decoded at a (mode, DCT scale) and the mask; what
    is missing is decoded and kept there when ``charge(nbytes)`` allows.

    Returns uint8 (C, S, S), uint8 (S, S) or None, and (contrast, brightness).
    """
    W, H = image.size
    area = W * H * rng.uniform(*spec.scale)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w, h = min(W, max(1, round(math.sqrt(area * ratio)))), min(H, max(1, round(math.sqrt(area / ratio))))
    x0, y0 = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
    size, mode = (spec.image_size, spec.image_size), ("L" if spec.in_chans == 1 else "RGB")
    mask_box = (x0, y0, x0 + w, y0 + h)
    if image.format == "JPEG":
        image.draft(mode, (math.ceil(W * size[0] / w), math.ceil(H * size[1] / h)))
    fx, fy = image.size[0] / W, image.size[1] / H
    box = (x0 * fx, y0 * fy, (x0 + w) * fx, (y0 + h) * fy)
    arr = np.asarray(_decoded(decoded, (mode, image.size), lambda: image.convert(mode), charge).resize(
        size, Image.BILINEAR, box=box))
    k, flip = int(rng.integers(4)), bool(rng.random() < 0.5)
    jitter = (1 + rng.uniform(-spec.jitter, spec.jitter), 1 + rng.uniform(-spec.jitter, spec.jitter)) \
        if spec.jitter else (1.0, 1.0)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    arr = np.rot90(arr, k, axes=(1, 2))
    arr = np.ascontiguousarray(arr[:, :, ::-1] if flip else arr)
    if mask is None:
        return arr, None, jitter
    mask = _decoded(decoded, "mask", mask.copy, charge) if decoded is not None else mask
    m = np.rot90(np.asarray(mask.resize(size, Image.NEAREST, box=mask_box)), k)
    return arr, np.ascontiguousarray(m[:, ::-1] if flip else m), jitter


def _decoded(memo: dict | None, key, decode, charge) -> Image.Image:
    """``memo[key]``, or ``decode()`` -- kept in ``memo`` (when given) if ``charge`` allows its bytes."""
    if memo is not None and key in memo:
        return memo[key]
    image = decode()
    if memo is not None:
        image.load()
        if charge(image.width * image.height * len(image.getbands())):
            memo[key] = image
    return image


def jitter_batch(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Per-image contrast and brightness on a float batch in 0..255: (x - mean) * c + mean * b, clamped -- in place
    (``x`` is the loop's own float copy of the batch: no whole-batch temporaries on a CPU's critical path)."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    c, b = factors[:, 0].view(-1, 1, 1, 1), factors[:, 1].view(-1, 1, 1, 1)
    return x.sub_(mean).mul_(c).add_(mean * b).clamp_(0, 255)


def _decode(sample: dict, spec: StreamSpec, rng: np.random.Generator, class_maps: dict[str, np.ndarray],
            cache: SampleCache | None = None) -> dict:
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None or CLS_KEY not in sample or (spec.with_mask and MASK_KEY not in sample):
        raise SynthvitError(f"sample {sample.get('__key__')} in {sample.get('__url__')} lacks jpg|png, cls or "
                            f"mask.png")
    with Image.open(io.BytesIO(sample[key])) as im:
        mask = Image.open(io.BytesIO(sample[MASK_KEY])) if spec.with_mask else None
        image, m, jitter = augment(im, mask, rng, spec, sample.get("__decoded__"), cache and cache.charge)
    cls, lut = int(sample[CLS_KEY]), class_maps.get(sample["__url__"])
    if lut is not None:  # a dataset mixed over a union of classes: its ids -> the run's
        cls, m = int(lut[cls]), (lut[m] if m is not None else None)
    out = {"image": image, "cls": cls, "jitter": jitter, "key": f"{Path(sample['__url__']).name}/{sample['__key__']}"}
    if m is not None:
        out["mask"] = m
    return out


def _collate(samples: list[dict], skipped: SkipCounter, role: int) -> dict:
    batch = {"image": torch.from_numpy(np.stack([s["image"] for s in samples])),
             "cls": torch.tensor([s["cls"] for s in samples], dtype=torch.long),
             "jitter": torch.tensor([s["jitter"] for s in samples], dtype=torch.float32),
             "keys": [s["key"] for s in samples], "skipped": (role, skipped.count)}
    if "mask" in samples[0]:
        batch["mask"] = torch.from_numpy(np.stack([s["mask"] for s in samples]))
    return batch


class TrainStream(torch.utils.data.IterableDataset):
    """An endless stream of batches for one rank; see the module docstring for the determinism contract."""

    def __init__(self, spec: StreamSpec, worker: int | None = None):
        super().__init__()
        self.spec = spec
        self.worker = worker  # the loader worker this stream plays (None: the DataLoader worker running it, or 0)

    def __iter__(self):
        spec = self.spec
        info = torch.utils.data.get_worker_info()
        worker = self.worker if self.worker is not None else info.id if info is not None else 0
        role = (worker + spec.start_batch) % spec.workers
        slot = spec.rank * spec.workers + role
        per_role = spec.batches_per_epoch // spec.workers
        epoch, within = divmod(spec.start_batch, spec.batches_per_epoch)
        done = max(0, math.ceil((within - role) / spec.workers))  # batches this role served in the epoch
        skipped = SkipCounter()
        cache = SampleCache(spec.cache_bytes) if spec.cache_bytes > 0 else None
        while True:
            if per_role > done:  # with_epoch(0) would mean "no limit"
                yield from self._epoch(slot, role, epoch, done, per_role - done, skipped, cache)
            epoch, done = epoch + 1, 0

    def _epoch(self, slot: int, role: int, epoch: int, skip_batches: int, num_batches: int, skipped: SkipCounter,
               cache: SampleCache | None = None):
        spec = self.spec
        counter = iter(range(skip_batches * spec.batch_size, 1 << 62))
        maps = {u: np.asarray(s.class_map, np.uint8) for s in spec.sources if s.class_map for u in s.urls}
        pipeline = wds.DataPipeline(
            lambda: _shard_urls(spec, slot, epoch),
            tar_samples(skipped, cache),
            wds.shuffle(spec.shuffle_buffer, min(spec.shuffle_buffer, 100),
                        rng=random.Random(f"synthvit-shuffle/{spec.seed}/{epoch}/{slot}")),
            lambda src: islice(src, skip_batches * spec.batch_size, None),  # resume: skip before decoding
            wds.map(lambda s: _decode(s, spec, np.random.default_rng((spec.seed, epoch, slot, next(counter))), maps,
                                      cache), handler=skipped),
            wds.batched(spec.batch_size, collation_fn=lambda b: _collate(b, skipped, role), partial=False),
        )
        return pipeline.with_epoch(num_batches)


class InProcessStream(torch.utils.data.IterableDataset):
    """All ``spec.workers`` roles in the calling process, taken round-robin: the very batches, in the very order, that
    ``spec.workers`` DataLoader workers would deliver (a DataLoader takes an iterable dataset's batches from its
    workers in turn), without processes that compete with the compute threads for a small CPU's cores."""

    def __init__(self, spec: StreamSpec):
        super().__init__()
        self.spec = spec

    def __iter__(self):
        streams = [iter(TrainStream(self.spec, worker=w)) for w in range(self.spec.workers)]
        while True:
            for stream in streams:
                yield next(stream)


def make_loader(spec: StreamSpec, num_workers: int, in_process: bool = False) -> torch.utils.data.DataLoader:
    """Not passed through ``accelerator.prepare``: each rank already reads its own slots; move batches yourself.
    ``in_process``: decode the ``num_workers`` roles in this process (the same batches; see ``InProcessStream``)."""
    if num_workers == 0 or in_process:
        return wds.WebLoader(InProcessStream(spec), batch_size=None, num_workers=0)
    return wds.WebLoader(TrainStream(spec), batch_size=None, num_workers=num_workers, persistent_workers=True,
                         prefetch_factor=4)
