"""Training checkpoints: Accelerate state folders, written atomically (temporary name, renamed when every rank is
done), rotated, and found again on resume. (The export read by ``finetune`` is :mod:`synthvit.models.export`.)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from synthvit.io import SynthvitError, atomic_write_text, dumps_json

CKPT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"


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
        atomic_write_text(tmp / STATE_FILE, dumps_json(state, indent=2))
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
    try:
        return json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise SynthvitError(f"resume: {ckpt / STATE_FILE} is unreadable ({e}); remove {ckpt} to resume from an "
                            f"earlier checkpoint, or run with resume=none") from None


def load_checkpoint(accelerator, ckpt: Path, *modules) -> None:
    """``accelerator.load_state`` of a checkpoint folder (model, optimizer, RNG states -- the RNG files are
    pickles: resume only from your own runs); a damaged one, or one whose weights (those of ``modules``, the
    prepared models) hold NaN or infinity, is named in a clear error."""
    from synthvit.training import first_nonfinite  # (training imports this module)

    try:
        accelerator.load_state(str(ckpt))
    except Exception as e:  # safetensors, torch.load and pickle raise many kinds
        raise SynthvitError(f"resume: cannot load {ckpt} ({type(e).__name__}: {e}); remove it to resume from an "
                            f"earlier checkpoint, or run with resume=none") from None
    bad = first_nonfinite((n, p) for m in modules for n, p in accelerator.unwrap_model(m).state_dict().items())
    if bad is not None:
        raise SynthvitError(f"resume: {ckpt} holds weights that are not finite (NaN or infinity; first: {bad}); "
                            f"remove it to resume from an earlier checkpoint, or run with resume=none")
