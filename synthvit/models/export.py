"""The export contract: the folder that pretrain writes, finetune starts from, and a finetune run ships.

One folder: ``model.safetensors`` (a timm backbone's own state dict, classifier included -- or a CNN baseline's
whole state dict), ``config.json`` (:class:`ExportMeta`: timm model name, img_size, in_chans, objective, the
classes of each head, mean/std in 0..1 units, the decoder, ...) and, for dense objectives of timm models, ``seg_head.safetensors``. A timm
backbone export loads with
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=".../model.safetensors"), ...)``:
timm resizes the position embeddings to a new ``img_size`` and replaces the head for a new ``num_classes``.
Everything is safetensors and JSON: nothing is unpickled.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from synthvit.io import SynthvitError, atomic_write_text, dumps_json
from synthvit.models.decision import Decision
from synthvit.models.heads import Heads
from synthvit.training import first_nonfinite

EXPORT_DIR = "export"  # a pretrain or finetune run folder's export: <run>/export
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_SEG_HEAD = "seg_head.safetensors"
EXPORT_CONFIG = "config.json"
# what a user can do about a damaged export file: there is no command that re-exports a run
REWRITE = ("restore it from a copy, or run again the synthvit pretrain or finetune that wrote it (the config.yaml "
           "beside export/ holds its settings)")


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors file written under a temporary name and renamed (never a half file under the final name)."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


def write_export(model, out_dir: Path, meta: ExportMeta) -> Path:
    """Write the export contract into ``out_dir`` (atomically, file by file; config.json last): the weights of
    ``model``, and ``meta`` completed with what rebuilds its head (decoder, width, class groups; a baseline's
    encoder), the file names and where the model's initial weights came from (its ``weights_source``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = model.export_tensors()
    for name, state in files.items():
        save_tensors(state, out_dir / name)
    meta = dataclasses.replace(meta, **model.export_meta(), weights=EXPORT_WEIGHTS,
                               seg_head=EXPORT_SEG_HEAD if EXPORT_SEG_HEAD in files else None,
                               weights_source=meta.weights_source or getattr(model, "weights_source", None))
    write_export_meta(out_dir, meta)
    return out_dir


def write_export_meta(out_dir: str | Path, meta: ExportMeta) -> None:
    """Rewrite an export's ``config.json`` alone (atomically), e.g. to add a fitted decision; the weights stay."""
    atomic_write_text(Path(out_dir) / EXPORT_CONFIG, dumps_json(meta.to_json(), indent=2) + "\n")


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file; a truncated or foreign one, or one holding NaN or infinity, is an error naming it."""
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types (and OSError) for broken files
        raise SynthvitError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); {REWRITE}") \
            from None
    check_finite(tensors, path)
    return tensors


def check_finite(tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """Weights that hold NaN or infinity predict nothing (every score NaN): an error naming ``source`` and the first
    such tensor."""
    bad = first_nonfinite(tensors.items())
    if bad is not None:
        raise SynthvitError(f"{source}: tensor {bad!r} holds NaN or infinity, so every prediction would be NaN; use "
                            f"weights of a run that finished (training stops at a non-finite loss), or train again "
                            f"with a lower optim.lr")


def read_export_config(folder: str | Path) -> dict:
    """``config.json`` of an export folder, after checking that its weights are there."""
    folder = Path(folder)
    cfg_path = folder / EXPORT_CONFIG
    if not cfg_path.is_file() or not (folder / EXPORT_WEIGHTS).is_file():
        inner = folder / EXPORT_DIR
        hint = f"; it is a run folder: its export is {inner}" if (inner / EXPORT_CONFIG).is_file() else ""
        raise SynthvitError(f"{folder} is not a synthvit export: it needs {EXPORT_CONFIG} and {EXPORT_WEIGHTS}{hint}")
    try:
        return json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportConfigError(f"{cfg_path} is not valid JSON ({e}); {REWRITE}") from None


class ExportConfigError(SynthvitError):
    """An export's ``config.json`` that is not JSON, or lacks a key or has one of the wrong type."""


