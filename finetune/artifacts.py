"""A finetune run folder, the contract that ``evaluate``, ``predict`` and ``compare`` read:

```
<run>/config.yaml      the resolved FinetuneConfig
<run>/split.csv        id,split for every image (train / test / unused: outside a train_limit)
<run>/synthetic.json   the synthetic sets mixed into training (synthetic=[...]): folder, samples, class mapping
<run>/near_duplicates.json  train/test image pairs with near-identical perceptual hashes (synthvit.data.dedup):
                       method, max_distance, train_images, test_images, pairs [{train, test, distance}]
<run>/metrics.jsonl    training losses and LR per logged step
<run>/train_summary.json  training's cost (steps, wall time, peak memory), written with the export
<run>/export/          the export contract of :mod:`synthvit.models.export` (model.safetensors + config.json ...)
<run>/metrics.json     full-resolution test metrics, speed and memory; written last: a run is finished when it exists
<run>/.lock            held (fcntl) by the one process writing the folder: a second one fails at once
```

One run per folder: a folder holding a finished run (or an export) is never written into again unless
``overwrite=true``, which first removes the earlier run's files (:func:`clear_run`), so the folder never holds two
runs' files side by side; an unfinished run of another config is refused as its checkpoints are. The export is
written into ``.export.tmp/`` and renamed to ``export/`` in one step (:func:`commit_export`), then metrics.json.
The split is the run's: readers take it from ``split.csv`` (:func:`pinned_split`), never draw it again.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from finetune.config import FinetuneConfig
from synthvit.checkpoint import CKPT_DIR
from synthvit.config import CONFIG_FILE, ConfigError, config_diff, load_config
from synthvit.io import SynthvitError, atomic_write_bytes, dumps_json
from synthvit.models import (
    EXPORT_CONFIG,
    EXPORT_DIR,
    ExportMeta,
    Heads,
    SynthvitModel,
    create_model,
    load_export,
    read_export_meta,
)
from synthvit.training import METRICS_LOG

SPLIT_FILE = "split.csv"
NEAR_DUPLICATES_FILE = "near_duplicates.json"
METRICS_FILE = "metrics.json"
TRAIN_SUMMARY_FILE = "train_summary.json"  # training's cost beside the export, until metrics.json holds it
# p(defect) histograms of defect and background pixels (synthvit.models.decision.DefectHistogram): the training
# frames calibration scored, and the test frames evaluation scored -- for studying decision rules afterwards
CALIBRATION_HISTOGRAM, TEST_HISTOGRAM = "calibration_histogram.json", "test_histogram.json"
SYNTHETIC_FILE = "synthetic.json"  # the synthetic sets a run mixed into its batches (finetune.synthetic)
ADVISED_SET = "copypaste-set"  # the few-defect recipe's copy-paste set, built from the run's train split (advise=true)
# Keys that run folders of synthvit <= 0.1.0 hold in config.yaml although finetune never read them
RETIRED_KEYS = ("optim.accum_steps", "optim.lr_base_batch", "optim.lr_scale")
__all__ = ["CONFIG_FILE", "SPLIT_FILE", "NEAR_DUPLICATES_FILE", "METRICS_LOG", "EXPORT_DIR", "METRICS_FILE",
           "SYNTHETIC_FILE", "TRAIN_SUMMARY_FILE", "RUN_ENTRIES", "EXPORT_STAGING", "SplitChangedError",
           "FinetuneRun", "clear_run", "commit_export", "pinned_split", "run_status", "RunMetrics", "MetricsFileError", "build_model", "load_run", "objective_of", "read_metrics",
           "read_split", "write_metrics", "CALIBRATION_HISTOGRAM", "TEST_HISTOGRAM", "ADVISED_SET"]


def objective_of(task: str) -> str:
    """A finetune ``task`` as the model objective: seg -> seg, cls -> cls, both -> cls+seg."""
    return Heads.parse(task).objective


def build_model(cfg: FinetuneConfig, seg_classes: int, cls_classes: int,
                class_groups: list[int] | None = None) -> SynthvitModel:
    """The model of a finetune config: from scratch, public weights (``cfg.pretrained``), ``cfg.weights`` or a
    pretrain export ``cfg.init``. With
    ``class_groups`` (zero-shot) the decoder keeps one output per group entry, summed into ``seg_classes``."""
    model = create_model(cfg.model, objective_of(cfg.task), seg_classes=len(class_groups or ()) or seg_classes,
                         cls_classes=cls_classes, img_size=cfg.crop_size, in_chans=cfg.in_chans,
                         drop_path=cfg.drop_path, weights=cfg.weights, init=cfg.init, pretrained=cfg.pretrained,
                         encoder=cfg.encoder, decoder=cfg.decoder, decoder_width=cfg.decoder_width)
    model.class_groups = class_groups
    return model


def class_counts(meta: ExportMeta) -> tuple[int, int]:
    """(segmentation, classification) output sizes of an exported finetune model (1 where the task has none)."""
    return max(len(meta.seg_classes), 1), max(len(meta.cls_classes), 1)


class MetricsFileError(SynthvitError):
    """A run's ``metrics.json`` that is not JSON, or lacks a key or has one of the wrong type."""


