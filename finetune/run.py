"""``synthvit finetune`` / ``evaluate`` / ``predict``.

A finetune run folder holds ``config.yaml``, ``split.csv``, ``metrics.jsonl``, ``export/`` (``model.safetensors`` +
``config.json`` like pretrain's, plus ``seg_head.safetensors`` for timm models with a dense head) and
``metrics.json`` (full-resolution test metrics, speed and memory).
"""
from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from finetune.config import EvaluateConfig, FinetuneConfig, PredictConfig
from finetune.datasets import RealData, load_real_data, split_ids
from finetune.evaluate import Predictor, evaluate
from finetune.models import build_model, freeze_early
from finetune.predict import input_files, predict_files
from finetune.train import train
from pretrain import checkpoint
from pretrain.model import PretrainModel, normalizer
from synthvit import __version__
from synthvit.config import ConfigError, dump_yaml, load_config
from synthvit.io import SynthvitError, atomic_write_bytes, atomic_write_text
from synthvit.progress import progress_bar

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


def check_task(data: RealData, cfg: FinetuneConfig) -> None:
    if cfg.task in ("seg", "both") and not data.has_masks:
        raise SynthvitError(f"task={cfg.task} needs masks, but {cfg.data} ({data.fmt}) has none; use task=cls")
    if cfg.task in ("cls", "both") and not data.has_labels:
        raise SynthvitError(f"task={cfg.task} needs image labels (labels.csv, class folders or a label column), "
                            f"but {cfg.data} ({data.fmt}) has none; use task=seg")


def _meta(cfg: FinetuneConfig, data: RealData, mean, std) -> dict:
    return {"model": cfg.model, "architecture": cfg.model, "img_size": cfg.crop_size, "crop_size": cfg.crop_size,
            "in_chans": cfg.in_chans, "task": cfg.task, "input": cfg.input,
            "num_classes": len(data.cls_classes) if cfg.task != "seg" else len(data.seg_classes),
            "seg_classes": data.seg_classes if cfg.task != "cls" else [], "class_names": data.cls_classes,
            "cls_classes": data.cls_classes if cfg.task != "seg" else [], "mean": mean, "std": std,
            "init": cfg.init, "synthvit_version": __version__}


def _export(model, out: Path, meta: dict) -> None:
    if isinstance(model, PretrainModel):
        checkpoint.export(model, out, meta)
        return
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.save_tensors(model.state_dict(), out / checkpoint.EXPORT_WEIGHTS)
    atomic_write_text(out / checkpoint.EXPORT_CONFIG, json.dumps(dict(meta, weights=checkpoint.EXPORT_WEIGHTS,
                                                                       seg_head=None), indent=2) + "\n")


def load_run(run_dir: str | Path):
    """(FinetuneConfig, export meta, model with the exported weights) of a finetune run folder."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "export" / checkpoint.EXPORT_CONFIG).is_file():
        raise SynthvitError(f"checkpoint: {run_dir} is not a finished finetune run (config.yaml and export/)")
    cfg = load_config(FinetuneConfig, run_dir / "config.yaml", ["init=", "weights="])
    meta = json.loads((run_dir / "export" / checkpoint.EXPORT_CONFIG).read_text())
    model = build_model(cfg, max(len(meta["seg_classes"]), 1), max(len(meta["cls_classes"]), 1))
    weights = load_file(str(run_dir / "export" / checkpoint.EXPORT_WEIGHTS))
    target = model.backbone if isinstance(model, PretrainModel) else model
    target.load_state_dict(weights)
    if isinstance(model, PretrainModel) and model.seg_head is not None:
        model.seg_head.load_state_dict(load_file(str(run_dir / "export" / checkpoint.EXPORT_SEG_HEAD)))
    return cfg, meta, model.eval()


def run(cfg: FinetuneConfig) -> Path:
    if not cfg.data:
        raise ConfigError("data: give the real-data folder, e.g. data=../shared/datasets/magnetic-tile")
    run_dir = Path(cfg.out_dir)
    data = load_real_data(cfg.data, cfg.format, max_pixels=cfg.max_pixels)
    check_task(data, cfg)
    split = split_ids(data, cfg.test_fraction, cfg.seed)
    train_items, test_items = _select(data, cfg, split)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, max(len(data.seg_classes), 1), max(len(data.cls_classes), 1))
    frozen = freeze_early(model, cfg.freeze_blocks)
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.precision)
    run_dir.mkdir(parents=True, exist_ok=True)
    if acc.is_main_process:
        atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
        used = {i.id for i in train_items}  # a train_limit leaves the other train images "unused"
        rows = sorted((i, "unused" if s == "train" and i not in used else s) for i, s in split.items())
        buf = io.StringIO()
        csv.writer(buf).writerows([("id", "split"), *rows])
        atomic_write_text(run_dir / "split.csv", buf.getvalue())
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        log.info("%s: %d train images (of %d), %d test; %s frozen parameters", cfg.data, len(train_items),
                 sum(v == "train" for v in split.values()), len(test_items), f"{frozen:,}")
    backbone = model.backbone if isinstance(model, PretrainModel) else None
    mean, std = normalizer(backbone, cfg.in_chans) if backbone is not None else (
        torch.full((cfg.in_chans, 1, 1), 127.5), torch.full((cfg.in_chans, 1, 1), 127.5))
    summary = train(cfg, acc, model, data, train_items, mean.to(acc.device), std.to(acc.device), run_dir)
    model = summary.pop("model")
    meta = _meta(cfg, data, (mean / 255).flatten().tolist(), (std / 255).flatten().tolist())
    if acc.is_main_process:
        _export(model, run_dir / "export", meta)
        if cfg.evaluate and test_items:
            bar = progress_bar(total=len(test_items), desc="evaluate", unit="img")
            metrics = evaluate(Predictor(model, meta, acc.device, cfg.tiling), data, test_items, cfg.in_chans, bar)
            bar.close()
            metrics.update(summary, model_name=cfg.model, init=cfg.init or None, task=cfg.task,
                           parameters=sum(p.numel() for p in model.parameters()))
            atomic_write_bytes(run_dir / "metrics.json", json.dumps(metrics, indent=2).encode())
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
    fcfg, meta, model = load_run(cfg.checkpoint)
    data = load_real_data(cfg.data or fcfg.data, fcfg.format, max_pixels=fcfg.max_pixels)
    if cfg.split not in ("test", "train", "all"):
        raise ConfigError(f"split: {cfg.split!r} not accepted; use test, train or all")
    split = split_ids(data, fcfg.test_fraction, fcfg.seed)
    items = [i for i in data.items if cfg.split == "all" or split[i.id] == cfg.split]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bar = progress_bar(total=len(items), desc="evaluate", unit="img")
    metrics = evaluate(Predictor(model.to(device), meta, device, fcfg.tiling), data, items, fcfg.in_chans, bar)
    bar.close()
    out = Path(cfg.out_dir or cfg.checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / f"metrics_{cfg.split}.json", json.dumps(metrics, indent=2).encode())
    log.info("%s: %s", cfg.split, _headline(metrics))
    return out


def run_predict(cfg: PredictConfig) -> Path:
    if not cfg.input:
        raise ConfigError("input: give an image file or a folder (--input PATH)")
    fcfg, meta, model = load_run(cfg.checkpoint)
    files = input_files(Path(cfg.input))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    predict_files(Predictor(model.to(device), meta, device, fcfg.tiling), files, Path(cfg.out), meta,
                  cfg.threshold)
    return Path(cfg.out)
