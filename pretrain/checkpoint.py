"""Checkpoints (Accelerate state, atomic, rotated) and the export contract read by ``finetune``.

Export contract (one folder): ``model.safetensors`` (the timm backbone's own state dict, classifier included),
``config.json`` (timm model name, img_size, in_chans, num_classes, class_names, objective, mean/std) and, for
dense objectives, ``seg_head.safetensors``. It loads with
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=".../model.safetensors"), ...)``:
timm resizes the position embeddings to a new ``img_size`` and replaces the head for a new ``num_classes``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from synthvit.io import SynthvitError, atomic_write_text

CKPT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_SEG_HEAD = "seg_head.safetensors"
EXPORT_CONFIG = "config.json"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CKPT_DIR / f"step_{step:08d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a checkpoint exists under its final name only once complete)."""
    root = run_dir / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file())


def save_checkpoint(accelerator, run_dir: Path, step: int, state: dict, keep_last: int) -> Path:
    """``accelerator.save_state`` into a temporary folder, renamed when every rank is done; keeps the last K."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """``auto``: newest complete checkpoint in the run (or none); ``none``; or an explicit checkpoint folder."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise SynthvitError(f"resume: {resume} is not a complete checkpoint folder (no {STATE_FILE}); "
                            f"use auto, none or a {run_dir / CKPT_DIR}/step_* folder")
    return path


def read_state(ckpt: Path) -> dict:
    return json.loads((ckpt / STATE_FILE).read_text())


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors file written under a temporary name and renamed (never a half file under the final name)."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


def export(model, out_dir: Path, meta: dict) -> Path:
    """Write the export contract into ``out_dir`` (atomically, file by file; config.json last)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(model.backbone.state_dict(), out_dir / EXPORT_WEIGHTS)
    if model.seg_head is not None:
        save_tensors(model.seg_head.state_dict(), out_dir / EXPORT_SEG_HEAD)
    meta = dict(meta, weights=EXPORT_WEIGHTS, seg_head=EXPORT_SEG_HEAD if model.seg_head is not None else None)
    atomic_write_text(out_dir / EXPORT_CONFIG, json.dumps(meta, indent=2) + "\n")
    return out_dir


def read_export(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, backbone state dict) of an export folder; safetensors only, nothing unpickled."""
    folder = Path(folder)
    cfg_path = folder / EXPORT_CONFIG
    if not cfg_path.is_file() or not (folder / EXPORT_WEIGHTS).is_file():
        raise SynthvitError(f"{folder} is not a synthvit export: it needs {EXPORT_CONFIG} and {EXPORT_WEIGHTS}")
    return json.loads(cfg_path.read_text()), load_file(str(folder / EXPORT_WEIGHTS))
