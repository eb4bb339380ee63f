"""The defect decision an export ships with: which pixels of a probability map are called defects.

A segmentation model trained on defect-centred crops learns a defect prior far above the frames' own (80 % of the
crops on a defect, against a few percent of defect pixels per frame), so ``argmax`` (``p(defect) > 0.5``) paints
defects over far too many pixels. finetune therefore fits a threshold on ``p(defect) = 1 - p(background)`` from
*training* frames (:mod:`finetune.calibrate`) and stores it here, in the export's ``config.json``; evaluate, predict
and compare apply it. The rule decides defect against background; among defect classes the most probable wins.

Three rules are fitted, one kept as ``rule`` (the others stay in ``candidates``):

- ``threshold``: the threshold that maximises defect IoU on the scored training frames.
- ``shrink`` (the default): that threshold pulled toward 0.5 by the number of defective frames it was fitted on
  (:func:`shrunk_threshold`): with a handful of defects the model memorises them and the IoU-best threshold on its
  own frames under-paints unseen ones.
- ``logit-adjust``: Menon et al. (2021), "Long-tail learning via logit adjustment": subtracting
  ``log(sampled odds / natural odds)`` of the defect class from its logit, which for the defect-vs-background
  decision is the threshold ``R / (1 + R)`` with ``R`` that odds ratio.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from synthvit.io import SynthvitError

RULES = ("threshold", "shrink", "logit-adjust")


class DecisionError(SynthvitError):
    """A ``decision`` record in an export's config.json that lacks a key or has one of the wrong type."""


@dataclass(kw_only=True)
class Decision:
    """A fitted defect decision: ``rule`` and its ``threshold`` on ``p(defect)``, every fitted rule's threshold,
    and what it was fitted on (never test pixels)."""
    rule: str  # threshold | logit-adjust
    threshold: float  # on p(defect) = 1 - p(background)
    candidates: dict[str, float] = field(default_factory=dict)  # rule -> its threshold
    fitted_on: str = ""  # which frames were scored, e.g. "train: 58 of 117 defective + 64 of 823 defect-free frames"
    train_defect_iou: dict[str, float] = field(default_factory=dict)  # rule (and argmax) -> IoU on those frames
    prior: dict[str, float] = field(default_factory=dict)  # natural and sampled defect-pixel shares

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.rule, "threshold": self.threshold, "candidates": self.candidates,
                "fitted_on": self.fitted_on, "train_defect_iou": self.train_defect_iou, "prior": self.prior}

    @classmethod
    def from_json(cls, doc: Any, source) -> Decision:
        if not isinstance(doc, dict):
            raise DecisionError(f"{source}: key 'decision' is {doc!r}, expected an object")
        rule, threshold = doc.get("rule"), doc.get("threshold")
        if rule not in RULES:
            raise DecisionError(f"{source}: decision.rule is {rule!r}; expected one of {', '.join(RULES)}")
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0 <= threshold <= 1:
            raise DecisionError(f"{source}: decision.threshold is {threshold!r}; expected a number in [0, 1]")
        return cls(rule=rule, threshold=float(threshold), candidates=dict(doc.get("candidates") or {}),
                   fitted_on=str(doc.get("fitted_on") or ""), train_defect_iou=dict(doc.get("train_defect_iou") or {}),
                   prior=dict(doc.get("prior") or {}))

    def with_rule(self, rule: str) -> Decision:
        """The same fit with another of its rules kept."""
        if rule not in self.candidates:
            raise SynthvitError(f"rule: {rule!r} was not fitted; fitted: {', '.join(self.candidates)}")
        return Decision(rule=rule, threshold=self.candidates[rule], candidates=self.candidates,
                        fitted_on=self.fitted_on, train_defect_iou=self.train_defect_iou, prior=self.prior)


def top_class(probs: torch.Tensor) -> torch.Tensor:
    """(K, H, W) -> (H, W) int64: the index of the most probable of the K maps (the first on a tie), as
    ``probs.argmax(0)``. A reduction over the leading dim of a (K, H, W) tensor runs ~6x slower on a CPU than one
    over a contiguous last dim (180 ms against 30 ms for 6 x 640 x 640 on one thread), so the maps are laid out
    pixel-major first."""
    return probs.permute(1, 2, 0).contiguous().argmax(-1)


def class_map(probs: torch.Tensor, threshold: float | None, defect_class: torch.Tensor | None = None) -> torch.Tensor:
    """(K, H, W) class probabilities -> (H, W) int64 classes. ``threshold`` None: argmax; else a pixel is a defect
    where ``1 - p(background) > threshold``, of its most probable defect class. ``defect_class``: that most
    probable defect class of every pixel (``top_class(probs[1:]) + 1``), when the caller applies several
    thresholds to the same map."""
    if threshold is None:  # argmax; for two classes the same comparison, several times faster on a 4K frame
        return (probs[1] > probs[0]).long() if probs.shape[0] == 2 else top_class(probs)
    defect = (1 - probs[0]) > threshold
    if probs.shape[0] <= 2:
        return defect.long()
    classes = defect_class if defect_class is not None else top_class(probs[1:]) + 1
    return classes * defect


