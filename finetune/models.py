"""Models for fine-tuning: timm ViTs/hybrids/CNNs (with the dense head of pretraining) and the segmentation
baselines users compare against, DeepLabV3+ (segmentation-models-pytorch) and HRNet-W18 (timm features +
an HRNetV2 head). Every model maps (B, C, H, W) to ``{"seg": (B, K, H, W)}`` and/or ``{"cls": (B, K)}``."""
from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.checkpoint import EXPORT_SEG_HEAD, read_export
from pretrain.model import PretrainModel, create_backbone
from synthvit.io import SynthvitError

SEG_BASELINES = ("deeplabv3plus_resnet50", "hrnet_w18_seg")


class DeepLabV3Plus(nn.Module):
    def __init__(self, num_classes: int, in_chans: int):
        super().__init__()
        import segmentation_models_pytorch as smp

        self.net = smp.DeepLabV3Plus(encoder_name="resnet50", encoder_weights=None, in_channels=in_chans,
                                     classes=num_classes)

    def forward(self, x):
        return {"seg": self.net(x)}


class HRNetSeg(nn.Module):
    """HRNetV2-W18: the four branch outputs (18/36/72/144 channels at 1/4..1/32) upsampled to 1/4, concatenated,
    a 1x1 conv head, bilinear to the input size (timm's raw branches, not its classification "incre" features)."""

    def __init__(self, num_classes: int, in_chans: int):
        super().__init__()
        self.body = timm.create_model("hrnet_w18", features_only=True, pretrained=False, in_chans=in_chans,
                                      feature_location="", out_indices=(1, 2, 3, 4))
        ch = sum(self.body.feature_info.channels())
        self.head = nn.Sequential(nn.Conv2d(ch, ch, 1, bias=False), nn.BatchNorm2d(ch), nn.ReLU(inplace=True),
                                  nn.Conv2d(ch, num_classes, 1))

    def forward(self, x):
        feats = self.body(x)
        size = feats[0].shape[-2:]
        fused = torch.cat([feats[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                                        for f in feats[1:]], 1)
        return {"seg": F.interpolate(self.head(fused), size=x.shape[-2:], mode="bilinear", align_corners=False)}


def objective_of(task: str) -> str:
    return {"seg": "seg", "cls": "cls", "both": "cls+seg"}[task]


def build_model(cfg, seg_classes: int, cls_classes: int) -> nn.Module:
    """A model for ``cfg.task``; from scratch, a local weights file or a synthvit pretrain export."""
    if cfg.model in SEG_BASELINES:
        if cfg.task != "seg":
            raise SynthvitError(f"model {cfg.model} is a segmentation baseline; use task=seg (or a timm model)")
        if cfg.init:
            raise SynthvitError(f"init: synthvit exports hold timm models; {cfg.model} cannot load one")
        return DeepLabV3Plus(seg_classes, cfg.in_chans) if cfg.model.startswith("deeplab") else \
            HRNetSeg(seg_classes, cfg.in_chans)
    weights = cfg.weights
    if cfg.init:
        meta, _ = read_export(cfg.init)
        if meta["model"] != cfg.model:
            raise SynthvitError(f"init: {cfg.init} holds {meta['model']}, but model={cfg.model}")
        if meta["in_chans"] != cfg.in_chans:
            raise SynthvitError(f"init: {cfg.init} was trained with in_chans={meta['in_chans']}; set in_chans to it")
        weights = str(Path(cfg.init) / "model.safetensors")
    head = cls_classes if cfg.task in ("cls", "both") else 0
    backbone = create_backbone(cfg.model, head, cfg.crop_size, cfg.in_chans, cfg.drop_path, weights)
    model = PretrainModel(backbone, objective_of(cfg.task), max(seg_classes, 1))
    _load_seg_head(model, cfg.init)
    return model


def _load_seg_head(model: PretrainModel, init: str) -> None:
    """Reuse a pretrained dense head when its shapes match (same number of classes); else keep the new one."""
    if not init or model.seg_head is None or not (Path(init) / EXPORT_SEG_HEAD).is_file():
        return
    from safetensors.torch import load_file

    state = load_file(str(Path(init) / EXPORT_SEG_HEAD))
    own = model.seg_head.state_dict()
    if all(k in own and own[k].shape == v.shape for k, v in state.items()):
        model.seg_head.load_state_dict(state)


def freeze_early(model: nn.Module, k: int) -> int:
    """Freeze the stem and the first ``k`` blocks (ViTs) or stages (ResNets); returns frozen parameter count."""
    if k == 0:
        return 0
    net = getattr(model, "backbone", None) or getattr(getattr(model, "net", None), "encoder", None) or \
        getattr(model, "body", None)
    parts = []
    if hasattr(net, "blocks") and hasattr(net, "patch_embed"):
        parts = [net.patch_embed, *list(net.blocks)[:k]]
        for name in ("cls_token", "pos_embed", "reg_token"):
            if getattr(net, name, None) is not None:
                getattr(net, name).requires_grad_(False)
    elif hasattr(net, "layer1"):
        parts = [m for m in (getattr(net, "conv1", None), getattr(net, "bn1", None)) if m is not None]
        parts += [getattr(net, f"layer{i}") for i in range(1, k + 1) if hasattr(net, f"layer{i}")]
    else:
        raise SynthvitError(f"freeze_blocks: cannot find the stem and blocks of {type(net).__name__}; "
                            f"supported: timm ViTs/hybrids, ResNets and DeepLabV3+")
    for p in parts:
        p.requires_grad_(False)
    return sum(p.numel() for m in parts for p in m.parameters())
