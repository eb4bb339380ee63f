"""Dense decoders over a timm backbone's features, chosen by name (``decoder`` in pretrain and finetune configs).

- ``linear``: today's light head, a 1x1 conv MLP on the last feature map (stride 16 for a ViT-B/16), upsampled.
- ``dpt``: DPT (Ranftl et al. 2021) from segmentation-models-pytorch: four ViT block outputs reassembled into a
  1/4..1/32 pyramid and fused top-down to 1/2 resolution (smp's ``DPTDecoder`` + ``DPTSegmentationHead``), fed by
  our own timm backbone's ``forward_intermediates`` (so local weights, exports and hybrids work unchanged).
- ``dpt-skip``: ``dpt`` plus a light convolutional stem on the image at 1/2 resolution, added to the fused features
  before the head (the high-resolution skip of TransUNet / UNETR): a 1-2 px crack is a sliver of one 16 px token.

``width`` (the fusion channels; the pyramid's intermediate channels are width x (1, 2, 4, 4)) keeps ViT-Tiny on a
CPU cheap. Every decoder maps ``forward_features``-style inputs to (B, K, H, W) logits at the input size.
"""
from __future__ import annotations

from typing import get_args

import torch
import torch.nn.functional as F
from torch import nn

from synthvit.config import Decoder
from synthvit.io import SynthvitError

DECODERS = get_args(Decoder)
PYRAMID = 4  # block outputs the DPT decoders read


class LinearHead(nn.Module):
    """1x1 conv -> BN -> GELU -> 1x1 conv on the last feature map, bilinear upsampling to the input size."""

    needs_intermediates = False

    def __init__(self, in_dim: int, num_classes: int, width: int = 256):
        super().__init__()
        self.width = width
        self.proj = nn.Sequential(nn.Conv2d(in_dim, width, 1, bias=False), nn.BatchNorm2d(width), nn.GELU(),
                                  nn.Conv2d(width, num_classes, 1))

    def forward(self, fmap: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(self.proj(fmap), size=size, mode="bilinear", align_corners=False)


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DPTHead(nn.Module):
    """smp's DPT decoder and head over 4 block outputs of a ViT; optionally a 1/2-resolution conv-stem skip."""

    needs_intermediates = True

    def __init__(self, embed_dim: int, patch_stride: int, has_prefix_tokens: bool, num_classes: int,
                 width: int = 32, in_chans: int = 3, skip: bool = False):
        super().__init__()
        from segmentation_models_pytorch.decoders.dpt.decoder import DPTDecoder, DPTSegmentationHead

        self.width = width
        self.decoder = DPTDecoder(encoder_out_channels=[embed_dim] * PYRAMID,
                                  encoder_output_strides=[patch_stride] * PYRAMID,
                                  encoder_has_prefix_tokens=has_prefix_tokens,
                                  readout="cat" if has_prefix_tokens else "ignore",
                                  intermediate_channels=[width, 2 * width, 4 * width, 4 * width],
                                  fusion_channels=width)
        self.stem = nn.Sequential(_conv_bn_relu(in_chans, width // 2, 1), _conv_bn_relu(width // 2, width, 2)) \
            if skip else None
        self.head = DPTSegmentationHead(width, num_classes, kernel_size=3, upsampling=2)

    def forward(self, blocks: list[tuple[torch.Tensor, torch.Tensor | None]], image: torch.Tensor) -> torch.Tensor:
        """``blocks``: (B, C, h, w) spatial tokens and (B, P, C) prefix tokens (or None) of 4 blocks."""
        fused = self.decoder([b for b, _ in blocks], [p for _, p in blocks])  # 1/2 resolution
        if self.stem is not None:
            fused = fused + self.stem(image)
        out = self.head(fused)
        if out.shape[-2:] != image.shape[-2:]:
            out = F.interpolate(out, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return out


def create_decoder(name: str, backbone: nn.Module, num_classes: int, in_chans: int, width: int = 0) -> nn.Module:
    """A decoder for ``backbone`` by name; ``width`` 0 takes the decoder's default (linear 256, dpt 32)."""
    if name == "linear":
        return LinearHead(backbone.num_features, num_classes, width or 256)
    if name not in DECODERS:
        raise SynthvitError(f"decoder: {name!r} is not known; use one of {', '.join(DECODERS)}")
    if not hasattr(backbone, "forward_intermediates") or not hasattr(backbone, "patch_embed"):
        raise SynthvitError(f"decoder={name} reads the blocks of a ViT or hybrid ViT; {type(backbone).__name__} "
                            f"has none: use decoder=linear (or a segmentation baseline) for CNNs")
    if len(getattr(backbone, "blocks", ())) < PYRAMID:
        raise SynthvitError(f"decoder={name} needs >= {PYRAMID} transformer blocks")
    stride = patch_stride(backbone)
    return DPTHead(backbone.embed_dim, stride, backbone.num_prefix_tokens > 0, num_classes, width or 32, in_chans,
                   skip=name == "dpt-skip")


def patch_stride(backbone: nn.Module) -> int:
    """Input pixels per token side: the patch size, times the conv stem's reduction for hybrids."""
    embed = backbone.patch_embed
    if hasattr(embed, "feat_ratio"):
        return int(embed.feat_ratio(as_scalar=True))
    return int(embed.patch_size[0])


def block_indices(num_blocks: int) -> list[int]:
    """The 4 blocks DPT reads: uniformly spaced, ending with the last (as smp's DPT samples them)."""
    return [int(num_blocks / PYRAMID * d) - 1 for d in range(1, PYRAMID + 1)]
