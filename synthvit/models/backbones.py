"""timm backbones by name (ViTs, conv-stem hybrids, CNNs), from ``pretrained=False`` or a local weights file."""
from __future__ import annotations

import difflib
import logging
import sys
from pathlib import Path

import timm
import torch
from torch import nn

from synthvit.io import SynthvitError
from synthvit.models.export import check_finite, read_tensors

log = logging.getLogger("synthvit.models")


def is_vit_backbone(backbone: nn.Module) -> bool:
    """A timm ViT or conv-stem hybrid ViT: transformer blocks over patch tokens."""
    return hasattr(backbone, "blocks") and hasattr(backbone, "patch_embed")


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


WEIGHTS_ACCEPTED = ("weights= takes a .safetensors file, or a torch checkpoint (.pth, .pt, .bin) of a state dict "
                    "that loads with torch.load(weights_only=True)")
TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive; a (legacy) pickle's PROTO opcode


def read_state(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a local weights file: safetensors, or a torch file loaded with ``weights_only`` (no code runs).
    Anything else (a text file, a pickle of objects, a checkpoint without a state dict, NaN or infinite weights) is
    one error naming the file and what is accepted."""
    if path.endswith(".safetensors"):
        return read_tensors(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise SynthvitError(f"weights: cannot read {path} ({e.strerror})") from None
    if not head.startswith(TORCH_MAGIC):
        raise SynthvitError(f"weights: {path} is neither a safetensors file nor a torch checkpoint (it starts with "
                            f"{head!r}); {WEIGHTS_ACCEPTED}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SynthvitError(f"weights: cannot read {path} as tensors only ({why:.200}); {WEIGHTS_ACCEPTED}, or "
                            f"convert it to .safetensors") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not any(torch.is_tensor(v) for v in state.values()):
        raise SynthvitError(f"weights: {path} holds a {type(state).__name__}, not a state dict of tensors; "
                            f"{WEIGHTS_ACCEPTED}")
    state = {k: v for k, v in state.items() if torch.is_tensor(v)}
    check_finite(state, path)
    return state


def load_local_weights(model: nn.Module, path: str) -> None:
    """Load a local timm-style state dict into ``model`` as timm's pretrained path does, whatever the timm
    version: the architecture's own ``checkpoint_filter_fn`` (position-embedding resampling), input-conv
    adaptation for another ``in_chans``, and classifier tensors of another shape left freshly initialised."""
    from timm.models import adapt_input_conv

    state = read_state(str(path))
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


def backbone_stats(backbone: nn.Module, in_chans: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (C, 1, 1) in 0..255 units from the backbone's timm data config (averaged for 1 channel)."""
    data_cfg = timm.data.resolve_model_data_config(backbone)
    mean, std = torch.tensor(data_cfg["mean"]), torch.tensor(data_cfg["std"])
    if in_chans == 1:
        mean, std = mean.mean(0, keepdim=True), std.mean(0, keepdim=True)
    return (mean * 255).view(-1, 1, 1), (std * 255).view(-1, 1, 1)
