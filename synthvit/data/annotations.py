"""labelme and COCO annotation files read the way their tools write them, and rasterised to class maps.

Every malformed entry becomes a problem line naming the file, the entry and what is wrong (the caller reports them
all in one :class:`synthvit.data.DataError`); valid shapes become ``(class id, kind, geometry)`` tuples that
:func:`shapes_mask` draws in file order, later shapes over earlier ones.

- labelme: ``imagePath`` relative to the JSON, with either slash (``../images/a.jpg`` or ``..\\images\\a.jpg``),
  else the image beside the JSON (its file name, or the JSON's stem), else the embedded ``imageData``; shapes
  ``polygon`` (3+ points), ``rectangle`` (2 corners, in either order), ``circle`` (centre and a point on the circle),
  ``line`` (2 points) and ``linestrip`` (2+ points) drawn ``LINE_WIDTH`` px wide; ``point`` marks no area and is
  skipped with a warning; shapes sharing a ``group_id`` are one instance, which a class map does not distinguish.
- COCO: polygons, RLE (``iscrowd``; compressed string or uncompressed list counts), bbox-only annotations (no
  masks: segmentation is refused, classification is fine); an image without annotations is defect-free. Its image
  label is the category covering most of its annotated area (``area``, else the bbox), ``good`` without annotations.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger("synthvit.finetune.data")

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
LINE_WIDTH = 3  # px: labelme line and linestrip shapes (labelme's own exporter draws them 10 px wide)
MAX_CLASSES = 255  # classes after background that a uint8 class map holds
COORD_LIMIT = 1e6  # coordinates are clipped to +-this before drawing (Pillow draws with C ints)
GOOD_LABEL = "good"  # the image label of a COCO image without annotations
LABELME_POINTS = {"polygon": (3, None), "rectangle": (2, 2), "circle": (2, 2), "line": (2, 2),
                  "linestrip": (2, None), "point": (1, 1)}  # shape_type -> (fewest, most) points
Shape = tuple[int, str, object]  # (class id, polygon|rectangle|circle|line|rle, geometry: flat xy or (RLE, where))


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(values) -> bool:
    """Whether every number of ``values`` is a finite float (an int past float's range is not)."""
    try:
        return all(math.isfinite(v) for v in values)
    except OverflowError:
        return False


def portable_path(path: str) -> PurePosixPath:
    """A path as written on Windows or POSIX (``..\\images\\a.png`` or ``../images/a.png``)."""
    return PurePosixPath(path.replace("\\", "/"))


UNREADABLE = object()


def _read_json(path: Path, name: str, problems: list[str]):
    """The parsed JSON of ``path``, or UNREADABLE with the problem listed (not UTF-8, not JSON)."""
    try:
        return json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        problems.append(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})")
    except (json.JSONDecodeError, RecursionError) as e:
        problems.append(f"{name}: not valid JSON ({e})")
    except OSError as e:
        problems.append(f"{name}: unreadable ({e})")
    return UNREADABLE


# ---------------------------------------------------------------------------------------------- rasterising
def shapes_mask(shapes: list[Shape]) -> Callable[[tuple[int, int]], np.ndarray]:
    """(width, height) -> uint8 (H, W) class map of ``shapes``, drawn in order on a background of 0."""
    def load(size):
        w, h = size
        canvas = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(canvas)
        for cls, kind, data in shapes:
            if kind == "rle":  # data: (the RLE, which annotation of which file, for messages)
                try:
                    decoded = rle_decode(data[0], h, w)
                except ValueError as e:
                    raise ValueError(f"{data[1]}: {e}") from None
                out = np.asarray(canvas).copy()
                out[decoded > 0] = cls
                canvas = Image.fromarray(out)
                draw = ImageDraw.Draw(canvas)
                continue
            xy = np.clip(np.asarray(data, np.float64), -COORD_LIMIT, COORD_LIMIT).reshape(-1, 2)
            if kind == "polygon":
                draw.polygon([tuple(p) for p in xy], fill=cls)
            elif kind == "rectangle":
                draw.rectangle([*xy.min(0), *xy.max(0)], fill=cls)
            elif kind == "circle":
                r = min(float(np.hypot(*(xy[1] - xy[0]))), COORD_LIMIT)
                draw.ellipse([xy[0, 0] - r, xy[0, 1] - r, xy[0, 0] + r, xy[0, 1] + r], fill=cls)
            elif kind == "line":
                draw.line([tuple(p) for p in xy], fill=cls, width=LINE_WIDTH, joint="curve")
        return np.asarray(canvas)
    return load


