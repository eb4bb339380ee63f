"""``synthvit pretrain``: the same code on one CPU, ``accelerate launch`` on 8 GPUs, or many nodes."""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from pathlib import Path

import torch

from pretrain.config import PretrainConfig
from pretrain.data import check_shard_counts, load_sources
from pretrain.loop import Trainer
from synthvit import __version__, checkpoint
from synthvit.config import CONFIG_FILE, dump_yaml, to_dict
from synthvit.io import atomic_write_text, dumps_json
from synthvit.lock import folder_lock
from synthvit.models import EXPORT_DIR, ExportMeta, Heads, create_model, stats_meta, write_export
from synthvit.models.hub import weights_comment
from synthvit.ranks import Ranks
from synthvit.training import make_accelerator

log = logging.getLogger("synthvit.pretrain")
SUMMARY_FILE = "summary.json"


def _accelerator(cfg: PretrainConfig, run_dir: Path):
    trackers = "tensorboard" if importlib.util.find_spec("tensorboard") else None
    acc = make_accelerator(cfg.precision, accum_steps=cfg.optim.accum_steps, compile=cfg.compile,
                           project_dir=run_dir, log_with=trackers)
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
    if cfg.objective == "cls" and (cfg.decoder != "linear" or cfg.decoder_width):
        log.warning("decoder and decoder_width have no effect with objective=cls (no dense head)")
    if not cfg.pretrained and cfg.pretrained_lr_scale != 0.1:
        log.warning("pretrained_lr_scale has no effect without pretrained=true")


def run(cfg: PretrainConfig) -> Path:
    main = os.environ.get("RANK", "0") == "0"  # a launched job's first process holds the folder for all of them
    with folder_lock(cfg.out_dir) if main else contextlib.nullcontext(Path(cfg.out_dir)) as run_dir:
        return _run(cfg, run_dir)


def _run(cfg: PretrainConfig, run_dir: Path) -> Path:
    sources, class_names = load_sources(cfg.data, cfg.data_weights, cfg.class_names)
    ckpt = checkpoint.resolve_resume(cfg.resume, run_dir)  # a bad resume path stops before anything is written
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every run
    # before the accelerator: bad model names fail fast
    model = create_model(cfg.model, cfg.objective, seg_classes=len(class_names), cls_classes=len(class_names),
                         img_size=cfg.image_size, in_chans=cfg.in_chans, drop_path=cfg.drop_path, weights=cfg.weights,
                         pretrained=cfg.pretrained, decoder=cfg.decoder, decoder_width=cfg.decoder_width)
    run_dir.mkdir(parents=True, exist_ok=True)
    acc = _accelerator(cfg, run_dir)
    ranks = Ranks.of(acc)
    check_shard_counts(sources, ranks.world, max(1, cfg.num_workers), cfg.resample)
    if ranks.is_main:
        atomic_write_text(run_dir / CONFIG_FILE, dump_yaml(cfg) + weights_comment(model.weights_source))
        _warn_no_effect(cfg)
    trainer = Trainer(cfg, acc, model, sources, class_names, run_dir)
    if ckpt is not None:
        trainer.resume(ckpt)
    end_step = cfg.stop_at or cfg.steps
    summary = trainer.train(end_step)
    summary["weights_source"] = model.weights_source  # where the weights it started from came from
    if ranks.is_main:
        if trainer.step >= cfg.steps:
            final = trainer.ema.module if trainer.ema is not None else acc.unwrap_model(trainer.model)
            summary["export"] = str(write_export(final, run_dir / EXPORT_DIR, _export_meta(cfg, class_names,
                                                                                             trainer)))
        atomic_write_text(run_dir / SUMMARY_FILE, dumps_json(summary, indent=2) + "\n")
        log.info("summary: %d steps, %d images seen, %.1f s, %.1f images/s, %d skipped samples%s",
                 summary["steps"], summary["images_seen"], summary["wall_time_s"], summary["images_per_s"],
                 summary["skipped_samples"], f", export: {summary['export']}" if "export" in summary else
                 f" (stopped at step {end_step} of {cfg.steps}; run again with resume=auto to continue)")
    ranks.barrier()
    ranks.finish()
    return run_dir


def _export_meta(cfg: PretrainConfig, class_names: list[str], trainer: Trainer) -> ExportMeta:
    heads = Heads.parse(cfg.objective)
    return ExportMeta(model=cfg.model, img_size=cfg.image_size, in_chans=cfg.in_chans, heads=heads,
                      num_classes=len(class_names) if heads.has_cls else 0, class_names=class_names,
                      seg_classes=class_names if heads.has_seg else [], cls_classes=class_names if heads.has_cls else [],
                      **stats_meta(trainer.mean, trainer.std),
                      extra={"steps": trainer.step, "images_seen": trainer.images_seen, "data": list(cfg.data),
                             "synthvit_version": __version__, **_real_ids(trainer.sources)})


def _real_ids(sources) -> dict:
    """``real_ids``: real-data folder -> the ids of its images that the shards drew on (finetune refuses an export
    that saw an image of its test split); absent when the shards drew on none."""
    merged: dict[str, set[str]] = {}
    for source in sources:
        for folder, ids in (source.real_ids or {}).items():
            merged.setdefault(folder, set()).update(ids)
    return {"real_ids": {k: sorted(v) for k, v in merged.items()}} if merged else {}
