"""Real, high-resolution data in the layouts users have, validated before any training starts.

Formats (detected from the folder, or named with ``fmt``):

- ``canonical``: ``images/<id>.<ext>``, optional ``masks/<id>.png`` (0 = background, k = class k, or 0/255 binary),
  optional ``labels.csv`` (``id,label``) and ``splits.csv`` (``id,split``); optional ``classes.txt`` names the mask
  classes (one per line, background first);
- ``imagefolder``: ``<class>/<image>`` (classification only);
- ``labelme``: ``<image>`` + ``<image stem>.json`` with polygon/rectangle shapes (label = class name);
- ``coco``: an instance-segmentation JSON (``annotations.json``/``instances*.json`` or any ``*.json`` with
  ``images``, ``annotations``, ``categories``) with polygons or RLE, images beside it or under ``images/``;
- ``hf``: a Hugging Face ``datasets`` folder saved with ``save_to_disk`` (columns ``image``, optional ``mask``,
  optional ``label``);
- ``shards``: a ``synthvit generate`` output folder (``_info.json`` + WebDataset shards), e.g. a procedural
  stand-in for real frames; masks and labels come from the shard contract, the encoded samples are held in memory.

Images may be 8- or 16-bit grayscale, RGB, RGBA or palette, with EXIF orientation, up to ``max_pixels``
(Pillow's decompression-bomb guard is raised to that cap only). Every problem found in a folder is reported at
once: one :class:`DataError` listing the first 20 offending files and the count.
"""
from __future__ import annotations

import csv
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from generate.schema import CLS_KEY, IMAGE_KEYS, INFO_FILE, MASK_KEY, SPLIT, iter_members, read_info
from synthvit.io import SynthvitError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
GOOD_NAMES = ("good", "free", "ok", "normal", "defect-free", "defect_free", "none", "background")
SHOWN = 20


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


@dataclass
class RealData:
    root: Path
    fmt: str
    items: list[Item]
    seg_classes: list[str] = field(default_factory=list)  # background first; empty: no masks
    cls_classes: list[str] = field(default_factory=list)  # a defect-free class first when there is one
    splits: dict[str, str] = field(default_factory=dict)  # id -> split from the data (splits.csv)

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
    return lambda: Image.open(path)


def _png_mask(path: Path, binary_to: int | None) -> Callable[[tuple[int, int]], np.ndarray]:
    def load(size):
        with Image.open(path) as im:
            m = np.asarray(im if im.mode in ("L", "P") else im.convert("L"))
        return (m > 127).astype(np.uint8) * binary_to if binary_to else m.astype(np.uint8)
    return load


def _shapes_mask(shapes: list[tuple[int, str, object]]) -> Callable[[tuple[int, int]], np.ndarray]:
    """Rasterise (class id, kind, data) shapes: polygons (flat xy lists), rectangles, COCO RLE dicts."""
    def load(size):
        w, h = size
        canvas = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(canvas)
        out = None
        for cls, kind, data in shapes:
            if kind == "polygon" and len(data) >= 6:
                draw.polygon([float(v) for v in data], fill=cls)
            elif kind == "rectangle":
                draw.rectangle([float(v) for v in data], fill=cls)
            elif kind == "rle":
                out = np.asarray(canvas).copy() if out is None else out
                out[rle_decode(data, h, w) > 0] = cls
                canvas = Image.fromarray(out)
                draw = ImageDraw.Draw(canvas)
        return np.asarray(canvas)
    return load


def rle_decode(rle: dict, height: int, width: int) -> np.ndarray:
    """COCO RLE (uncompressed ``counts`` list or compressed string), column-major, to a (H, W) uint8 mask."""
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = _rle_string_counts(counts)
    flat = np.zeros(height * width, np.uint8)
    pos, value = 0, 0
    for c in counts:
        if value:
            flat[pos:pos + c] = 1
        pos += c
        value ^= 1
    return flat.reshape(width, height).T