def rle_decode(rle: dict, height: int, width: int) -> np.ndarray:
    """COCO RLE (uncompressed ``counts`` list or compressed string), column-major, to a (H, W) uint8 mask.

    A malformed RLE is a ValueError saying what is wrong: not a dict with ``counts``, a ``size`` other than
    ``[height, width]``, counts that are not non-negative integers summing to ``height * width``, a broken string."""
    if not isinstance(rle, dict) or "counts" not in rle:
        raise ValueError(f"an RLE is a dict with counts and size, got {str(rle)[:60]}")
    size = rle.get("size")
    if size is not None and (not isinstance(size, (list, tuple)) or list(size) != [height, width]):
        raise ValueError(f"RLE size {str(size)[:60]} is not the image's [height, width] = [{height}, {width}]")
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")  # UnicodeDecodeError is a ValueError
    if isinstance(counts, str):
        counts = _rle_string_counts(counts)
    elif not isinstance(counts, list) or not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool)
                                                 for c in counts):
        raise ValueError(f"RLE counts must be a list of integers or a compressed string, got {str(counts)[:60]}")
    if any(c < 0 for c in counts):
        raise ValueError(f"RLE counts hold a negative run ({min(counts)})")
    if sum(counts) != height * width:
        raise ValueError(f"RLE counts sum to {sum(counts)}, the image has {height}x{width} = {height * width} pixels")
    runs = np.zeros(len(counts), np.uint8)
    runs[1::2] = 1  # runs alternate 0, 1, 0, ... from a run of zeros
    return np.repeat(runs, counts).reshape(width, height).T


def _rle_string_counts(s: str) -> list[int]:
    """pycocotools' compressed RLE: 5-bit groups with a continuation bit, deltas from the count two back."""
    counts, i = [], 0
    while i < len(s):
        x, k, more = 0, 0, True
        while more:
            if i == len(s):
                raise ValueError("the compressed RLE string ends inside a count")
            c = ord(s[i]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"the compressed RLE string holds {s[i]!r} (its characters are '0' to 'o')")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            i += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


# ---------------------------------------------------------------------------------------------- labelme
@dataclass
class LabelmeFile:
    json: Path
    id: str  # the image's file stem (imagePath's when the image is embedded)
    image: Path | None  # the image file; None: ``image_data`` holds its bytes
    image_data: bytes | None
    shapes: list[tuple[str, str, list]] = field(default_factory=list)  # (label, kind, [x, y, ...])
    points_skipped: int = 0


def labelme_jsons(root: Path) -> list[Path]:
    """The JSONs of a labelme folder: at its root (beside the images) and one folder down (``labelme --output``)."""
    return [p for p in sorted(root.glob("*.json")) + sorted(root.glob("*/*.json"))
            if not any(part.startswith(".") for part in p.relative_to(root).parts)]


def is_labelme(path: Path) -> bool:
    try:
        doc = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and "shapes" in doc


def read_labelme(path: Path, root: Path, problems: list[str]) -> LabelmeFile | None:
    """One labelme JSON: its image (file or embedded) and valid shapes; what is wrong goes to ``problems``."""
    name = path.relative_to(root).as_posix()
    doc = _read_json(path, name, problems)
    if doc is UNREADABLE:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("shapes"), list):
        got = type(doc.get("shapes")).__name__ if isinstance(doc, dict) else f"a JSON {type(doc).__name__}"
        problems.append(f"{name}: not a labelme file (an object whose shapes is a list), got {got}")
        return None
    found = _labelme_image(path, name, doc, problems)
    if found is None:
        return None
    out = LabelmeFile(path, *found)
    for k, s in enumerate(doc["shapes"]):
        shape = _labelme_shape(s, k)
        if isinstance(shape, str):
            problems.append(f"{name}: {shape}")
        elif shape[1] == "point":
            out.points_skipped += 1
        else:
            out.shapes.append(shape)
    return out