# keys left out of metrics.json when None (a run without that head, or not resumed); the others are written as null
_OPTIONAL = ("pixel", "image", "classification", "resumed_at")


@dataclass(kw_only=True)
class RunMetrics:
    """A finetune run's ``metrics.json``: test metrics (full-resolution, tiled), training cost and provenance.
    The sections keep evaluate's nested trees; compare reads them through the properties."""
    images: int  # test images evaluated
    pixel: dict | None = None  # iou and dice per class, miou, mdice, defect_ap (runs with a dense head)
    image: dict | None = None  # auroc, ap, defective, good (image-level defect score; dense head)
    classification: dict | None = None  # accuracy, classes, confusion_matrix (runs with a classifier)
    speed: dict = field(default_factory=dict)  # seconds_per_image, peak_rss_mb[, peak_cuda_mb]
    steps: int
    resumed_at: int | None = None
    train_images: int | None = None
    train_wall_s: float | None = None
    train_peak_mb: float | None = None
    train_peak_kind: str | None = None  # rss or cuda
    train_images_per_s: float | None = None
    zero_shot: bool = False
    model_name: str
    init: str | None = None
    task: str  # finetune's spelling of the heads: seg, cls or both
    parameters: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys of other versions, kept as written

    @classmethod
    def from_json(cls, doc: Any, source: str | Path) -> RunMetrics:
        """The metrics of a parsed ``metrics.json``; a missing or mistyped key is an error naming ``source``."""
        if not isinstance(doc, dict):
            raise MetricsFileError(f"{source}: expected a JSON object, got {type(doc).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        for key, kind in (("images", int), ("steps", int), ("model_name", str), ("task", str)):
            if key not in doc:
                raise MetricsFileError(f"{source}: missing key {key!r}; run the finetune again")
            if not isinstance(doc[key], kind) or isinstance(doc[key], bool):
                raise MetricsFileError(f"{source}: key {key!r} is {doc[key]!r}, expected {kind.__name__}")
        for key in ("pixel", "image", "classification", "speed"):
            if doc.get(key) is not None and not isinstance(doc[key], dict):
                raise MetricsFileError(f"{source}: key {key!r} is {doc[key]!r}, expected an object")
        return cls(**{k: v for k, v in doc.items() if k in names},
                   extra={k: v for k, v in doc.items() if k not in names})

    def to_json(self) -> dict[str, Any]:
        """The ``metrics.json`` document (the keys and order finetune has always written)."""
        doc = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {k: v for k, v in doc.items() if not (k in _OPTIONAL and v is None)} | self.extra

    @property
    def heads(self) -> Heads:
        return Heads.parse(self.task)

    @property
    def accuracy(self) -> float | None:
        return (self.classification or {}).get("accuracy")


def write_metrics(run_dir: str | Path, metrics: RunMetrics) -> Path:
    """``metrics.json`` of a run folder, written atomically (last: it marks the run finished)."""
    path = Path(run_dir) / METRICS_FILE
    atomic_write_bytes(path, dumps_json(metrics.to_json(), indent=2).encode())
    return path


def read_metrics(run_dir: str | Path) -> RunMetrics | None:
    """``metrics.json`` of a run folder, or None while the run is unfinished."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MetricsFileError(f"{path} is not valid JSON ({e}); run the finetune again") from None
    return RunMetrics.from_json(doc, path)


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
    meta: ExportMeta
    model: SynthvitModel

    @property
    def max_pixels(self) -> int:
        return self.cfg.max_pixels

    def predictor(self, device):
        """Full-resolution (tiled) inference with this run's model and tiling on ``device``."""
        from finetune.evaluate import Predictor

        return Predictor(self.model.to(device), self.meta, device, self.cfg.tiling)

    def architecture(self, crop_size: int) -> SynthvitModel:
        """The same architecture built for ``crop_size`` inputs, randomly initialised (for FLOP counts)."""
        arch = dataclasses.replace(self.cfg, crop_size=crop_size, init="", weights="", pretrained=False,
                                   drop_path=0.0)
        return build_model(arch, *class_counts(self.meta)).eval()


def load_run(run_dir: str | Path) -> FinetuneRun:
    run_dir = Path(run_dir)
    export = run_dir / EXPORT_DIR
    if not (run_dir / CONFIG_FILE).is_file() or not (export / EXPORT_CONFIG).is_file():
        raise SynthvitError(f"checkpoint: {run_dir} is not a finished finetune run ({CONFIG_FILE} and "
                            f"{EXPORT_DIR}/{EXPORT_CONFIG})")
    meta = read_export_meta(export)
    cfg = load_config(FinetuneConfig, run_dir / CONFIG_FILE, _rebuild_overrides(run_dir / CONFIG_FILE),
                      retired=RETIRED_KEYS)
    # the exported architecture: the export's decoder (and a baseline's encoder), as typed fields (no
    # "decoder=..." override parsed back)
    cfg = dataclasses.replace(cfg, decoder=meta.decoder or "auto", decoder_width=meta.decoder_width,
                              encoder=meta.encoder or cfg.encoder)
    model = build_model(cfg, *class_counts(meta), class_groups=meta.class_groups)
    return FinetuneRun(run_dir, cfg, meta, load_export(model, export).eval())


def _rebuild_overrides(config: Path) -> list[str]:
    """Rebuild the exported architecture alone: no init, weights file or public weights; a run written before
    ``data_seed`` existed drew its split with ``seed``, one before ``split_missing`` put images splits.csv did not
    list in train."""
    overrides = ["init=", "weights=", "pretrained=false"]
    tree = yaml.safe_load(config.read_text()) or {}
    if "data_seed" not in tree:
        overrides.append(f"data_seed={tree.get('seed', 0)}")
    if "split_missing" not in tree:
        overrides.append("split_missing=train")
    return overrides


# ------------------------------------------------------------------------------------------- one run per folder
# Everything a finetune run writes into its folder (evaluate's metrics_<split>.json too): what overwrite=true and
# resume=none clear, and nothing else (out_dir may be a folder that holds the user's own files as well).
RUN_ENTRIES = (CONFIG_FILE, SPLIT_FILE, SYNTHETIC_FILE, NEAR_DUPLICATES_FILE, METRICS_LOG, METRICS_FILE, EXPORT_DIR,
               TRAIN_SUMMARY_FILE, "advice.json", ADVISED_SET, f"{ADVISED_SET}.real_ids.txt",
               f"{ADVISED_SET}.generate.log", f"{ADVISED_SET}.build.json", CALIBRATION_HISTOGRAM, TEST_HISTOGRAM, CKPT_DIR)
EXPORT_STAGING = ".export.tmp"  # the export is written here, then renamed to export/ in one step


def config_changes(run_dir: Path, cfg: FinetuneConfig, values: Callable[[FinetuneConfig], dict],
                   missing: str | None = None) -> list[str]:
    """``key: old -> new`` for each value the folder's ``config.yaml`` (read with today's defaults, retired keys
    dropped) differs in from ``cfg``, among ``values`` (``finetune.train.training_config``: the values that change what a step
    computes; ``to_dict``: every value); without a config.yaml, ``[missing]`` (None: [])."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return [] if missing is None else [missing]
    try:
        before = load_config(FinetuneConfig, path, retired=RETIRED_KEYS)
    except ConfigError as e:
        return [f"its {CONFIG_FILE} no longer loads ({e})"]
    return config_diff(values(before), values(cfg))


def run_status(run_dir: str | Path) -> str:
    """What a run folder holds: ``finished`` (metrics.json), ``exported`` (an export, no test metrics: trained with
    evaluate=false, or stopped while evaluating), ``unfinished`` (a run's files, no export) or ``empty``."""
    run_dir = Path(run_dir)
    if (run_dir / METRICS_FILE).is_file():
        return "finished"
    if (run_dir / EXPORT_DIR / EXPORT_CONFIG).is_file():
        return "exported"
    if any((run_dir / name).exists() for name in RUN_ENTRIES) or (run_dir / EXPORT_STAGING).exists():
        return "unfinished"
    return "empty"


def clear_run(run_dir: str | Path) -> list[str]:
    """Remove an earlier run's files from ``run_dir`` (the entries of :data:`RUN_ENTRIES`, evaluate's
    ``metrics_<split>.json`` and a staged export); the names removed."""
    run_dir = Path(run_dir)
    gone = []
    for entry in [*(run_dir / n for n in RUN_ENTRIES), run_dir / EXPORT_STAGING, *run_dir.glob("metrics_*.json")]:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.exists() or entry.is_symlink():
            entry.unlink()
        else:
            continue
        gone.append(entry.name)
    return gone


def commit_export(run_dir: str | Path, write) -> Path:
    """Write a run's export through ``write(folder)`` into a staging folder, then rename it to ``export/`` in one
    step: an interrupted write never leaves an export that looks whole, nor one run's export beside another's."""
    run_dir = Path(run_dir)
    staging, export = run_dir / EXPORT_STAGING, run_dir / EXPORT_DIR
    shutil.rmtree(staging, ignore_errors=True)
    write(staging)
    if export.exists():  # a run starting over (resume=none, overwrite=true) cleared it; a leftover of a crash here
        shutil.rmtree(export)
    staging.rename(export)
    return export


class SplitChangedError(SynthvitError):
    """The data no longer holds an image a run's ``split.csv`` records."""


def pinned_split(run_dir: str | Path, ids: list[str], source: str, own_data: bool = True,
                 ) -> tuple[dict[str, str], list[str]] | None:
    """The run's own split of ``ids`` (the images of the data now, ``source`` naming it): id -> train, test or
    unused as its ``split.csv`` records them, never a split drawn again, and the ids it does not record (images
    added since: on the run's own data they belong to neither side; on other data, ``own_data=False``, they are
    images the run never saw, given as ``test``). A recorded id the run's own data no longer holds is an error
    naming it (a renamed frame is one gone and one new). None for a run folder without ``split.csv``."""
    saved = read_split(run_dir)
    if saved is None:
        return None
    present = set(ids)
    gone = sorted(set(saved) - present)
    if gone and own_data:
        shown = ", ".join(repr(i) for i in gone[:5]) + (f" and {len(gone) - 5} more" if len(gone) > 5 else "")
        raise SplitChangedError(
            f"{Path(run_dir) / SPLIT_FILE} records {len(gone)} image(s) that {source} no longer holds: {shown}; the "
            f"run's split is pinned to the images it was trained and tested on: restore them (a renamed image counts "
            f"as removed), or train a new run on the data as it is now")
    new = [i for i in ids if i not in saved]
    split = {i: saved[i] for i in ids if i in saved}
    if not own_data:
        split.update({i: "test" for i in new})
    return split, new