def _rle_string_counts(s: str) -> list[int]:
    """pycocotools' compressed RLE: 5-bit groups with a continuation bit, deltas from the count two back."""
    counts, i = [], 0
    while i < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[i]) - 48
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


# ---------------------------------------------------------------------------------------------- formats
def _read_csv(path: Path, columns: tuple[str, str]) -> dict[str, str]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not set(columns) <= set(reader.fieldnames):
            raise DataError(f"{path} must have the header {','.join(columns)}, got {reader.fieldnames}")
        return {row[columns[0]].strip(): row[columns[1]].strip() for row in reader}


def _order_classes(names: set[str]) -> list[str]:
    good = [n for n in sorted(names) if n.lower() in GOOD_NAMES]
    return good[:1] + sorted(n for n in names if n not in good[:1])


def _canonical(root: Path, problems: list[str]) -> RealData:
    images = {p.stem: p for p in sorted((root / "images").iterdir()) if p.suffix.lower() in IMAGE_EXTS}
    labels = _read_csv(root / "labels.csv", ("id", "label")) if (root / "labels.csv").is_file() else {}
    splits = _read_csv(root / "splits.csv", ("id", "split")) if (root / "splits.csv").is_file() else {}
    for name, table in (("labels.csv", labels), ("splits.csv", splits)):
        problems += [f"{name}: id {i!r} has no image in images/" for i in sorted(set(table) - set(images))]
    masks_dir = root / "masks"
    masks = {p.stem: p for p in masks_dir.glob("*.png")} if masks_dir.is_dir() else {}
    problems += [f"masks/{masks[i].name}: no image with id {i!r}" for i in sorted(set(masks) - set(images))]
    seg_classes: list[str] = []
    binary = None
    if masks:
        names_file = root / "classes.txt"
        seg_classes = [ln.strip() for ln in names_file.read_text().splitlines() if ln.strip()] \
            if names_file.is_file() else []
        per_mask = {}
        for i, p in masks.items():
            try:
                with Image.open(p) as im:
                    per_mask[i] = set(np.unique(np.asarray(im)).tolist())
            except (OSError, Image.DecompressionBombError) as e:
                problems.append(f"masks/{p.name}: unreadable ({e})")
        values = set().union(*per_mask.values()) if per_mask else {0}
        binary = 1 if 255 in values and not seg_classes else None
        if binary:  # 0/255 masks: any other value is a mistake, not a class
            problems += [f"masks/{masks[i].name}: values {sorted(v - {0, 255})} in binary (0/255) masks"
                         for i, v in sorted(per_mask.items()) if v - {0, 255}]
        if not seg_classes:
            seg_classes = ["background", "defect"] if binary else ["background"] + [
                f"class_{k}" for k in range(1, int(max(values | {1})) + 1)]
    items = [Item(i, str(p), _open(p), labels.get(i),
                  _png_mask(masks[i], binary) if i in masks else (_empty_mask if masks else None))
             for i, p in images.items()]
    cls = _order_classes({lab for lab in labels.values()}) if labels else []
    return RealData(root, "canonical", items, seg_classes, cls, splits)


def _empty_mask(size):
    return np.zeros((size[1], size[0]), np.uint8)


def _imagefolder(root: Path, problems: list[str]) -> RealData:
    items = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        for p in sorted(d.iterdir()):
            if p.suffix.lower() in IMAGE_EXTS:
                items.append(Item(f"{d.name}/{p.stem}", str(p), _open(p), d.name))
    return RealData(root, "imagefolder", items, [], _order_classes({i.label for i in items}))


