"""What every synthvit model offers besides ``forward(x) -> {"seg": (B, K, H, W)} and/or {"cls": (B, K)}``:
the hooks training, export and analysis need, as methods, so no caller reaches into a model's attributes."""
from __future__ import annotations

import torch
from torch import nn

from synthvit.io import SynthvitError


class SynthvitModel(nn.Module):
    """Base of the task model and the CNN baselines. ``x`` is always a normalised (B, C, H, W) float batch."""

    is_vit = False  # transformer blocks over patch tokens (attention rollout applies)
    # where the initial weights came from (synthvit.models.hub.weights_record: source, revision, file, sha256, chain;
    # None: random), recorded in the export's config.json as ExportMeta.weights_source
    weights_source: dict | None = None

    def input_stats(self, in_chans: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std (C, 1, 1) in 0..255 units that inputs are normalised with (default: 127.5, 127.5)."""
        return torch.full((in_chans, 1, 1), 127.5), torch.full((in_chans, 1, 1), 127.5)

    def input_multiple(self) -> int:
        """Input sides must be a multiple of this (a ViT's patch stride, a CNN's output stride; 1: any)."""
        return 1

    def set_input_size(self, size: int) -> None:
        """Prepare the model for ``size`` x ``size`` inputs (a ViT resamples its position embeddings); CNNs take any
        size."""

    def export_meta(self) -> dict:
        """What an export's config.json must record to rebuild this model's head (``decoder``: none here)."""
        return {"decoder": None, "decoder_width": 0, "class_groups": None}

    def export_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """File name in the export folder -> state dict written there."""
        raise NotImplementedError

    def load_export_tensors(self, files: dict[str, dict[str, torch.Tensor]]) -> None:
        """The inverse of :meth:`export_tensors` (strict: every tensor must fit)."""
        raise NotImplementedError

    def freeze_early(self, k: int) -> int:
        """Freeze the stem and the first ``k`` blocks (ViTs) or stages (ResNets); returns the frozen parameters."""
        if k == 0:
            return 0
        raise SynthvitError(f"freeze_blocks: {type(self).__name__} has no stem and blocks to freeze; supported: "
                            f"timm ViTs/hybrids, ResNets, DeepLabV3+ and HRNet")

    def layer_decay_groups(self, weight_decay: float, layer_decay: float) -> list[dict] | None:
        """Optimizer parameter groups with layer-wise LR decay (``lr_scale`` per group); None: not supported."""
        return None

    def feature_blocks(self, x: torch.Tensor) -> tuple[list[str], list[torch.Tensor]]:
        """(names, features) of every block, for representation similarity (CKA)."""
        raise SynthvitError(f"layer features: {type(self).__name__} is not a ViT, a ResNet or HRNet model")

    def cam_layer(self) -> nn.Module:
        """The last convolutional stage (Grad-CAM's layer)."""
        raise SynthvitError(f"Grad-CAM: no last convolutional stage found in {type(self).__name__}")

    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per transformer block, (B, N, N) attention probabilities averaged over heads (ViTs only)."""
        raise SynthvitError(f"attention maps: {type(self).__name__} is not a ViT")


def freeze(parts: list[nn.Module]) -> int:
    for p in parts:
        p.requires_grad_(False)
    return sum(p.numel() for m in parts for p in m.parameters())


def resnet_stem_and_stages(body: nn.Module, k: int) -> list[nn.Module]:
    """The stem (conv1, bn1) and the first ``k`` stages (layer1..k) of a ResNet-like body."""
    parts = [m for m in (getattr(body, "conv1", None), getattr(body, "bn1", None)) if m is not None]
    return parts + [getattr(body, f"layer{i}") for i in range(1, k + 1) if hasattr(body, f"layer{i}")]


def is_resnet(body: nn.Module) -> bool:
    return all(hasattr(body, f"layer{i}") for i in range(1, 5))


@torch.no_grad()
def resnet_block_features(body: nn.Module, run) -> tuple[list[str], list[torch.Tensor]]:
    """Outputs of every residual block of ``body`` (layer1.0 ... layer4.N) while ``run()`` does a forward pass."""
    blocks = [(f"layer{s}.{b}", m) for s in range(1, 5) for b, m in enumerate(getattr(body, f"layer{s}"))]
    feats: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: feats.append(out)) for _, m in blocks]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return [n for n, _ in blocks], feats
