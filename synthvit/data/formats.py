"""The layouts real data comes in, read and validated before any training starts; see :mod:`synthvit.data`."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image

from synthvit.data.annotations import (
    GOOD_LABEL,
    IMAGE_EXTS,
    MAX_CLASSES,
    is_file,
    is_labelme,
    labelme_jsons,
    portable_path,
    read_coco,
    read_labelme,
    shapes_mask,
)
from synthvit.data.core import (
    MAX_PIXELS,
    DataError,
    Item,
    RealData,
    bytes_image,
    mask_array,
    open_image,
    order_classes,
    png_mask,
    problems_error,
    read_csv,
    set_pixel_cap,
    shown_size,
    to_array,
    translucent,
    why,
)
from synthvit.data.hf import read_hf
from synthvit.data.splits import SPLIT_MISSING, read_splits, split_ids
from synthvit.storage import is_url, redact

log = logging.getLogger("synthvit.data")


def _canonical(root: Path, problems: list[str]) -> RealData:
    images: dict[str, Path] = {}
    for p in _visible_files(root / "images", IMAGE_EXTS):
        if p.stem in images:
            problems.append(f"images/{p.name}: a second image with the id {p.stem!r} (images/{images[p.stem].name})")
        images.setdefault(p.stem, p)
    labelled = (root / "labels.csv").is_file()
    try:
        labels = read_csv(root / "labels.csv", ("id", "label")) if labelled else {}
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
                problems.append(f"masks/{p.name}: unreadable ({why(e)})")
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
    items = [Item(i, str(p), open_image(p), labels.get(i),
                  png_mask(masks[i], binary, void) if i in masks else (_empty_mask if masks else None))
             for i, p in images.items()]
    cls = order_classes({lab for lab in labels.values()}) if labels else []
    return RealData(root, "canonical", items, seg_classes, cls)


def _empty_mask(size):
    return np.zeros((size[1], size[0]), np.uint8)


def image_files(folder: Path) -> list[Path]:
    """Every image under ``folder`` (recursive, sorted); hidden files and folders are not data. A symbolic link
    that points nowhere is listed too: reading it fails, and its reader names it with the other unreadable files."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS
                  and (p.is_file() or (p.is_symlink() and not p.exists()))
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
            items.append(Item(i, str(p), open_image(p), d.name))
    return RealData(root, "imagefolder", items, [], order_classes({i.label for i in items}))


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
        source = str(f.image) if f.image else f"{f.json}#imageData"
        load = open_image(f.image) if f.image else bytes_image(f.image_data, source)
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
            items.append(Item(rel.stem, str(p), open_image(p), label, shapes_mask(im.shapes)))
    refused = ""
    if coco.bbox_only:
        ids = ", ".join(map(str, coco.bbox_only[:5])) + (", ..." if len(coco.bbox_only) > 5 else "")
        refused = (f"{path}: {len(coco.bbox_only)} annotation(s) (id {ids}) have a bbox and no segmentation; use "
                   f"task=cls or add segmentations (polygons or RLE)")
    return RealData(root, "coco", items, [] if refused else ["background", *coco.classes],
                    order_classes({it.label for it in items}), masks_refused=refused)


@dataclass(frozen=True)
class Format:
    """A real-data layout: ``read(root, problems) -> RealData`` appends what is wrong to ``problems``; ``detect(root)``
    recognises a local folder (checked before the built-in layouts)."""
    read: Callable[[Path | str, list[str]], RealData]
    detect: Callable[[Path], bool] | None = None


FORMATS: dict[str, Format] = {"canonical": Format(_canonical), "imagefolder": Format(_imagefolder),
                              "labelme": Format(_labelme), "coco": Format(_coco), "hf": Format(read_hf)}
# Layouts read by a room above this floor, which registers them: synthvit shards (generate.schema). Named here only
# so that a folder of them is never mistaken for another layout when that room is not imported.
SHARDS, SHARDS_MARKER = "shards", "_info.json"


def register_format(name: str, read: Callable[[Path | str, list[str]], RealData],
                    detect: Callable[[Path], bool] | None = None) -> None:
    """Add a layout that ``load_real_data`` reads (and ``format=auto`` detects with ``detect``)."""
    FORMATS[name] = Format(read, detect)


def _unregistered_shards(root: Path | str) -> DataError:
    return DataError(f"{root} holds synthvit shards ({SHARDS_MARKER}); their reader is registered by the shard "
                     f"contract: import generate.schema first (every synthvit stage does)")


