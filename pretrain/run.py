"""``synthvit pretrain``: the same code on one CPU, ``accelerate launch`` on 8 GPUs, or many nodes."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from pretrain import checkpoint
from pretrain.config import PretrainConfig
from pretrain.data import check_shard_counts, load_sources
from pretrain.loop import Trainer
from pretrain.model import build_model
from synthvit import __version__
from synthvit.config import dump_yaml, to_dict
from synthvit.io import atomic_write_text

log = logging.getLogger("synthvit.pretrain")


def _single_cpu_process_trap() -> bool:
    """``accelerate launch --cpu --num_processes N`` starts ONE process (multi-CPU needs mpirun; accelerate#2741).

    The simple launcher exports MASTER_ADDR only when more than one process was asked for.
    """
    env = os.environ
    asked_many = env.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in env
    launched_many = any(k in env for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"))
    return asked_many and not launched_many


def make_accelerator(cfg: PretrainConfig, run_dir: Path) -> Accelerator:
    if _single_cpu_process_trap():
        log.warning("`accelerate launch --cpu --num_processes N` started a single process: accelerate runs several "
                    "CPU processes only through mpirun. For N CPU processes use `accelerate launch --multi_gpu "
                    "--num_processes N -m synthvit pretrain ...` (torchrun; synthvit uses gloo when no GPU is present)")
    trackers = "tensorboard" if importlib.util.find_spec("tensorboard") else None
    project = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tb"))
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.precision,
                      gradient_accumulation_steps=cfg.optim.accum_steps, log_with=trackers,
                      dynamo_backend="inductor" if cfg.compile else "no", project_config=project)
    if trackers:
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in to_dict(cfg).items()}
        acc.init_trackers("pretrain", config=flat)
    return acc


def _warn_no_effect(cfg: PretrainConfig) -> None:
    if cfg.objective != "cls" and cfg.mix.mixup_alpha > 0:
        log.warning("mix.mixup_alpha has no effect with objective=%s: masks are mixed by CutMix only",
                    cfg.objective)
    if cfg.objective == "cls" and cfg.seg_weight != 1.0:
        log.warning("seg_weight has no effect with objective=cls")


def run(cfg: PretrainConfig) -> Path:
    run_dir = Path(cfg.out_dir)
    sources, class_names = load_sources(cfg.data, cfg.data_weights, cfg.class_names)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every run
    model = build_model(cfg, len(class_names))  # before the accelerator: bad model names fail fast
    run_dir.mkdir(parents=True, exist_ok=True)
    acc = make_accelerator(cfg, run_dir)
    check_shard_counts(sources, acc.num_processes, max(1, cfg.num_workers), cfg.resample)
    if acc.is_main_process:
        atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
        _warn_no_effect(cfg)
    trainer = Trainer(cfg, acc, model, sources, class_names, run_dir)
    ckpt = checkpoint.resolve_resume(cfg.resume, run_dir)
    if ckpt is not None:
        trainer.resume(ckpt)
    end_step = cfg.stop_at or cfg.steps
    summary = trainer.train(end_step)
    if acc.is_main_process:
        if trainer.step >= cfg.steps:
            final = trainer.ema.module if trainer.ema is not None else acc.unwrap_model(trainer.model)
            summary["export"] = str(checkpoint.export(final, run_dir / "export", _export_meta(cfg, class_names,
                                                                                                trainer)))
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        log.info("summary: %d steps, %d images seen, %.1f s, %.1f images/s, %d skipped samples%s",
                 summary["steps"], summary["images_seen"], summary["wall_time_s"], summary["images_per_s"],
                 summary["skipped_samples"], f", export: {summary['export']}" if "export" in summary else
                 f" (stopped at step {end_step} of {cfg.steps}; run again with resume=auto to continue)")
    acc.wait_for_everyone()
    acc.end_training()
    return run_dir


def _export_meta(cfg: PretrainConfig, class_names: list[str], trainer: Trainer) -> dict:
    mean, std = (t.flatten().div(255).tolist() for t in (trainer.mean.cpu(), trainer.std.cpu()))
    return {"model": cfg.model, "architecture": cfg.model, "img_size": cfg.image_size, "in_chans": cfg.in_chans,
            "num_classes": len(class_names) if "cls" in cfg.objective else 0, "class_names": class_names,
            "objective": cfg.objective, "mean": mean, "std": std, "steps": trainer.step,
            "images_seen": trainer.images_seen, "data": list(cfg.data), "synthvit_version": __version__}
