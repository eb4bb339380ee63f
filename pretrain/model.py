"""Backbones by timm name (ViTs, conv-stem hybrids, CNNs) and a light dense head on their features."""
from __future__ import annotations

import difflib
import logging
import math
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from synthvit.io import SynthvitError

log = logging.getLogger("synthvit.model")


def create_backbone(name: str, num_classes: int, image_size: int, in_chans: int, drop_path: float,
                    weights: str = "") -> nn.Module:
    """``timm.create_model`` from ``pretrained=False`` or a local weights file (never the hub)."""
    if not timm.is_model(name):
        similar = difflib.get_close_matches(name, timm.list_models(), n=8, cutoff=0.6)
        raise SynthvitError(f"model: unknown timm model {name!r}; similar names: {', '.join(similar) or 'none'} "
                            f"(see timm.list_models())")
    kwargs = dict(num_classes=num_classes, in_chans=in_chans, drop_path_rate=drop_path)
    if weights and not Path(weights).is_file():
        raise SynthvitError(f"weights: {weights} is not a file; give a local .safetensors (or .pth) file")
    try:
        model = timm.create_model(name, img_size=image_size, **kwargs)
    except TypeError as e:  # CNNs take any input size and have no img_size argument
        if "img_size" not in str(e):
            raise
        model = timm.create_model(name, **kwargs)
    if weights:
        load_local_weights(model, weights)
    return model


def _read_state(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as e:
        raise SynthvitError(f"weights: cannot read {path} as tensors only ({type(e).__name__}: {e}); "
                            f"convert it to .safetensors") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            return state[key]
    return state


def load_local_weights(model: nn.Module, path: str) -> None:
    """Load a local timm-style state dict into ``model`` as timm's pretrained path does, whatever the timm
    version: the architecture's own ``checkpoint_filter_fn`` (position-embedding resampling), input-conv
    adaptation for another ``in_chans``, and classifier tensors of another shape left freshly initialised."""
    import sys

    from timm.models import adapt_input_conv

    state = _read_state(str(path))
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    own = model.state_dict()
    loaded, skipped = {}, []
    for key, value in state.items():
        if key not in own:
            continue
        target = own[key]
        if value.shape != target.shape and value.ndim == 4 and value.shape[0] == target.shape[0] \
                and value.shape[2:] == target.shape[2:]:
            value = adapt_input_conv(target.shape[1], value)
        if value.shape == target.shape:
            loaded[key] = value
        else:
            skipped.append(key)
    if not loaded:
        raise SynthvitError(f"weights: {path} holds no tensor that fits {type(model).__name__} "
                            f"(first keys: {', '.join(list(state)[:5])})")
    model.load_state_dict(loaded, strict=False)
    log.info("weights: %d of %d tensors from %s%s", len(loaded), len(own), path,
             f"; new (other shape): {', '.join(skipped)}" if skipped else "")


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
