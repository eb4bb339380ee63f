"""CutMix for dense targets: the same box pasted into images *and* masks (timm's ``Mixup`` mixes images only).

Built from timm's public pieces (``cutmix_bbox_and_lam``, ``mixup_target``) so boxes, the area-corrected lambda
and label smoothing match timm's batch-mode CutMix exactly. Like timm, it draws from numpy's global RNG, which
the training loop reseeds every step from (seed, step, rank).
"""
from __future__ import annotations

import numpy as np
import torch
from timm.data import Mixup
from timm.data.mixup import cutmix_bbox_and_lam, mixup_target


def paste_box(t: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """In place: the box of every item is replaced by the same box of the batch-reversed partner."""
    yl, yh, xl, xh = box
    t[..., yl:yh, xl:xh] = t.flip(0)[..., yl:yh, xl:xh]
    return t


class MaskCutMix:
    """Batch-mode CutMix of (images, masks, class targets)."""

    def __init__(self, alpha: float, prob: float, label_smoothing: float, num_classes: int):
        self.alpha, self.prob, self.smoothing, self.num_classes = alpha, prob, label_smoothing, num_classes

    def __call__(self, x: torch.Tensor, mask: torch.Tensor, target: torch.Tensor):
        if len(x) % 2:
            raise ValueError(f"CutMix needs an even batch, got {len(x)}")
        lam, box = 1.0, None
        if self.alpha > 0 and np.random.rand() < self.prob:
            box, lam = cutmix_bbox_and_lam(x.shape, np.random.beta(self.alpha, self.alpha), correct_lam=True)
            paste_box(x, box)
            paste_box(mask, box)
        return x, mask, mixup_target(target, self.num_classes, lam, self.smoothing), box


def create_mixer(mix_cfg, objective: str, num_classes: int):
    """timm ``Mixup`` for ``cls``; :class:`MaskCutMix` when masks take part; None when mixing is off."""
    if not mix_cfg.active:
        return None
    if objective == "cls":
        return Mixup(mixup_alpha=mix_cfg.mixup_alpha, cutmix_alpha=mix_cfg.cutmix_alpha, prob=mix_cfg.prob,
                     switch_prob=mix_cfg.switch_prob, mode="batch", label_smoothing=mix_cfg.label_smoothing,
                     num_classes=num_classes)
    return MaskCutMix(mix_cfg.cutmix_alpha, mix_cfg.prob, mix_cfg.label_smoothing, num_classes)
