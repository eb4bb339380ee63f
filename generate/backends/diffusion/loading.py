"""Load a diffusers pipeline from a local folder only, after checking that every part of it is there.

The folder is what ``pipeline.save_pretrained(dir)`` writes (or a Hugging Face snapshot you copied by hand):
``model_index.json`` plus one subfolder per component. Model weights must be ``*.safetensors`` (pickled ``.bin``
files are refused). Nothing is ever downloaded: ``from_pretrained(dir, local_files_only=True)``.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from synthvit.io import SynthvitError

SCHEDULER_FILE = "scheduler_config.json"
# Components that are not torch models: what each needs in its subfolder.
NON_MODEL = {"scheduler": [SCHEDULER_FILE], "feature_extractor": ["preprocessor_config.json"]}


def _component_problems(root: Path, name: str, spec) -> list[str]:
    if not isinstance(spec, list) or spec[0] is None or spec[-1] is None:
        return []  # an optional component saved as null
    sub = root / name
    if not sub.is_dir():
        return [f"{name}/ (a {spec[-1]} from {spec[0]})"]
    if name.startswith("tokenizer"):
        return [] if any(sub.iterdir()) else [f"{name}/ tokenizer files (vocab/merges or tokenizer.json)"]
    needed = NON_MODEL.get(name, ["config.json"])
    missing = [f"{name}/{f}" for f in needed if not (sub / f).is_file()]
    if name not in NON_MODEL and not any(sub.glob("*.safetensors")):
        bins = [p.name for p in sub.glob("*.bin")]
        missing.append(f"{name}/*.safetensors" + (f" (found only pickled {', '.join(bins)}: convert them to "
                                                  f"safetensors)" if bins else ""))
    return missing


def check_pipeline_folder(path: str | Path) -> dict:
    """``model_index.json`` of the folder; a :class:`SynthvitError` listing everything that is missing."""
    root = Path(path)
    index = root / "model_index.json"
    hint = ("diffusion.weights must be a local diffusers pipeline folder (model_index.json, unet/, vae/, "
            "scheduler/, and text_encoder/ + tokenizer/ for prompts); see docs/generate.md, 'The diffusion backend'")
    if not root.is_dir():
        raise SynthvitError(f"diffusion.weights: {root} does not exist; {hint}")
    if not index.is_file():
        raise SynthvitError(f"diffusion.weights: {root} lacks model_index.json; {hint}")
    try:
        spec = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise SynthvitError(f"{index} is not valid JSON: {e}") from None
    missing = [m for name, s in spec.items() if not name.startswith("_") for m in _component_problems(root, name, s)]
    if missing:
        raise SynthvitError(f"diffusion.weights: {root} ({spec.get('_class_name', '?')}) is incomplete; missing: "
                            f"{', '.join(missing)}")
    return spec


def _auto_class(mode: str):
    import diffusers

    return {"inpaint": diffusers.AutoPipelineForInpainting, "img2img": diffusers.AutoPipelineForImage2Image,
            "unconditional": diffusers.DiffusionPipeline}[mode]


def load_pipeline(path: str | Path, mode: str, device: torch.device, dtype: torch.dtype, compile_unet: bool):
    """The pipeline for ``mode`` from the local folder ``path``, prepared by :func:`prepare_pipeline`."""
    spec = check_pipeline_folder(path)
    extra = {} if mode == "unconditional" else {"safety_checker": None, "requires_safety_checker": False}
    if mode != "unconditional" and spec.get("safety_checker", [None])[0] is not None:
        extra = {}
    try:
        with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype; older ones know only this
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = _auto_class(mode).from_pretrained(str(path), local_files_only=True, use_safetensors=True,
                                                     torch_dtype=dtype, **extra)
    except ImportError as e:
        raise SynthvitError(f"loading {path} needs a package that is not installed ({e}); "
                            f"install the diffusion extra: pip install 'synthvit[diffusion]'") from None
    except (OSError, ValueError) as e:
        raise SynthvitError(f"diffusion.weights: cannot load {path} as a {mode} pipeline: {e}") from None
    return prepare_pipeline(pipe, device, dtype, compile_unet)


def prepare_pipeline(pipe, device: torch.device, dtype: torch.dtype, compile_unet: bool):
    """On ``device`` in ``dtype``, SDPA attention, progress bars off, optionally a compiled UNet."""
    pipe = pipe.to(device)
    if pipe.dtype != dtype:
        pipe = pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    _use_sdpa(pipe)
    if compile_unet and hasattr(pipe, "unet"):
        pipe.unet = torch.compile(pipe.unet)
    return pipe


def _use_sdpa(pipe) -> None:
    """PyTorch's scaled_dot_product_attention (flash / memory-efficient kernels on GPUs) in every attention."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    for name in ("unet", "vae"):
        model = getattr(pipe, name, None)
        if model is not None and hasattr(model, "set_attn_processor"):
            try:
                model.set_attn_processor(AttnProcessor2_0())
            except (ValueError, TypeError):  # a model with its own attention type keeps it (already SDPA in diffusers)
                pass
