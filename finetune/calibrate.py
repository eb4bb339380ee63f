"""Fit the defect decision of a finetune run on its *training* frames (never test pixels).

Training crops are drawn defect-centred (``defect_crop_prob``, 0.8 in the compare configs), so the model learns a
defect prior tens of times above the frames' own and ``argmax`` over-paints defects (14-17x the true defect pixels
on two real sets). After training, :func:`fit_decision` scores whole training frames at full resolution, tiled as
evaluation tiles them, and fits three rules (see :mod:`synthvit.models.decision`):

- ``threshold``: the p(defect) threshold that maximises defect IoU over those frames' pixels;
- ``shrink`` (the default): that threshold pulled toward 0.5 by the few defective frames it saw;
- ``logit-adjust``: the threshold that undoes the prior shift, from the defect-pixel share of the training crops
  (the sampler replayed on the masks) and of the training frames.

Why training frames and not a held-out share of them: the runs this is for have few labelled defects (5-100
defective frames); holding some out would take them from training, and the shift being corrected comes from the
sampler, not from the frames. The frames scored: up to ``calibrate.max_images`` of the train split, half defective
and half defect-free where there are that many (a seeded draw), each half weighted to its whole count so the pixel
shares are the split's.

A frame over ``calibrate.max_pixels`` (2 M by default: a 3840x2160 frame holds 8.3 M) is not scored whole: it is cut
into 512 px cells, every cell that holds a defect pixel is scored (up to half the budget) and a seeded draw of the
others fills the rest, each drawn cell weighted by the count of its stratum over the count drawn (an unbiased
estimate of the frame's histogram; Horvitz-Thompson). Each cell is predicted inside a window of the model's tiles
snapped into the frame, so it sees the context evaluation gives it. On 4K frames this scores ~4x fewer pixels
(DeepLabV3+ on one CPU thread: ~40 s a frame whole).
"""
from __future__ import annotations

import logging
import zlib
from pathlib import Path

import numpy as np
import torch

from finetune.evaluate import NonFiniteOutput
from finetune.train import replayed_windows
from synthvit.data import Item, RealData, has_defect, to_array
from synthvit.io import atomic_write_text, dumps_json
from synthvit.models import Decision
from synthvit.models.decision import DefectHistogram, logit_adjust_threshold, shrunk_threshold
from synthvit.progress import progress_bar

log = logging.getLogger("synthvit.finetune")

CELL = 512  # the side of the cells a frame over calibrate.max_pixels is scored on
SAMPLED_CROPS = 2048  # training samples replayed (masks only) to measure the sampled defect share