def logit_adjust_threshold(sampled: float, natural: float) -> float:
    """The p(defect) threshold equivalent to logit adjustment from the ``sampled`` to the ``natural`` defect share
    (both in (0, 1)): ``R / (1 + R)``, ``R = odds(sampled) / odds(natural)``."""
    eps = 1e-9
    s, n = min(max(sampled, eps), 1 - eps), min(max(natural, eps), 1 - eps)
    log_r = math.log(s / (1 - s)) - math.log(n / (1 - n))
    return 1 / (1 + math.exp(-log_r))


SHRINK_FRAMES = 20  # the shrink rule's weight of p = 0.5, in defective training frames (see shrunk_threshold)


def shrunk_threshold(fitted: float, defective_frames: int, prior_frames: float = SHRINK_FRAMES) -> float:
    """The fitted threshold pulled toward 0.5 on the logit scale, by the weight of ``prior_frames`` against the
    ``defective_frames`` it was fitted on: ``logit(t) = n / (n + k) * logit(fitted)``. With a handful of defects the
    model memorises them: on its own training frames they score near 1 and the IoU-best threshold climbs far above
    what unseen defects reach (the threshold rule's predicted / true defect pixels as low as 0.01 on DeepPCB's test
    split at 5-10 defective frames, 0.26-0.38 on two other real sets at 8); with hundreds the fit stands almost as
    it is."""
    n = max(0, defective_frames)
    w = n / (n + prior_frames) if n + prior_frames > 0 else 1.0
    z = math.log(min(max(fitted, 1e-9), 1 - 1e-9) / (1 - min(max(fitted, 1e-9), 1 - 1e-9)))
    return 1 / (1 + math.exp(-w * z))


LOGIT_RANGE, BINS = 16.0, 3200  # p(defect) histogrammed on the logit scale, 0.01 per bin


class DefectHistogram:
    """Weighted pixel counts of defect and background pixels per bin of logit(p(defect))."""

    def __init__(self):
        self.pos = torch.zeros(BINS, dtype=torch.float64)
        self.neg = torch.zeros(BINS, dtype=torch.float64)

    def add(self, p_defect: torch.Tensor, target: torch.Tensor, weight: float) -> None:
        z = torch.logit(p_defect.float().cpu().clamp(1e-7, 1 - 1e-7)).clamp(-LOGIT_RANGE, LOGIT_RANGE - 1e-4)
        idx = ((z + LOGIT_RANGE) * (BINS / (2 * LOGIT_RANGE))).long().flatten()
        is_defect = target.cpu().flatten() > 0
        self.pos += torch.bincount(idx[is_defect], minlength=BINS).double() * weight
        self.neg += torch.bincount(idx[~is_defect], minlength=BINS).double() * weight

    def edge(self, j: int) -> float:
        """p(defect) at the lower edge of bin ``j``."""
        return float(torch.sigmoid(torch.tensor(-LOGIT_RANGE + j * 2 * LOGIT_RANGE / BINS, dtype=torch.float64)))

    def iou_curve(self) -> torch.Tensor:
        """Defect IoU when every pixel in bin j or above is called a defect, for every j."""
        tp = self.pos.flip(0).cumsum(0).flip(0)
        fp = self.neg.flip(0).cumsum(0).flip(0)
        return tp / (fp + self.pos.sum()).clamp_min(1e-12)

    def iou_at(self, threshold: float) -> float:
        return float(self.iou_curve()[self._bin(threshold)])

    def best(self) -> tuple[float, float]:
        """(threshold, IoU) of the IoU-maximising threshold."""
        curve = self.iou_curve()
        j = int(curve.argmax())
        return self.edge(j), float(curve[j])

    def ratio_at(self, threshold: float) -> float | None:
        """Predicted / true defect pixels when pixels with p(defect) > ``threshold`` are called defects."""
        j = self._bin(threshold)
        true = float(self.pos.sum())
        return float(self.pos[j:].sum() + self.neg[j:].sum()) / true if true else None

    def _bin(self, threshold: float) -> int:
        z = float(torch.logit(torch.tensor(threshold, dtype=torch.float64).clamp(1e-7, 1 - 1e-7)))
        return int(np.clip(np.ceil((z + LOGIT_RANGE) * BINS / (2 * LOGIT_RANGE)), 0, BINS - 1))

    @property
    def defect_share(self) -> float:
        total = float(self.pos.sum() + self.neg.sum())
        return float(self.pos.sum()) / total if total else 0.0

    def to_json(self) -> dict:
        """The counts as a JSON object (bins of 0.01 on logit(p(defect)) from -16 to 16; weights rounded)."""
        return {"logit_range": LOGIT_RANGE, "bins": BINS, "pos": [round(float(v), 3) for v in self.pos],
                "neg": [round(float(v), 3) for v in self.neg]}

    @classmethod
    def from_json(cls, doc: dict) -> "DefectHistogram":
        hist = cls()
        if doc.get("bins") != BINS or doc.get("logit_range") != LOGIT_RANGE:
            raise SynthvitError(f"a defect histogram of {doc.get('bins')} bins over +-{doc.get('logit_range')}; this "
                                f"synthvit reads {BINS} over +-{LOGIT_RANGE}")
        hist.pos = torch.tensor(doc["pos"], dtype=torch.float64)
        hist.neg = torch.tensor(doc["neg"], dtype=torch.float64)
        return hist