def _labelme(root: Path, problems: list[str]) -> RealData:
    docs = {}
    for j in sorted(root.glob("*.json")):
        try:
            docs[j] = json.loads(j.read_text())
        except json.JSONDecodeError as e:
            problems.append(f"{j.name}: not valid JSON ({e})")
    names = sorted({s["label"] for d in docs.values() for s in d.get("shapes", [])})
    seg_classes = ["background", *names]
    items = []
    for j, doc in docs.items():
        image = j.with_name(doc.get("imagePath", j.stem + ".png")) if doc.get("imagePath") else None
        if image is None or not image.is_file():
            image = next((j.with_suffix(e) for e in IMAGE_EXTS if j.with_suffix(e).is_file()), None)
        if image is None:
            problems.append(f"{j.name}: no image beside it (imagePath {doc.get('imagePath')!r})")
            continue
        shapes = []
        for s in doc.get("shapes", []):
            kind = s.get("shape_type") or "polygon"
            pts = [v for xy in s.get("points", []) for v in xy]
            if kind not in ("polygon", "rectangle"):
                problems.append(f"{j.name}: shape type {kind!r} not supported (polygon, rectangle)")
                continue
            shapes.append((seg_classes.index(s["label"]), kind, pts))
        items.append(Item(image.stem, str(image), _open(image), None, _shapes_mask(shapes)))
    return RealData(root, "labelme", items, seg_classes if names else [], [])


