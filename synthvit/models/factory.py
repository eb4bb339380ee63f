"""``create_model``: a synthvit model by name, from scratch, public weights (the hub or its cache), a local timm
weights file or a synthvit export."""
from __future__ import annotations

import logging
from pathlib import Path

from synthvit.config import ConfigError
from synthvit.io import SynthvitError
from synthvit.models.backbones import create_backbone
from synthvit.models.base import SynthvitModel
from synthvit.models.baselines import SEG_BASELINES
from synthvit.models.export import EXPORT_SEG_HEAD, EXPORT_WEIGHTS, ExportMeta, read_export_meta, read_tensors
from synthvit.models.heads import Heads
from synthvit.models.task import TaskModel

log = logging.getLogger("synthvit.models")


def create_model(name: str, objective: str, *, seg_classes: int = 1, cls_classes: int = 1, img_size: int = 224,
                 in_chans: int = 3, drop_path: float = 0.0, weights: str = "", init: str = "",
                 pretrained: bool = False, encoder: str = "", decoder: str = "linear",
                 decoder_width: int = 0) -> SynthvitModel:
    """A model for ``objective`` (``cls``, ``seg`` or ``cls+seg``): a segmentation baseline
    (``deeplabv3plus_resnet50``, ``hrnet_w18_seg``: its timm ``encoder``, ImageNet weights with ``pretrained``) or
    a :class:`TaskModel` around any timm backbone with a dense ``decoder`` (``auto``: the init export's, else
    ``linear``), started from random weights, the public weights of the name's tag (``pretrained``: the hub or the
    Hugging Face cache), ``weights`` (a local timm file; it wins over ``pretrained``) or ``init`` (a synthvit export
    folder: the backbone, and the decoder where it is the export's; a new last conv when the classes differ). The
    model's ``weights_source`` records where its weights came from (an init export's own record in its chain)."""
    if init and pretrained:
        raise ConfigError("init: give init (a synthvit export: its weights, and the record of the public weights it "
                          "started from) or pretrained=true, not both")
    if name in SEG_BASELINES:
        return _baseline(name, objective, seg_classes, in_chans, weights, init, pretrained, encoder)
    if encoder:
        raise ConfigError(f"encoder: {encoder} is for the CNN baselines ({', '.join(SEG_BASELINES)}); a timm "
                          f"model's weights follow the tag in its name (model={name}.<tag>)")
    meta = _check_init(init, name, in_chans) if init else None
    decoder, decoder_width = _resolve_decoder(meta, decoder, decoder_width)
    weights = str(Path(init) / EXPORT_WEIGHTS) if init else weights
    head = cls_classes if Heads.parse(objective).has_cls else 0
    backbone = create_backbone(name, head, img_size, in_chans, drop_path, weights, pretrained)
    model = TaskModel(backbone, objective, max(seg_classes, 1), decoder, decoder_width, in_chans)
    model.weights_source = backbone.weights_source
    if init:  # the export's file, and where the export's own weights came from
        model.weights_source = dict(backbone.weights_source, source=f"init:{init}",
                                    chain=[meta.weights_source] if meta.weights_source else [])
        if model.seg_head is not None:
            _load_decoder(model, Path(init), meta)
    return model


def _baseline(name: str, objective: str, seg_classes: int, in_chans: int, weights: str, init: str,
              pretrained: bool, encoder: str) -> SynthvitModel:
    if objective != "seg":
        raise SynthvitError(f"model {name} is a segmentation baseline; use task=seg (or a timm model)")
    if init:
        raise SynthvitError(f"init: synthvit exports hold timm models; {name} cannot load one")
    if weights:
        raise SynthvitError(f"weights: {name} does not load a weights file; its encoder takes ImageNet weights with "
                            f"pretrained=true (encoder=<timm name>.<tag>, e.g. resnet50.a1_in1k)")
    return SEG_BASELINES[name](seg_classes, in_chans, encoder=encoder, pretrained=pretrained)


def _check_init(init: str, name: str, in_chans: int) -> ExportMeta:
    try:
        meta = read_export_meta(init)
    except SynthvitError as e:  # name the key (a run folder given for its export: the message says which)
        raise type(e)(f"init: {e}") from None
    if meta.model != name:
        raise SynthvitError(f"init: {init} holds {meta.model}, but model={name}")
    if meta.in_chans != in_chans:
        raise SynthvitError(f"init: {init} was trained with in_chans={meta.in_chans}; set in_chans to it")
    return meta


def _resolve_decoder(meta: ExportMeta | None, decoder: str, width: int) -> tuple[str, int]:
    """``auto`` -> the export's decoder (exports before decoders existed: linear); width 0 -> the export's width
    when the decoder is the export's, else the decoder's default."""
    exported = (meta.decoder if meta else None) or "linear"
    decoder = exported if decoder == "auto" else decoder
    if not width and decoder == exported and meta:
        width = meta.decoder_width or 0
    return decoder, width


def _load_decoder(model: TaskModel, init: Path, meta: ExportMeta) -> None:
    path = init / EXPORT_SEG_HEAD
    exported = meta.decoder or "linear"
    if not path.is_file() or exported != model.decoder:
        why = f"the export's is {exported}" if path.is_file() else f"{init} has no {EXPORT_SEG_HEAD}"
        log.info("init: decoder %s is new (%s); backbone from %s", model.decoder, why, init)
        return
    new = model.load_seg_head(read_tensors(path))
    log.info("init: decoder %s from %s%s", model.decoder, path,
             f"; new (other classes or shapes): {', '.join(new)}" if new else " (all tensors)")


def class_groups(source: list[str], target: list[str]) -> list[int]:
    """Zero-shot: the target class of each source (pretrain) class. 0 -> 0 (background / defect-free); a defect
    class -> the target class of the same name, else the single defect class of a binary target."""
    groups = []
    for k, name in enumerate(source):
        if k == 0:
            groups.append(0)
        elif name in target[1:]:
            groups.append(target.index(name))
        elif len(target) == 2:
            groups.append(1)
        else:
            raise SynthvitError(f"zero-shot: pretrain class {name!r} has no counterpart among the data's classes "
                                f"{', '.join(target)}; name the data's classes as the pretrain ones "
                                f"({', '.join(source)}) or use a binary (background/defect) mask")
    return groups
