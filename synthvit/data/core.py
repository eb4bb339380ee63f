"""The real-data floor's nouns: :class:`Item`, :class:`RealData`, :class:`DataError`, and how pixels and masks are
read from every layout (8/16-bit, palette, RGBA, EXIF), shared by the format readers and the split."""
from __future__ import annotations

import csv
import io
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from synthvit.io import SynthvitError

GOOD_NAMES = ("good", "free", "ok", "normal", "defect-free", "defect_free", "none", "background")
SHOWN = 20
EXIF_ORIENTATION = 0x0112
MAX_PIXELS = 8192 * 8192  # the default ``max_pixels``: the largest frame (in pixels) any reader decodes
_cap = [MAX_PIXELS]  # the cap set_pixel_cap set last, for messages


class DataError(SynthvitError):
    """Invalid real data; the message lists the offending files."""


def problems_error(root: Path, problems: list[str]) -> DataError:
    shown = "\n  ".join(problems[:SHOWN])
    more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
    return DataError(f"{len(problems)} problem(s) in {root}:\n  {shown}{more}")


@dataclass
class Item:
    id: str
    source: str  # a path or "<folder>#<row>", for messages
    load: Callable[[], Image.Image]
    label: str | None = None
    mask: Callable[[tuple[int, int]], np.ndarray] | None = None  # (width, height) -> uint8 (H, W) class map
    defect: bool | None = None  # whether its mask holds a defect pixel, once read (validate reads every mask)


@dataclass
class RealData:
    root: Path | str  # str: an object-store URL (shards)
    fmt: str
    items: list[Item]
    seg_classes: list[str] = field(default_factory=list)  # background first; empty: no masks
    cls_classes: list[str] = field(default_factory=list)  # a defect-free class first when there is one
    splits: dict[str, str] = field(default_factory=dict)  # id -> split from splits.csv, for every item
    masks_refused: str = ""  # why the annotations cannot give masks (COCO bbox-only annotations): no seg task

    @property
    def has_masks(self) -> bool:
        return bool(self.seg_classes)

    @property
    def has_labels(self) -> bool:
        return bool(self.cls_classes)

    def label_index(self, item: Item) -> int:
        return self.cls_classes.index(item.label) if item.label is not None else -1

    def check_task(self, task: str) -> None:
        """Stop when the data cannot serve ``task`` (seg needs masks, cls needs image labels, both needs both)."""
        if task in ("seg", "both") and self.masks_refused:
            raise SynthvitError(f"task={task} needs masks, but {self.masks_refused}")
        if task in ("seg", "both") and not self.has_masks:
            raise SynthvitError(f"task={task} needs masks, but {self.root} ({self.fmt}) has none; use task=cls")
        if task in ("cls", "both") and not self.has_labels:
            raise SynthvitError(f"task={task} needs image labels (labels.csv, class folders or a label column), "
                                f"but {self.root} ({self.fmt}) has none; use task=seg")


# ---------------------------------------------------------------------------------------------- pixels
def to_array(image: Image.Image, channels: int = 3) -> np.ndarray:
    """uint8 (H, W, 3) or (H, W): 16-bit scaled by its own range, palette and RGBA converted, EXIF applied."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(image, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) * (255.0 / max(hi - lo, 1e-6))
        image = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        bg = Image.new("RGB", image.size, (0, 0, 0))
        bg.paste(image.convert("RGBA"), mask=image.getchannel("A"))
        image = bg
    return np.asarray(image.convert("L" if channels == 1 else "RGB"))


def set_pixel_cap(max_pixels: int = MAX_PIXELS) -> None:
    """Refuse to open a frame of more than ``max_pixels`` pixels (a ``DecompressionBombError``, which :func:`why`
    words with the cap). Pillow warns above ``MAX_IMAGE_PIXELS`` and refuses above twice that: the cap is set to half
    ``max_pixels``, so the refusal comes at ``max_pixels`` itself, and Pillow's warning below it is silenced."""
    _cap[0] = max_pixels
    Image.MAX_IMAGE_PIXELS = max_pixels // 2 if max_pixels % 2 == 0 else max_pixels / 2
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def open_image(path: Path) -> Callable[[], Image.Image]:
    # From its bytes, not its path: Pillow (13) applies a TIFF's EXIF orientation as it loads, but from a path it
    # drops the tag without turning the pixels, so a rotated TIFF would load in its stored orientation.
    def load() -> Image.Image:
        if path.is_symlink() and not path.exists():
            raise FileNotFoundError(f"a symbolic link to {os.readlink(path)}, which does not exist")
        return _open_bytes(path.read_bytes(), str(path))
    return load


def _open_bytes(data: bytes, name: str) -> Image.Image:
    """``Image.open`` of in-memory bytes whose error names ``name`` (Pillow's would show ``<_io.BytesIO ...>``)."""
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        what = "empty (0 bytes)" if not data else "not an image in a format Pillow reads"
        raise UnidentifiedImageError(f"cannot identify image {name!r}: {what}" if name else
                                     f"cannot identify the image: {what}") from None


