"""The CNN segmentation baselines users compare ViTs against: DeepLabV3+ with a ResNet-50 encoder
(segmentation-models-pytorch) and HRNetV2-W18 (timm's HRNet branches + an HRNetV2 head)."""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from synthvit.models.base import SynthvitModel, freeze, resnet_block_features, resnet_stem_and_stages
from synthvit.models.export import EXPORT_WEIGHTS


class _WholeStateExport(SynthvitModel):
    """Baselines export their whole state dict as ``model.safetensors``."""

    def export_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {EXPORT_WEIGHTS: self.state_dict()}

    def load_export_tensors(self, files: dict[str, dict[str, torch.Tensor]]) -> None:
        self.load_state_dict(files[EXPORT_WEIGHTS])


class DeepLabV3Plus(_WholeStateExport):
    def __init__(self, num_classes: int, in_chans: int):
        super().__init__()
        import segmentation_models_pytorch as smp

        self.net = smp.DeepLabV3Plus(encoder_name="resnet50", encoder_weights=None, in_channels=in_chans,
                                     classes=num_classes)

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

    def freeze_early(self, k: int) -> int:
        """The stem and HRNet's first stage (``layer1``); later stages are multi-branch and stay trainable."""
        return freeze(resnet_stem_and_stages(self.body, k)) if k else 0

    @torch.no_grad()
    def feature_blocks(self, x):
        feats = self.body(x)
        return [f"stage{i}" for i in range(len(feats))], feats

    def cam_layer(self) -> nn.Module:
        return self.head[0]


SEG_BASELINES = {"deeplabv3plus_resnet50": DeepLabV3Plus, "hrnet_w18_seg": HRNetSeg}
