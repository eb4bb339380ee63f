"""The ``hf`` layout: a Hugging Face ``datasets`` folder saved with ``save_to_disk`` (columns ``image``, optional
``mask``, optional ``label``); needs the ``hf`` extra (``datasets``), imported only here."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from synthvit.data.core import DataError, Item, RealData, mask_array, order_classes, why


def read_hf(root: Path, problems: list[str]) -> RealData:
    try:
        import datasets
    except ModuleNotFoundError:
        raise DataError(f"{root} is a Hugging Face datasets folder (format=hf), which needs the datasets package: "
                        f"pip install 'synthvit[hf]'") from None

    try:
        ds = datasets.load_from_disk(str(root))
        if isinstance(ds, datasets.DatasetDict):
            ds = datasets.concatenate_datasets(list(ds.values()))
        raw_labels = list(ds["label"]) if "label" in ds.column_names else None
    except Exception as e:  # a half-written or foreign folder: no state.json, a corrupt arrow file or JSON ...
        problems.append(f"{root.name}: not a readable datasets save_to_disk folder ({why(e)})")
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
    cls = order_classes({it.label for it in items if it.label is not None}) if raw_labels is not None else []
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
