"""The task model: a timm backbone (ViT, conv-stem hybrid or CNN) with its classifier (``cls``) and/or a dense
decoder (``seg``; :mod:`synthvit.models.decoders`), sharing one feature pass. Pretrain trains it on shards, finetune on real
images; the CNN segmentation baselines live in :mod:`synthvit.models.baselines`."""
from __future__ import annotations

import math

import torch
from torch import nn

from synthvit.io import SynthvitError
from synthvit.models.backbones import backbone_stats, is_vit_backbone
from synthvit.models.base import SynthvitModel, freeze, is_resnet, resnet_block_features, resnet_stem_and_stages
from synthvit.models.decoders import block_indices, create_decoder, patch_stride
from synthvit.models.export import EXPORT_SEG_HEAD, EXPORT_WEIGHTS
from synthvit.models.heads import OBJECTIVES, Heads


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


class TaskModel(SynthvitModel):
    """A timm backbone with its classifier (``cls``) and/or a dense decoder (``seg``) for an objective of
    ``cls``, ``seg`` or ``cls+seg``. ``class_groups`` (zero-shot) sums the decoder's class probabilities into
    fewer target classes: output class ``j`` gathers every decoder class ``k`` with ``class_groups[k] == j``."""

    def __init__(self, backbone: nn.Module, objective: str, seg_classes: int, decoder: str = "linear",
                 decoder_width: int = 0, in_chans: int = 3):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective {objective!r}: use one of {OBJECTIVES}")
        self.backbone = backbone
        self.objective = objective
        self.heads = Heads.parse(objective)
        self.decoder = decoder if self.heads.has_seg else None
        self.seg_head = create_decoder(decoder, backbone, seg_classes, in_chans, decoder_width) \
            if self.heads.has_seg else None
        self.block_ids = block_indices(len(backbone.blocks)) if getattr(self.seg_head, "needs_intermediates",
                                                                        False) else None
        self.class_groups: list[int] | None = None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        if self.block_ids is not None:
            feats, blocks = self.backbone.forward_intermediates(x, indices=self.block_ids, return_prefix_tokens=True)
            out["seg"] = self.seg_head([b if isinstance(b, tuple) else (b, None) for b in blocks], x)
        else:
            feats = self.backbone.forward_features(x)
            if self.seg_head is not None:
                out["seg"] = self.seg_head(feature_map(self.backbone, feats, x.shape[-2:]), x.shape[-2:])
        if "seg" in out and self.class_groups is not None:
            out["seg"] = self._collapse(out["seg"])
        if self.heads.has_cls:
            out = {"cls": self.backbone.forward_head(feats), **out}
        return out

    def _collapse(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits of the target classes: log of the summed probabilities of each group (softmax-consistent)."""
        groups = torch.tensor(self.class_groups, device=logits.device)
        return torch.stack([torch.logsumexp(logits[:, groups == j], 1) for j in range(int(groups.max()) + 1)], 1)

    @property
    def is_vit(self) -> bool:
        return is_vit_backbone(self.backbone)

    @property
    def num_prefix_tokens(self) -> int:
        """Class and register tokens before the patch tokens (ViTs)."""
        return getattr(self.backbone, "num_prefix_tokens", 1 if self.has_class_token else 0)

    @property
    def has_class_token(self) -> bool:
        return getattr(self.backbone, "cls_token", None) is not None

    def input_multiple(self) -> int:
        return patch_stride(self.backbone) if self.is_vit else 1

    def set_input_size(self, size: int) -> None:
        """A ViT trained on ``img_size`` crops runs on ``size`` tiles: timm resamples its position embeddings to the
        new grid (bicubic), as it does when fine-tuning at a new resolution. CNN backbones take any size."""
        if not self.is_vit or tuple(self.backbone.patch_embed.img_size) == (size, size):
            return
        if not hasattr(self.backbone, "set_input_size"):
            raise SynthvitError(f"{type(self.backbone).__name__} cannot change its input size from "
                                f"{self.backbone.patch_embed.img_size[0]}; infer with tiling.tile=0 (the crop size)")
        self.backbone.set_input_size(img_size=(size, size))

    # ------------------------------------------------------------------ training and export
    def export_meta(self) -> dict:
        return {"decoder": self.decoder, "decoder_width": getattr(self.seg_head, "width", 0),
                "class_groups": self.class_groups}

    def input_stats(self, in_chans: int) -> tuple[torch.Tensor, torch.Tensor]:
        return backbone_stats(self.backbone, in_chans)

    def export_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        files = {EXPORT_WEIGHTS: self.backbone.state_dict()}
        if self.seg_head is not None:
            files[EXPORT_SEG_HEAD] = self.seg_head.state_dict()
        return files

    def load_export_tensors(self, files: dict[str, dict[str, torch.Tensor]]) -> None:
        self.backbone.load_state_dict(files[EXPORT_WEIGHTS])
        if self.seg_head is not None:
            self.seg_head.load_state_dict(files[EXPORT_SEG_HEAD])

    def load_seg_head(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Load a pretrained decoder's tensors where name and shape match (all but the last conv when the classes
        differ); returns the names of the decoder tensors that stay new."""
        own = self.seg_head.state_dict()
        fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        self.seg_head.load_state_dict(fits, strict=False)
        return [k for k in own if k not in fits]

    def freeze_early(self, k: int) -> int:
        if k == 0:
            return 0
        net = self.backbone
        if self.is_vit:
            for name in ("cls_token", "pos_embed", "reg_token"):
                if getattr(net, name, None) is not None:
                    getattr(net, name).requires_grad_(False)
            return freeze([net.patch_embed, *list(net.blocks)[:k]])
        if hasattr(net, "layer1"):
            return freeze(resnet_stem_and_stages(net, k))
        return super().freeze_early(k)

    def layer_decay_groups(self, weight_decay: float, layer_decay: float) -> list[dict]:
        """timm's layer-wise LR decay groups for the backbone; the dense head at the full LR."""
        from timm.optim import param_groups_layer_decay

        groups = param_groups_layer_decay(self.backbone, weight_decay=weight_decay, layer_decay=layer_decay)
        groups = [dict(g, params=[p for p in g["params"] if p.requires_grad]) for g in groups]
        rest = [p for n, p in self.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
        return groups + [{"params": rest, "weight_decay": weight_decay}]

    # ------------------------------------------------------------------ analysis
    @torch.no_grad()
    def feature_blocks(self, x: torch.Tensor) -> tuple[list[str], list[torch.Tensor]]:
        """ViT blocks (timm ``forward_intermediates``) or ResNet residual blocks."""
        if self.is_vit:
            feats = self.backbone.forward_intermediates(x, intermediates_only=True)
            return [f"block{i}" for i in range(len(feats))], feats
        if is_resnet(self.backbone):
            return resnet_block_features(self.backbone, lambda: self.backbone.forward_features(x))
        return super().feature_blocks(x)

    def cam_layer(self) -> nn.Module:
        if is_resnet(self.backbone):
            return self.backbone.layer4
        if hasattr(self.backbone, "stages"):
            return self.backbone.stages[-1]
        return super().cam_layer()

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Softmax(q k^T / sqrt(d)) of every block, averaged over heads, from the blocks' own qkv projections."""
        if not self.is_vit:
            return super().attention_maps(x)
        attns: list[torch.Tensor] = []

        def hook(mod, inputs, _out):
            t = inputs[0]
            b, n, _ = t.shape
            qkv = mod.qkv(t).reshape(b, n, 3, mod.num_heads, mod.head_dim).permute(2, 0, 3, 1, 4)
            q, k = mod.q_norm(qkv[0]), mod.k_norm(qkv[1])
            attns.append(((q * mod.scale) @ k.transpose(-2, -1)).softmax(-1).mean(1))

        hooks = [blk.attn.register_forward_hook(hook) for blk in self.backbone.blocks]
        try:
            self.backbone.forward_features(x)
        finally:
            for h in hooks:
                h.remove()
        return attns
