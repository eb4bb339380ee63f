"""``create_model``: a synthvit model by name, from scratch, a local timm weights file or a synthvit export."""
from __future__ import annotations

import logging
from pathlib import Path

from safetensors.torch import load_file

from models.backbones import create_backbone
from models.base import SynthvitModel
from models.baselines import SEG_BASELINES
from models.export import EXPORT_SEG_HEAD, EXPORT_WEIGHTS, read_export_config
from models.task import TaskModel
from synthvit.io import SynthvitError

log = logging.getLogger("synthvit.models")


def create_model(name: str, objective: str, *, seg_classes: int = 1, cls_classes: int = 1, img_size: int = 224,
                 in_chans: int = 3, drop_path: float = 0.0, weights: str = "", init: str = "") -> SynthvitModel:
    """A model for ``objective`` (``cls``, ``seg`` or ``cls+seg``): a segmentation baseline
    (``deeplabv3plus_resnet50``, ``hrnet_w18_seg``) or a :class:`TaskModel` around any timm backbone, started
    from ``weights`` (a local timm file) or ``init`` (a synthvit export folder: backbone and, when its classes
    fit, dense head)."""
    if name in SEG_BASELINES:
        if objective != "seg":
            raise SynthvitError(f"model {name} is a segmentation baseline; use task=seg (or a timm model)")
        if init:
            raise SynthvitError(f"init: synthvit exports hold timm models; {name} cannot load one")
        return SEG_BASELINES[name](seg_classes, in_chans)
    if init:
        meta = read_export_config(init)
        if meta["model"] != name:
            raise SynthvitError(f"init: {init} holds {meta['model']}, but model={name}")
        if meta["in_chans"] != in_chans:
            raise SynthvitError(f"init: {init} was trained with in_chans={meta['in_chans']}; set in_chans to it")
        weights = str(Path(init) / EXPORT_WEIGHTS)
    head = cls_classes if "cls" in objective else 0
    model = TaskModel(create_backbone(name, head, img_size, in_chans, drop_path, weights), objective,
                      max(seg_classes, 1))
    seg_head = Path(init) / EXPORT_SEG_HEAD if init else None
    if seg_head is not None and model.seg_head is not None and seg_head.is_file():
        loaded = model.load_seg_head(load_file(str(seg_head)))
        log.info("init: dense head %s from %s", "loaded" if loaded else "new (other classes)", seg_head)
    return model
