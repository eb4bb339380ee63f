"""What the models look at: attention rollout for ViTs (Abnar & Zuidema 2020), Grad-CAM for CNNs (captum's
``LayerGradCam``), and how well a map agrees with a ground-truth defect mask (:func:`pixel_auroc`,
:func:`mass_share`).

Every model here is a :class:`synthvit.models.SynthvitModel` (the task model around a timm backbone, DeepLabV3+ or HRNet):
it maps a normalised (B, C, H, W) batch to ``{"seg": ...}`` and/or ``{"cls": ...}`` and hands out its blocks'
features, attention maps and Grad-CAM layer through methods.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from synthvit.models import SynthvitModel


def attention_rollout(model: SynthvitModel, x: torch.Tensor) -> torch.Tensor:
    """(B, H, W) attention rollout of a ViT: attention of the class token (or the mean over tokens) to each
    patch, through all blocks with the residual folded in (0.5 A + 0.5 I), upsampled to the input size."""
    attns = model.attention_maps(x)
    rollout = torch.eye(attns[0].shape[-1]).expand_as(attns[0])
    for a in attns:
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1])
        rollout = (a / a.sum(-1, keepdim=True)) @ rollout
    prefix = model.num_prefix_tokens
    source = rollout[:, 0] if model.has_class_token else rollout[:, prefix:].mean(1)
    patches = source[:, prefix:]
    h, w = x.shape[-2:]
    gh = max(int(round((patches.shape[1] * h / w) ** 0.5)), 1)
    grid = patches.reshape(-1, 1, gh, patches.shape[1] // gh)
    return F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)[:, 0]


def defect_score(model: SynthvitModel, x: torch.Tensor) -> torch.Tensor:
    """(B,) differentiable defect log-odds: log sum_k>0 exp(z_k) - z_0, averaged over the pixels (segmentation)
    or of the classifier (class 0 is the defect-free class when the data has one). Logits, not probabilities:
    a saturated softmax would give Grad-CAM no gradient."""
    out = model(x)
    z = (out["seg"] if "seg" in out else out["cls"]).float()
    odds = torch.logsumexp(z[:, 1:], 1) - z[:, 0] if z.shape[1] > 1 else z[:, 0]
    return odds.flatten(1).mean(1) if odds.dim() > 1 else odds


def grad_cam(model: SynthvitModel, x: torch.Tensor) -> torch.Tensor:
    """(B, H, W) Grad-CAM of the defect score at the model's last convolutional stage, upsampled to the input."""
    from captum.attr import LayerAttribution, LayerGradCam

    cam = LayerGradCam(lambda t: defect_score(model, t), model.cam_layer())
    with torch.enable_grad():
        attr = cam.attribute(x.clone().requires_grad_(True), relu_attributions=True)
    return LayerAttribution.interpolate(attr.detach(), tuple(x.shape[-2:]), interpolate_mode="bilinear")[:, 0]


def saliency(model: SynthvitModel, x: torch.Tensor) -> tuple[str, torch.Tensor]:
    """("attention rollout" | "Grad-CAM", (B, H, W) map scaled to [0, 1] per image)."""
    kind, maps = ("attention rollout", attention_rollout(model, x)) if model.is_vit else ("Grad-CAM",
                                                                                        grad_cam(model, x))
    lo = maps.flatten(1).min(1).values[:, None, None]
    hi = maps.flatten(1).max(1).values[:, None, None]
    return kind, (maps - lo) / (hi - lo).clamp(min=1e-12)


def pixel_auroc(score: np.ndarray, mask: np.ndarray) -> float:
    """AUROC of ``score`` ranking the pixels inside ``mask`` (non-zero: defect) above those outside: the
    Mann-Whitney U statistic with ties counted half. NaN when the mask is empty or covers everything."""
    s, inside = np.asarray(score, np.float64).ravel(), np.asarray(mask).ravel() != 0
    pos, neg = int(inside.sum()), int((~inside).sum())
    if not pos or not neg:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based, ties share their mean rank
    return float((ranks[inside].sum() - pos * (pos + 1) / 2) / (pos * neg))


def mass_share(score: np.ndarray, mask: np.ndarray) -> float:
    """The share of a (non-negative) map's mass that lies inside ``mask``; NaN for an all-zero map."""
    s = np.clip(np.asarray(score, np.float64), 0, None)
    total = s.sum()
    return float(s[np.asarray(mask) != 0].sum() / total) if total > 0 else float("nan")