def _only_json(folder: Path) -> bool:
    """A folder of JSONs and no images (``labelme --output``), not a class folder."""
    files = [f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")]
    return any(f.suffix.lower() == ".json" for f in files) and not any(
        f.suffix.lower() in IMAGE_EXTS for f in files)


def detect_format(root: Path) -> str:
    for name, layout in FORMATS.items():
        if layout.detect is not None and layout.detect(root):
            return name
    if (root / SHARDS_MARKER).is_file():
        raise _unregistered_shards(root)
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


def load_real_data(root: str | Path, fmt: str = "auto", check: bool = True, max_pixels: int = MAX_PIXELS,
                   split_missing: str = "error") -> RealData:
    """The data of ``root`` with its ``splits.csv`` applied (``split_missing``: images it does not list are an error,
    or go to train or test), validated unless ``check`` is false; every problem found in one :class:`DataError`."""
    if split_missing not in SPLIT_MISSING:
        raise ValueError(f"split_missing={split_missing!r}; use one of {', '.join(SPLIT_MISSING)}")
    if is_url(root):  # an object store holds synthvit shards only (the folder layouts need a file system)
        if fmt not in ("auto", SHARDS):
            raise DataError(f"data {redact(str(root))}: a URL holds synthvit shards (format=shards); format={fmt} "
                            f"needs a local folder")
        root, fmt = str(root).rstrip("/"), SHARDS
        if fmt not in FORMATS:
            raise _unregistered_shards(redact(root))
    else:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"data folder {root} does not exist")
        if not any(root.iterdir()):
            raise DataError(f"data folder {root} is empty")
    set_pixel_cap(max_pixels)
    fmt = detect_format(root) if fmt == "auto" else fmt
    if fmt == SHARDS and fmt not in FORMATS:
        raise _unregistered_shards(root)
    if fmt not in FORMATS:
        raise DataError(f"format {fmt!r} is not known; use auto or one of {', '.join(FORMATS)}")
    problems: list[str] = []
    data = FORMATS[fmt].read(root, problems)
    if not data.items:
        problems.append(f"no images found ({fmt} layout)")
    else:
        data.splits = read_splits(data, split_missing, problems)
    if check:
        problems += validate(data)
    if problems:
        raise problems_error(root, problems)
    return data


def validate(data: RealData, items: list[Item] | None = None, decode: bool = True) -> list[str]:
    """The problems of ``items`` (default: every item) as training would meet them; see :func:`check_items`."""
    return check_items(data, data.items if items is None else items, decode).problems


class Checked(NamedTuple):
    problems: list[str]  # one line per problem, naming its file
    broken: set[str]  # ids of the items with a problem


def check_items(data: RealData, items: list[Item], decode: bool = True) -> Checked:
    """Read every image (and mask) of ``items`` once, as training reads them: unreadable, empty, truncated or
    corrupt files, frames over the pixel cap, pixel formats that do not convert, mask size mismatches (masks are in
    the displayed, EXIF-transposed orientation) and out-of-range mask values. Whatever a file raises becomes a
    problem naming it, never a raw exception. ``decode`` false: image headers only (sizes), masks still read whole.
    Frames with transparency, which training blends onto black, are named in one warning."""
    problems, broken, see_through = [], set(), []
    for item in items:
        try:
            with item.load() as im:
                size = shown_size(im)
                if decode:
                    im.load()  # decodes: truncated and corrupt files fail here
                    to_array(im.crop((0, 0, 1, 1)))  # its pixel format converts the way training converts it
                    if translucent(im):
                        see_through.append(item.source)
        except Exception as e:  # PIL raises OSError, SyntaxError, struct.error, DecompressionBombError ...
            problems.append(f"{item.source}: unreadable image ({why(e)})")
            broken.add(item.id)
            continue
        if item.mask is None or not data.seg_classes:  # no mask classes (labelme without shapes): no masks to check
            continue
        problem = _mask_problem(data, item, size)
        if problem:
            problems.append(f"{item.source}: {problem}")
            broken.add(item.id)
    if see_through:
        log.warning("%d frame(s) of %s have transparent pixels (alpha < 255), which are read blended onto black: %s%s",
                    len(see_through), redact(str(data.root)), ", ".join(see_through[:10]),
                    f" and {len(see_through) - 10} more" if len(see_through) > 10 else "")
    return Checked(problems, broken)


def _mask_problem(data: RealData, item: Item, size: tuple[int, int]) -> str:
    """What is wrong with ``item``'s mask for an image of ``size`` ("" if nothing); records its defect presence."""
    try:
        mask = item.mask(size)
    except Exception as e:
        return f"unreadable mask ({why(e)})"
    if mask.shape != (size[1], size[0]):
        return f"mask is {mask.shape[1]}x{mask.shape[0]}, image is {size[0]}x{size[1]}"
    if mask.size and int(mask.max()) >= len(data.seg_classes):
        return (f"mask value {int(mask.max())} outside the classes 0..{len(data.seg_classes) - 1} "
                f"({', '.join(data.seg_classes)})")
    item.defect = bool(mask.any())  # read once here for the split's strata
    return ""


def checked_split(data: RealData, test_fraction: float, seed: int, reads: Callable[[dict[str, str]], list[Item]],
                  decode: bool = True) -> tuple[dict[str, str], list[Item]]:
    """For a reader of part of ``data`` (generate's readers of the train split): the split, and the items
    ``reads(split)`` picks, checked as finetune checks them (:func:`check_items`) before anything reads them; every
    problem in one :class:`DataError`. Only what the reader reads is opened: those items, and -- where the seeded
    split is stratified by defect presence (no ``splits.csv``, no image labels), so reads every mask -- every mask
    with its image's header (no pixels). Otherwise a test image is never opened."""
    if not data.splits and not data.has_labels and data.has_masks:
        problems = validate(data, decode=False)
        if problems:
            raise problems_error(data.root, problems)
    split = split_ids(data, test_fraction, seed)
    items = reads(split)
    problems = validate(data, items, decode)
    if problems:
        raise problems_error(data.root, problems)
    return split, items
