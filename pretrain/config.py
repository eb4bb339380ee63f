"""Typed config of ``synthvit pretrain`` (a light module: the CLI imports it for ``--help``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from synthvit.config import Attention, ConfigError, Decoder, InChans, Precision, check_min, check_range

Objective = Literal["cls", "seg", "cls+seg"]
LrScale = Literal["linear", "sqrt", "none"]


@dataclass(kw_only=True)
class MixConfig:
    """timm ``Mixup`` as CutMix (alpha 0.7, mixup off, label smoothing 0.1); masks get the same boxes."""
    cutmix_alpha: float = 0.7
    mixup_alpha: float = 0.0
    prob: float = field(default=1.0, metadata={"help": "share of batches mixed (0 disables CutMix)"})
    switch_prob: float = field(default=0.5, metadata={"help": "cutmix vs mixup when both alphas > 0"})
    label_smoothing: float = 0.1

    def __post_init__(self):
        check_min(self, 0, "cutmix_alpha", "mixup_alpha")
        for name in ("prob", "switch_prob", "label_smoothing"):
            check_range(self, name, 0, 1)

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.cutmix_alpha > 0 or self.mixup_alpha > 0)


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = field(default=5e-4, metadata={"help": "base LR for a global batch of lr_base_batch"})
    lr_base_batch: int = 256
    lr_scale: LrScale = field(default="linear", metadata={"help": "LR scaling with the global batch"})
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 100
    min_lr_ratio: float = 0.01
    clip_grad: float = field(default=1.0, metadata={"help": "max grad norm (0: off)"})
    fused: bool = field(default=True, metadata={
        "help": "AdamW's fused kernel (one pass over all parameters; ViT-Tiny fine-tune steps ~1.2x faster on a CPU, "
                "same updates: BENCHMARKS.md); false: torch's default implementation"})
    accum_steps: int = field(default=1, metadata={"help": "gradient accumulation steps per optimizer step"})

    def __post_init__(self):
        check_min(self, 0, "lr", above=True)
        check_min(self, 1, "lr_base_batch", "accum_steps")
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas: {self.betas} must hold two numbers")
        check_min(self, 0, "warmup_steps", "clip_grad")


@dataclass(kw_only=True)
class PretrainConfig:
    data: list[str] = field(default_factory=lambda: ["shards/demo"],
                            metadata={"help": "dataset folder(s) of synthvit shards (with _info.json): local, "
                                                      "s3://, gs:// or https://"})
    data_weights: list[float] = field(default_factory=list, metadata={"help": "sampling weight per folder"})
    model: str = field(default="vit_tiny_patch16_224", metadata={"help": "any timm model name"})
    weights: str = field(default="", metadata={"help": "local weights file to start from (safetensors; it wins "
                                                       "over pretrained)"})
    pretrained: bool = field(default=False, metadata={
        "help": "start from the public weights of the model's timm tag (vit_small_patch16_224.augreg_in21k_ft_in1k; "
                "no tag: timm's default): the Hugging Face hub, or its local cache with HF_HUB_OFFLINE=1"})
    pretrained_lr_scale: float = field(default=0.1, metadata={
        "help": "with pretrained=true the LR is optim.lr (batch-scaled) x this: continued pretraining keeps the "
                "public features rather than overwriting them (docs/pretrain.md)"})
    out_dir: str = "runs/pretrain"
    objective: Objective = field(default="cls", metadata={"help": "train on image labels, masks or both"})
    seg_weight: float = field(default=1.0, metadata={"help": "weight of the seg loss in cls+seg"})
    decoder: Decoder = field(default="linear", metadata={
        "help": "dense decoder (seg objectives): linear (1x1 head on the last feature map), dpt (DPT over 4 ViT "
                "blocks), dpt-skip (DPT + a 1/2-resolution conv-stem skip)"})
    decoder_width: int = field(default=0, metadata={"help": "decoder channels (0: linear 256, dpt 32)"})
    steps: int = 300
    batch_size: int = field(default=32, metadata={"help": "per process, per micro-step"})
    image_size: int = 224
    in_chans: InChans = field(default=3, metadata={"help": "input channels (3: grayscale replicated)"})
    drop_path: float = 0.1
    seed: int = 0
    num_workers: int = field(default=2, metadata={
        "help": "data loader roles (each its own seeded share of the shards: this number is part of what is learnt)"})
    loader: Literal["auto", "workers", "main"] = field(default="auto", metadata={
        "help": "where the num_workers roles decode: workers (that many DataLoader processes), main (this process, "
                "round-robin: the same batches in the same order), auto (main on a CPU-only machine whose cores do "
                "not cover the compute threads plus num_workers -- there worker processes preempt the compute "
                "threads -- else workers)"})
    cache_mb: int = field(default=1024, metadata={
        "help": "samples kept in memory per loader role, MB: each shard read whole and cleanly, with the images "
                "decoded from it, so later epochs neither read nor decode them again (the same batches; BENCHMARKS.md); "
                "0: off"})
    shuffle_buffer: int = 1000
    resample: bool = field(default=True, metadata={"help": "draw shards with replacement (false: one pass each)"})
    scale: list[float] = field(default_factory=lambda: [0.25, 1.0], metadata={"help": "random-resized-crop area"})
    jitter: float = field(default=0.2, metadata={"help": "brightness/contrast jitter strength"})
    class_names: list[str] = field(default_factory=list,
                                   metadata={"help": "expected classes (empty: take them from the data)"})
    mix: MixConfig = field(default_factory=MixConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: Precision = field(default="no", metadata={
        "help": "mixed precision through Accelerate; auto: bf16 on a GPU that has it and on a CPU with native bf16 "
                "(avx512_bf16 or AMX), else no (fp32)"})
    attention: Attention = field(default="auto", metadata={
        "help": "a ViT's attention kernel: auto (timm's math path on a CPU, where torch's fused SDPA kernel is "
                "slower: training steps 1.2-1.8x faster in bf16, BENCHMARKS.md; SDPA elsewhere), sdpa or math"})
    compile: bool = False
    ema_decay: float = field(default=0.0, metadata={"help": "EMA of weights (0: off, e.g. 0.9998)"})
    log_every: int = 10
    save_every: int = field(default=100, metadata={"help": "checkpoint every N steps (and at the end)"})
    keep_last: int = 2
    resume: str = field(default="auto", metadata={"help": "auto (newest complete checkpoint), none, or a path"})
    stop_at: int = field(default=0, metadata={"help": "end this run after step N with a checkpoint (0: run all)"})
    record_keys: bool = field(default=False, metadata={"help": "log the sample keys each rank trains on"})

    def __post_init__(self):
        if not self.data:
            raise ConfigError("data: give at least one dataset folder")
        if self.data_weights and (len(self.data_weights) != len(self.data) or min(self.data_weights) <= 0):
            raise ConfigError(f"data_weights: {self.data_weights} needs one positive weight per data folder "
                              f"({len(self.data)})")
        check_min(self, 1, "steps", "batch_size")
        check_min(self, 16, "image_size")
        check_min(self, 0, "num_workers", "cache_mb")
        if self.mix.active and self.batch_size % 2:
            raise ConfigError(f"batch_size: {self.batch_size} is odd; CutMix pairs each image with another in the "
                              f"batch and needs an even per-process batch (or set mix.prob=0)")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ConfigError(f"scale: {self.scale} must be [min, max] with 0 < min <= max <= 1")
        check_range(self, "ema_decay", 0, 1, open_high=True)
        check_min(self, 1, "save_every", "keep_last", "log_every")
        check_min(self, 0, "decoder_width")
        check_range(self, "pretrained_lr_scale", 0, 1, open_low=True)
        check_range(self, "stop_at", 0, self.steps, note=" (the steps; 0: run all)")
