"""Typed configs of ``synthvit finetune``, ``evaluate`` and ``predict`` (light: the CLI imports them for --help)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from synthvit.config import Attention, ConfigError, Decoder, InChans, Precision, check_min, check_range

Task = Literal["seg", "cls", "both"]
DataFormat = Literal["auto", "canonical", "imagefolder", "labelme", "coco", "hf", "shards"]
InputMode = Literal["crop", "resize"]
SegLoss = Literal["ce", "ce+dice"]
Split = Literal["test", "train", "all"]
SplitMissing = Literal["error", "train", "test"]
DecoderChoice = Literal[("auto", *get_args(Decoder))]
Rule = Literal["threshold", "shrink", "logit-adjust", "argmax"]
SyntheticMode = Literal["share", "add"]
InferencePrecision = Literal["auto", "bf16", "fp32"]
DeployFormat = Literal["onnx", "openvino"]
DeployPrecision = Literal["fp32", "fp16", "int8"]
OnnxExporter = Literal["dynamo", "torchscript"]


@dataclass(kw_only=True)
class TilingConfig:
    tile: int = field(default=0, metadata={"help": "tile size for full-resolution inference (0: crop_size)"})
    overlap: float = 0.1
    batch_size: int = field(default=0, metadata={
        "help": "tiles per batch (0: auto -- a ViT or hybrid at least 8 and as many as make 0.5 Mpx, 32 tiles of 128 "
                "px: 1.16x faster 4K inference on a 2-core CPU than 8; a CNN 8, where 32 were slower; BENCHMARKS.md)"})
    streams: int = field(default=0, metadata={
        "help": "threads that each run every n-th batch of tiles with a share of the compute threads, blended in "
                "order (0: auto -- 2 on a CPU running >= 2 compute threads: DeepLabV3+ 4K inference at two threads "
                "1.59x -> 1.80x the fp32 path, BENCHMARKS.md; else 1)"})
    precision: InferencePrecision = field(default="auto", metadata={
        "help": "inference arithmetic: auto (bf16 autocast on CUDA and on CPUs with native bf16, avx512_bf16 or AMX: "
                "1.4-1.7x faster tiled inference on such a CPU, BENCHMARKS.md; else fp32), bf16 or fp32"})
    attention: Attention = field(default="auto", metadata={
        "help": "a ViT's attention kernel at inference: auto (timm's math path on a CPU, torch's SDPA elsewhere: "
                "BENCHMARKS.md), sdpa or math"})

    def __post_init__(self):
        check_min(self, 0, "tile", note=" (0: the crop size)")
        check_range(self, "overlap", 0, 0.5, open_high=True)
        check_min(self, 0, "batch_size", "streams", note=" (0: auto)")


@dataclass(kw_only=True)
class CalibrateConfig:
    """The defect decision fitted on training frames after training (finetune/calibrate.py)."""
    rule: Rule = field(default="shrink", metadata={
        "help": "shrink: the threshold rule's threshold pulled toward 0.5 by the few defective frames it was fitted "
                "on (logit scale, weight n / (n + 20)): a model memorises a handful of defects and the IoU-best "
                "threshold on its own frames under-paints unseen ones (BENCHMARKS.md); with hundreds it is the "
                "threshold rule's. threshold: the p(defect) threshold with the best defect IoU on training frames; "
                "logit-adjust: undo the defect prior of the training crops (Menon et al. 2021); argmax: no decision"})
    max_images: int = field(default=128, metadata={
        "help": "training frames scored at full resolution (half defective, half defect-free where there are that "
                "many)"})
    max_pixels: int = field(default=2_000_000, metadata={
        "help": "pixels scored per frame: a larger frame (4K: 8.3 M) is scored on 512 px cells, every cell holding "
                "a defect and a seeded draw of the others, each weighted to the cells it stands for (0: whole "
                "frames)"})

    def __post_init__(self):
        check_min(self, 2, "max_images", note=" (a defective and a defect-free frame)")
        check_min(self, 0, "max_pixels", note=" (0: whole frames)")


@dataclass(kw_only=True)
class FinetuneOptimConfig:
    """AdamW with warmup + cosine decay; the LR is used as given (no batch scaling, no accumulation)."""
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 20
    min_lr_ratio: float = field(default=0.01, metadata={"help": "final LR as a share of lr"})
    clip_grad: float = field(default=1.0, metadata={"help": "max grad norm (0: off)"})
    fused: bool = field(default=True, metadata={
        "help": "AdamW's fused kernel (one pass over all parameters; ViT-Tiny fine-tune steps ~1.2x faster on a CPU, "
                "same updates: BENCHMARKS.md); false: torch's default implementation"})

    def __post_init__(self):
        check_min(self, 0, "lr", above=True)
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas: {self.betas} must hold two numbers")
        check_min(self, 0, "warmup_steps", "clip_grad")


@dataclass(kw_only=True)
class FinetuneConfig:
    data: str = field(default="", metadata={
        "help": "real-data folder (canonical, imagefolder, labelme, coco, hf, or synthvit shards, also at an "
                "s3:// gs:// https:// URL)"})
    format: DataFormat = field(default="auto", metadata={"help": "layout of data (auto: detected)"})
    model: str = field(default="vit_tiny_patch16_224", metadata={
        "help": "a timm name (ViT, hybrid, resnet50, ...), deeplabv3plus_resnet50 or hrnet_w18_seg"})
    init: str = field(default="", metadata={"help": "a synthvit pretrain export folder to start from"})
    weights: str = field(default="", metadata={"help": "a local timm weights file to start from (it wins over "
                                                       "pretrained)"})
    pretrained: bool = field(default=False, metadata={
        "help": "start from the public weights of the model's timm tag (vit_small_patch16_224.augreg_in21k_ft_in1k; "
                "no tag: timm's default) or of a CNN baseline's encoder: the Hugging Face hub, or its local cache "
                "with HF_HUB_OFFLINE=1; safetensors only"})
    encoder: str = field(default="", metadata={
        "help": "a CNN baseline's encoder as a timm name and tag (deeplabv3plus_resnet50: resnet18..resnet152, "
                "e.g. resnet50.a1_in1k; hrnet_w18_seg: an hrnet_w*; empty: resnet50 / hrnet_w18)"})
    out_dir: str = "runs/finetune"
    task: Task = field(default="seg", metadata={"help": "segmentation, classification or both heads"})
    decoder: DecoderChoice = field(default="auto", metadata={
        "help": "dense decoder of a timm model: linear (1x1 head on the last feature map), dpt (DPT over 4 ViT "
                "blocks), dpt-skip (DPT + a 1/2-resolution conv-stem skip); auto: the init export's, else linear"})
    decoder_width: int = field(default=0, metadata={"help": "decoder channels (0: the init export's, else linear "
                                                            "256, dpt 32)"})
    steps: int = field(default=500, metadata={"help": "training steps (0: zero-shot, evaluate the init export as is)"})
    batch_size: int = 8
    crop_size: int = 512
    input: InputMode = field(default="crop", metadata={"help": "crop: random crops at full resolution; resize: whole "
                                                                "images resized to crop_size"})
    defect_crop_prob: float = field(default=0.5, metadata={
        "help": "share of training samples drawn from the frames that hold defects (crop: centred on a defect "
                "pixel); the rest from any frame, anywhere"})
    synthetic: list[str] = field(default_factory=list, metadata={
        "help": "synthvit shard folders or URLs mixed into every batch (e.g. the copypaste backend's defects in "
                "your own frames); their classes map into the data's by name"})
    synthetic_classes: list[str] = field(default_factory=list, metadata={
        "help": "SYNTHETIC=REAL pairs for synthetic defect classes whose names the data lacks (e.g. [pit=pin-hole, "
                "crack=open]): those classes train as the named real ones; the others still map by name"})
    synthetic_share: float = field(default=0.5, metadata={
        "help": "share of each batch drawn from the synthetic sets (round(share * batch_size) samples)"})
    synthetic_mode: SyntheticMode = field(default="share", metadata={
        "help": "share: synthetic samples take synthetic_share of each batch of batch_size (they displace real ones); "
                "add: every batch keeps its batch_size real samples -- the very crops a run without synthetic sets "
                "draws -- and round(share / (1 - share) * batch_size) synthetic ones are added (equal real exposure)"})
    seg_loss: SegLoss = field(default="ce+dice", metadata={"help": "ce+dice: Dice over defect classes added"})
    seed: int = field(default=0, metadata={"help": "initialisation, sample order and augmentation"})
    data_seed: int = field(default=0, metadata={"help": "the seeded split (no splits.csv) and train_limit subset"})
    train_limit: int = field(default=0, metadata={"help": "use only the first N train images (seeded; 0: all)"})
    defective_limit: int = field(default=0, metadata={
        "help": "use only N of the train images that hold a defect (seeded by data_seed, nested: N's images are "
                "among N+1's, stratified by defect class) and every defect-free train image (0: all)"})
    test_fraction: float = field(default=0.3, metadata={"help": "test share of the seeded split (no splits.csv)"})
    split_missing: SplitMissing = field(default="error", metadata={
        "help": "images that splits.csv does not list: error (stop and list them), or put them in train or test"})
    near_duplicate_distance: int = field(default=6, metadata={
        "help": "warn about train/test image pairs whose 64-bit perceptual hashes (pHash) differ in at most this many "
                "bits -- resized, re-encoded or shifted copies that leak test content into training -- and list them "
                "in the run's near_duplicates.json (0: off)"})
    num_workers: int = field(default=2, metadata={"help": "DataLoader processes that cut and augment the crops"})
    loader: Literal["auto", "workers", "main"] = field(default="auto", metadata={
        "help": "where the crops are cut: workers (num_workers processes), main (this process), auto (main on a "
                "CPU-only machine whose cores do not cover the compute threads plus num_workers, else workers); the "
                "same crops either way (each is seeded by its own id)"})
    in_chans: InChans = field(default=3, metadata={"help": "input channels (3: grayscale replicated)"})
    drop_path: float = 0.1
    freeze_blocks: int = field(default=0, metadata={
        "help": "freeze the stem and the first k blocks (ViTs: patch embedding, position embedding and class token, "
                "transformer blocks 0..k-1) or stages (ResNets and DeepLabV3+: conv1/bn1 and layer1..k; HRNet: conv1/bn1 "
                "and layer1 for any k >= 1)"})
    layer_decay: float = field(default=0.0, metadata={"help": "layer-wise LR decay for timm models (0: off)"})
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    precision: Precision = field(default="auto", metadata={
        "help": "mixed precision through Accelerate; auto: bf16 on a GPU that has it and on a CPU with native bf16 "
                "(avx512_bf16 or AMX), else no (fp32)"})
    attention: Attention = field(default="auto", metadata={
        "help": "a ViT's attention kernel in training: auto (timm's math path on a CPU, where torch's fused SDPA "
                "kernel is slower: training steps 1.2-1.8x faster in bf16, BENCHMARKS.md; SDPA elsewhere), sdpa or "
                "math"})
    tiling: TilingConfig = field(default_factory=TilingConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    cache_mb: int = field(default=2048, metadata={"help": "decoded train frames kept per loader worker, MB"})
    max_pixels: int = field(default=8192 * 8192, metadata={"help": "Pillow's decompression-bomb cap, in pixels"})
    log_every: int = 10
    save_every: int = field(default=500, metadata={
        "help": "checkpoint every N steps (Accelerate state; removed once the export is written); 0: off"})
    resume: str = field(default="auto", metadata={
        "help": "auto: continue from out_dir's newest checkpoint (it must come from the same config); none: start "
                "over; or a checkpoint folder"})
    stop_at: int = field(default=0, metadata={"help": "end this run after step N with a checkpoint (0: run all)"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace a finished run in out_dir (its files are removed first); without it a finished run is "
                "never written over"})
    evaluate: bool = field(default=True, metadata={"help": "evaluate on the test split at the end"})
    advise: bool = field(default=False, metadata={
        "help": "first measure the train split as `synthvit doctor` does and apply its advice (crop_size, "
                "tiling.tile, defect_crop_prob, decoder, steps; at <= 10 defective train frames for a ViT the "
                "few-defect recipe: a copy-paste set of the run's own train defects built into out_dir/copypaste-set "
                "and mixed in, synthetic=...); keys you give win over advice; advice.json says what changed and what "
                "your keys overrode"})

    def __post_init__(self):
        check_min(self, 0, "steps", "num_workers", "cache_mb", "decoder_width", "freeze_blocks", "save_every")
        check_min(self, 1, "batch_size")
        check_min(self, 16, "crop_size", note=" (a multiple of the model's patch or output stride, e.g. 64)")
        check_range(self, "defect_crop_prob", 0, 1)
        check_range(self, "test_fraction", 0, 1, open_low=True, open_high=True)
        check_range(self, "layer_decay", 0, 1, open_high=True)
        check_range(self, "stop_at", 0, self.steps, note=" (the steps; 0: run all)")
        if not 0 < self.synthetic_share < 1:
            raise ConfigError(f"synthetic_share: {self.synthetic_share} must be in (0, 1): real samples stay in "
                              f"every batch")
        if self.synthetic and self.synthetic_mode == "share" and self.batch_size < 2:
            raise ConfigError(f"batch_size: {self.batch_size} cannot hold a synthetic and a real sample; use "
                              f"batch_size >= 2 or synthetic_mode=add")
        if self.synthetic and self.task != "seg":
            raise ConfigError(f"synthetic: mixed batches train the dense head; use task=seg (got task={self.task})")
        if not 0 <= self.near_duplicate_distance < 64:
            raise ConfigError(f"near_duplicate_distance: {self.near_duplicate_distance} must be in 0..63 bits (0: off; "
                              f"6 flags resized, re-encoded and shifted copies, different frames differ in ~32)")
        check_min(self, 0, "train_limit", "defective_limit", note=" (0: no limit)")
        if self.defective_limit and self.train_limit:
            raise ConfigError("give train_limit (any train images) or defective_limit (defective train images, all "
                              "defect-free ones kept), not both")
        if self.init and self.weights:
            raise ConfigError("give init (a synthvit export) or weights (a timm weights file), not both")
        if self.init and self.pretrained:
            raise ConfigError("give init (a synthvit export: its weights, and the record of the public weights it "
                              "started from) or pretrained=true, not both")


@dataclass(kw_only=True)
class EvaluateConfig:
    checkpoint: str = field(default="", metadata={"help": "a finetune run folder"})
    data: str = field(default="", metadata={"help": "real-data folder (default: the run's)"})
    split: Split = field(default="test", metadata={"help": "images of the run's split to evaluate"})
    out_dir: str = field(default="", metadata={"help": "where metrics.json goes (default: the run folder)"})


@dataclass(kw_only=True)
class DoctorConfig(FinetuneConfig):
    """``synthvit doctor``: every finetune key (the run being planned: model, crop_size, tiling.tile, ...) plus where
    the findings go."""
    report_dir: str = field(default="", metadata={
        "help": "where doctor.json and doctor.png go (default: doctor/<data folder name>)"})
    strict: bool = field(default=False, metadata={
        "help": "exit 1 on warnings too (findings finetune trains through: suspicious masks, too few instances, "
                "rare defect crops, near-duplicates); without it exit 1 means finetune would refuse the data"})


@dataclass(kw_only=True)
class CalibrateRunConfig:
    checkpoint: str = field(default="", metadata={"help": "a finetune run folder"})
    rule: Rule = field(default="shrink", metadata={"help": "the rule to keep (see finetune calibrate.rule)"})
    max_images: int = field(default=128, metadata={"help": "training frames scored at full resolution"})
    max_pixels: int = field(default=2_000_000, metadata={"help": "pixels scored per frame (see finetune "
                                                                 "calibrate.max_pixels)"})

    def __post_init__(self):
        CalibrateConfig(rule=self.rule, max_images=self.max_images, max_pixels=self.max_pixels)


@dataclass(kw_only=True)
class PredictConfig:
    checkpoint: str = field(default="", metadata={"help": "a finetune run folder"})
    input: str = field(default="", metadata={
        "help": "an image file, a folder (recursive), a glob pattern ('frames/**/*.png'), a .txt/.lst list of "
                "paths (one per line, # comments, relative to the list), a video file (.mp4, .mkv, .avi, ...) or a "
                "stream URL (rtsp://, rtmp://, http(s)://, udp://, srt://; extra `video`)"})
    out: str = field(default="predictions", metadata={"help": "output folder (input subfolders mirrored in it)"})
    threshold: str = field(default="auto", metadata={
        "help": "p(defect) threshold for masks and boxes: auto (the run's fitted decision; argmax for runs made "
                "before decisions existed) or a number in [0, 1]"})
    overwrite: bool = field(default=False, metadata={
        "help": "redo every frame (false: a re-run skips frames whose <name>.json is already in out)"})
    realtime: bool = field(default=False, metadata={
        "help": "a video or stream input: keep up with it -- read a file at its frame rate, predict the newest frame "
                "and drop (count) the ones inference had no time for (false: every frame)"})
    video_overlay: bool = field(default=False, metadata={
        "help": "a video or stream input: also write <name>_overlay.mp4, the predicted frames with their masks"})

    def __post_init__(self):
        if self.threshold != "auto" and parse_threshold(self.threshold) is None:
            raise ConfigError(f"threshold: {self.threshold!r} is neither auto nor a number in [0, 1]")


@dataclass(kw_only=True)
class ExportConfig:
    """``synthvit export``: a finished finetune run as a folder a production runtime runs (finetune/deploy.py)."""
    checkpoint: str = field(default="", metadata={"help": "a finished finetune run folder"})
    format: DeployFormat = field(default="onnx", metadata={
        "help": "onnx (ONNX Runtime; extra `onnx`) or openvino (OpenVINO IR; extra `openvino`)"})
    precision: DeployPrecision = field(default="fp32", metadata={
        "help": "fp32, fp16 (weights and arithmetic in half precision where the runtime has it) or int8 (post-"
                "training static quantization calibrated on tiles of the run's own training frames, never test)"})
    out: str = field(default="", metadata={"help": "the folder to write (default: <checkpoint>/deploy-<format>-"
                                                   "<precision>)"})
    tile: int = field(default=0, metadata={"help": "the tile side the model runs at (0: the run's tiling.tile, "
                                                   "else its crop size)"})
    exporter: OnnxExporter = field(default="dynamo", metadata={
        "help": "torch's ONNX exporter: dynamo (torch.export, the maintained path; ~30 s a graph on a 2-core CPU) or "
                "torchscript (the older tracer, deprecated by torch, ~15x faster)"})
    calibration_tiles: int = field(default=64, metadata={
        "help": "int8: tiles drawn (seeded) from the run's training frames to calibrate the activation ranges"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing export folder at out"})

    def __post_init__(self):
        check_min(self, 0, "tile", note=" (0: the run's)")
        check_min(self, 1, "calibration_tiles")


def parse_threshold(value) -> float | None:
    """A predict threshold as a number in [0, 1]; None for auto or anything else."""
    try:
        t = float(value)
    except (TypeError, ValueError):
        return None
    return t if 0 <= t <= 1 else None
