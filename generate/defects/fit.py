"""Procedural defects fitted to the user's (``defects.fit=FOLDER``): sizes, shapes, contrast and counts read off the
labelled defects of a real-data folder's *train* split.

FOLDER is a real-data folder in any format with masks; its split is finetune's (``splits.csv``, else the seeded
split of ``defects.fit_test_fraction`` / ``defects.fit_data_seed``), and with ``real_ids`` only the train images it
lists are read: a test image is never opened (but for its mask and size where the seeded split is stratified by
defect presence, as finetune's is). What it reads is checked first as finetune checks it
(:func:`synthvit.data.checked_split`): every unreadable image, mask of another size or mask value outside the classes
is listed in one error, before anything is measured. Each instance is a connected component (8-connected) of one
class of a train mask (components under ``MIN_AREA`` px, annotation specks, are left out), measured by
:func:`generate.defects.shape.measure` relative to its frame's short side, and its contrast is the mean grey level
(0..1) inside it minus that of a ``RING`` px ring around it (other defects' pixels left out). The real classes are
pooled: every painter class (``defects.classes``) draws from the same fitted distributions and keeps its own look.

:func:`fit_defects` writes the numbers into the config's ``defects`` keys (``fit_stats`` says which): quantiles at
``LEVELS`` evenly spaced levels, the count's probabilities, ``defect_free_prob`` (the share of train frames without
a defect); ``defects.fitted`` records what was read. While ``fitted`` is set the folder is not read again, so the
resolved ``config.yaml`` of a run reproduces it without the data.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from generate.backgrounds import allowed_train, read_real_ids
from generate.config import MAX_COUNT
from generate.defects.shape import measure
from synthvit.data import (
    GOOD_NAMES,
    SPLITS_FILE,
    DataError,
    checked_split,
    has_defect,
    load_real_data,
    shown_size,
    to_array,
    why,
)
from synthvit.io import SynthvitError

log = logging.getLogger("synthvit.generate")

KEY = "defects.fit"
LEVELS = 11  # quantiles at 0, 0.1, ..., 1
MIN_AREA = 4  # px: smaller components are annotation specks, left out
RING = 3  # px around an instance its contrast is measured against
EIGHT = np.ones((3, 3), bool)
DRAWS_NO_DEFECTS = ("contours", "copypaste")  # backends that never read defects.*


class FitError(SynthvitError):
    pass


class Measurement(NamedTuple):
    size: float  # length / the frame's short side
    aspect: float
    angle: float
    contrast: float | None  # None: no background around it


@dataclasses.dataclass(frozen=True)
class Measured:
    """What the train split holds: every instance, the instances per defective frame, the frames."""
    instances: list[Measurement]
    counts: list[int]
    frames: int
    defect_free: int
    record: str  # for defects.fitted


def measure_frame(grey: np.ndarray, mask: np.ndarray) -> tuple[list[Measurement], int]:
    """The instances of one frame (``grey`` (H, W) in [0, 1], ``mask`` its class map) and how many components were
    under ``MIN_AREA`` px."""
    defect = mask > 0
    side = min(mask.shape)
    out, small = [], 0
    for c in np.unique(mask[defect]).tolist():
        lab, _ = ndimage.label(mask == c, structure=EIGHT)
        for j, (sy, sx) in enumerate(ndimage.find_objects(lab), start=1):
            ys = slice(max(0, sy.start - RING), sy.stop + RING)
            xs = slice(max(0, sx.start - RING), sx.stop + RING)
            own = lab[ys, xs] == j
            if int(own.sum()) < MIN_AREA:
                small += 1
                continue
            g = measure(own)
            ring = ndimage.binary_dilation(own, EIGHT, iterations=RING) & ~defect[ys, xs]
            patch = grey[ys, xs]
            contrast = float(patch[own].mean() - patch[ring].mean()) if ring.any() else None
            out.append(Measurement(g.length / side, g.aspect, g.angle, contrast))
    return out, small


def measure_train(folder: str, fmt: str = "auto", test_fraction: float = 0.3, data_seed: int = 0,
                  split_missing: str = "error", allowed: frozenset[str] | None = None) -> Measured:
    """Every labelled defect of ``folder``'s train split (those ``allowed`` lists, when given); every problem of the
    input is one :class:`FitError`."""
    root = Path(folder)
    if not root.is_dir():
        raise FitError(f"{KEY}: {root} is not a folder; give a real-data folder (any format with masks)")
    try:
        data = load_real_data(root, fmt, check=False, split_missing=split_missing)
        if not data.has_masks:
            raise FitError(f"{KEY}: {root} ({data.fmt} layout) has no masks"
                           f"{': ' + data.masks_refused if data.masks_refused else ''}; the fit measures labelled "
                           f"defects: give masks, polygons or COCO segmentations")
        # the train images it reads (those real_ids lists, when given), checked as finetune checks them
        _, train = checked_split(data, test_fraction, data_seed,
                                 lambda split: allowed_train(root, data, split, allowed, KEY))
    except DataError as e:
        raise FitError(f"{KEY}: {e}") from None
    except FitError:
        raise
    except SynthvitError as e:
        raise FitError(str(e)) from None
    train = sorted(train, key=lambda i: i.id)
    source = SPLITS_FILE if data.splits else (f"seeded: defects.fit_test_fraction={test_fraction}, "
                                              f"defects.fit_data_seed={data_seed}")
    instances, counts, problems, small, free = [], [], [], 0, 0
    for item in train:
        try:
            if not has_defect(item):
                free += not (data.has_labels and (item.label or "").lower() not in GOOD_NAMES)
                continue
            with item.load() as im:
                size = shown_size(im)
                grey = to_array(im, 1).astype(np.float32) / 255.0
            mask = item.mask(size)
            if mask.shape != grey.shape:
                raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]}, image is {size[0]}x{size[1]}")
            found, dropped = measure_frame(grey, mask)
        except Exception as e:  # PIL raises OSError, SyntaxError, DecompressionBombError ...
            problems.append(f"{item.source}: {why(e)}")
            continue
        small += dropped
        if found:
            instances += found
            counts.append(len(found))
    if problems:
        raise FitError(f"{KEY}: {len(problems)} problem(s) in {root}: " + "; ".join(problems[:20])
                       + (" ..." if len(problems) > 20 else "") + "; remove or fix them")
    if not instances:
        raise FitError(f"{KEY}: {root} ({data.fmt} layout) has no labelled defect of at least {MIN_AREA} px in its "
                       f"train split ({len(train)} train images, {len(train) - free} not defect-free, {small} "
                       f"smaller components; split: {source}); the fit needs defects with masks in the train split")
    record = (f"{root} ({data.fmt}; train split, {source}{'; real_ids' if allowed is not None else ''}): "
              f"{len(train)} frames, {free} defect-free, {len(instances)} instances in {len(counts)} frames "
              f"(classes pooled: {', '.join(data.seg_classes[1:])}; {small} under {MIN_AREA} px left out)")
    return Measured(instances, counts, len(train), free, record)


def _quantiles(values, digits: int = 4) -> list[float]:
    return [float(f"{v:.{digits}g}") for v in np.quantile(np.asarray(values, np.float64), np.linspace(0, 1, LEVELS))]


def unwrap_angles(angles: np.ndarray) -> np.ndarray:
    """Angles (mod 180) moved by +180 below the middle of their widest gap, so their quantiles run through the
    directions they hold (a spread around 0/180 stays one spread)."""
    a = np.sort(np.asarray(angles, np.float64) % 180.0)
    gaps = np.diff(np.concatenate([a, [a[0] + 180.0]]))
    k = int(gaps.argmax())
    cut = (a[k] + gaps[k] / 2) % 180.0
    out = np.asarray(angles, np.float64) % 180.0
    return np.where(out < cut, out + 180.0, out) if k < len(a) - 1 else out


def fitted_numbers(m: Measured, stats: list[str]) -> dict:
    """The ``defects`` keys ``stats`` name, from ``m``."""
    inst = m.instances
    out: dict = {}
    if "size" in stats:
        out["size"] = _quantiles([i.size for i in inst])
    if "aspect" in stats:
        out["aspect"] = _quantiles([i.aspect for i in inst])
    if "orientation" in stats:
        out["orientation"] = [round(v, 2) for v in _quantiles(unwrap_angles([i.angle for i in inst]), 8)]
    if "contrast" in stats:
        contrasts = [i.contrast for i in inst if i.contrast is not None]
        if contrasts:
            out["contrast"] = [round(v, 4) for v in _quantiles(contrasts, 8)]
        else:
            log.warning("%s: no instance has background around it to measure its contrast against; "
                        "defects.contrast keeps its value", KEY)
    if "count" in stats:
        hist = np.bincount(np.minimum(m.counts, MAX_COUNT), minlength=2)[1:]
        p = np.round(hist / hist.sum(), 4)
        p[int(p.argmax())] += round(1.0 - float(p.sum()), 4)  # the rounding left over: they sum to 1
        out["count"] = [round(float(v), 4) for v in p]
        out["max_defects"] = len(p)
    if "defect_free_prob" in stats:
        out["defect_free_prob"] = round(m.defect_free / m.frames, 4)
    return out


def fit_defects(cfg):
    """``cfg`` with ``defects.fit``'s numbers in its ``defects`` keys (as it is without a fit, or once ``fitted``
    records one)."""
    d = cfg.defects
    if d.fit and cfg.backend in DRAWS_NO_DEFECTS:
        log.warning("%s: backend=%s draws no procedural defects: the fit has no effect and is not read", KEY,
                    cfg.backend)
        return cfg
    if not d.fit or d.fitted:
        if d.fit:
            log.info("%s: the fitted numbers of the config are used (fitted: %s); clear defects.fitted to refit",
                     KEY, d.fitted)
        return cfg
    m = measure_train(d.fit, d.fit_format, d.fit_test_fraction, d.fit_data_seed, d.fit_split_missing,
                      read_real_ids(cfg.real_ids))
    numbers = fitted_numbers(m, d.fit_stats)
    log.info("%s: %s -> %s", KEY, m.record, ", ".join(f"{k}={v}" for k, v in numbers.items()))
    return dataclasses.replace(cfg, defects=dataclasses.replace(d, **numbers, fitted=m.record))
