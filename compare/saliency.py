"""What the models look at and what their layers hold: layer features for CKA, attention rollout for ViTs
(Abnar & Zuidema 2020), Grad-CAM for CNNs (captum's ``LayerGradCam``).

Every model here is a finetune model: a ``PretrainModel`` around a timm backbone, ``DeepLabV3Plus`` or
``HRNetSeg``; each maps a normalised (B, C, H, W) batch to ``{"seg": ...}`` and/or ``{"cls": ...}``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finetune.models import DeepLabV3Plus, HRNetSeg
from synthvit.io import SynthvitError


def is_vit(model: nn.Module) -> bool:
    backbone = getattr(model, "backbone", None)
    return backbone is not None and hasattr(backbone, "blocks") and hasattr(backbone, "patch_embed")


def _resnet_body(model: nn.Module) -> nn.Module | None:
    body = model.net.encoder if isinstance(model, DeepLabV3Plus) else getattr(model, "backbone", None)
    return body if body is not None and hasattr(body, "layer4") else None


@torch.no_grad()
def layer_features(model: nn.Module, x: torch.Tensor) -> tuple[list[str], list[torch.Tensor]]:
    """(names, features) of every block: ViT blocks (timm ``forward_intermediates``), ResNet residual blocks,
    HRNet stages."""
    if is_vit(model):
        feats = model.backbone.forward_intermediates(x, intermediates_only=True)
        return [f"block{i}" for i in range(len(feats))], feats
    body = _resnet_body(model)
    if body is not None:
        blocks = [(f"layer{s}.{b}", m) for s in range(1, 5) for b, m in enumerate(getattr(body, f"layer{s}"))]
        feats: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda _m, _i, out: feats.append(out)) for _, m in blocks]
        try:
            body(x) if isinstance(model, DeepLabV3Plus) else body.forward_features(x)
        finally:
            for h in hooks:
                h.remove()
        return [n for n, _ in blocks], feats
    if isinstance(model, HRNetSeg):
        feats = model.body(x)
        return [f"stage{i}" for i in range(len(feats))], feats
    raise SynthvitError(f"layer features: {type(model).__name__} is not a ViT, a ResNet or HRNet model")


def attention_rollout(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, H, W) attention rollout of a timm ViT: attention of the class token (or the mean over tokens) to each
    patch, through all blocks with the residual folded in (0.5 A + 0.5 I), upsampled to the input size."""
    vit = model.backbone
    attns: list[torch.Tensor] = []

    def hook(mod, inputs, _out):
        t = inputs[0]
        b, n, _ = t.shape
        qkv = mod.qkv(t).reshape(b, n, 3, mod.num_heads, mod.head_dim).permute(2, 0, 3, 1, 4)
        q, k = mod.q_norm(qkv[0]), mod.k_norm(qkv[1])
        attns.append(((q * mod.scale) @ k.transpose(-2, -1)).softmax(-1).mean(1))

    hooks = [blk.attn.register_forward_hook(hook) for blk in vit.blocks]
    try:
        with torch.no_grad():
            vit.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    rollout = torch.eye(attns[0].shape[-1]).expand_as(attns[0])
    for a in attns:
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1])
        rollout = (a / a.sum(-1, keepdim=True)) @ rollout
    prefix = getattr(vit, "num_prefix_tokens", 1 if getattr(vit, "cls_token", None) is not None else 0)
    source = rollout[:, 0] if getattr(vit, "cls_token", None) is not None else rollout[:, prefix:].mean(1)
    patches = source[:, prefix:]
    h, w = x.shape[-2:]
    gh = max(int(round((patches.shape[1] * h / w) ** 0.5)), 1)
    grid = patches.reshape(-1, 1, gh, patches.shape[1] // gh)
    return F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)[:, 0]


def defect_score(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B,) differentiable defect log-odds: log sum_k>0 exp(z_k) - z_0, averaged over the pixels (segmentation)
    or of the classifier (class 0 is the defect-free class when the data has one). Logits, not probabilities:
    a saturated softmax would give Grad-CAM no gradient."""
    out = model(x)
    z = (out["seg"] if "seg" in out else out["cls"]).float()
    odds = torch.logsumexp(z[:, 1:], 1) - z[:, 0] if z.shape[1] > 1 else z[:, 0]
    return odds.flatten(1).mean(1) if odds.dim() > 1 else odds


def cam_layer(model: nn.Module) -> nn.Module:
    body = _resnet_body(model)
    if body is not None:
        return body.layer4
    if isinstance(model, HRNetSeg):
        return model.head[0]
    backbone = getattr(model, "backbone", None)
    if backbone is not None and hasattr(backbone, "stages"):
        return backbone.stages[-1]
    raise SynthvitError(f"Grad-CAM: no last convolutional stage found in {type(model).__name__}")


def grad_cam(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, H, W) Grad-CAM of the defect score at the model's last convolutional stage, upsampled to the input."""
    from captum.attr import LayerAttribution, LayerGradCam

    cam = LayerGradCam(lambda t: defect_score(model, t), cam_layer(model))
    with torch.enable_grad():
        attr = cam.attribute(x.clone().requires_grad_(True), relu_attributions=True)
    return LayerAttribution.interpolate(attr.detach(), tuple(x.shape[-2:]), interpolate_mode="bilinear")[:, 0]


def saliency(model: nn.Module, x: torch.Tensor) -> tuple[str, torch.Tensor]:
    """("attention rollout" | "Grad-CAM", (B, H, W) map scaled to [0, 1] per image)."""
    kind, maps = ("attention rollout", attention_rollout(model, x)) if is_vit(model) else ("Grad-CAM",
                                                                                        grad_cam(model, x))
    lo = maps.flatten(1).min(1).values[:, None, None]
    hi = maps.flatten(1).max(1).values[:, None, None]
    return kind, (maps - lo) / (hi - lo).clamp(min=1e-12)
