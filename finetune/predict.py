"""``synthvit predict``: full-size mask PNG, overlay JPEG and a JSON (defect score, classes, areas, boxes) per frame,
as a resumable batch job over a frame, a folder, a glob pattern or a list file of frames.

Outputs of ``frames/line1/x.png`` (input ``frames``) go to ``<out>/line1/x.json``, ``x_mask.png``, ``x_overlay.jpg``:
the input's subfolders are mirrored, so equal stems in different folders never collide. Every file is written
atomically and the per-frame JSON last: it exists only for a finished frame, and a re-run skips those frames. A
record per frame is appended to ``predictions.jsonl`` as it finishes (nothing accumulates in memory);
``predictions.json`` (``{"predictions": [...], "failed": [...]}``) is built from it at the end of a run.
"""
from __future__ import annotations

import glob
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
import yaml
from PIL import Image
from scipy import ndimage

from finetune.evaluate import NonFiniteOutput
from synthvit.config import CONFIG_FILE
from synthvit.data import IMAGE_EXTS, image_files, open_image, to_array
from synthvit.io import SynthvitError, atomic_open, atomic_write_text, dumps_json
from synthvit.models import ExportMeta, class_map
from synthvit.overlay import overlay
from synthvit.progress import progress_bar

LIST_SUFFIXES = (".txt", ".lst")  # an input file with one of these is a list of frames, not a frame
GLOB_CHARS = "*?["
RECORDS = "predictions.jsonl"
SUMMARY = "predictions.json"
# What reading or decoding one bad frame raises (missing, truncated, not an image, over the pixel cap)
FRAME_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
SHOWN = 20

log = logging.getLogger("synthvit.predict")


