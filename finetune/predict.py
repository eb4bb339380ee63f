"""``synthvit predict``: full-size mask PNG, overlay JPEG and a JSON (defect score, classes, areas, boxes) per image."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from finetune.datasets import IMAGE_EXTS, to_array
from synthvit.io import SynthvitError, atomic_write_bytes, atomic_write_text
from synthvit.overlay import overlay
from synthvit.progress import progress_bar


def input_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
        if files:
            return files
        raise SynthvitError(f"input: {path} holds no images ({', '.join(IMAGE_EXTS)})")
    raise SynthvitError(f"input: {path} does not exist")


def regions(class_map: np.ndarray, names: list[str]) -> list[dict]:
    """Connected regions of every defect class: class, area, box [x0, y0, x1, y1)."""
    out = []
    for k in range(1, len(names)):
        labelled, n = ndimage.label(class_map == k)
        if n == 0:
            continue
        areas = np.bincount(labelled.ravel(), minlength=n + 1)
        for j, sl in enumerate(ndimage.find_objects(labelled), start=1):
            out.append({"class": names[k], "area": int(areas[j]),
                        "box": [sl[1].start, sl[0].start, sl[1].stop, sl[0].stop]})
    return out


def write_prediction(path: Path, out_dir: Path, image: np.ndarray, result: dict, meta: dict, threshold: float):
    stem = path.stem
    record: dict = {"image": str(path), "width": image.shape[1], "height": image.shape[0],
                    "defect_score": round(result["score"], 6)}
    if "probs" in result:
        probs = result["probs"]
        class_map = probs.argmax(0).numpy().astype(np.uint8)
        class_map[(1 - probs[0]).numpy() < threshold] = 0
        names = meta["seg_classes"]
        record["defects"] = regions(class_map, names)
        record["areas"] = {n: int((class_map == k).sum()) for k, n in enumerate(names) if k}
        Image.fromarray(class_map).save(out_dir / f"{stem}_mask.png")
        Image.fromarray(overlay(image, class_map, len(names))).save(out_dir / f"{stem}_overlay.jpg", quality=90)
    if "cls_probs" in result:
        p = result["cls_probs"].tolist()
        record["classes"] = {n: round(v, 6) for n, v in zip(meta["cls_classes"], p)}
        record["predicted_class"] = meta["cls_classes"][int(np.argmax(p))]
    atomic_write_text(out_dir / f"{stem}.json", json.dumps(record, indent=2) + "\n")
    return record


def predict_files(predictor, files: list[Path], out_dir: Path, meta: dict, threshold: float) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for path in progress_bar(iterable=files, desc="predict", unit="img"):
        try:
            with Image.open(path) as im:
                image = to_array(im, meta["in_chans"])
        except OSError as e:
            raise SynthvitError(f"input: cannot read {path} ({e})") from None
        records.append(write_prediction(path, out_dir, image, predictor(image), meta, threshold))
    atomic_write_bytes(out_dir / "predictions.json", json.dumps(records, indent=2).encode())
    return records
