"""The matrix as typed rows: every cell's ``metrics.json``, export config and its model's ``probe.json`` read once
into one :class:`Row` per cell and seed, written as ``results.csv`` beside the report. Tables, plots and the
differences read rows, never metric trees."""
from __future__ import annotations

import csv
import dataclasses
import io
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import timm
import torch
import yaml

from finetune.artifacts import EXPORT_DIR, SYNTHETIC_FILE, read_metrics
from synthvit.compare.matrix import CELL_CONFIG, PROBE_FILE, Cell
from synthvit.compare.report import read_json
from synthvit.io import SynthvitError, atomic_write_text
from synthvit.models import EXPORT_CONFIG, SEG_BASELINES, ExportMeta, is_vit_backbone

RESULTS_FILE = "results.csv"


@dataclass(frozen=True)
class Row:
    """One cell and seed (the columns of ``results.csv``, in this order; None: an empty field)."""
    name: str  # the model's report name
    model: str  # the finetune model (timm name or segmentation baseline)
    family: str  # vit (ViTs and conv-stem hybrids) or cnn
    init: str  # the pretrain export it started from ("": scratch)
    weights: str  # where its initial weights came from: "random", a hub model (timm/<name>@<rev>), a file, init:<export>
    synthetic: str  # the backends of the synthetic sets mixed into its batches, "+"-joined ("": real data only)
    decoder: str | None  # the effective dense decoder of a timm model; None for the CNN segmentation baselines
    task: str
    budget: int | str  # train images, or "zero-shot"
    seed: int
    status: str  # done | failed
    steps: int | None
    train_images: int | None
    miou: float | None  # at the run's defect decision (its "rule": threshold, logit-adjust, or argmax for old runs)
    defect_iou: float | None  # mean IoU of the non-background classes, at the run's defect decision
    mdice: float | None
    pixel_ap: float | None  # threshold-free
    rule: str | None  # the decision the IoU/Dice columns were taken at
    defect_iou_argmax: float | None  # the same at argmax (p(defect) > 0.5): what synthvit <= 0.1.0 reported
    miou_argmax: float | None
    defect_pixel_ratio: float | None  # predicted / true defect pixels of the test frames, at the decision
    defect_pixel_ratio_argmax: float | None
    image_auroc: float | None
    image_ap: float | None
    accuracy: float | None
    train_s: float | None
    train_peak_mb: float | None
    s_per_4k_frame: float | None  # the model's probe: seconds per probe_size frame (3840x2160 by default)
    frames_per_s: float | None
    inference_peak_mb: float | None
    params_m: float | None
    gflops_per_512_tile: float | None
    folder: str

    @property
    def done(self) -> bool:
        return self.status == "done"

    @property
    def zero_shot(self) -> bool:
        return self.budget == "zero-shot"


COLUMNS = [f.name for f in dataclasses.fields(Row)]


@lru_cache(maxsize=None)
def model_family(model: str) -> str:
    """``vit`` for timm ViTs and conv-stem hybrids (transformer blocks over patch tokens), else ``cnn``; the
    architecture is built on the meta device (no memory, no weights)."""
    if model in SEG_BASELINES:
        return "cnn"
    with torch.device("meta"):
        return "vit" if is_vit_backbone(timm.create_model(model)) else "cnn"


def defect_iou(iou: dict | None) -> float | None:
    """Mean IoU of the non-background classes (every class after the first, which is background)."""
    values = [v for v in list((iou or {}).values())[1:] if isinstance(v, (int, float))]
    return sum(values) / len(values) if values else None


def mixed_in(cell: Cell) -> str:
    """What the cell mixed into its batches: the backends its ``synthetic.json`` records (a finished or started
    run), else the stem of its row's ``synthetic`` generate config (a cell that never started), else ""."""
    path = cell.folder / SYNTHETIC_FILE
    try:
        record = read_json(path) or {}
    except (ValueError, OSError) as e:
        raise SynthvitError(f"{path}: not a readable JSON record ({e}); remove {cell.folder} to run the cell "
                            f"again") from e
    sets = record.get("sets") if isinstance(record, dict) else None
    if sets is not None and not (isinstance(sets, list) and all(isinstance(s, dict) and "folder" in s
                                                                 for s in sets)):
        raise SynthvitError(f"{path}: key 'sets' is {sets!r:.200}; expected a list of objects with a 'folder' "
                            f"(finetune writes it); remove {cell.folder} to run the cell again")
    if sets:
        return "+".join(dict.fromkeys(s.get("backend") or Path(s["folder"]).name for s in sets))
    return Path(cell.spec.synthetic).stem if cell.spec.synthetic else ""


