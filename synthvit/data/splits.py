"""The split of real data, for every format: ``splits.csv`` (``id,split``) at the data root, or a seeded split
stratified by image label, else by defect presence; and what each side holds."""
from __future__ import annotations

from collections import Counter

import numpy as np

from synthvit.data.core import GOOD_NAMES, DataError, Item, RealData, read_rows, shown_size

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
        rows = read_rows(path, ("id", "split"))
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


def defect_stratum(data: RealData, item: Item) -> str:
    """The class a defective image counts under when budgets are stratified: its image label where the data has
    more than one defect label, else the defect class with the most pixels in its mask."""
    defect_labels = [c for c in data.cls_classes if c.lower() not in GOOD_NAMES]
    if item.label is not None and len(defect_labels) > 1:
        return item.label
    with item.load() as im:
        size = shown_size(im)
    counts = np.bincount(item.mask(size).ravel(), minlength=len(data.seg_classes))
    counts[0] = 0
    return data.seg_classes[int(counts.argmax())] if data.seg_classes else "defect"


def defective_order(data: RealData, items: list[Item], seed: int) -> list[str]:
    """Ids of the defective ``items`` in the order budgets take them: the first N of it is any budget of N, so
    budgets are nested, and each class's share of every prefix is near its share of the whole (each class's images
    in seeded order, at evenly spaced positions ``(rank + offset) / count`` with a seeded offset per class)."""
    rng = np.random.default_rng([seed, 24])
    strata: dict[str, list[Item]] = {}
    for item in items:
        if has_defect(item):
            strata.setdefault(defect_stratum(data, item), []).append(item)
    keyed = []
    for name in sorted(strata):
        members = strata[name]
        order = rng.permutation(len(members))
        offset = rng.random()
        keyed += [((rank + offset) / len(members), rng.random(), members[k].id) for rank, k in enumerate(order)]
    return [item_id for _, _, item_id in sorted(keyed)]


def budget_subset(data: RealData, train: list[Item], train_limit: int = 0, defective_limit: int = 0,
                  seed: int = 0) -> list[Item]:
    """The train images a budget uses (finetune's ``train_limit``/``defective_limit``; compare builds a cell's
    synthetic set from the same ones): ``train_limit`` of any train images (a seeded permutation's first N), or
    ``defective_limit`` defective ones (:func:`defective_order`) with every defect-free one; all with neither."""
    if train_limit:
        order = np.random.default_rng(seed).permutation(len(train))
        train = [train[k] for k in sorted(order[:train_limit])]
    if defective_limit:
        keep = set(defective_order(data, train, seed)[:defective_limit])
        train = [i for i in train if not has_defect(i) or i.id in keep]
    return train


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
