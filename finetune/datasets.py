"""Real, high-resolution data in the layouts users have, validated before any training starts.

Formats (detected from the folder, or named with ``fmt``):

- ``canonical``: ``images/<id>.<ext>``, optional ``masks/<id>.png`` (0 = background, k = class k, or 0/255 binary;
  palette masks with other classes, Pascal VOC's ``SegmentationClass``, read 255 = void as background), optional
  ``labels.csv`` (``id,label``); optional ``classes.txt`` names the mask classes (one per line, background first);
- ``imagefolder``: ``<class>/<image>`` (classification only; id ``<class>/<stem>``);
- ``labelme``: JSONs at the root or one folder down (``labelme --output``), each with its image (``imagePath``
  relative to the JSON, either slash) or embedded ``imageData``; see :mod:`finetune.annotations` (label = class name);
- ``coco``: an instance-segmentation JSON (``annotations.json``/``instances*.json`` or any ``*.json`` with
  ``images``, ``annotations``, ``categories``) with polygons, RLE or bboxes, images beside it or under ``images/``;
- ``hf``: a Hugging Face ``datasets`` folder saved with ``save_to_disk`` (columns ``image``, optional ``mask``,
  optional ``label``);
- ``shards``: a ``synthvit generate`` output folder (``_info.json`` + WebDataset shards), e.g. a procedural
  stand-in for real frames; masks and labels come from the shard contract, the encoded samples are held in memory.

Images may be 8- or 16-bit grayscale, RGB, RGBA or palette, with EXIF orientation, up to ``max_pixels``
(Pillow's decompression-bomb guard is raised to that cap only). Every problem found in a folder is reported at
once: one :class:`DataError` listing the first 20 offending files and the count.

The split, for every format: ``splits.csv`` (``id,split``, split train or test) at the data root, its unlisted ids
an error or ``split_missing``; else :func:`split_ids` draws a seeded split stratified by image label, or by defect
presence in the mask when there are no labels.
"""
from __future__ import annotations

import csv
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

from finetune.annotations import (GOOD_LABEL, IMAGE_EXTS, MAX_CLASSES, is_file, is_labelme, labelme_jsons,
                                  portable_path, read_coco, read_labelme, shapes_mask)
from finetune.annotations import rle_decode  # noqa: F401  (here since before finetune.annotations)
from generate.schema import CLS_KEY, IMAGE_KEYS, INFO_FILE, MASK_KEY, SPLIT, iter_members, read_info
from synthvit.io import SynthvitError
from synthvit.storage import Folder, is_url, redact

GOOD_NAMES = ("good", "free", "ok", "normal", "defect-free", "defect_free", "none", "background")
SHOWN = 20
EXIF_ORIENTATION = 0x0112
log = logging.getLogger("synthvit.finetune.data")


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


def set_pixel_cap(max_pixels: int) -> None:
    Image.MAX_IMAGE_PIXELS = max_pixels


def _open(path: Path) -> Callable[[], Image.Image]:
    # From its bytes, not its path: Pillow (13) applies a TIFF's EXIF orientation as it loads, but from a path it
    # drops the tag without turning the pixels, so a rotated TIFF would load in its stored orientation.
    return lambda: Image.open(io.BytesIO(path.read_bytes()))


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


def _why(e: Exception) -> str:
    """An exception for a problem line: its text, with its type when that is not an I/O or value error."""
    return str(e) if isinstance(e, (OSError, ValueError)) and str(e) else f"{type(e).__name__}: {e}"


def _png_mask(path: Path, binary_to: int | None, void: bool = False) -> Callable[[tuple[int, int]], np.ndarray]:
    """A mask file's class map; 0/255 masks as 0/``binary_to``; with ``void``, 255 in a palette mask (Pascal VOC's
    void / boundary band) as background."""
    def load(size):
        with Image.open(path) as im:
            m = mask_array(im)
            if void and im.mode == "P":
                m = np.where(m == 255, np.uint8(0), m)
        return (m > 127).astype(np.uint8) * binary_to if binary_to else m
    return load


# ---------------------------------------------------------------------------------------------- formats
def _read_rows(path: Path, columns: tuple[str, str]) -> list[tuple[int, str, str]]:
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