def _labelme_image(path: Path, name: str, doc: dict, problems: list[str]):
    """(id, image file or None, embedded bytes or None) of a labelme document, or None with the problem listed."""
    image_path, data = doc.get("imagePath"), doc.get("imageData")
    if image_path is not None and not isinstance(image_path, str):
        problems.append(f"{name}: imagePath must be the image's path relative to the JSON, got {image_path!r:.60}")
        return None
    rel = portable_path(image_path) if image_path else None
    candidates = [path.parent / rel, path.parent / rel.name] if rel is not None and rel.name else []
    candidates += [p for p in sorted(path.parent.glob(f"{_glob_escape(path.stem)}.*"))
                   if p.suffix.lower() in IMAGE_EXTS]
    image = next((c for c in candidates if is_file(c)), None)
    stem = rel.stem if rel is not None and rel.name else path.stem
    if image is not None:
        return image.stem, image, None
    if isinstance(data, str) and data:
        try:
            return stem, None, base64.b64decode(data)  # what is not an image fails validation, named
        except (binascii.Error, ValueError) as e:
            problems.append(f"{name}: imageData is not base64 ({e})")
            return None
    problems.append(f"{name}: image {image_path!r} not found (relative to the JSON, or beside it) and no imageData")
    return None


def _glob_escape(s: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in s)


def is_file(p: Path) -> bool:
    try:
        return p.is_file()
    except (OSError, ValueError):  # a name too long, or with a NUL
        return False


def _labelme_shape(s, k: int) -> tuple[str, str, list] | str:
    """(label, kind, flat coordinates) of shape ``k``, or what is wrong with it."""
    if not isinstance(s, dict):
        return f"shape {k} is {type(s).__name__}, not a shape object"
    label = s.get("label")
    if label is None or label == "":
        return f"shape {k}: no label"
    if not isinstance(label, str):
        return f"shape {k}: label {label!r:.40} is not a string"
    kind = s.get("shape_type")
    kind = "polygon" if kind is None else kind  # labelme before 3.x wrote polygons without a shape_type
    if not isinstance(kind, str) or kind not in LABELME_POINTS:
        return f"shape {k}: shape_type {kind!r:.40} is not supported ({', '.join(LABELME_POINTS)})"
    pts = s.get("points")
    if not (isinstance(pts, list) and all(isinstance(p, list) and len(p) == 2 and all(map(_number, p))
                                          for p in pts)):
        return f"shape {k} ({kind}): points must be a list of [x, y] number pairs, got {str(pts):.60}"
    lo, hi = LABELME_POINTS[kind]
    if len(pts) < lo or (hi is not None and len(pts) > hi):
        need = f"at least {lo}" if hi is None else str(lo)
        return f"shape {k} ({kind}): {len(pts)} point(s), a {kind} needs {need}"
    flat = [v for p in pts for v in p]
    if not _finite(flat):
        return f"shape {k} ({kind}): coordinates {str(pts):.60} are not finite numbers"
    return label, "line" if kind == "linestrip" else kind, flat


# ---------------------------------------------------------------------------------------------- COCO
@dataclass
class CocoImage:
    id: int
    file_name: str
    shapes: list[Shape] = field(default_factory=list)
    area: dict[int, float] = field(default_factory=dict)  # class id -> annotated area

    @property
    def label_class(self) -> int:
        """The class covering most of the annotated area (0: no annotation)."""
        return max(self.area, key=lambda c: (self.area[c], -c)) if self.area else 0


@dataclass
class CocoFile:
    classes: list[str]  # category names in id order
    images: list[CocoImage]
    bbox_only: list[object]  # ids of annotations with a bbox and no segmentation


def read_coco(path: Path, name: str, problems: list[str]) -> CocoFile | None:
    """A COCO instance JSON with its entries checked; what is wrong goes to ``problems``."""
    doc = _read_json(path, name, problems)
    if doc is UNREADABLE:
        return None
    if not isinstance(doc, dict):
        problems.append(f"{name}: a COCO file is an object with images, annotations and categories, "
                        f"got a JSON {type(doc).__name__}")
        return None
    bad = [k for k in ("images", "annotations", "categories") if not isinstance(doc.get(k), list)]
    if bad:
        problems += [f"{name}: {k} must be a list, got {str(doc.get(k)):.40}" for k in bad]
        return None
    cat_index = _coco_categories(doc["categories"], name, problems)
    images = _coco_images(doc["images"], name, problems)
    out = CocoFile([c for c, _ in sorted(cat_index.values(), key=lambda v: v[1])], list(images.values()), [])
    for k, a in enumerate(doc["annotations"]):
        where = f"{name}: annotation {a.get('id', f'#{k}') if isinstance(a, dict) else f'#{k}'}"
        if not isinstance(a, dict):
            problems.append(f"{where} is {type(a).__name__}, not an object")
            continue
        image, cat = a.get("image_id"), a.get("category_id")
        if not isinstance(image, int) or isinstance(image, bool) or image not in images:
            problems.append(f"{where}: image_id {image!r:.40} is not the id of an image in the file")
            continue
        if not isinstance(cat, int) or isinstance(cat, bool) or cat not in cat_index:
            problems.append(f"{where}: category_id {cat!r:.40} is not the id of a category in the file")
            continue
        shapes = _coco_segmentation(a, where, cat_index[cat][1], problems)
        if shapes is None:
            continue
        if not shapes:
            out.bbox_only.append(a.get("id", f"#{k}"))
        im = images[image]
        im.shapes += shapes
        area = a.get("area")
        area = float(area) if _number(area) and _finite([area]) else _bbox_area(a.get("bbox")) or 0.0
        im.area[cat_index[cat][1]] = im.area.get(cat_index[cat][1], 0.0) + area
    return out