def translucent(image: Image.Image) -> bool:
    """Whether a frame holds a pixel with alpha < 255 (RGBA, LA, or a palette with a transparent entry), which
    :func:`to_array` blends onto black."""
    if image.mode in ("RGBA", "LA"):
        return image.getchannel("A").getextrema()[0] < 255
    if image.mode == "P" and "transparency" in image.info:
        return image.convert("RGBA").getchannel("A").getextrema()[0] < 255
    return False


def shown_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after ``ImageOps.exif_transpose`` (EXIF orientations 5-8 swap them)."""
    if image.format == "TIFF":  # Pillow's TIFF plugin turns the pixels itself as it loads and drops the tag: its
        image.load()  # size before loading is the displayed one in some Pillow versions, the stored one in others
    w, h = image.size
    return (h, w) if image.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8) else (w, h)


def mask_array(image: Image.Image) -> np.ndarray:
    """A mask image as a uint8 (H, W) map of its values, in the displayed (EXIF-transposed) orientation, the one its
    image is shown and annotated in: L as is; P by palette index (the index is the class, whatever colour it shows);
    1-bit as 0/255; 16-bit as is, 0/65535 as 0/255; gray RGB, RGBA or LA by their gray. A colour-coded mask, a value
    over 255 or another mode is a ValueError that says so."""
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode == "1":
        return np.asarray(image, dtype=np.uint8) * np.uint8(255)
    if image.mode in ("L", "P"):
        return np.asarray(image, dtype=np.uint8)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(image)
        if a.size and set(np.unique(a).tolist()) <= {0, 65535}:  # a 16-bit binary mask
            return (a > 0).astype(np.uint8) * np.uint8(255)
        if a.size and (int(a.min()) < 0 or int(a.max()) > 255):
            raise ValueError(f"{image.mode} mask holds values {int(a.min())}..{int(a.max())}; class ids are 0..255")
        return a.astype(np.uint8)
    if image.mode in ("LA", "RGB", "RGBA"):
        a = np.asarray(image.convert("RGB"))
        if not (np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])):
            raise ValueError(f"colour-coded {image.mode} mask: store class ids as a gray (L) or palette (P) PNG")
        return np.ascontiguousarray(a[..., 0])
    raise ValueError(f"mask mode {image.mode} is not supported (L, P, 1, 16-bit, gray RGB)")


def why(e: Exception) -> str:
    """An exception for a problem line: its text, with its type when that is not an I/O or value error; a frame over
    the pixel cap as its size against ``max_pixels``."""
    if isinstance(e, Image.DecompressionBombError):
        found = re.search(r"\((\d+) pixels\)", str(e))
        return f"{found.group(1) + ' pixels' if found else 'a frame'}, more than the max_pixels cap of {_cap[0]}"
    return str(e) if isinstance(e, (OSError, ValueError)) and str(e) else f"{type(e).__name__}: {e}"


def png_mask(path: Path, binary_to: int | None, void: bool = False) -> Callable[[tuple[int, int]], np.ndarray]:
    """A mask file's class map; 0/255 masks as 0/``binary_to``; with ``void``, 255 in a palette mask (Pascal VOC's
    void / boundary band) as background."""
    def load(size):
        with Image.open(path) as im:
            m = mask_array(im)
            if void and im.mode == "P":
                m = np.where(m == 255, np.uint8(0), m)
        return (m > 127).astype(np.uint8) * binary_to if binary_to else m
    return load


def read_rows(path: Path, columns: tuple[str, str]) -> list[tuple[int, str, str]]:
    """(line, first column, second column) of each row of a two-column CSV (UTF-8, a BOM allowed); a file that is
    not UTF-8, lacks the header or holds a row without both values is a DataError naming it."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None or not set(columns) <= {c.strip() for c in reader.fieldnames}:
        raise DataError(f"{path} must have the header {','.join(columns)}, got {reader.fieldnames}")
    reader.fieldnames = [c.strip() for c in reader.fieldnames]
    rows = []
    for row in reader:
        a, b = row[columns[0]], row[columns[1]]
        if a is None or b is None or not a.strip():
            raise DataError(f"{path} line {reader.line_num}: a row needs both {' and '.join(columns)}, got "
                            f"{','.join(v for v in row.values() if isinstance(v, str))!r}")
        rows.append((reader.line_num, a.strip(), b.strip()))
    return rows


def read_csv(path: Path, columns: tuple[str, str]) -> dict[str, str]:
    return {a: b for _, a, b in read_rows(path, columns)}


def order_classes(names: set[str]) -> list[str]:
    good = [n for n in sorted(names) if n.lower() in GOOD_NAMES]
    return good[:1] + sorted(n for n in names if n not in good[:1])


def bytes_image(data: bytes, name: str = "") -> Callable[[], Image.Image]:
    """A loader of an image held in memory; ``name`` (its file, shard or sample key) is what its errors name."""
    return lambda: _open_bytes(data, name)


def bytes_mask(data: bytes) -> Callable[[tuple[int, int]], np.ndarray]:
    def load(size):
        with _open_bytes(data, "") as im:
            return mask_array(im)
    return load