def _read_csv(path: Path, columns: tuple[str, str]) -> dict[str, str]:
    return {a: b for _, a, b in _read_rows(path, columns)}


def _order_classes(names: set[str]) -> list[str]:
    good = [n for n in sorted(names) if n.lower() in GOOD_NAMES]
    return good[:1] + sorted(n for n in names if n not in good[:1])


def _canonical(root: Path, problems: list[str]) -> RealData:
    images: dict[str, Path] = {}
    for p in _visible_files(root / "images", IMAGE_EXTS):
        if p.stem in images:
            problems.append(f"images/{p.name}: a second image with the id {p.stem!r} (images/{images[p.stem].name})")
        images.setdefault(p.stem, p)
    labelled = (root / "labels.csv").is_file()
    try:
        labels = _read_csv(root / "labels.csv", ("id", "label")) if labelled else {}
    except DataError as e:  # one error for the whole folder: listed with the others
        problems.append(str(e))
        labels, labelled = {}, False
    problems += [f"labels.csv: id {i!r} has no image in images/" for i in sorted(set(labels) - set(images))]
    if labelled:  # an unlabelled image would train with no class (label_index -1)
        problems += [f"labels.csv: no label for images/{p.name}" for i, p in images.items() if not labels.get(i)]
    masks_dir = root / "masks"
    masks: dict[str, Path] = {}
    for p in _visible_files(masks_dir, IMAGE_EXTS) if masks_dir.is_dir() else []:
        if p.suffix.lower() != ".png":  # ignored, its image would train as defect-free
            problems.append(f"masks/{p.name}: masks must be PNG (lossless class ids), not {p.suffix}")
        elif p.stem in masks:
            problems.append(f"masks/{p.name}: a second mask for the id {p.stem!r} (masks/{masks[p.stem].name})")
        else:
            masks[p.stem] = p
    problems += [f"masks/{masks[i].name}: no image with id {i!r}" for i in sorted(set(masks) - set(images))]
    seg_classes: list[str] = []
    binary, void = None, False
    if masks:
        names_file = root / "classes.txt"
        try:
            seg_classes = [ln.strip() for ln in names_file.read_text().splitlines() if ln.strip()] \
                if names_file.is_file() else []
        except (OSError, UnicodeDecodeError) as e:
            problems.append(f"classes.txt: unreadable, one class name a line in UTF-8 ({e})")
        per_mask, palette = {}, set()
        for i, p in masks.items():
            try:
                with Image.open(p) as im:
                    per_mask[i] = set(np.unique(mask_array(im)).tolist())
                    if im.mode == "P":
                        palette.add(i)
            except Exception as e:
                problems.append(f"masks/{p.name}: unreadable ({_why(e)})")
        # Pascal VOC's SegmentationClass: palette masks of class ids with 255 = void (object boundaries), which
        # training, having no ignore label, reads as background
        void = any(per_mask[i] - {0, 255} for i in palette) and any(255 in per_mask[i] for i in palette)
        if void:
            per_mask.update({i: per_mask[i] - {255} for i in palette})
        values = set().union(*per_mask.values()) if per_mask else {0}
        binary = 1 if 255 in values and not seg_classes else None
        if binary:  # 0/255 masks: any other value is a mistake, not a class
            problems += [f"masks/{masks[i].name}: values {sorted(v - {0, 255})} in binary (0/255) masks"
                         for i, v in sorted(per_mask.items()) if v - {0, 255}]
        if not seg_classes:
            seg_classes = ["background", "defect"] if binary else ["background"] + [
                f"class_{k}" for k in range(1, int(max(values | {1})) + 1)]
    items = [Item(i, str(p), _open(p), labels.get(i),
                  _png_mask(masks[i], binary, void) if i in masks else (_empty_mask if masks else None))
             for i, p in images.items()]
    cls = _order_classes({lab for lab in labels.values()}) if labels else []
    return RealData(root, "canonical", items, seg_classes, cls)


def _empty_mask(size):
    return np.zeros((size[1], size[0]), np.uint8)