def _coco_categories(cats: list, name: str, problems: list[str]) -> dict[int, tuple[str, int]]:
    """category id -> (name, class id), class ids 1.. in category id order."""
    valid = {}
    for k, c in enumerate(cats):
        wrong = _wrong_keys(c, "name")
        if wrong:
            problems.append(f"{name}: category #{k} needs an integer id and a name: {wrong}")
        elif c["id"] in valid:
            problems.append(f"{name}: category id {c['id']} is used twice ({valid[c['id']]!r}, {c['name']!r})")
        else:
            valid[c["id"]] = c["name"]
    if len(valid) > MAX_CLASSES:
        problems.append(f"{name}: {len(valid)} categories; a uint8 class map holds at most {MAX_CLASSES}")
    return {cid: (valid[cid], k + 1) for k, cid in enumerate(sorted(valid))}


def _coco_images(images: list, name: str, problems: list[str]) -> dict[int, CocoImage]:
    out: dict[int, CocoImage] = {}
    for k, im in enumerate(images):
        wrong = _wrong_keys(im, "file_name")
        if wrong:
            problems.append(f"{name}: image #{k} needs an integer id and a file_name: {wrong}")
        elif im["id"] in out:
            problems.append(f"{name}: image id {im['id']} is used twice ({out[im['id']].file_name}, "
                            f"{im['file_name']})")
        else:
            out[im["id"]] = CocoImage(im["id"], im["file_name"])
    return out


def _wrong_keys(entry, text_key: str) -> str:
    """What keeps ``entry`` from being an object with an integer ``id`` and a non-empty string ``text_key`` ("" if
    nothing); only the faulty values are shown."""
    if not isinstance(entry, dict):
        return f"got {type(entry).__name__} {entry!r:.40}"
    wrong = []
    if not isinstance(entry.get("id"), int) or isinstance(entry.get("id"), bool):
        wrong.append("no id" if "id" not in entry else f"id {entry['id']!r:.40}")
    if not isinstance(entry.get(text_key), str) or not entry[text_key]:
        wrong.append(f"no {text_key}" if text_key not in entry else f"{text_key} {entry[text_key]!r:.40}")
    return ", ".join(wrong)


def _coco_segmentation(a: dict, where: str, cls: int, problems: list[str]) -> list[Shape] | None:
    """The shapes of annotation ``a`` ([] when it has only a bbox), or None with the problem listed."""
    seg = a.get("segmentation")
    if seg is None or seg == []:
        if _bbox_area(a.get("bbox")) is None:
            problems.append(f"{where}: neither a segmentation nor a bbox [x, y, width, height]")
            return None
        return []
    if isinstance(seg, dict):
        if "counts" not in seg:
            problems.append(f"{where}: an RLE segmentation needs counts (and size), got {str(seg):.60}")
            return None
        return [(cls, "rle", (seg, where))]  # its counts are checked against the image when the mask is read
    if not isinstance(seg, list):
        problems.append(f"{where}: segmentation must be a list of polygons or an RLE object, got {seg!r:.40}")
        return None
    shapes = []
    for p in seg:
        if not (isinstance(p, list) and all(map(_number, p))):
            problems.append(f"{where}: a polygon is a list of numbers x1, y1, x2, y2, ..., got {str(p):.60}")
            return None
        if len(p) % 2 or len(p) < 6:
            problems.append(f"{where}: a polygon needs an even count of at least 6 numbers, got {len(p)}")
            return None
        if not _finite(p):
            problems.append(f"{where}: polygon coordinates {str(p):.60} are not finite numbers")
            return None
        shapes.append((cls, "polygon", p))
    return shapes


def _bbox_area(bbox) -> float | None:
    if isinstance(bbox, list) and len(bbox) == 4 and all(map(_number, bbox)) and _finite(bbox):
        return max(float(bbox[2]), 0.0) * max(float(bbox[3]), 0.0)
    return None
