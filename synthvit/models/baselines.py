"""The CNN segmentation baselines users compare ViTs against: DeepLabV3+ with a ResNet-50 encoder
(segmentation-models-pytorch) and HRNetV2-W18 (timm's HRNet branches + an HRNetV2 head).

``encoder`` names each one's encoder as a timm model, tag included (``resnet50.a1_in1k``; none: timm's default tag);
``pretrained=True`` loads that tag's ImageNet weights through :mod:`synthvit.models.hub` (one cache, one offline
rule for every model) and normalises inputs with the tag's mean/std. smp builds DeepLabV3+'s ResNets in
torchvision's layout, which timm's ResNets share key for key: the timm checkpoint's tensors are copied into
``net.encoder``, every one of them checked."""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from synthvit.config import ConfigError
from synthvit.io import SynthvitError
from synthvit.models import hub
from synthvit.models.backbones import cfg_stats, timm_model
from synthvit.models.base import SynthvitModel, freeze, resnet_block_features, resnet_stem_and_stages
from synthvit.models.export import EXPORT_WEIGHTS

# smp's ResNet encoders (torchvision's layout: conv1, bn1, layer1..4), which timm's ResNets of these names share
SMP_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


class _WholeStateExport(SynthvitModel):
    """Baselines export their whole state dict as ``model.safetensors`` and record their encoder; ``pretrained``
    ones normalise inputs with the encoder tag's mean/std."""

    encoder_name = ""
    stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def export_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {EXPORT_WEIGHTS: self.state_dict()}

    def load_export_tensors(self, files: dict[str, dict[str, torch.Tensor]]) -> None:
        self.load_state_dict(files[EXPORT_WEIGHTS])

    def export_meta(self) -> dict:
        return {**super().export_meta(), "encoder": self.encoder_name}

    def input_stats(self, in_chans: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.stats if self.stats is not None else super().input_stats(in_chans)

    def use_encoder(self, encoder: str, in_chans: int, pretrained: bool) -> None:
        self.encoder_name = encoder
        self.weights_source = None
        if pretrained:
            cfg = hub.pretrained_cfg(encoder, "encoder")
            self.stats = cfg_stats(cfg.mean, cfg.std, in_chans)


def _encoder(encoder: str, family: tuple[str, ...], what: str, example: str) -> str:
    """The timm architecture of ``encoder`` (tag checked); one outside ``family`` is a config error naming it."""
    from timm.models import split_model_name_tag

    arch = split_model_name_tag(encoder)[0]
    if arch not in family:
        raise ConfigError(f"encoder: {encoder} cannot be {what}'s encoder; it takes {', '.join(family)} (timm names, "
                          f"any tag, e.g. encoder={example})")
    hub.pretrained_cfg(encoder, "encoder")
    return arch


class DeepLabV3Plus(_WholeStateExport):
    def __init__(self, num_classes: int, in_chans: int, encoder: str = "", pretrained: bool = False):
        super().__init__()
        import segmentation_models_pytorch as smp

        encoder = encoder or "resnet50"
        arch = _encoder(encoder, SMP_RESNETS, "DeepLabV3+", "resnet50.a1_in1k")
        self.net = smp.DeepLabV3Plus(encoder_name=arch, encoder_weights=None, in_channels=in_chans,
                                     classes=num_classes)
        self.use_encoder(encoder, in_chans, pretrained)
        if pretrained:
            self.weights_source = _load_resnet_encoder(self.net.encoder, encoder, in_chans)

    def forward(self, x):
        return {"seg": self.net(x)}

    def input_multiple(self) -> int:
        return int(getattr(self.net.encoder, "output_stride", 16))  # smp refuses other sides

    def freeze_early(self, k: int) -> int:
        return freeze(resnet_stem_and_stages(self.net.encoder, k)) if k else 0

    def feature_blocks(self, x):
        return resnet_block_features(self.net.encoder, lambda: self.net.encoder(x))

    def cam_layer(self) -> nn.Module:
        return self.net.encoder.layer4


class HRNetSeg(_WholeStateExport):
    """HRNetV2-W18: the four branch outputs (18/36/72/144 channels at 1/4..1/32) upsampled to 1/4, concatenated,
    a 1x1 conv head, bilinear to the input size (timm's raw branches, not its classification "incre" features)."""

    def __init__(self, num_classes: int, in_chans: int, encoder: str = "", pretrained: bool = False):
        super().__init__()
        encoder = encoder or "hrnet_w18"
        _encoder(encoder, tuple(timm.list_models("hrnet_w*")), "HRNet", "hrnet_w18.ms_aug_in1k")
        self.body = timm_model(encoder, hub.fetch_weights(encoder, "encoder") if pretrained else None, "encoder",
                               features_only=True, in_chans=in_chans, feature_location="", out_indices=(1, 2, 3, 4))
        self.use_encoder(encoder, in_chans, pretrained)
        self.weights_source = self.body.weights_source
        ch = sum(self.body.feature_info.channels())
        self.head = nn.Sequential(nn.Conv2d(ch, ch, 1, bias=False), nn.BatchNorm2d(ch), nn.ReLU(inplace=True),
                                  nn.Conv2d(ch, num_classes, 1))

    def forward(self, x):
        feats = self.body(x)
        size = feats[0].shape[-2:]
        fused = torch.cat([feats[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                                        for f in feats[1:]], 1)
        return {"seg": F.interpolate(self.head(fused), size=x.shape[-2:], mode="bilinear", align_corners=False)}

    def freeze_early(self, k: int) -> int:
        """The stem and HRNet's first stage (``layer1``); later stages are multi-branch and stay trainable."""
        return freeze(resnet_stem_and_stages(self.body, k)) if k else 0

    @torch.no_grad()
    def feature_blocks(self, x):
        feats = self.body(x)
        return [f"stage{i}" for i in range(len(feats))], feats

    def cam_layer(self) -> nn.Module:
        return self.head[0]


def _load_resnet_encoder(target: nn.Module, encoder: str, in_chans: int) -> dict:
    """timm's weights of ``encoder`` (a ResNet; ``in_chans`` adapted by timm, classifier dropped) into smp's ResNet
    encoder ``target``, tensor for tensor: a tensor missing or of another shape is an error. Their provenance."""
    source = timm_model(encoder, hub.fetch_weights(encoder, "encoder"), "encoder", num_classes=0, in_chans=in_chans)
    state, own = source.state_dict(), target.state_dict()
    unmatched = [k for k, v in own.items() if k not in state or state[k].shape != v.shape]
    if unmatched:
        raise SynthvitError(f"encoder: {encoder}'s weights do not fit DeepLabV3+'s {type(target).__name__} "
                            f"({len(unmatched)} of {len(own)} tensors unmatched: {', '.join(unmatched[:4])}); use "
                            f"one of {', '.join(SMP_RESNETS)}")
    target.load_state_dict({k: state[k] for k in own})
    return source.weights_source


SEG_BASELINES = {"deeplabv3plus_resnet50": DeepLabV3Plus, "hrnet_w18_seg": HRNetSeg}
