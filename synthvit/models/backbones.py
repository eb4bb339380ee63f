"""timm backbones by name (ViTs, conv-stem hybrids, CNNs): random, public weights by the name's tag (the hub or its
cache, :mod:`synthvit.models.hub`) or a local weights file."""
from __future__ import annotations

import difflib
import logging
import sys
from pathlib import Path

import timm
import torch
from torch import nn

from synthvit.io import SynthvitError
from synthvit.models import hub
from synthvit.models.export import check_finite, read_tensors

log = logging.getLogger("synthvit.models")


def is_vit_backbone(backbone: nn.Module) -> bool:
    """A timm ViT or conv-stem hybrid ViT: transformer blocks over patch tokens."""
    return hasattr(backbone, "blocks") and hasattr(backbone, "patch_embed")


def create_backbone(name: str, num_classes: int, image_size: int, in_chans: int, drop_path: float,
                    weights: str = "", pretrained: bool = False) -> nn.Module:
    """``timm.create_model`` from random weights, a local weights file, or (``pretrained``) the public weights of
    the name's tag through :mod:`synthvit.models.hub` (the hub, or the Hugging Face cache offline); a local file
    wins over the hub. ViTs get ``img_size=image_size`` (timm resamples the position embeddings at load), another
    ``in_chans`` sums or repeats the RGB filters (timm's ``adapt_input_conv``). The model carries
    ``weights_source``: where its weights came from (:func:`synthvit.models.hub.weights_record`; None: random)."""
    if not timm.is_model(name):
        similar = difflib.get_close_matches(name, timm.list_models(), n=8, cutoff=0.6)
        raise SynthvitError(f"model: unknown timm model {name!r}; similar names: {', '.join(similar) or 'none'} "
                            f"(see timm.list_models())")
    hub.pretrained_cfg(name)  # an unknown tag: one line listing the architecture's tags
    if weights and not Path(weights).is_file():
        raise SynthvitError(f"weights: {weights} is not a file; give a local .safetensors (or .pth) file")
    if weights and pretrained:
        log.info("weights: %s is loaded; pretrained=true does not ask the hub (a local file wins)", weights)
    fetched = hub.fetch_weights(name) if pretrained and not weights else None
    model = timm_model(name, fetched, img_size=image_size, num_classes=num_classes, in_chans=in_chans,
                       drop_path_rate=drop_path)
    if weights:
        load_local_weights(model, weights)
        model.weights_source = hub.weights_record(str(Path(weights).resolve()), weights)
    return model


def timm_model(name: str, fetched: hub.HubWeights | None = None, key: str = "model", **kwargs) -> nn.Module:
    """``timm.create_model(name, **kwargs)``; with ``fetched`` (:func:`synthvit.models.hub.fetch_weights`) timm
    loads that file as the tag's pretrained weights (``pretrained=True``). ``img_size`` is dropped for models that
    take any input size (CNNs). The model carries ``weights_source`` (None: random weights)."""
    if fetched is not None:
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(fetched.path), custom_load=False))
    builder = logging.getLogger("timm.models._builder")
    level = builder.level
    if kwargs.get("features_only"):  # timm lists every classifier-side tensor a feature extractor leaves out
        builder.setLevel(logging.ERROR)
    try:
        try:
            model = timm.create_model(name, **kwargs)
        except TypeError as e:  # CNNs take any input size and have no img_size argument
            if "img_size" not in str(e) or "img_size" not in kwargs:
                raise
            model = timm.create_model(name, **{k: v for k, v in kwargs.items() if k != "img_size"})
    except (RuntimeError, KeyError, ValueError) as e:
        if fetched is None:
            raise
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SynthvitError(f"{key}: {fetched.path} does not load into {name} ({why:.200}); remove it from the "
                            f"Hugging Face cache and fetch it again") from None
    finally:
        builder.setLevel(level)
    model.weights_source = None
    if fetched is not None:
        check_finite(model.state_dict(), fetched.path)
        model.weights_source = fetched.record()
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
    """Mean and std (C, 1, 1) in 0..255 units from the backbone's timm data config: the tag's own (augreg ViTs
    0.5/0.5, ImageNet ResNets and DINOv2 ImageNet's mean/std; averaged for 1 channel)."""
    data_cfg = timm.data.resolve_model_data_config(backbone)
    return cfg_stats(data_cfg["mean"], data_cfg["std"], in_chans)


def cfg_stats(mean, std, in_chans: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std in 0..1 units (a timm pretrained config's) as (C, 1, 1) tensors in 0..255 units."""
    mean, std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    if in_chans == 1:
        mean, std = mean.mean(0, keepdim=True), std.mean(0, keepdim=True)
    return (mean * 255).view(-1, 1, 1), (std * 255).view(-1, 1, 1)