def weights_text(source: dict | None) -> str:
    """A run's weight provenance (``ExportMeta.weights_source``) in a few words: ``random`` (none),
    ``timm/<name>@<revision>`` (the hub), a file's name, or ``init:<export>`` followed by where that export started
    (``<-`` joined), with the first 12 hex digits of the file's sha256."""
    if not source:
        return "random"
    where = str(source.get("source", "?"))
    if where.startswith("hf-hub:"):
        where = where[len("hf-hub:"):] + (f"@{str(source['revision'])[:8]}" if source.get("revision") else "")
    elif not where.startswith("init:"):
        where = Path(where).name
    sha = f" sha256:{str(source['sha256'])[:12]}" if source.get("sha256") else ""
    chain = [weights_text(c) for c in source.get("chain") or [] if isinstance(c, dict)]
    return " <- ".join([where + sha, *chain])


def cell_row(cell: Cell, probe: dict) -> Row:
    m = read_metrics(cell.folder)
    planned = yaml.safe_load((cell.folder / CELL_CONFIG).read_text()) if (cell.folder / CELL_CONFIG).is_file() else {}
    export_path = cell.folder / EXPORT_DIR / EXPORT_CONFIG
    export = ExportMeta.from_json(read_json(export_path), export_path) if export_path.is_file() else None
    pixel, image = (m and m.pixel) or {}, (m and m.image) or {}
    argmax = pixel.get("argmax") or pixel  # metrics of synthvit <= 0.1.0 hold argmax figures only
    params = probe.get("parameters", m and m.parameters)
    return Row(name=cell.spec.name, model=cell.spec.model, family=model_family(cell.spec.model),
               init=cell.spec.init, weights=weights_text(getattr(export, "weights_source", None)) if export else "",
               synthetic=mixed_in(cell), decoder=export and export.decoder,
               task=m.task if m else planned.get("task", ""),
               budget=cell.label, seed=cell.seed, status="done" if m else "failed",
               steps=m.steps if m else planned.get("steps"),
               train_images=m and m.train_images, miou=pixel.get("miou"), defect_iou=defect_iou(pixel.get("iou")),
               mdice=pixel.get("mdice"), pixel_ap=pixel.get("defect_ap"),
               rule=pixel.get("rule", "argmax") if pixel else None,
               defect_iou_argmax=defect_iou(argmax.get("iou")), miou_argmax=argmax.get("miou"),
               defect_pixel_ratio=pixel.get("defect_pixel_ratio"),
               defect_pixel_ratio_argmax=argmax.get("defect_pixel_ratio"), image_auroc=image.get("auroc"),
               image_ap=image.get("ap"), accuracy=m and m.accuracy,
               train_s=m and m.train_wall_s, train_peak_mb=m and m.train_peak_mb,
               s_per_4k_frame=probe.get("seconds_per_frame"), frames_per_s=probe.get("frames_per_s"),
               inference_peak_mb=probe.get("inference_peak_cuda_mb", probe.get("inference_peak_rss_mb")),
               params_m=round(params / 1e6, 2) if params else None,
               gflops_per_512_tile=probe.get("gflops_per_512_tile"), folder=str(cell.folder))


def load_rows(cells: list[Cell], references: dict[str, Cell]) -> list[Row]:
    """One row per cell, each cell's files read once; a model's probe (in its reference cell) fills its costs."""
    probes = {name: read_json(cell.folder / PROBE_FILE) or {} for name, cell in references.items()}
    return [cell_row(c, probes.get(c.spec.name, {})) for c in cells]


def _field(value) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def write_results(rows: list[Row], path: Path) -> Path:
    """``results.csv``: the header :data:`COLUMNS`, one line per row, empty fields for missing values."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows([_field(getattr(r, c)) for c in COLUMNS] for r in rows)
    atomic_write_text(path, buf.getvalue())
    return path
