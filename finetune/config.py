"""Typed configs of ``synthvit finetune``, ``evaluate`` and ``predict`` (light: the CLI imports them for --help)."""
from __future__ import annotations

from dataclasses import dataclass, field

from pretrain.config import OptimConfig
from synthvit.config import ConfigError

TASKS = ("seg", "cls", "both")


@dataclass(kw_only=True)
class TilingConfig:
    tile: int = field(default=0, metadata={"help": "tile size for full-resolution inference (0: crop_size)"})
    overlap: float = 0.1
    batch_size: int = 8

    def __post_init__(self):
        if self.tile < 0 or not 0 <= self.overlap < 0.5 or self.batch_size < 1:
            raise ConfigError("tiling.tile >= 0, tiling.overlap in [0, 0.5) and tiling.batch_size >= 1 required")


@dataclass(kw_only=True)
class FinetuneConfig:
    data: str = field(default="", metadata={
        "help": "real-data folder (canonical, imagefolder, labelme, coco, hf, or synthvit shards)"})
    format: str = field(default="auto", metadata={"help": "auto, canonical, imagefolder, labelme, coco, hf or shards"})
    model: str = field(default="vit_tiny_patch16_224", metadata={
        "help": "a timm name (ViT, hybrid, resnet50, ...), deeplabv3plus_resnet50 or hrnet_w18_seg"})
    init: str = field(default="", metadata={"help": "a synthvit pretrain export folder to start from"})
    weights: str = field(default="", metadata={"help": "a local timm weights file to start from"})
    out_dir: str = "runs/finetune"
    task: str = field(default="seg", metadata={"help": "seg, cls or both"})
    steps: int = 500
    batch_size: int = 8
    crop_size: int = 512
    input: str = field(default="crop", metadata={"help": "crop (random crops at full resolution) or resize"})
    defect_crop_prob: float = field(default=0.5, metadata={"help": "share of crops centred on a defect pixel"})
    seg_loss: str = field(default="ce+dice", metadata={"help": "ce, or ce+dice (Dice over defect classes)"})
    seed: int = 0
    train_limit: int = field(default=0, metadata={"help": "use only the first N train images (seeded; 0: all)"})
    test_fraction: float = field(default=0.3, metadata={"help": "test share of the seeded split (no splits.csv)"})
    num_workers: int = 2
    in_chans: int = 3
    drop_path: float = 0.1
    freeze_blocks: int = field(default=0, metadata={"help": "freeze the stem and the first k blocks/stages"})
    layer_decay: float = field(default=0.0, metadata={"help": "layer-wise LR decay for timm models (0: off)"})
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=20, lr_scale="none"))
    precision: str = "no"
    tiling: TilingConfig = field(default_factory=TilingConfig)
    cache_mb: int = field(default=2048, metadata={"help": "decoded train frames kept per loader worker, MB"})
    max_pixels: int = field(default=8192 * 8192, metadata={"help": "Pillow's decompression-bomb cap, in pixels"})
    log_every: int = 10
    evaluate: bool = field(default=True, metadata={"help": "evaluate on the test split at the end"})

    def __post_init__(self):
        if self.seg_loss not in ("ce", "ce+dice"):
            raise ConfigError(f"seg_loss: {self.seg_loss!r} not accepted; use ce or ce+dice")
        if self.task not in TASKS:
            raise ConfigError(f"task: {self.task!r} not accepted; use seg, cls or both")
        if self.input not in ("crop", "resize"):
            raise ConfigError(f"input: {self.input!r} not accepted; use crop or resize")
        if self.steps < 1 or self.batch_size < 1 or self.crop_size < 16 or self.num_workers < 0 or self.cache_mb < 0:
            raise ConfigError("steps >= 1, batch_size >= 1, crop_size >= 16, num_workers >= 0 and cache_mb >= 0 "
                              "required")
        if not 0 <= self.defect_crop_prob <= 1 or not 0 < self.test_fraction < 1:
            raise ConfigError("defect_crop_prob in [0, 1] and test_fraction in (0, 1) required")
        if self.in_chans not in (1, 3) or self.freeze_blocks < 0 or not 0 <= self.layer_decay < 1:
            raise ConfigError("in_chans 1 or 3, freeze_blocks >= 0 and layer_decay in [0, 1) required")
        if self.init and self.weights:
            raise ConfigError("give init (a synthvit export) or weights (a timm weights file), not both")
        if self.precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"precision: {self.precision!r} not accepted; use no, bf16 or fp16")


@dataclass(kw_only=True)
class EvaluateConfig:
    checkpoint: str = field(default="", metadata={"help": "a finetune run folder"})
    data: str = field(default="", metadata={"help": "real-data folder (default: the run's)"})
    split: str = field(default="test", metadata={"help": "test, train or all"})
    out_dir: str = field(default="", metadata={"help": "where metrics.json goes (default: the run folder)"})


@dataclass(kw_only=True)
class PredictConfig:
    checkpoint: str = field(default="", metadata={"help": "a finetune run folder"})
    input: str = field(default="", metadata={"help": "an image file or a folder of images"})
    out: str = field(default="predictions", metadata={"help": "output folder"})
    threshold: float = field(default=0.5, metadata={"help": "defect probability threshold for masks and boxes"})