def _coco_file(root: Path) -> Path | None:
    for j in sorted(root.glob("*.json")):
        try:
            head = json.loads(j.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(head, dict) and {"images", "annotations", "categories"} <= set(head):
            return j
    return None


def _coco(root: Path, problems: list[str]) -> RealData:
    path = _coco_file(root)
    doc = json.loads(path.read_text())
    cats = sorted(doc["categories"], key=lambda c: c["id"])
    seg_classes = ["background", *[c["name"] for c in cats]]
    cat_index = {c["id"]: k + 1 for k, c in enumerate(cats)}
    anns: dict[int, list] = {}
    for a in doc["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    items = []
    for im in doc["images"]:
        p = next((c for c in (root / im["file_name"], root / "images" / im["file_name"]) if c.is_file()), None)
        if p is None:
            problems.append(f"{path.name}: image {im['file_name']!r} (id {im['id']}) not found")
            continue
        shapes = []
        for a in anns.get(im["id"], []):
            if a["category_id"] not in cat_index:
                problems.append(f"{path.name}: annotation {a.get('id')} has unknown category {a['category_id']}")
                continue
            seg = a.get("segmentation")
            if isinstance(seg, list):
                shapes += [(cat_index[a["category_id"]], "polygon", poly) for poly in seg]
            elif isinstance(seg, dict):
                shapes.append((cat_index[a["category_id"]], "rle", seg))
        items.append(Item(Path(im["file_name"]).stem, str(p), _open(p), None, _shapes_mask(shapes)))
    return RealData(root, "coco", items, seg_classes, [])


def _hf(root: Path, problems: list[str]) -> RealData:
    import datasets

    ds = datasets.load_from_disk(str(root))
    if isinstance(ds, datasets.DatasetDict):
        ds = datasets.concatenate_datasets(list(ds.values()))
    if "image" not in ds.column_names:
        raise DataError(f"{root}: a datasets folder needs an 'image' column; it has {ds.column_names}")
    label_names = ds.features["label"].names if "label" in ds.column_names and hasattr(
        ds.features["label"], "names") else None
    items = []
    for i in range(len(ds)):
        def load(i=i):
            return ds[i]["image"]
        label = None
        if "label" in ds.column_names:
            label = label_names[ds[i]["label"]] if label_names else str(ds[i]["label"])
        mask = (lambda size, i=i: np.asarray(ds[i]["mask"].convert("L"))) if "mask" in ds.column_names else None
        items.append(Item(f"{i:06d}", f"{root}#{i}", load, label, mask))
    seg = ["background", "defect"] if "mask" in ds.column_names else []
    cls = _order_classes({it.label for it in items}) if "label" in ds.column_names else []
    return RealData(root, "hf", items, seg, cls)


def _bytes_image(data: bytes) -> Callable[[], Image.Image]:
    return lambda: Image.open(io.BytesIO(data))


def _bytes_mask(data: bytes) -> Callable[[tuple[int, int]], np.ndarray]:
    def load(size):
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im).astype(np.uint8)
    return load


def _shards(root: Path, problems: list[str]) -> RealData:
    try:
        info = read_info(root)
    except SynthvitError as e:
        problems.append(str(e))
        return RealData(root, "shards", [])
    names = info["class_names"]
    items = []
    for filename in info["splits"][SPLIT]["filenames"]:
        try:
            for m in iter_members(root / filename):
                image_key = next((k for k in IMAGE_KEYS if k in m), None)
                if image_key is None or MASK_KEY not in m or CLS_KEY not in m:
                    problems.append(f"{filename}#{m['__key__']}: lacks jpg|png, {MASK_KEY} or {CLS_KEY}")
                    continue
                items.append(Item(m["__key__"], f"{root / filename}#{m['__key__']}", _bytes_image(m[image_key]),
                                  names[int(m[CLS_KEY])], _bytes_mask(m[MASK_KEY])))
        except (OSError, tarfile.TarError, ValueError) as e:
            problems.append(f"{filename}: unreadable shard ({e})")
    return RealData(root, "shards", items, ["background", *names[1:]], list(names))


FORMATS = {"canonical": _canonical, "imagefolder": _imagefolder, "labelme": _labelme, "coco": _coco, "hf": _hf,
           "shards": _shards}


def detect_format(root: Path) -> str:
    if (root / INFO_FILE).is_file():
        return "shards"
    if (root / "dataset_info.json").is_file() or (root / "dataset_dict.json").is_file():
        return "hf"
    if _coco_file(root) is not None:
        return "coco"
    if (root / "images").is_dir():
        return "canonical"
    if list(root.glob("*.json")):
        return "labelme"
    if any(p.is_dir() for p in root.iterdir()):
        return "imagefolder"
    raise DataError(f"{root}: no known layout (images/ folder, class folders, labelme or COCO JSON, or a "
                    f"datasets save_to_disk folder, or synthvit shards with _info.json)")


def load_real_data(root: str | Path, fmt: str = "auto", check: bool = True, max_pixels: int = 8192 * 8192
                   ) -> RealData:
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
    if check:
        problems += validate(data)
    if problems:
        raise problems_error(root, problems)
    return data


def validate(data: RealData) -> list[str]:
    """Open every image (and mask): unreadable files, size mismatches and out-of-range mask values."""
    problems = []
    for item in data.items:
        try:
            with item.load() as im:
                im.load()  # decodes: truncated and corrupt files fail here
                size = ImageOps.exif_transpose(im).size
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            problems.append(f"{item.source}: unreadable image ({e})")
            continue
        if item.mask is None:
            continue
        try:
            mask = item.mask(size)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            problems.append(f"{item.source}: unreadable mask ({e})")
            continue
        if mask.shape != (size[1], size[0]):
            problems.append(f"{item.source}: mask is {mask.shape[1]}x{mask.shape[0]}, image is {size[0]}x{size[1]}")
        elif mask.size and int(mask.max()) >= len(data.seg_classes):
            problems.append(f"{item.source}: mask value {int(mask.max())} outside the classes "
                            f"0..{len(data.seg_classes) - 1} ({', '.join(data.seg_classes)})")
    return problems


def split_ids(data: RealData, test_fraction: float, seed: int) -> dict[str, str]:
    """``splits.csv`` when the data has one; otherwise a seeded split stratified by image label (images without a
    label form one stratum), ``test_fraction`` of each stratum to ``test``."""
    if data.splits:
        return {i.id: data.splits.get(i.id, "train") for i in data.items}
    strata: dict[str, list[str]] = {}
    for item in data.items:
        key = item.label if item.label is not None else "all"
        strata.setdefault(key, []).append(item.id)
    rng = np.random.default_rng(seed)
    out = {}
    for key in sorted(strata):
        ids = sorted(strata[key])
        rng.shuffle(ids)
        n_test = int(round(len(ids) * test_fraction)) if len(ids) > 1 else 0
        out.update({i: ("test" if k < n_test else "train") for k, i in enumerate(ids)})
    return out
