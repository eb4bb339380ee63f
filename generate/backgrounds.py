"""The user's own defect-free images as backgrounds for synthetic defects (``procedural.backgrounds=FOLDER``).

FOLDER is a plain folder of images (every image is used) or a real-data folder in any finetune format: then
only the defect-free images (an empty mask; with image labels, a label of ``procedural.defect_free_labels``) of
its *train* split are used -- the split finetune draws (``splits.csv``, else the seeded split of
``backgrounds_test_fraction`` / ``backgrounds_data_seed``, finetune's defaults), so an image finetune tests on is
never drawn into pretraining data.

:func:`find_backgrounds` lists them, checked as finetune checks real data (:func:`synthvit.data.checked_split`:
the train images with their masks, or every image of a plain folder; with ``check``, run once by ``generate`` before
any shard, every file decoded; every problem in one error);
:class:`BackgroundPool` hands out a background per sample from the sample's own rng (the image choice and crop
included), decoding each image once per worker process and keeping it in memory (up to ``CACHE_BYTES``).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

import generate.schema  # noqa: F401  (registers format=shards with synthvit.data)
from generate.backends import BaseBackend
from synthvit.data import (
    GOOD_NAMES,
    IMAGE_EXTS,
    DataError,
    Item,
    RealData,
    checked_split,
    has_defect,
    image_files,
    load_real_data,
    set_pixel_cap,
    validate,
    why,
)
from synthvit.data.core import open_image
from synthvit.io import SynthvitError

log = logging.getLogger("synthvit.generate")

CACHE_BYTES = 1 << 30  # decoded backgrounds kept per worker process
KEY = "procedural.backgrounds"


class BackgroundError(SynthvitError):
    pass


@dataclass(frozen=True)
class Source:
    id: str
    where: str  # a path, for messages
    load: Callable[[], Image.Image]
    size: tuple[int, int]  # (width, height) as displayed


def _open_file(path: Path) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        with Image.open(path) as im:
            return ImageOps.exif_transpose(im)
    return load


def _plain(root: Path, check: bool, key: str) -> list[tuple[str, str, Callable[[], Image.Image]]]:
    """(id, where, loader) of every image of a plain folder, checked as finetune checks real data (``check``: decoded,
    else headers only) -- every unreadable one (a link to nowhere included) in one error."""
    data = RealData(root, "plain", [Item(p.relative_to(root).with_suffix("").as_posix(), str(p), open_image(p))
                                    for p in image_files(root)])
    set_pixel_cap()
    bad = validate(data, decode=check)
    if bad:
        raise BackgroundError(f"{key}: {len(bad)} unreadable image(s) in {root}: " + "; ".join(bad[:20])
                              + (" ..." if len(bad) > 20 else "") + "; remove or fix them")
    return [(i.id, i.source, _open_file(Path(i.source))) for i in data.items]


def _is_plain(root: Path) -> bool:
    """Images directly in the folder and nothing a finetune format reads (no subfolders, JSON, CSV); a link to
    nowhere counts as an image (reading it fails, named)."""
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    return bool(entries) and all((p.is_file() or p.is_symlink()) and p.suffix.lower() in IMAGE_EXTS
                                 for p in entries)


@lru_cache(maxsize=8)
def read_real_ids(path: str) -> frozenset[str] | None:
    """The ids of a ``real_ids`` file (one per line, blank lines and # comments skipped); None for ""."""
    if not path:
        return None
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SynthvitError(f"real_ids: cannot read {path} ({e}); give a text file of image ids, one per line") \
            from None
    return frozenset(ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#"))


def allowed_train(root, data, split: dict[str, str], allowed: frozenset[str] | None, key: str) -> list:
    """The train items of ``data`` a set may draw on: all of them, or those ``allowed`` (``real_ids``) lists -- an
    id of no image, or of a test image, is an error (a set never draws on the test split)."""
    train = [i for i in data.items if split[i.id] == "train"]
    if allowed is None:
        return train
    unknown = sorted(allowed - set(split))
    test = sorted(i for i in allowed & set(split) if split[i] != "train")
    if unknown or test:
        raise SynthvitError(f"real_ids: {key}={root} " + "; ".join(
            part for part in (f"has no image {', '.join(unknown[:10])}" if unknown else "",
                              f"puts {', '.join(test[:10])} in its test split" if test else "") if part)
            + ": real_ids must list train images of that folder")
    return [i for i in train if i.id in allowed]


def _real_data(root: Path, fmt: str, labels: tuple[str, ...], test_fraction: float, data_seed: int, check: bool,
               key: str, allowed: frozenset[str] | None = None):
    """(id, where, loader) of the defect-free train images of a real-data folder (those ``allowed`` lists, when
    given), and what was left out."""
    labels = labels or GOOD_NAMES
    try:  # the train images (with their masks) checked as finetune checks them (``check``: decoded too)
        data = load_real_data(root, fmt, check=False)
        _, train = checked_split(data, test_fraction, data_seed,
                                 lambda split: allowed_train(root, data, split, allowed, key), decode=check)
    except DataError as e:
        raise BackgroundError(f"{key}: {e}") from None
    keep = [i for i in train if not (data.has_masks and has_defect(i))
            and not (data.has_labels and (i.label or "").lower() not in labels)]
    left = {"test": len(data.items) - len(train), "defective": len(train) - len(keep)}
    if not keep:
        by = ("its masks" if data.has_masks else "") + (" and " if data.has_masks and data.has_labels else "") + \
              (f"its labels (defect-free: {', '.join(labels)}; set procedural.defect_free_labels)"
               if data.has_labels else "")
        raise BackgroundError(
            f"{key}: {root} ({data.fmt} layout) has no defect-free image in its train split ({left['test']} test, "
            f"{left['defective']} defective by {by or 'its annotations'}); give a folder with defect-free "
            f"images, or procedural.backgrounds_format=plain to use every image of a plain folder")
    return data.fmt, [(i.id, i.source, i.load) for i in sorted(keep, key=lambda i: i.id)], left


@lru_cache(maxsize=8)
def find_backgrounds(folder: str, fmt: str = "auto", labels: tuple[str, ...] = (), test_fraction: float = 0.3,
                     data_seed: int = 0, check: bool = True, key: str = KEY,
                     allowed: frozenset[str] | None = None) -> tuple[list[Source], dict]:
    """The background images of ``folder`` and a record of them for ``_info.json`` (folder, format, ids used,
    counts left out). ``check``: decode every image and mask (else only their headers are read); ``key``: the
    config key errors name; ``allowed``: only these train ids (``real_ids``)."""
    root = Path(folder)
    if not root.is_dir():
        raise BackgroundError(f"{key}: {root} is not a folder; give a folder of defect-free images or a "
                              f"real-data folder (any finetune format)")
    if not any(p for p in root.iterdir() if not p.name.startswith(".")):
        raise BackgroundError(f"{key}: {root} holds no images ({', '.join(IMAGE_EXTS)})")
    left = {"test": 0, "defective": 0}
    if fmt == "plain" or (fmt == "auto" and _is_plain(root)):
        fmt, found = "plain", _plain(root, check, key)
        if not found:
            raise BackgroundError(f"{key}: {root} holds no images ({', '.join(IMAGE_EXTS)})")
    else:
        fmt, found, left = _real_data(root, fmt, labels, test_fraction, data_seed, check, key, allowed)
    sources = []
    for id_, where, load in found:  # checked above: their sizes
        try:
            with load() as im:
                sources.append(Source(id_, where, load, im.size))
        except Exception as e:  # changed since it was checked
            raise BackgroundError(f"{key}: {where}: unreadable image ({why(e)})") from None
    record = {"folder": str(root), "format": fmt, "count": len(sources), "ids": [s.id for s in sources],
              "left_out": left}
    return sources, record


class BackgroundPool:
    """Backgrounds of ``width`` x ``height``: a random crop (``fit=crop``; images smaller than the frame are first
    scaled up to cover it) or the whole image resized (``fit=resize``). Grayscale images (mode L, or RGB with equal
    channels) come back as (H, W), colour ones as (H, W, 3), both uint8."""

    def __init__(self, sources: list[Source], width: int, height: int, fit: str = "crop", warn: bool = True,
                 key: str = KEY):
        self.sources, self.width, self.height, self.fit, self.key = sources, width, height, fit, key
        self.record: dict = {}
        self._cache: OrderedDict[int, tuple[np.ndarray, float]] = OrderedDict()
        self._bytes = 0
        small = [s for s in sources if s.size[0] < width or s.size[1] < height]
        if small and fit == "crop" and warn:
            log.warning("%s: %d of %d backgrounds are smaller than %dx%d (e.g. %s, %dx%d): they are scaled up to "
                        "cover the frame before cropping", key, len(small), len(sources), width, height,
                        small[0].where, *small[0].size)

    def _decoded(self, k: int) -> tuple[np.ndarray, float]:
        """Image ``k`` as uint8 (H, W) or (H, W, 3), scaled to cover the frame (crop) or to it (resize); decoded
        once per process while the cache holds it."""
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        src = self.sources[k]
        try:
            with src.load() as im:
                if im.mode in ("I;16", "I;16B", "I"):  # 16-bit grey: its top 8 bits
                    im = Image.fromarray((np.asarray(im, np.int64).clip(0, 65535) >> 8).astype(np.uint8))
                im = im.convert("L" if im.mode in ("L", "LA", "1", "P") and _gray_palette(im) else "RGB")
                if self.fit == "resize":
                    scale = 1.0
                    im = im.resize((self.width, self.height), Image.Resampling.BICUBIC)
                else:
                    scale = max(self.width / im.width, self.height / im.height, 1.0)
                    if scale > 1.0:
                        im = im.resize((max(self.width, round(im.width * scale)),
                                        max(self.height, round(im.height * scale))), Image.Resampling.BICUBIC)
                arr = np.asarray(im)
        except Exception as e:
            raise BackgroundError(f"{self.key}: cannot read {src.where}: {e}") from None
        if arr.ndim == 3 and (arr == arr[..., :1]).all():
            arr = np.ascontiguousarray(arr[..., 0])  # an RGB file of a grey image: a grey background
        self._cache[k] = (arr, scale)
        self._bytes += arr.nbytes
        while self._bytes > CACHE_BYTES and len(self._cache) > 1:
            old, _ = self._cache.popitem(last=False)[1]
            self._bytes -= old.nbytes
        return arr, scale

    def draw(self, rng) -> tuple[int, np.ndarray, float, int, int]:
        """Image ``k`` drawn from ``rng``, decoded (``arr``, ``scale`` as :meth:`_decoded`), and the top-left corner
        ``x0, y0`` of the frame's crop in ``arr``, drawn too."""
        k = int(rng.integers(len(self.sources)))
        arr, scale = self._decoded(k)
        h, w = arr.shape[:2]
        x0 = int(rng.integers(w - self.width + 1)) if self.fit == "crop" else 0
        y0 = int(rng.integers(h - self.height + 1)) if self.fit == "crop" else 0
        return k, arr, scale, x0, y0

    def crop_record(self, k: int, scale: float, x0: int, y0: int) -> dict:
        """``{id, box}`` of a crop (box: x0, y0, x1, y1 in the source image's pixels)."""
        if self.fit == "resize":
            box = [0, 0, *self.sources[k].size]
        else:
            box = [round(v / scale, 1) if scale != 1.0 else v for v in (x0, y0, x0 + self.width, y0 + self.height)]
        return {"id": self.sources[k].id, "box": box}

    def __call__(self, rng) -> tuple[np.ndarray, dict]:
        """A background and its record ``{id, box}`` (box: x0, y0, x1, y1 in the source image's pixels)."""
        k, arr, scale, x0, y0 = self.draw(rng)
        return arr[y0:y0 + self.height, x0:x0 + self.width], self.crop_record(k, scale, x0, y0)


def background_pool(cfg, check: bool = False) -> BackgroundPool | None:
    """The pool of ``procedural.backgrounds`` (None without one); ``check``: decode every file first, warn about
    small ones (``generate`` does this once, before any shard). ``pool.record`` goes into ``_info.json``."""
    p = cfg.procedural
    if not p.backgrounds:
        return None
    sources, record = find_backgrounds(p.backgrounds, p.backgrounds_format, tuple(x.lower() for x in
                                       p.defect_free_labels), p.backgrounds_test_fraction, p.backgrounds_data_seed,
                                       check, allowed=read_real_ids(cfg.real_ids))
    pool = BackgroundPool(sources, *cfg.size, p.backgrounds_fit, warn=check)
    pool.record = record
    return pool


class UsesBackgrounds(BaseBackend):
    """A backend that draws into ``procedural.backgrounds`` (``self.backgrounds``, the pool or None, and
    ``self.cfg``): :meth:`validate` and :attr:`info` of :class:`~generate.backends.Backend` for them."""
    cfg: object
    backgrounds: BackgroundPool | None

    def validate(self) -> None:
        """Every background decodes (one error listing those that do not); run once before any shard."""
        if self.backgrounds is not None:
            background_pool(self.cfg, check=True)

    @property
    def info(self) -> dict:
        """What ``_info.json`` records beside the config: the backgrounds used (ids included)."""
        return {"backgrounds": self.backgrounds.record} if self.backgrounds is not None else {}


def _gray_palette(im: Image.Image) -> bool:
    """Whether a single-band image is grey (a palette image is grey only when its palette is)."""
    if im.mode != "P":
        return True
    pal = np.asarray(im.getpalette() or [0, 0, 0]).reshape(-1, 3)
    return bool((pal == pal[:, :1]).all())
