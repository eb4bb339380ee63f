"""synthvit's models, one room for every stage: timm backbones (random, public weights by timm tag from the
Hugging Face hub or its cache -- :mod:`synthvit.models.hub` -- or a local weights file), the task model
(backbone + classifier and/or dense head), the CNN segmentation baselines and the export contract.

Every model maps a normalised (B, C, H, W) batch to ``{"seg": (B, K, H, W)}`` and/or ``{"cls": (B, K)}`` and
offers what training, export and analysis need as methods (:class:`synthvit.models.base.SynthvitModel`).
"""
from synthvit.models.backbones import create_backbone, is_vit_backbone, load_local_weights
from synthvit.models.base import SynthvitModel
from synthvit.models.baselines import SEG_BASELINES, DeepLabV3Plus, HRNetSeg
from synthvit.models.decision import Decision, class_map
from synthvit.models.decoders import DECODERS, DPTHead, LinearHead, create_decoder
from synthvit.models.export import (
                                    EXPORT_CONFIG,
                                    EXPORT_DIR,
                                    EXPORT_SEG_HEAD,
                                    EXPORT_WEIGHTS,
                                    ExportConfigError,
                                    ExportMeta,
                                    load_export,
                                    meta_stats,
                                    read_export_config,
                                    read_export_meta,
                                    save_tensors,
                                    stats_meta,
                                    write_export,
                                    write_export_meta,
)
from synthvit.models.factory import class_groups, create_model
from synthvit.models.heads import OBJECTIVES, Heads
from synthvit.models.task import TaskModel

__all__ = ["create_backbone", "is_vit_backbone", "load_local_weights", "SynthvitModel", "SEG_BASELINES",
           "DeepLabV3Plus", "HRNetSeg", "EXPORT_CONFIG", "EXPORT_DIR", "EXPORT_SEG_HEAD", "EXPORT_WEIGHTS",
           "ExportConfigError", "ExportMeta", "read_export_meta", "load_export", "meta_stats", "read_export_config",
           "save_tensors", "stats_meta", "write_export", "class_groups", "create_model", "OBJECTIVES", "Heads",
           "TaskModel", "Decision", "class_map", "write_export_meta", "DECODERS", "DPTHead", "LinearHead", "create_decoder"]