@dataclass(kw_only=True)
class ExportMeta:
    """What an export is: the typed ``config.json``, written by :meth:`to_json` in one shape for pretrain and finetune
    exports; files of earlier versions (``task`` instead of ``objective``, ``architecture``/``crop_size`` beside
    ``model``/``img_size``, no ``decoder``) read into it too."""
    model: str  # timm model name or segmentation baseline
    in_chans: int
    img_size: int  # the input side the weights were trained at (finetune: the crop)
    heads: Heads  # the cls/seg/both choice (pretrain wrote it as objective, finetune as task)
    class_names: list[str]  # pretrain: the shard classes; finetune: the image-label classes
    mean: list[float]  # per channel, 0..1 units (timm's)
    std: list[float]
    num_classes: int = 0  # the classifier's outputs (timm's num_classes)
    seg_classes: list[str] = field(default_factory=list)  # finetune: the dense head's classes
    cls_classes: list[str] = field(default_factory=list)  # finetune: the classifier's classes
    decoder: str | None = None  # the dense decoder's name (None: no dense head; old exports: linear)
    decoder_width: int = 0
    class_groups: list[int] | None = None  # zero-shot: decoder class -> target class
    input: str | None = None  # finetune: crop or resize
    init: str | None = None  # finetune: the export it started from
    weights: str = EXPORT_WEIGHTS  # the backbone's (or whole CNN's) safetensors file
    seg_head: str | None = None  # the dense head's safetensors file (timm models with a dense head)
    decision: Decision | None = None  # finetune: the fitted defect decision (None: argmax, as before it existed)
    encoder: str | None = None  # CNN baselines: the timm encoder, tag included (None: exports before it: the default)
    # where the initial weights came from: {source: hf-hub:timm/<repo> | file path | init:<export>, revision, file,
    # sha256, chain: [the init export's own record]} (synthvit.models.hub.weights_record); None: random weights
    weights_source: dict | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # provenance kept as written (steps, data, version, ...)

    def to_json(self) -> dict[str, Any]:
        """The one shape of ``config.json`` (``objective``: cls, seg or cls+seg, for pretrain and finetune alike)."""
        doc = {"model": self.model, "img_size": self.img_size, "in_chans": self.in_chans,
               "objective": self.heads.objective, "num_classes": self.num_classes, "class_names": self.class_names,
               "seg_classes": self.seg_classes, "cls_classes": self.cls_classes, "mean": self.mean, "std": self.std,
               "decoder": self.decoder, "decoder_width": self.decoder_width, "class_groups": self.class_groups,
               "input": self.input, "init": self.init, "weights": self.weights, "seg_head": self.seg_head}
        if self.decision is not None:  # absent, not null, when there is none: earlier files keep their shape
            doc["decision"] = self.decision.to_json()
        for name in ("encoder", "weights_source"):  # absent too when there is none
            if getattr(self, name) is not None:
                doc[name] = getattr(self, name)
        return doc | {k: v for k, v in self.extra.items() if k not in doc}

    @classmethod
    def from_json(cls, doc: Any, source: str | Path) -> ExportMeta:
        """The meta of a parsed ``config.json``; a missing or mistyped key is an error naming ``source``."""
        if not isinstance(doc, dict):
            raise ExportConfigError(f"{source}: expected a JSON object, got {type(doc).__name__}")
        doc = dict(doc)
        heads = doc.pop("objective", None) or doc.pop("task", None)
        if heads is None:
            raise ExportConfigError(f"{source}: missing key 'objective' (cls, seg, cls+seg); {REWRITE}")
        try:
            heads = Heads.parse(heads)
        except SynthvitError as e:
            raise ExportConfigError(f"{source}: key 'objective': {e}") from None
        size = doc.pop("img_size", None) or doc.get("crop_size")
        # earlier pretrain exports named their classes once (class_names), for the classifier and the dense head
        has_cls_classes, has_seg_classes = "cls_classes" in doc, "seg_classes" in doc
        meta = cls(model=_key(doc, "model", str, source), in_chans=_key(doc, "in_chans", int, source),
                   img_size=_need(size, "img_size", int, source), heads=heads,
                   class_names=_key(doc, "class_names", list, source), mean=_key(doc, "mean", list, source),
                   std=_key(doc, "std", list, source))
        for name in ("num_classes", "seg_classes", "cls_classes", "decoder", "decoder_width", "class_groups",
                     "input", "init", "weights", "seg_head"):
            if doc.get(name) is not None:
                setattr(meta, name, doc.pop(name))
            doc.pop(name, None)
        if not has_cls_classes and heads.has_cls:
            meta.cls_classes = list(meta.class_names)
        if not has_seg_classes and heads.has_seg:
            meta.seg_classes = list(meta.class_names)
        for name, kind in (("encoder", str), ("weights_source", dict)):
            if doc.get(name) is not None:
                setattr(meta, name, _need(doc[name], name, kind, source))
            doc.pop(name, None)
        decision = doc.pop("decision", None)
        if decision is not None:
            meta.decision = Decision.from_json(decision, source)
        for dup in ("architecture", "crop_size"):  # written twice by earlier versions
            doc.pop(dup, None)
        meta.extra = doc
        return meta


def _key(doc: dict, name: str, kind: type, source) -> Any:
    return _need(doc.pop(name, None), name, kind, source)


def _need(value: Any, name: str, kind: type, source) -> Any:
    if value is None:
        raise ExportConfigError(f"{source}: missing key {name!r}; {REWRITE}")
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ExportConfigError(f"{source}: key {name!r} is {value!r}, expected {kind.__name__}")
    return value


def read_export_meta(folder: str | Path) -> ExportMeta:
    """The typed ``config.json`` of an export folder (after checking that its weights are there)."""
    return ExportMeta.from_json(read_export_config(folder), Path(folder) / EXPORT_CONFIG)


def read_export_tensors(folder: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """File name -> tensors of every weights file the export's ``config.json`` names (safetensors only)."""
    meta, folder = read_export_meta(folder), Path(folder)
    names = [EXPORT_WEIGHTS] + ([meta.seg_head] if meta.seg_head else [])
    return {name: read_tensors(folder / name) for name in names}


def load_export(model, folder: str | Path):
    """``model`` with the weights of an export folder written for the same architecture (strict)."""
    model.load_export_tensors(read_export_tensors(folder))
    return model


def stats_meta(mean: torch.Tensor, std: torch.Tensor) -> dict[str, list[float]]:
    """(C, 1, 1) mean and std in 0..255 units as an export's ``mean`` and ``std`` (0..1 units, timm's)."""
    return {"mean": (mean.cpu() / 255).flatten().tolist(), "std": (std.cpu() / 255).flatten().tolist()}


def meta_stats(meta: ExportMeta, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """An export's mean and std as (C, 1, 1) tensors in 0..255 units: ``(uint8 pixels - mean) / std``."""
    mean = torch.tensor(meta.mean, device=device).view(-1, 1, 1) * 255
    std = torch.tensor(meta.std, device=device).view(-1, 1, 1) * 255
    return mean, std
