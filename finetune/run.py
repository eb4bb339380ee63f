"""``synthvit finetune`` / ``evaluate`` / ``predict``; the run folder they write and read is
:mod:`finetune.artifacts`."""
from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import numpy as np
import torch

from finetune.artifacts import CONFIG_FILE, EXPORT_DIR, METRICS_FILE, SPLIT_FILE, build_model, load_run
from finetune.config import EvaluateConfig, FinetuneConfig, PredictConfig
from finetune.datasets import RealData, load_real_data, split_ids
from finetune.evaluate import Predictor, evaluate
from finetune.predict import input_files, predict_files
from finetune.train import train
from models import stats_meta, write_export
from synthvit import __version__
from synthvit.config import ConfigError, dump_yaml
from synthvit.io import SynthvitError, atomic_write_bytes, atomic_write_text
from synthvit.progress import progress_bar
from synthvit.training import make_accelerator, resolve_device

log = logging.getLogger("synthvit.finetune")


def _select(data: RealData, cfg: FinetuneConfig, split: dict[str, str]):
    train_items = [i for i in data.items if split[i.id] == "train"]
    test_items = [i for i in data.items if split[i.id] == "test"]
    if cfg.train_limit:
        order = np.random.default_rng(cfg.seed).permutation(len(train_items))
        train_items = [train_items[k] for k in sorted(order[:cfg.train_limit])]
    if not train_items:
        raise SynthvitError(f"no training images in {cfg.data} (split: {len(test_items)} test)")
    return train_items, test_items


def _meta(cfg: FinetuneConfig, data: RealData, stats: dict) -> dict:
    return {"model": cfg.model, "architecture": cfg.model, "img_size": cfg.crop_size, "crop_size": cfg.crop_size,
            "in_chans": cfg.in_chans, "task": cfg.task, "input": cfg.input,
            "num_classes": len(data.cls_classes) if cfg.task != "seg" else len(data.seg_classes),
            "seg_classes": data.seg_classes if cfg.task != "cls" else [], "class_names": data.cls_classes,
            "cls_classes": data.cls_classes if cfg.task != "seg" else [], **stats,
            "init": cfg.init, "synthvit_version": __version__}


def run(cfg: FinetuneConfig) -> Path:
    if not cfg.data:
        raise ConfigError("data: give the real-data folder, e.g. data=../shared/datasets/magnetic-tile")
    run_dir = Path(cfg.out_dir)
    data = load_real_data(cfg.data, cfg.format, max_pixels=cfg.max_pixels)
    data.check_task(cfg.task)
    split = split_ids(data, cfg.test_fraction, cfg.seed)
    train_items, test_items = _select(data, cfg, split)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, max(len(data.seg_classes), 1), max(len(data.cls_classes), 1))
    frozen = model.freeze_early(cfg.freeze_blocks)
    acc = make_accelerator(cfg.precision)
    run_dir.mkdir(parents=True, exist_ok=True)
    if acc.is_main_process:
        atomic_write_text(run_dir / CONFIG_FILE, dump_yaml(cfg))
        used = {i.id for i in train_items}  # a train_limit leaves the other train images "unused"
        rows = sorted((i, "unused" if s == "train" and i not in used else s) for i, s in split.items())
        buf = io.StringIO()
        csv.writer(buf).writerows([("id", "split"), *rows])
        atomic_write_text(run_dir / SPLIT_FILE, buf.getvalue())
        log.info("%s: %d train images (of %d), %d test; %s frozen parameters", cfg.data, len(train_items),
                 sum(v == "train" for v in split.values()), len(test_items), f"{frozen:,}")
    mean, std = model.input_stats(cfg.in_chans)
    summary = train(cfg, acc, model, data, train_items, mean.to(acc.device), std.to(acc.device), run_dir)
    model = summary.pop("model")
    meta = _meta(cfg, data, stats_meta(mean, std))
    if acc.is_main_process:
        write_export(model, run_dir / EXPORT_DIR, meta)
        if cfg.evaluate and test_items:
            bar = progress_bar(total=len(test_items), desc="evaluate", unit="img")
            metrics = evaluate(Predictor(model, meta, acc.device, cfg.tiling), data, test_items, cfg.in_chans, bar)
            bar.close()
            metrics.update(summary, model_name=cfg.model, init=cfg.init or None, task=cfg.task,
                           parameters=sum(p.numel() for p in model.parameters()))
            atomic_write_bytes(run_dir / METRICS_FILE, json.dumps(metrics, indent=2).encode())
            log.info("test: %s", _headline(metrics))
    return run_dir


def _headline(m: dict) -> str:
    parts = []
    if "pixel" in m:
        parts.append(f"mIoU {m['pixel']['miou']:.4f}, defect AP {m['pixel']['defect_ap']:.4f}")
    if m.get("image", {}).get("auroc") is not None:
        parts.append(f"image AUROC {m['image']['auroc']:.4f}")
    if "classification" in m:
        parts.append(f"accuracy {m['classification']['accuracy']:.4f}")
    parts.append(f"{m['speed']['seconds_per_image']} s/image")
    return ", ".join(parts)


def run_evaluate(cfg: EvaluateConfig) -> Path:
    run = load_run(cfg.checkpoint)
    fcfg = run.cfg
    data = load_real_data(cfg.data or fcfg.data, fcfg.format, max_pixels=fcfg.max_pixels)
    split = split_ids(data, fcfg.test_fraction, fcfg.seed)
    items = [i for i in data.items if cfg.split == "all" or split[i.id] == cfg.split]
    bar = progress_bar(total=len(items), desc="evaluate", unit="img")
    metrics = evaluate(run.predictor(resolve_device()), data, items, fcfg.in_chans, bar)
    bar.close()
    out = Path(cfg.out_dir or cfg.checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / f"metrics_{cfg.split}.json", json.dumps(metrics, indent=2).encode())
    log.info("%s: %s", cfg.split, _headline(metrics))
    return out


def run_predict(cfg: PredictConfig) -> Path:
    if not cfg.input:
        raise ConfigError("input: give an image file or a folder (--input PATH)")
    run = load_run(cfg.checkpoint)
    files = input_files(Path(cfg.input))
    predict_files(run.predictor(resolve_device()), files, Path(cfg.out), run.meta, cfg.threshold)
    return Path(cfg.out)