def scored_frames(items: list[Item], max_images: int, seed: int) -> list[tuple[str, list[Item], int]]:
    """The training frames to score as (kind, frames, whole count) groups: defective and defect-free, each a seeded
    draw of at most half of ``max_images`` (more of one when the other has fewer)."""
    defective = [it for it in items if has_defect(it)]
    free = [it for it in items if not has_defect(it)]
    n_def = min(len(defective), max(max_images // 2, max_images - len(free)))
    n_free = min(len(free), max_images - n_def)
    rng = np.random.default_rng([seed, 22])
    groups = []
    for kind, group, n in (("defective", defective, n_def), ("defect-free", free, n_free)):
        if n:
            keep = sorted(rng.choice(len(group), n, replace=False).tolist())
            groups.append((kind, [group[k] for k in keep], len(group)))
    return groups


Cell = tuple[slice, slice]


def calibration_cells(mask: np.ndarray, max_pixels: int, side: int, rng: np.random.Generator
                      ) -> list[tuple[Cell, Cell, float]]:
    """What to score of a frame with defect ``mask`` (H, W): (window to predict, cell inside it to count, weight)
    triples, in frame coordinates. The whole frame with weight 1 when it has at most ``max_pixels`` pixels (or
    ``max_pixels`` is 0); else ``side`` px cells (a partition of the frame): the cells holding a defect and those
    without are two strata, each drawn without replacement and weighted by stratum size / cells drawn, at most
    ``max_pixels`` in all (at least one cell of each stratum present). Each cell's window is ``side`` square (the
    frame's side where shorter), snapped into the frame."""
    h, w = mask.shape
    if not max_pixels or h * w <= max_pixels:
        return [((slice(0, h), slice(0, w)), (slice(0, h), slice(0, w)), 1.0)]
    cells = [(y, x) for y in range(0, h, side) for x in range(0, w, side)]
    hits = [bool(mask[y:y + side, x:x + side].any()) for y, x in cells]
    budget = max(2, max_pixels // (side * side))
    strata = [[c for c, hit in zip(cells, hits) if hit], [c for c, hit in zip(cells, hits) if not hit]]
    n_def = min(len(strata[0]), max(1, budget // 2 if strata[1] else budget))
    n_free = min(len(strata[1]), max(1, budget - n_def))
    out = []
    for group, n in zip(strata, (n_def, n_free)):
        if not group:
            continue
        for k in sorted(rng.choice(len(group), n, replace=False).tolist()):
            y, x = group[k]
            wy = min(y, max(0, h - side))  # the window: side square, snapped into the frame
            wx = min(x, max(0, w - side))
            out.append(((slice(wy, wy + side), slice(wx, wx + side)),
                        (slice(y, min(y + side, h)), slice(x, min(x + side, w))), len(group) / n))
    return out


def sampled_defect_share(data: RealData, items: list[Item], cfg, synthetic=None) -> float:
    """The defect-pixel share of the crops training drew (mixed-in synthetic ones included): the run's own sampler
    replayed for up to :data:`SAMPLED_CROPS` of its sample ids, on masks alone (each mask read once)."""
    defect = pixels = 0
    for window in replayed_windows(data, items, cfg, SAMPLED_CROPS, synthetic):
        defect += int(np.count_nonzero(window))
        pixels += window.size
    return defect / pixels if pixels else 0.0


def _probs(predictor, image: np.ndarray, item: Item) -> torch.Tensor:
    """The predictor's class probabilities of a training frame (window); a non-finite output names the frame."""
    try:
        return predictor(image)["probs"]
    except NonFiniteOutput as e:  # NaN in the histogram: no threshold can be fitted
        raise NonFiniteOutput(f"calibrate: training frame {item.source}: {e}") from None


def fit_decision(predictor, data: RealData, items: list[Item], cfg, synthetic=None,
                 record: Path | None = None) -> Decision | None:
    """The run's defect decision from its training ``items`` (``cfg``: the FinetuneConfig), or None where there is
    nothing to fit (``calibrate.rule=argmax``, no dense head, no defect pixel among the training frames). ``record``:
    a file the training frames' p(defect) histogram is written to (JSON), for studying rules afterwards."""
    rule = cfg.calibrate.rule
    if rule == "argmax" or not predictor.meta.heads.has_seg or not data.has_masks:
        return None
    groups = scored_frames(items, cfg.calibrate.max_images, cfg.data_seed)
    if not any(kind == "defective" for kind, _, _ in groups):
        log.warning("calibrate: no training frame holds a defect pixel; the decision stays argmax")
        return None
    hist, per_group = DefectHistogram(), {}
    n = sum(len(frames) for _, frames, _ in groups)
    max_pixels = cfg.calibrate.max_pixels
    side = max(CELL, predictor.tiler.tile)
    scored = total = 0
    with progress_bar(total=n, desc="calibrate", unit="img") as bar:
        for kind, frames, whole in groups:
            weight = whole / len(frames)  # each scored frame stands for this many of the split's
            own = per_group[kind] = DefectHistogram()  # the scored frames of this kind, each weighted 1
            for item in frames:
                with item.load() as im:
                    image = to_array(im, cfg.in_chans)
                h, w = image.shape[:2]
                mask = np.array(item.mask((w, h))) if item.mask is not None else np.zeros((h, w), np.uint8)
                rng = np.random.default_rng([cfg.data_seed, 23, zlib.crc32(item.id.encode())])
                for window, cell, share in calibration_cells(mask, max_pixels, side, rng):
                    p = 1 - _probs(predictor, image[window], item)[0]
                    inner = tuple(slice(c.start - o.start, c.stop - o.start) for c, o in zip(cell, window))
                    own.add(p[inner], torch.from_numpy(mask[cell]), share)
                    scored += (cell[0].stop - cell[0].start) * (cell[1].stop - cell[1].start)
                total += h * w
                bar.update(1)
            hist.pos += own.pos * weight
            hist.neg += own.neg * weight
    if record is not None:  # the weighted whole, and each kind's scored frames apart (rules weighing them otherwise)
        groups_json = {kind: {"frames": len(frames), "whole": whole, **per_group[kind].to_json()}
                       for kind, frames, whole in groups}
        atomic_write_text(record, dumps_json({**hist.to_json(), "groups": groups_json}) + "\n")
    natural, sampled = hist.defect_share, sampled_defect_share(data, items, cfg, synthetic)
    best, best_iou = hist.best()
    adjusted = logit_adjust_threshold(sampled, natural)
    n_defective = sum(has_defect(it) for it in items)
    shrunk = shrunk_threshold(best, n_defective)
    candidates = {"threshold": round(best, 6), "shrink": round(shrunk, 6), "logit-adjust": round(adjusted, 6)}
    counts = " + ".join(f"{len(frames)} of {whole} {kind}" for kind, frames, whole in groups)
    cells = "" if scored == total else f", {100 * scored / total:.0f}% of their pixels in {side} px cells"
    decision = Decision(rule=rule, threshold=candidates[rule], candidates=candidates,
                        fitted_on=f"train split at full resolution (tile {predictor.tiler.tile}): {counts} frames"
                                  f"{cells}",
                        train_defect_iou={"threshold": round(best_iou, 6),
                                          "shrink": round(hist.iou_at(shrunk), 6),
                                          "logit-adjust": round(hist.iou_at(adjusted), 6),
                                          "p>0.5": round(hist.iou_at(0.5), 6)},
                        prior={"natural": round(natural, 8), "sampled": round(sampled, 8),
                               "defective_frames": n_defective})
    log.info("calibrate: defect pixels %.4f%% of the train frames, %.2f%% of the training crops; thresholds on "
             "p(defect): threshold %.4f (train IoU %.4f), shrink %.4f (%d defective frames; train IoU %.4f), "
             "logit-adjust %.4f (train IoU %.4f), 0.5 (train IoU %.4f); using %s", 100 * natural, 100 * sampled,
             best, best_iou, shrunk, n_defective, decision.train_defect_iou["shrink"], adjusted,
             decision.train_defect_iou["logit-adjust"], decision.train_defect_iou["p>0.5"], rule)
    return decision
