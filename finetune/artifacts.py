"""A finetune run folder, the contract that ``evaluate``, ``predict`` and ``compare`` read:

```
<run>/config.yaml      the resolved FinetuneConfig
<run>/split.csv        id,split for every image (train / test / unused: outside a train_limit)
<run>/metrics.jsonl    training losses and LR per logged step
<run>/export/          the export contract of :mod:`synthvit.models.export` (model.safetensors + config.json ...)
<run>/metrics.json     full-resolution test metrics, speed and memory; written last: a run is finished when it exists
```
"""
from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from finetune.config import FinetuneConfig
from synthvit.models import EXPORT_CONFIG, EXPORT_DIR, SynthvitModel, create_model, load_export
from synthvit.config import CONFIG_FILE, load_config
from synthvit.io import SynthvitError
from synthvit.training import METRICS_LOG

SPLIT_FILE = "split.csv"
METRICS_FILE = "metrics.json"
# Keys that run folders of synthvit <= 0.1.0 hold in config.yaml although finetune never read them
RETIRED_KEYS = ("optim.accum_steps", "optim.lr_base_batch", "optim.lr_scale")
__all__ = ["CONFIG_FILE", "SPLIT_FILE", "METRICS_LOG", "EXPORT_DIR", "METRICS_FILE", "FinetuneRun", "build_model",
           "load_run", "objective_of", "read_metrics", "read_split"]


def objective_of(task: str) -> str:
    """A finetune ``task`` as the model objective: seg -> seg, cls -> cls, both -> cls+seg."""
    return {"seg": "seg", "cls": "cls", "both": "cls+seg"}[task]


def build_model(cfg: FinetuneConfig, seg_classes: int, cls_classes: int,
                class_groups: list[int] | None = None) -> SynthvitModel:
    """The model of a finetune config: from scratch, ``cfg.weights`` or a pretrain export ``cfg.init``. With
    ``class_groups`` (zero-shot) the decoder keeps one output per group entry, summed into ``seg_classes``."""
    model = create_model(cfg.model, objective_of(cfg.task), seg_classes=len(class_groups or ()) or seg_classes,
                         cls_classes=cls_classes, img_size=cfg.crop_size, in_chans=cfg.in_chans,
                         drop_path=cfg.drop_path, weights=cfg.weights, init=cfg.init, decoder=cfg.decoder,
                         decoder_width=cfg.decoder_width)
    model.class_groups = class_groups
    return model


def class_counts(meta: dict) -> tuple[int, int]:
    """(segmentation, classification) output sizes of an exported finetune model (1 where the task has none)."""
    return max(len(meta["seg_classes"]), 1), max(len(meta["cls_classes"]), 1)


def read_metrics(run_dir: str | Path) -> dict | None:
    """``metrics.json`` of a run folder, or None while the run is unfinished."""
    path = Path(run_dir) / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def read_split(run_dir: str | Path) -> dict[str, str] | None:
    """id -> train, test or unused from a run folder's ``split.csv``; None when it has none."""
    path = Path(run_dir) / SPLIT_FILE
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        return {row["id"]: row["split"] for row in csv.DictReader(f)}


@dataclass
class FinetuneRun:
    """A finished finetune run: its folder, config, export meta and model (eval mode, CPU, exported weights)."""
    folder: Path
    cfg: FinetuneConfig
    meta: dict
    model: SynthvitModel

    def predictor(self, device):
        """Full-resolution (tiled) inference with this run's model and tiling on ``device``."""
        from finetune.evaluate import Predictor

        return Predictor(self.model.to(device), self.meta, device, self.cfg.tiling)

    def architecture(self, crop_size: int) -> SynthvitModel:
        """The same architecture built for ``crop_size`` inputs, randomly initialised (for FLOP counts)."""
        arch = dataclasses.replace(self.cfg, crop_size=crop_size, init="", weights="", drop_path=0.0)
        return build_model(arch, *class_counts(self.meta)).eval()


def load_run(run_dir: str | Path) -> FinetuneRun:
    run_dir = Path(run_dir)
    export = run_dir / EXPORT_DIR
    if not (run_dir / CONFIG_FILE).is_file() or not (export / EXPORT_CONFIG).is_file():
        raise SynthvitError(f"checkpoint: {run_dir} is not a finished finetune run ({CONFIG_FILE} and "
                            f"{EXPORT_DIR}/{EXPORT_CONFIG})")
    meta = json.loads((export / EXPORT_CONFIG).read_text())
    cfg = load_config(FinetuneConfig, run_dir / CONFIG_FILE, _rebuild_overrides(run_dir / CONFIG_FILE, meta),
                      retired=RETIRED_KEYS)
    model = build_model(cfg, *class_counts(meta), class_groups=meta.get("class_groups"))
    return FinetuneRun(run_dir, cfg, meta, load_export(model, export).eval())


def _rebuild_overrides(config: Path, meta: dict) -> list[str]:
    """Rebuild the exported architecture alone: no init or weights file, the export's decoder; a run written
    before ``data_seed`` existed drew its split with ``seed``, one before ``split_missing`` put images splits.csv did
    not list in train."""
    overrides = ["init=", "weights=", f"decoder={meta.get('decoder') or 'auto'}",
                 f"decoder_width={meta.get('decoder_width') or 0}"]
    tree = yaml.safe_load(config.read_text()) or {}
    if "data_seed" not in tree:
        overrides.append(f"data_seed={tree.get('seed', 0)}")
    if "split_missing" not in tree:
        overrides.append("split_missing=train")
    return overrides