def image_files(folder: Path) -> list[Path]:
    """Every image under ``folder`` (recursive, sorted); hidden files and folders are not data."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _visible_files(folder: Path, exts: tuple[str, ...]) -> list[Path]:
    """Files of ``folder`` with one of ``exts`` (any case), sorted; hidden ones (``.x``, macOS ``._x.png`` forks,
    temporary files) are not data."""
    return [p for p in sorted(folder.iterdir())
            if p.suffix.lower() in exts and not p.name.startswith(".") and not p.is_dir()]


def _imagefolder(root: Path, problems: list[str]) -> RealData:
    items = []
    seen: dict[str, Path] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for p in _visible_files(d, IMAGE_EXTS):
            i = f"{d.name}/{p.stem}"
            if i in seen:
                problems.append(f"{d.name}/{p.name}: a second image with the id {i!r} ({d.name}/{seen[i].name})")
                continue
            seen[i] = p
            items.append(Item(i, str(p), _open(p), d.name))
    return RealData(root, "imagefolder", items, [], _order_classes({i.label for i in items}))


def _labelme(root: Path, problems: list[str]) -> RealData:
    files = [f for j in labelme_jsons(root) if (f := read_labelme(j, root, problems)) is not None]
    names = sorted({label for f in files for label, _, _ in f.shapes})
    index = {n: k + 1 for k, n in enumerate(names)}
    items: list[Item] = []
    seen: dict[str, str] = {}
    skipped: list[str] = []
    for f in files:
        name = f.json.relative_to(root).as_posix()
        over = sorted({label for label, _, _ in f.shapes if index[label] > MAX_CLASSES})
        if over:
            problems.append(f"{name}: labels {', '.join(over[:3])} go beyond the {MAX_CLASSES} classes a uint8 mask "
                            f"holds ({len(names)} labels in all)")
        if f.points_skipped:
            skipped.append(f"{name} ({f.points_skipped})")
        if f.id in seen:
            problems.append(f"{name}: a second annotation of the image id {f.id!r} ({seen[f.id]})")
            continue
        seen[f.id] = name
        load, source = (_open(f.image), str(f.image)) if f.image else (_bytes_image(f.image_data),
                                                                        f"{f.json}#imageData")
        items.append(Item(f.id, source, load, None, shapes_mask([(index[lab], k, pts) for lab, k, pts in f.shapes])))
    if skipped:
        log.warning("labelme: %d point shape(s) skipped, a point marks no area: %s",
                    sum(f.points_skipped for f in files), ", ".join(skipped[:10]))
    return RealData(root, "labelme", items, ["background", *names] if names else [], [])


def _coco_file(root: Path) -> Path | None:
    """``annotations.json`` or ``instances*.json`` at the root (by name: a broken one is reported, not passed over),
    else the first JSON at the root or in ``annotations/`` holding ``images``, ``annotations`` and ``categories``."""
    named = next((p for p in [root / "annotations.json", *sorted(root.glob("instances*.json"))] if p.is_file()), None)
    if named is not None:
        return named
    for j in sorted(root.glob("*.json")) + sorted((root / "annotations").glob("*.json")):
        try:
            head = json.loads(j.read_bytes().decode("utf-8-sig"))
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(head, dict) and "shapes" in head:  # labelme
            return None
        if isinstance(head, dict) and {"images", "annotations", "categories"} <= set(head):
            return j
    return None


def _coco(root: Path, problems: list[str]) -> RealData:
    path = _coco_file(root)
    if path is None:
        problems.append("no COCO file (annotations.json, instances*.json, or a JSON holding images, annotations "
                        "and categories, at the root or in annotations/)")
        return RealData(root, "coco", [])
    name = path.relative_to(root).as_posix()
    coco = read_coco(path, name, problems)
    if coco is None:
        return RealData(root, "coco", [])
    folders = [root, root / "images", path.parent, *sorted(d for d in root.iterdir() if d.is_dir()
                                                           and not d.name.startswith(".") and d.name != "images")]
    items: list[Item] = []
    seen: dict[str, str] = {}
    for im in coco.images:
        rel = portable_path(im.file_name)
        p = next((d / rel for d in folders if is_file(d / rel)), None)
        if p is None:
            problems.append(f"{name}: image {im.file_name!r} (id {im.id}) not found at the root, under images/ or "
                            f"beside {name}")
        elif rel.stem in seen:
            problems.append(f"{name}: images {seen[rel.stem]!r} and {im.file_name!r} have one id {rel.stem!r}")
        else:
            seen[rel.stem] = im.file_name
            label = coco.classes[im.label_class - 1] if im.label_class else GOOD_LABEL
            items.append(Item(rel.stem, str(p), _open(p), label, shapes_mask(im.shapes)))
    refused = ""
    if coco.bbox_only:
        ids = ", ".join(map(str, coco.bbox_only[:5])) + (", ..." if len(coco.bbox_only) > 5 else "")
        refused = (f"{path}: {len(coco.bbox_only)} annotation(s) (id {ids}) have a bbox and no segmentation; use "
                   f"task=cls or add segmentations (polygons or RLE)")
    return RealData(root, "coco", items, [] if refused else ["background", *coco.classes],
                    _order_classes({it.label for it in items}), masks_refused=refused)


def _hf(root: Path, problems: list[str]) -> RealData:
    import datasets

    try:
        ds = datasets.load_from_disk(str(root))
        if isinstance(ds, datasets.DatasetDict):
            ds = datasets.concatenate_datasets(list(ds.values()))
        raw_labels = list(ds["label"]) if "label" in ds.column_names else None
    except Exception as e:  # a half-written or foreign folder: no state.json, a corrupt arrow file or JSON ...
        problems.append(f"{root.name}: not a readable datasets save_to_disk folder ({_why(e)})")
        return RealData(root, "hf", [])
    if "image" not in ds.column_names:
        problems.append(f"{root.name}: a datasets folder needs an 'image' column; it has {ds.column_names}")
        return RealData(root, "hf", [])
    feature = ds.features.get("label")
    label_names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    images = ds.select_columns(["image"])
    masks = ds.select_columns(["mask"]) if "mask" in ds.column_names else None
    seg: list[str] = []
    binary = False
    if masks is not None:  # classes from the values, as in the canonical layout (0/255: binary)
        per_mask = {}
        for i in range(len(ds)):
            try:
                m = _hf_mask_values(masks, i)
            except Exception:
                continue  # validate lists it as an unreadable mask
            if m is not None:
                per_mask[i] = set(np.unique(m).tolist())
        values = set().union(*per_mask.values()) if per_mask else {0}
        binary = 255 in values
        if binary:
            problems += [f"{root}#{i}: mask values {sorted(v - {0, 255})} in binary (0/255) masks"
                         for i, v in sorted(per_mask.items()) if v - {0, 255}]
        top = int(max(values))
        seg = ["background", "defect"] if binary or top <= 1 else ["background"] + [
            f"class_{k}" for k in range(1, top + 1)]
    items = []
    for i in range(len(ds)):
        label = None
        if raw_labels is not None:
            v = raw_labels[i]
            if label_names is not None and isinstance(v, int) and 0 <= v < len(label_names):
                label = label_names[v]
            elif label_names is None and v is not None:
                label = str(v)
            else:  # None, or ClassLabel's -1 (no label): it would train with no class
                problems.append(f"{root}#{i}: no label (label {v!r}; classes {label_names or 'any value'})")
        items.append(Item(f"{i:06d}", f"{root}#{i}", _hf_image(images, i), label,
                          _hf_mask(masks, i, binary) if masks is not None else None))
    cls = _order_classes({it.label for it in items if it.label is not None}) if raw_labels is not None else []
    return RealData(root, "hf", items, seg, cls)


def _hf_image(images, i: int) -> Callable[[], Image.Image]:
    def load():
        im = images[i]["image"]
        if not isinstance(im, Image.Image):
            raise ValueError("no image in this row" if im is None else f"the image column holds {type(im).__name__}")
        return im
    return load


def _hf_mask_values(masks, i: int) -> np.ndarray | None:
    m = masks[i]["mask"]
    if m is None:  # no mask: defect-free, like an image without a mask file
        return None
    if not isinstance(m, Image.Image):
        raise ValueError(f"the mask column holds {type(m).__name__}")
    return mask_array(m)


def _hf_mask(masks, i: int, binary: bool) -> Callable[[tuple[int, int]], np.ndarray]:
    def load(size):
        m = _hf_mask_values(masks, i)
        if m is None:
            return np.zeros((size[1], size[0]), np.uint8)
        return (m > 127).astype(np.uint8) if binary else m
    return load


def _bytes_image(data: bytes) -> Callable[[], Image.Image]:
    return lambda: Image.open(io.BytesIO(data))


def _bytes_mask(data: bytes) -> Callable[[tuple[int, int]], np.ndarray]:
    def load(size):
        with Image.open(io.BytesIO(data)) as im:
            return mask_array(im)
    return load


def _shards(root: Path | str, problems: list[str]) -> RealData:
    """synthvit shards in a local folder or at an object-store URL (read through synthvit.storage)."""
    folder = Folder(root)
    manifest = f"{folder}/{INFO_FILE}"
    try:
        info = read_info(folder)
        names, split = info["class_names"], info["splits"][SPLIT]
        filenames, lengths = split["filenames"], split["shard_lengths"]
        if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
            raise SynthvitError(f"{manifest}: class_names must be a list of names, got {str(names)[:60]}")
        if not (isinstance(filenames, list) and all(isinstance(f, str) for f in filenames)
                and isinstance(lengths, list) and len(lengths) == len(filenames)
                and all(isinstance(n, int) for n in lengths)):
            raise SynthvitError(f"{manifest}: splits.{SPLIT} must hold a list of shard filenames and one "
                                f"shard_lengths count each, got {str(filenames)[:60]} and {str(lengths)[:60]}")
    except SynthvitError as e:
        problems.append(str(e))
        return RealData(root, "shards", [])
    except Exception as e:  # a JSON of the wrong shape: a list, a number, splits that are not a dict ...
        problems.append(f"{manifest}: not a synthvit shards manifest ({_why(e)})")
        return RealData(root, "shards", [])
    items = []
    for filename, expected in zip(filenames, lengths):
        count = 0
        try:
            with folder.open(filename) as stream:
                shard = list(iter_members(stream))
            for m in shard:
                count += 1
                where = f"{filename}#{m['__key__']}"
                image_key = next((k for k in IMAGE_KEYS if k in m), None)
                if image_key is None or MASK_KEY not in m or CLS_KEY not in m:
                    problems.append(f"{where}: lacks jpg|png, {MASK_KEY} or {CLS_KEY}")
                    continue
                try:
                    cls = int(m[CLS_KEY])
                except ValueError:
                    cls = -1
                if not 0 <= cls < len(names):
                    problems.append(f"{where}: cls {m[CLS_KEY][:20]!r} is not a class id 0..{len(names) - 1}")
                    continue
                items.append(Item(m["__key__"], f"{folder.url(filename)}#{m['__key__']}", _bytes_image(m[image_key]),
                                  names[cls], _bytes_mask(m[MASK_KEY])))
        except Exception as e:  # missing, truncated or not a tar; a member name without an extension ...
            problems.append(f"{filename}: unreadable shard ({_why(e)})")
            continue
        if count != expected:
            problems.append(f"{filename}: holds {count} samples, {INFO_FILE} says {expected}")
    return RealData(root, "shards", items, ["background", *names[1:]], list(names))


FORMATS = {"canonical": _canonical, "imagefolder": _imagefolder, "labelme": _labelme, "coco": _coco, "hf": _hf,
           "shards": _shards}


def _only_json(folder: Path) -> bool:
    """A folder of JSONs and no images (``labelme --output``), not a class folder."""
    files = [f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")]
    return any(f.suffix.lower() == ".json" for f in files) and not any(
        f.suffix.lower() in IMAGE_EXTS for f in files)


def detect_format(root: Path) -> str:
    if (root / INFO_FILE).is_file():
        return "shards"
    if (root / "dataset_info.json").is_file() or (root / "dataset_dict.json").is_file():
        return "hf"
    if _coco_file(root) is not None:
        return "coco"
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return "canonical"
    if any(is_labelme(j) for j in labelme_jsons(root)[:20]):  # beside the images, or one folder down
        return "labelme"
    if (root / "images").is_dir():
        return "canonical"
    if list(root.glob("*.json")) or any(_only_json(d) for d in root.iterdir() if d.is_dir()):
        return "labelme"  # JSONs that are all unreadable: labelme still, so that the error names them
    if any(p.is_dir() for p in root.iterdir()):
        return "imagefolder"
    raise DataError(f"{root}: no known layout (images/ folder, class folders, labelme or COCO JSON, or a "
                    f"datasets save_to_disk folder, or synthvit shards with _info.json)")


def load_real_data(root: str | Path, fmt: str = "auto", check: bool = True, max_pixels: int = 8192 * 8192,
                   split_missing: str = "error") -> RealData:
    """The data of ``root`` with its ``splits.csv`` applied (``split_missing``: images it does not list are an error,
    or go to train or test), validated unless ``check`` is false; every problem found in one :class:`DataError`."""
    if split_missing not in SPLIT_MISSING:
        raise ValueError(f"split_missing={split_missing!r}; use one of {', '.join(SPLIT_MISSING)}")
    if is_url(root):  # an object store holds synthvit shards only (the folder layouts need a file system)
        if fmt not in ("auto", "shards"):
            raise DataError(f"data {redact(str(root))}: a URL holds synthvit shards (format=shards); format={fmt} "
                            f"needs a local folder")
        root, fmt = str(root).rstrip("/"), "shards"
    else:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"data folder {root} does not exist")
        if not any(root.iterdir()):
            raise DataError(f"data folder {root} is empty")
    set_pixel_cap(max_pixels)
    fmt = detect_format(root) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise DataError(f"format {fmt!r} is not known; use auto or one of {', '.join(FORMATS)}")
    problems: list[str] = []
    data = FORMATS[fmt](root, problems)
    if not data.items:
        problems.append(f"no images found ({fmt} layout)")
    else:
        data.splits = read_splits(data, split_missing, problems)
    if check:
        problems += validate(data)
    if problems:
        raise problems_error(root, problems)
    return data


def validate(data: RealData) -> list[str]:
    """Decode every image (and mask) once, as training reads them: unreadable, truncated or corrupt files, pixel
    formats that do not convert, size mismatches (masks are in the displayed, EXIF-transposed orientation) and
    out-of-range mask values. Whatever a file raises becomes a problem naming it, never a raw exception."""
    problems = []
    for item in data.items:
        try:
            with item.load() as im:
                im.load()  # decodes: truncated and corrupt files fail here
                size = shown_size(im)
                to_array(im.crop((0, 0, 1, 1)))  # its pixel format converts the way training converts it
        except Exception as e:  # PIL raises OSError, SyntaxError, struct.error, DecompressionBombError ...
            problems.append(f"{item.source}: unreadable image ({_why(e)})")
            continue
        if item.mask is None or not data.seg_classes:  # no mask classes (labelme without shapes): no masks to check
            continue
        try:
            mask = item.mask(size)
        except Exception as e:
            problems.append(f"{item.source}: unreadable mask ({_why(e)})")
            continue
        if mask.shape != (size[1], size[0]):
            problems.append(f"{item.source}: mask is {mask.shape[1]}x{mask.shape[0]}, image is {size[0]}x{size[1]}")
        elif mask.size and int(mask.max()) >= len(data.seg_classes):
            problems.append(f"{item.source}: mask value {int(mask.max())} outside the classes "
                            f"0..{len(data.seg_classes) - 1} ({', '.join(data.seg_classes)})")
        item.defect = bool(mask.any())  # read once here for the split's strata
    return problems


# ---------------------------------------------------------------------------------------------- splits
SPLITS_FILE = "splits.csv"
SPLIT_NAMES = ("train", "test")
SPLIT_MISSING = ("error", "train", "test")


def read_splits(data: RealData, split_missing: str, problems: list[str]) -> dict[str, str]:
    """id -> split of every item from ``splits.csv`` at the data root ({} without one). Rows with a split other than
    train or test, an id listed with both, ids of no item and (``split_missing=error``) items it does not list are
    problems; with ``split_missing`` train or test, unlisted items go there."""
    if isinstance(data.root, str):  # shards at a URL: no splits.csv beside them (a seeded split is made)
        return {}
    path = data.root / SPLITS_FILE
    if not path.is_file():
        return {}
    try:
        rows = _read_rows(path, ("id", "split"))
    except DataError as e:
        problems.append(str(e))
        return {}
    ids = {item.id for item in data.items}
    listed: dict[str, tuple[str, int]] = {}  # id -> (split, line)
    bad: set[str] = set()
    for line, i, split in rows:
        if split.lower() not in SPLIT_NAMES:
            problems.append(f"{SPLITS_FILE} line {line}: split {split!r} of id {i!r} is neither train nor test")
            bad.add(i)
        elif i in listed and listed[i][0] != split.lower():
            problems.append(f"{SPLITS_FILE}: id {i!r} is listed as {listed[i][0]} (line {listed[i][1]}) and "
                            f"{split.lower()} (line {line})")
        else:
            listed.setdefault(i, (split.lower(), line))
    problems += [f"{SPLITS_FILE}: id {i!r} is not an image of the data ({data.fmt} ids: {_id_hint(data)})"
                 for i in sorted((set(listed) | bad) - ids)]
    unlisted = [item.id for item in data.items if item.id not in listed and item.id not in bad]
    if unlisted and split_missing == "error":
        shown = ", ".join(repr(i) for i in unlisted[:10]) + (f" and {len(unlisted) - 10} more" if len(unlisted) > 10
                                                              else "")
        problems.append(f"{SPLITS_FILE} lists no split for {len(unlisted)} image(s): {shown}; list them, or set "
                        f"split_missing=train or split_missing=test")
    return {item.id: listed[item.id][0] if item.id in listed else split_missing for item in data.items}


def _id_hint(data: RealData) -> str:
    return {"canonical": "image file stems", "imagefolder": "<class folder>/<file stem>",
            "labelme": "image file stems", "coco": "file_name stems", "hf": "row numbers as 000000",
            "shards": "sample keys"}.get(data.fmt, "")


def split_ids(data: RealData, test_fraction: float, seed: int) -> dict[str, str]:
    """id -> train or test: ``data.splits`` (``splits.csv``) when the data has one; otherwise a seeded split
    stratified by image label when the data has labels, else by defect presence in the mask (one stratum without
    masks), ``test_fraction`` of each stratum to ``test``."""
    if data.splits:
        missing = [i.id for i in data.items if data.splits.get(i.id) not in SPLIT_NAMES]
        if missing:
            raise DataError(f"{data.root / SPLITS_FILE} lists no split for {len(missing)} image(s), e.g. "
                            f"{missing[0]!r}; list them, or set split_missing=train or split_missing=test")
        return {i.id: data.splits[i.id] for i in data.items}
    strata: dict[str, list[str]] = {}
    for item in data.items:
        strata.setdefault(_stratum(data, item), []).append(item.id)
    rng = np.random.default_rng(seed)
    out = {}
    for key in sorted(strata):
        ids = sorted(strata[key])
        rng.shuffle(ids)
        n_test = int(round(len(ids) * test_fraction)) if len(ids) > 1 else 0
        out.update({i: ("test" if k < n_test else "train") for k, i in enumerate(ids)})
    return out


def _stratum(data: RealData, item: Item) -> str:
    if data.has_labels:
        return item.label if item.label is not None else "all"
    if data.has_masks:
        return "defect" if has_defect(item) else "defect-free"
    return "all"


def has_defect(item: Item) -> bool:
    """Whether the item's mask holds a defect pixel: recorded by :func:`validate`, else read now (once)."""
    if item.defect is None:
        if item.mask is None:
            item.defect = False
        else:
            with item.load() as im:
                size = shown_size(im)
            item.defect = bool(item.mask(size).any())
    return item.defect


def describe_split(data: RealData, split: dict[str, str]) -> list[str]:
    """One line per split: where it comes from, its images, their image classes and defect presence."""
    source = SPLITS_FILE if data.splits else "seeded, " + (
        "stratified by label" if data.has_labels else "stratified by defect presence" if data.has_masks else "random")
    lines = []
    for name in SPLIT_NAMES:
        items = [i for i in data.items if split.get(i.id) == name]
        parts = [f"{len(items)} images"]
        if data.has_labels:
            counts = Counter(i.label for i in items)
            parts.append(", ".join(f"{c} {counts[c]}" for c in data.cls_classes))
        if data.has_masks:
            n = sum(has_defect(i) for i in items)
            parts.append(f"{n} with a defect, {len(items) - n} defect-free")
        lines.append(f"{name} split ({source}): " + "; ".join(parts))
    return lines
