"""Backbones by timm name (ViTs, conv-stem hybrids, CNNs) and a light dense head on their features."""
from __future__ import annotations

import difflib
import math
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from synthvit.io import SynthvitError


def create_backbone(name: str, num_classes: int, image_size: int, in_chans: int, drop_path: float,
                    weights: str = "") -> nn.Module:
    """``timm.create_model`` from ``pretrained=False`` or a local weights file (never the hub)."""
    if not timm.is_model(name):
        similar = difflib.get_close_matches(name, timm.list_models(), n=8, cutoff=0.6)
        raise SynthvitError(f"model: unknown timm model {name!r}; similar names: {', '.join(similar) or 'none'} "
                            f"(see timm.list_models())")
    kwargs = dict(num_classes=num_classes, in_chans=in_chans, drop_path_rate=drop_path)
    if weights:
        if not Path(weights).is_file():
            raise SynthvitError(f"weights: {weights} is not a file; give a local .safetensors (or .pth) file")
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)))
    try:
        return timm.create_model(name, img_size=image_size, **kwargs)
    except TypeError as e:  # CNNs take any input size and have no img_size argument
        if "img_size" not in str(e):
            raise
        return timm.create_model(name, **kwargs)


def feature_map(backbone: nn.Module, feats: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """``forward_features`` output as an NCHW map: ViT tokens lose their prefix tokens and become a grid."""
    if feats.ndim == 4:
        return feats
    tokens = feats[:, getattr(backbone, "num_prefix_tokens", 0):]
    n = tokens.shape[1]
    ratio = image_hw[1] / image_hw[0]
    h = max(1, round(math.sqrt(n / ratio)))
    w = n // h
    if h * w != n:
        raise SynthvitError(f"cannot arrange {n} tokens of {type(backbone).__name__} into a grid")
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


class DenseHead(nn.Module):
    """1x1 conv -> BN -> GELU -> 1x1 conv on the feature map, bilinear upsampling to the input size."""

    def __init__(self, in_dim: int, num_classes: int, hidden: int = 256):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(in_dim, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.GELU(),
                                  nn.Conv2d(hidden, num_classes, 1))

    def forward(self, fmap: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(self.proj(fmap), size=size, mode="bilinear", align_corners=False)


class PretrainModel(nn.Module):
    """A timm backbone with its classifier (``cls``) and/or a dense head (``seg``), sharing one feature pass."""

    def __init__(self, backbone: nn.Module, objective: str, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.objective = objective
        self.seg_head = DenseHead(backbone.num_features, num_classes) if "seg" in objective else None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone.forward_features(x)
        out = {}
        if "cls" in self.objective:
            out["cls"] = self.backbone.forward_head(feats)
        if self.seg_head is not None:
            out["seg"] = self.seg_head(feature_map(self.backbone, feats, x.shape[-2:]), x.shape[-2:])
        return out


def build_model(cfg, num_classes: int) -> PretrainModel:
    head_classes = num_classes if "cls" in cfg.objective else 0
    backbone = create_backbone(cfg.model, head_classes, cfg.image_size, cfg.in_chans, cfg.drop_path, cfg.weights)
    return PretrainModel(backbone, cfg.objective, num_classes)


def normalizer(backbone: nn.Module, in_chans: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (C, 1, 1) in 0..255 units from the model's timm data config."""
    data_cfg = timm.data.resolve_model_data_config(backbone)
    mean, std = torch.tensor(data_cfg["mean"]), torch.tensor(data_cfg["std"])
    if in_chans == 1:
        mean, std = mean.mean(0, keepdim=True), std.mean(0, keepdim=True)
    return (mean * 255).view(-1, 1, 1), (std * 255).view(-1, 1, 1)