def input_files(spec: str | Path, skip: Path | None = None) -> tuple[list[Path], Path]:
    """The frames ``input`` names, and the folder their output names are relative to: an image file; a folder
    (recursive, hidden files and folders left out); a glob pattern (``frames/**/*.png``, ``**`` recursive); a list
    file (.txt/.lst, see :func:`listed_files`). Folder and glob frames under ``skip`` (the output folder) or under
    any other folder a predict wrote (:func:`is_predict_output`) are left out, with a line saying how many: a run
    must not read earlier outputs as frames."""
    path = Path(spec)
    if path.is_file():
        return listed_files(path) if path.suffix.lower() in LIST_SUFFIXES else ([path], path.parent)
    if path.is_dir():
        found = image_files(path)
        files = _outside_predictions(_outside(found, skip), path)
        if files:
            return files, path
        outside = f" outside the output folder {skip} and predict's other output folders" if found else ""
        raise SynthvitError(f"input: {path} holds no images{outside} ({', '.join(IMAGE_EXTS)})")
    if any(c in str(spec) for c in GLOB_CHARS):
        parts = path.parts
        fixed = next(i for i, part in enumerate(parts) if any(c in part for c in GLOB_CHARS))
        base = Path(*parts[:fixed]) if fixed else Path(".")
        matched = sorted(p for p in map(Path, glob.glob(str(spec), recursive=True))
                         if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        files = _outside_predictions(_outside(matched, skip), base)
        if not files:
            outside = " outside predict's output folders" if matched else ""
            raise SynthvitError(f"input: the pattern {str(spec)!r} matches no images{outside} "
                                f"({', '.join(IMAGE_EXTS)})")
        return files, base
    raise SynthvitError(f"input: {path} does not exist; give an image, a folder, a glob pattern such as "
                        f"'frames/**/*.png' or a list file ({'/'.join(LIST_SUFFIXES)}, one path per line)")


def listed_files(list_file: Path) -> tuple[list[Path], Path]:
    """The frames of a list file, each once, and their common folder: a path per line, relative ones relative to the
    list's folder; blank lines and lines starting with ``#`` are skipped. Listed paths are not checked here: a
    missing one fails as its frame, listed with the other failures."""
    try:
        text = list_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SynthvitError(f"input: cannot read the list {list_file} ({e})") from None
    lines = [ln.strip() for ln in text.splitlines()]
    files = list(dict.fromkeys(Path(os.path.normpath(list_file.parent / ln)) for ln in lines
                               if ln and not ln.startswith("#")))
    if not files:
        raise SynthvitError(f"input: the list {list_file} names no frames (one image path per line, # comments)")
    return files, Path(os.path.commonpath([os.path.abspath(p.parent) for p in files]))


def _outside(files: list[Path], folder: Path | None) -> list[Path]:
    if folder is None:
        return files
    folder = folder.resolve()
    return [p for p in files if not p.resolve().is_relative_to(folder)]


def is_predict_output(folder: Path) -> bool:
    """``folder`` was written by ``synthvit predict``: it holds predict's ``config.yaml`` (its keys checkpoint, input,
    out and threshold) or its records (predictions.jsonl / predictions.json)."""
    if (folder / RECORDS).is_file() or (folder / SUMMARY).is_file():
        return True
    try:
        recorded = yaml.safe_load((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(recorded, dict) and {"checkpoint", "input", "out", "threshold"} <= set(recorded)


def _outside_predictions(files: list[Path], base: Path) -> list[Path]:
    """``files`` less those in a folder below ``base`` that predict wrote (its masks and overlays are no frames),
    saying how many folders and files were left out."""
    verdict: dict[Path, bool] = {}

    def written_by_predict(p: Path) -> bool:
        for folder in p.parents:
            if folder == base or folder == folder.parent or not folder.is_relative_to(base):
                return False
            if folder not in verdict:
                verdict[folder] = is_predict_output(folder)
            if verdict[folder]:
                return True
        return False

    kept = [p for p in files if not written_by_predict(p)]
    skipped = sorted(f for f, v in verdict.items() if v)
    if skipped:
        log.info("predict: left out %d image(s) in %d folder(s) that predict wrote (%s%s): outputs are not frames",
                 len(files) - len(kept), len(skipped), ", ".join(map(str, skipped[:5])),
                 " ..." if len(skipped) > 5 else "")
    return kept


def output_keys(files: list[Path], base: Path) -> list[Path]:
    """Each frame's output name under ``out``, without suffix: its folder relative to ``base`` and its stem
    (``base/a/x.png`` -> ``a/x``). Frames that would share one (``x.png`` beside ``x.jpg``; a top-level
    ``predictions.png`` beside the summary) keep their suffix in it (``x.png.json``, ``x.png_mask.png``)."""
    root = os.path.abspath(base)
    rel = [Path(os.path.relpath(os.path.abspath(p), root)) for p in files]
    stems = [r.with_suffix("") for r in rel]
    count = Counter(stems)
    count[Path(SUMMARY).with_suffix("")] += 1
    keys = [r if count[s] > 1 else s for r, s in zip(rel, stems)]
    first: dict[Path, Path] = {}
    for path, key in zip(files, keys):
        if first.setdefault(key, path) != path:
            raise SynthvitError(f"input: {first[key]} and {path} would write the same outputs ({key}.json); "
                                f"rename one of them")
    return keys


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


def output_path(out_dir: Path, key: Path, suffix: str) -> Path:
    """``<out>/a/x.json`` for the key ``a/x`` and the suffix ``.json``."""
    return out_dir / key.parent / f"{key.name}{suffix}"


def read_frame(path: Path, channels: int) -> np.ndarray:
    """A frame as uint8 pixels, decoded from its bytes as training reads it (a TIFF's EXIF orientation applied)."""
    with open_image(path)() as im:  # its errors name the file, not an in-memory buffer
        return to_array(im, channels)


def _save_image(out_dir: Path, key: Path, suffix: str, image: Image.Image, fmt: str, **params) -> str:
    path = output_path(out_dir, key, suffix)
    with atomic_open(path) as f:
        image.save(f, format=fmt, **params)
    return path.relative_to(out_dir).as_posix()


class MaskRule(NamedTuple):
    """How predict turns probabilities into a mask: ``threshold`` on p(defect), then the most probable defect class
    (None: argmax with p(defect) >= 0.5, the rule of exports made before decisions were fitted)."""
    name: str  # threshold | shrink | logit-adjust (the run's fitted decision), user, or argmax
    threshold: float | None

    @classmethod
    def of(cls, meta: ExportMeta, threshold: str | float) -> MaskRule:
        """``threshold`` auto: the export's fitted decision (argmax without one); a number: that threshold."""
        if threshold != "auto":
            return cls("user", float(threshold))
        if meta.decision is not None:
            return cls(meta.decision.rule, meta.decision.threshold)
        return cls("argmax", None)

    def classes(self, probs) -> np.ndarray:
        probs = probs.cpu()  # the predictor leaves them on its device
        if self.threshold is None:
            classes = probs.argmax(0).numpy().astype(np.uint8)
            classes[(1 - probs[0]).numpy() < 0.5] = 0
            return classes
        return class_map(probs, self.threshold).numpy().astype(np.uint8)


def write_prediction(path: Path, out_dir: Path, image: np.ndarray, result: dict, meta: ExportMeta,
                     rule: MaskRule | float, key: Path | None = None) -> dict:
    """Write a frame's outputs as ``<out_dir>/<key>...`` (key: the stem by default), each atomically and the JSON
    last, so that the JSON exists only beside complete outputs; its record. ``rule``: a :class:`MaskRule` or a
    p(defect) threshold."""
    rule = rule if isinstance(rule, MaskRule) else MaskRule("user", float(rule))
    key = Path(path.stem) if key is None else key
    output_path(out_dir, key, ".json").parent.mkdir(parents=True, exist_ok=True)
    record: dict = {"image": str(path), "width": image.shape[1], "height": image.shape[0],
                    "defect_score": round(result["score"], 6)}
    if "probs" in result:
        classes = rule.classes(result["probs"])
        names = meta.seg_classes
        record["decision"] = {"rule": rule.name, "threshold": rule.threshold}
        record["defects"] = regions(classes, names)
        record["areas"] = {n: int((classes == k).sum()) for k, n in enumerate(names) if k}
        record["mask"] = _save_image(out_dir, key, "_mask.png", Image.fromarray(classes), "PNG")
        record["overlay"] = _save_image(out_dir, key, "_overlay.jpg",
                                        Image.fromarray(overlay(image, classes, len(names))), "JPEG", quality=90)
    if "cls_probs" in result:
        p = result["cls_probs"].tolist()
        record["classes"] = {n: round(v, 6) for n, v in zip(meta.cls_classes, p)}
        record["predicted_class"] = meta.cls_classes[int(np.argmax(p))]
    atomic_write_text(output_path(out_dir, key, ".json"), dumps_json(record, indent=2) + "\n")
    return record


def predict_files(predictor, files: list[Path], out_dir: Path, meta: ExportMeta, threshold: MaskRule | float,
                  keys: list[Path] | None = None, overwrite: bool = False) -> dict:
    """Predict every frame whose JSON is not in ``out_dir`` yet (``overwrite``: every frame), appending each record
    to predictions.jsonl as it finishes (a done frame's read back from its JSON), then build predictions.json from
    it. A frame that cannot be read is skipped with a warning and listed under ``failed``. Returns the counts:
    ``{"predicted": n, "skipped": n (done before), "failed": [{"image", "error"}, ...]}``."""
    if keys is None:
        keys = output_keys(files, Path(os.path.commonpath([os.path.abspath(p.parent) for p in files])))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SUMMARY).unlink(missing_ok=True)  # there again only once this run is complete
    done = [not overwrite and output_path(out_dir, k, ".json").is_file() for k in keys]
    counts, failed = Counter(predicted=0, skipped=0), []
    bar = progress_bar(total=len(files), initial=sum(done), desc="predict", unit="frame")
    with bar, open(out_dir / RECORDS, "w", encoding="utf-8") as stream:
        for path, key, finished in zip(files, keys, done):
            record = _read_back(out_dir, key, path) if finished else None
            if record is not None:
                counts["skipped"] += 1
            else:
                record = _predict_frame(predictor, path, out_dir, key, meta, threshold, failed)
                counts["predicted"] += record is not None
                bar.update(0 if finished else 1)  # a done frame redone was counted in the bar's start
            if record is not None:
                stream.write(dumps_json(record) + "\n")
                stream.flush()
    _write_summary(out_dir, failed)
    return {**counts, "failed": failed}


def _read_back(out_dir: Path, key: Path, path: Path) -> dict | None:
    """The record of a frame an earlier run finished, or None to predict it again: its JSON was written for another
    image (another input mapped to the same name) or an output it names is gone."""
    json_path = output_path(out_dir, key, ".json")
    try:
        record = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    image = record.get("image") if isinstance(record, dict) else None
    if not isinstance(image, str) or os.path.abspath(image) != os.path.abspath(path):
        log.warning("%s holds the outputs of %s, not of %s: predicting %s again over them", json_path, image, path,
                    path)
        return None
    if any(not (out_dir / record[k]).is_file() for k in ("mask", "overlay") if isinstance(record.get(k), str)):
        return None
    return record


def _predict_frame(predictor, path: Path, out_dir: Path, key: Path, meta: ExportMeta, threshold: MaskRule | float,
                   failed: list[dict]) -> dict | None:
    try:
        image = read_frame(path, meta.in_chans)
    except FRAME_ERRORS as e:
        reason = str(e) or type(e).__name__
        log.warning("cannot read %s (%s): skipped, going on with the other frames", path, reason)
        failed.append({"image": str(path), "error": reason})
        return None
    try:
        result = predictor(image)
    except NonFiniteOutput:  # no score is not "no defect": the frame fails, listed with why
        reason = "non-finite model output (NaN or infinity): no defect score"
        log.warning("%s: %s; skipped, going on with the other frames", path, reason)
        failed.append({"image": str(path), "error": reason})
        return None
    return write_prediction(path, out_dir, image, result, meta, threshold, key)


def _write_summary(out_dir: Path, failed: list[dict]) -> None:
    """predictions.json from predictions.jsonl, a record at a time: ``{"predictions": [...], "failed": [...]}``."""
    with atomic_open(out_dir / SUMMARY) as f, open(out_dir / RECORDS, "rb") as records:
        f.write(b'{"predictions": [')
        for i, line in enumerate(records):
            f.write((b",\n  " if i else b"\n  ") + line.rstrip(b"\n"))
        f.write(b'\n],\n"failed": ' + dumps_json(failed, indent=2).encode() + b"}\n")


def check_earlier_run(out_dir: Path, checkpoint: str, threshold: str | float, overwrite: bool) -> None:
    """``out_dir`` is a new folder or one an earlier predict wrote (its ``config.yaml``: never clobber another
    stage's folder); a re-run that keeps the frames done before must predict as that run did: the same checkpoint
    and threshold."""
    path = out_dir / CONFIG_FILE
    if not path.is_file():
        return
    try:
        earlier = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        earlier = None
    if not isinstance(earlier, dict) or not {"checkpoint", "input", "out", "threshold"} <= set(earlier):
        raise SynthvitError(f"out: {out_dir} holds a {CONFIG_FILE} that synthvit predict did not write (a run "
                            f"folder?); give another out")
    changed = []
    if os.path.abspath(str(earlier["checkpoint"])) != os.path.abspath(checkpoint):
        changed.append(f"checkpoint={earlier['checkpoint']}")
    if str(earlier["threshold"]) != str(threshold) and _number(earlier["threshold"]) != _number(threshold):
        changed.append(f"threshold={earlier['threshold']}")
    if changed and not overwrite:
        raise SynthvitError(f"out: {out_dir} holds predictions made with {', '.join(changed)} ({path}), not "
                            f"checkpoint={checkpoint}, threshold={threshold}; give overwrite=true to redo every "
                            f"frame, or another out")


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def failure_message(failed: list[dict], total: int, out_dir: Path) -> str:
    """The error of a run with unreadable frames: how many, the first SHOWN of them and why, where all are listed."""
    lines = [f"  {f['image']}: {f['error']}" for f in failed[:SHOWN]]
    if len(failed) > SHOWN:
        lines.append(f"  ... and {len(failed) - SHOWN} more")
    return (f"{len(failed)} of {total} frames could not be read or predicted and were skipped (the other {total - len(failed)} "
            f"are done; every failed frame is listed under \"failed\" in {out_dir / SUMMARY}):\n" + "\n".join(lines))
