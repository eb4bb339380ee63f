"""Typed config of ``synthvit generate`` (a light module: the CLI imports it for ``--help``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from synthvit.config import ConfigError, check_min, check_range, parse_size

SURFACES = ("metal", "sintered", "concrete", "fabric", "painted")
DEFECTS = ("crack", "scratch", "pit", "stain", "inclusion", "dent", "chip")
# The keys of defects.* (formerly procedural.*, still accepted there: see GenerateConfig.RENAMED_KEYS)
DEFECT_KEYS = ("classes", "defect_free_prob", "max_defects", "defect_scale", "scale_exponent")

# What defects.fit sets from a real-data folder's labelled train defects (generate.defects.fit)
FIT_STATS = ("size", "aspect", "orientation", "contrast", "count", "defect_free_prob")
MAX_COUNT = 32  # the most defects per frame (defects.max_defects, len(defects.count))

BACKGROUND_FORMATS = ("auto", "plain", "canonical", "imagefolder", "labelme", "coco", "hf", "shards")
BackgroundFit = Literal["crop", "resize"]

# Sizes outside this range are refused: below, a defect cannot be drawn; above, one frame needs > 2 GiB of floats.
MIN_SIDE, MAX_SIDE = 32, 16384


def _check_prob(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name}: {value} is not a probability; use a value in [0, 1]")


def _check_names(name: str, values: list[str], accepted: tuple[str, ...]) -> None:
    bad = [v for v in values if v not in accepted]
    if bad or not values:
        raise ConfigError(f"{name}: {bad or values!r} not accepted; choose from {', '.join(accepted)}")
    if len(set(values)) != len(values):
        raise ConfigError(f"{name}: {values!r} lists a name twice")


def _check_quantiles(name: str, values: list[float], lo: float, hi: float, low_open: bool = False) -> None:
    """Empty, or quantiles: non-decreasing numbers in [lo, hi] (``low_open``: above lo)."""
    if not values:
        return
    inside = all((lo < v if low_open else lo <= v) and v <= hi for v in values)
    if not inside or any(b < a for a, b in zip(values, values[1:])):
        raise ConfigError(f"{name}: {values} not accepted; give quantiles (non-decreasing numbers) in "
                          f"{'(' if low_open else '['}{lo:g}, {hi:g}], or [] for the painters' own")


COPYPASTE_FORMATS = ("auto", "canonical", "labelme", "coco", "hf", "shards")  # the real-data formats with masks
SplitMissing = Literal["error", "train", "test"]


@dataclass(kw_only=True)
class CameraConfig:
    lighting: float = field(default=0.35, metadata={"help": "max strength of uneven lighting and vignetting"})
    noise: float = field(default=4.0, metadata={"help": "max sensor noise std, in 8-bit grey levels"})
    blur_prob: float = field(default=0.3, metadata={"help": "share of frames with Gaussian blur"})
    max_blur_sigma: float = 1.2
    warp_prob: float = field(default=0.2, metadata={"help": "share of frames with a small perspective/rotation"})
    max_rotation_deg: float = 4.0
    max_perspective: float = field(default=0.03, metadata={"help": "corner shift as a fraction of the side"})
    jpeg_artifact_prob: float = field(default=0.1, metadata={"help": "share of frames re-compressed at low quality"})

    def __post_init__(self):
        for name in ("blur_prob", "warp_prob", "jpeg_artifact_prob"):
            _check_prob(name, getattr(self, name))
        check_min(self, 0, "lighting", "noise", "max_blur_sigma", "max_rotation_deg", "max_perspective")


@dataclass(kw_only=True)
class DefectsConfig:
    """``defects.*``: the procedural defects (exact masks) every backend draws (``generate.defects``)."""
    classes: list[str] = field(default_factory=lambda: list(DEFECTS),
                               metadata={"help": f"defect classes (ids 1..K in this order): {', '.join(DEFECTS)}"})
    defect_free_prob: float = field(default=0.25, metadata={"help": "share of defect-free frames"})
    max_defects: int = field(default=3, metadata={"help": "defects per defective frame: 1..max_defects"})
    defect_scale: float = field(default=1.0, metadata={"help": "multiplies every defect's size"})
    scale_exponent: float = field(
        default=0.5, metadata={"help": "defect size grows as side**exponent above 256 px (0.5: small in 4K)"})
    # Fitted distributions (generate.defects.shape): quantiles at evenly spaced levels 0..1; empty: the painters' own
    size: list[float] = field(default_factory=list, metadata={
        "help": "quantiles of a defect's length (long side of its moment rectangle), as a share of the frame's "
                "short side (times defect_scale; scale_exponent unused); empty: the painters' own sizes"})
    aspect: list[float] = field(default_factory=list, metadata={
        "help": "quantiles of a defect's short/long side, in (0, 1]; empty: the painters' own shapes"})
    orientation: list[float] = field(default_factory=list, metadata={
        "help": "quantiles of a defect's long-axis angle, degrees counter-clockwise from horizontal (mod 180); "
                "empty: the painters' own"})
    contrast: list[float] = field(default_factory=list, metadata={
        "help": "quantiles of a defect's mean grey-level change (0..1 scale; < 0: darker); empty: the painters' own"})
    count: list[float] = field(default_factory=list, metadata={
        "help": "probabilities of 1, 2, ... defects per defective frame (replaces 1..max_defects); empty: uniform"})
    fit: str = field(default="", metadata={
        "help": "a real-data folder (any format with masks): its labelled train defects set fit_stats (test images "
                "never read); the numbers land in the keys above, so config.yaml reproduces the run without it"})
    fit_stats: list[str] = field(default_factory=lambda: list(FIT_STATS), metadata={
        "help": f"what fit sets: {', '.join(FIT_STATS)} (the others keep their values)"})
    fit_format: str = field(default="auto", metadata={"help": f"layout of fit: {', '.join(COPYPASTE_FORMATS)}"})
    fit_test_fraction: float = field(default=0.3, metadata={
        "help": "the test share of fit's seeded split (no splits.csv): as finetune's test_fraction"})
    fit_data_seed: int = field(default=0, metadata={"help": "its split seed: as finetune's data_seed"})
    fit_split_missing: SplitMissing = field(default="error", metadata={
        "help": "images its splits.csv does not list: an error, or train or test (as finetune's split_missing)"})
    fitted: str = field(default="", metadata={
        "help": "what fit read (written by the fit); while set, fit is not read again: the numbers are used as "
                "they are (clear it to refit)"})

    def __post_init__(self):
        _check_names("classes", self.classes, DEFECTS)
        _check_prob("defect_free_prob", self.defect_free_prob)
        if not 1 <= self.max_defects <= MAX_COUNT:
            raise ConfigError(f"max_defects: {self.max_defects} not accepted; use 1..{MAX_COUNT}")
        check_min(self, 0, "defect_scale", above=True)
        check_range(self, "scale_exponent", 0, 1)
        _check_quantiles("size", self.size, 0.0, 2.0, low_open=True)
        _check_quantiles("aspect", self.aspect, 0.0, 1.0, low_open=True)
        _check_quantiles("orientation", self.orientation, -360.0, 360.0)
        if self.orientation and self.orientation[-1] - self.orientation[0] > 180:
            raise ConfigError(f"orientation: {self.orientation} spans more than 180 degrees; angles are mod 180")
        _check_quantiles("contrast", self.contrast, -1.0, 1.0)
        if self.count and (len(self.count) > MAX_COUNT or min(self.count) < 0 or abs(sum(self.count) - 1) > 1e-3):
            raise ConfigError(f"count: {self.count} not accepted; give 1..{MAX_COUNT} probabilities (of 1, 2, ... "
                              f"defects) that sum to 1")
        _check_names("fit_stats", self.fit_stats, FIT_STATS)
        if self.fit_format not in COPYPASTE_FORMATS:
            raise ConfigError(f"fit_format: {self.fit_format!r} not accepted; use one of "
                              f"{', '.join(COPYPASTE_FORMATS)}")
        if not 0 <= self.fit_test_fraction < 1:
            raise ConfigError(f"fit_test_fraction: {self.fit_test_fraction} not accepted; use [0, 1)")


@dataclass(kw_only=True)
class ProceduralConfig:
    """``procedural.*``: the frame the defects land on (the procedural surfaces and camera, or your backgrounds);
    also read by the StyleGAN backend (``gray_prob``, ``backgrounds``) and diffusion's procedural backgrounds."""
    surfaces: list[str] = field(default_factory=lambda: list(SURFACES),
                                metadata={"help": f"surface families to draw from: {', '.join(SURFACES)}"})
    gray_prob: float = field(default=0.5, metadata={"help": "share of grayscale frames (the rest are RGB)"})
    camera: CameraConfig = field(default_factory=CameraConfig)
    backgrounds: str = field(default="", metadata={
        "help": "a folder of your defect-free images, or a real-data folder (its defect-free train images): "
                "defects are drawn into them instead of procedural surfaces"})
    backgrounds_format: str = field(default="auto", metadata={
        "help": f"layout of backgrounds: {', '.join(BACKGROUND_FORMATS)} (plain: every image of the folder)"})
    backgrounds_fit: BackgroundFit = field(default="crop", metadata={
        "help": "crop: random crops of image_size (smaller images scaled up to cover it); resize: whole images"})
    defect_free_labels: list[str] = field(default_factory=list, metadata={
        "help": "image labels that mean defect-free in a labelled backgrounds folder (empty: good, free, ok, "
                "normal, ...)"})
    backgrounds_test_fraction: float = field(default=0.3, metadata={
        "help": "the test share of the backgrounds folder's seeded split (no splits.csv): as finetune's"})
    backgrounds_data_seed: int = field(default=0, metadata={"help": "its split seed: as finetune's data_seed"})

    def __post_init__(self):
        if self.backgrounds_format not in BACKGROUND_FORMATS:
            raise ConfigError(f"backgrounds_format: {self.backgrounds_format!r} not accepted; use one of "
                              f"{', '.join(BACKGROUND_FORMATS)}")
        if not 0 <= self.backgrounds_test_fraction < 1:
            raise ConfigError(f"backgrounds_test_fraction: {self.backgrounds_test_fraction} not accepted; use [0, 1)")
        _check_names("surfaces", self.surfaces, SURFACES)
        _check_prob("gray_prob", self.gray_prob)


ContourFill = Literal["texture", "flat"]


@dataclass(kw_only=True)
class ContoursConfig:
    """``backend=contours``: formula-driven radial contours (VisualAtom / SegRCDB style), one class per shape."""
    num_classes: int = field(default=32, metadata={
        "help": "K contour classes (ids 1..K), each a fixed shape drawn from the dataset seed"})
    min_instances: int = field(default=4, metadata={"help": "instances per frame: min_instances..max_instances"})
    max_instances: int = field(default=16, metadata={"help": "at most 255"})
    harmonics: int = field(default=4, metadata={"help": "sinusoids per class contour r(theta): 1..harmonics"})
    max_frequency: int = field(default=8, metadata={"help": "highest sinusoid frequency (lobes per turn)"})
    shape_noise: float = field(default=0.15, metadata={"help": "smooth noise of each class contour (relative)"})
    instance_noise: float = field(default=0.05, metadata={
        "help": "max extra smooth noise of each instance's contour (relative)"})
    min_scale: float = field(default=0.04, metadata={"help": "smallest instance radius, share of the short side"})
    max_scale: float = field(default=0.25, metadata={"help": "largest instance radius (log-uniform in between)"})
    outline_prob: float = field(default=0.3, metadata={"help": "share of instances with a dark or light inner rim"})
    gray_prob: float = field(default=0.5, metadata={"help": "share of grayscale frames (the rest are RGB)"})
    fill: ContourFill = field(default="texture", metadata={
        "help": "texture: noise background, shaded textured instances; flat: black background, each instance its "
                "class id as grey level (image == mask, for checks)"})

    def __post_init__(self):
        if not 1 <= self.num_classes <= 255:
            raise ConfigError(f"num_classes: {self.num_classes} not accepted; use 1..255 (the mask is 8-bit)")
        if not 0 <= self.min_instances <= self.max_instances <= 255:
            raise ConfigError(f"min_instances, max_instances: {self.min_instances}, {self.max_instances} not "
                              "accepted; use 0 <= min_instances <= max_instances <= 255")
        if not 1 <= self.harmonics <= 16:
            raise ConfigError(f"harmonics: {self.harmonics} not accepted; use 1..16")
        if not 1 <= self.max_frequency <= 64:
            raise ConfigError(f"max_frequency: {self.max_frequency} not accepted; use 1..64")
        for name in ("shape_noise", "instance_noise"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name}: {getattr(self, name)} not accepted; use a value in [0, 1]")
        if not 0 < self.min_scale <= self.max_scale <= 2:
            raise ConfigError(f"min_scale, max_scale: {self.min_scale}, {self.max_scale} not accepted; use "
                              "0 < min_scale <= max_scale <= 2")
        _check_prob("outline_prob", self.outline_prob)
        _check_prob("gray_prob", self.gray_prob)


@dataclass(kw_only=True)
class CopyPasteConfig:
    """``backend=copypaste``: the labelled defects of a real-data folder's *train* split, cut out with a margin and
    pasted into its defect-free train frames (``generate.backends.copypaste``)."""
    data: str = field(default="", metadata={
        "help": "a real-data folder (any finetune format with masks): its train split's defects and frames "
                "(required for backend=copypaste)"})
    format: str = field(default="auto", metadata={"help": f"its layout: {', '.join(COPYPASTE_FORMATS)}"})
    test_fraction: float = field(default=0.3, metadata={
        "help": "the test share of its seeded split (no splits.csv): as finetune's test_fraction"})
    data_seed: int = field(default=0, metadata={"help": "its split seed: as finetune's data_seed"})
    split_missing: SplitMissing = field(default="error", metadata={
        "help": "images its splits.csv does not list: an error, or train or test (as finetune's split_missing)"})
    max_instances: int = field(default=3, metadata={"help": "defects pasted per frame: 1..max_instances"})
    defect_free_prob: float = field(default=0.0, metadata={"help": "share of frames left as they are (no paste)"})
    scale: list[float] = field(default_factory=lambda: [0.75, 1.33], metadata={
        "help": "[min, max] scale of a pasted defect (log-uniform); one number: that scale"})
    rotate: bool = field(default=True, metadata={
        "help": "turn and flip each defect at random (as copypaste.orientation says; false: as it was cut)"})
    orientation: Literal["right", "any", "real"] = field(default="right", metadata={
        "help": "how a defect is turned (with rotate): right (k*90 degrees, exact), any (any angle), or real (its "
                "axis laid at the angle of a real train defect of its class, drawn: defects lie as they do in the "
                "real frames); each flipped at random"})
    elastic: float = field(default=1.5, metadata={
        "help": "peak displacement (px) of a smooth random warp of each defect (0: none)"})
    match: bool = field(default=True, metadata={
        "help": "match each defect's surroundings (margin) to the mean/std of the spot it lands on (false: paste "
                "its pixels as they are, e.g. for binary images)"})
    margin: int = field(default=4, metadata={
        "help": "px of surroundings cut out around each defect: matched to the destination, faded into it"})
    feather: float = field(default=3.0, metadata={
        "help": "px over which the margin fades into the destination (<= margin; 0: a hard edge at the margin)"})
    min_area: int = field(default=4, metadata={"help": "defect components of fewer pixels are not used"})
    free_areas: bool = field(default=True, metadata={
        "help": "also paste into the defect-free areas of defective train frames (their own defects kept)"})
    placement: Literal["uniform", "context", "real"] = field(default="uniform", metadata={
        "help": "where a defect lands: uniform (anywhere free), context (of 12 free spots drawn, the one whose "
                "surroundings look most like those it was cut with: mean and std of the margin ring), or real "
                "(where a real train defect of its class sits in its frame, drawn, at the same relative position "
                "of the frame pasted into; uniform when none of 12 such spots is free)"})
    blend: Literal["alpha", "poisson"] = field(default="alpha", metadata={
        "help": "how a defect meets its spot: alpha (faded over copypaste.feather px at the margin) or poisson "
                "(seamless cloning: the patch's gradients kept, its values solved to meet the spot's at the "
                "margin's edge; Perez et al. 2003)"})

    def __post_init__(self):
        if self.format not in COPYPASTE_FORMATS:
            raise ConfigError(f"format: {self.format!r} not accepted; use one of {', '.join(COPYPASTE_FORMATS)}")
        if not 0 <= self.test_fraction < 1:
            raise ConfigError(f"test_fraction: {self.test_fraction} not accepted; use [0, 1)")
        if not 1 <= self.max_instances <= 64:
            raise ConfigError(f"max_instances: {self.max_instances} not accepted; use 1..64")
        _check_prob("defect_free_prob", self.defect_free_prob)
        if len(self.scale) not in (1, 2) or not 0.05 <= self.scale[0] <= self.scale[-1] <= 20:
            raise ConfigError(f"scale: {self.scale} not accepted; use [min, max] with 0.05 <= min <= max <= 20, "
                              f"or one number")
        if not 1 <= self.margin <= 64:
            raise ConfigError(f"margin: {self.margin} not accepted; use 1..64 px")
        if not 0 <= self.feather <= self.margin:
            raise ConfigError(f"feather: {self.feather} not accepted; use 0..margin ({self.margin}) px")
        if not 0 <= self.elastic <= 16:
            raise ConfigError(f"elastic: {self.elastic} not accepted; use 0..16 px")
        if self.min_area < 1:
            raise ConfigError(f"min_area: {self.min_area} not accepted; use >= 1 px")


StyleGANMode = Literal["random", "oriented", "checkpoint"]
DiffusionMode = Literal["inpaint", "img2img", "unconditional"]
Dtype = Literal["auto", "fp32", "fp16", "bf16"]
ImageFormat = Literal["jpg", "png"]


def _check_device(device: str) -> None:
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"device: {device!r} not accepted; use auto, cpu, cuda or cuda:N")


@dataclass(kw_only=True)
class StyleGANConfig:
    mode: StyleGANMode = field(default="random", metadata={
        "help": "random: random weights (Baradad et al. 2021); oriented: random oriented filters; checkpoint: "
                "stylegan.checkpoint"})
    checkpoint: str = field(default="", metadata={
        "help": "a .safetensors file (mode=checkpoint); see docs/generate.md"})
    resolution: int = field(default=0, metadata={"help": "network output side (0: the image size rounded up to 2^k)"})
    channel_max: int = field(default=128, metadata={"help": "channels per layer in random modes (checkpoint: read)"})
    truncation: float = field(default=1.0, metadata={"help": "truncation psi for mode=checkpoint"})
    anomaly_prob: float = field(default=0.0, metadata={
        "help": "share of defects drawn as DRAEM-style anomalies: a second texture blended into a defect shape"})
    batch_size: int = field(default=8, metadata={"help": "samples per forward pass"})
    device: str = field(default="auto", metadata={"help": "auto (cuda:LOCAL_RANK when a GPU is present), cpu, cuda"})
    dtype: Dtype = field(default="auto", metadata={"help": "auto: bf16 on GPU, fp32 on CPU"})

    def __post_init__(self):
        if self.mode == "checkpoint" and not self.checkpoint:
            raise ConfigError("checkpoint: mode=checkpoint needs stylegan.checkpoint=PATH.safetensors")
        if self.resolution and (self.resolution < 8 or self.resolution & (self.resolution - 1)):
            raise ConfigError(f"resolution: {self.resolution} not accepted; use 0 or a power of two >= 8")
        if not 4 <= self.channel_max <= 1024:
            raise ConfigError(f"channel_max: {self.channel_max} not accepted; use 4..1024")
        _check_prob("anomaly_prob", self.anomaly_prob)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: {self.batch_size} not accepted; use >= 1")
        _check_device(self.device)


@dataclass(kw_only=True)
class DiffusionConfig:
    weights: str = field(default="weights/sd-inpaint", metadata={
        "help": "a local diffusers pipeline folder (model_index.json + components); never downloaded"})
    mode: DiffusionMode = field(default="inpaint", metadata={
        "help": "inpaint: defects into backgrounds; img2img, unconditional: surfaces for procedural defects"})
    backgrounds: str = field(default="", metadata={
        "help": "a folder of your defect-free images (empty: procedural surfaces)"})
    prompt: str = field(default="a close-up photo of a {defect} defect on a {surface} surface", metadata={
        "help": "prompt template per defect class ({defect}, {surface})"})
    prompts: list[str] = field(default_factory=list, metadata={
        "help": "per-class prompts overriding the template, as class=prompt"})
    surface_prompt: str = field(default="a close-up photo of a clean {surface} surface", metadata={
        "help": "prompt for img2img surfaces"})
    negative_prompt: str = ""
    steps: int = 30
    guidance_scale: float = 7.5
    strength: float = field(default=1.0, metadata={"help": "inpaint/img2img noise strength (0, 1]"})
    batch_size: int = field(default=8, metadata={"help": "samples per pipeline call"})
    device: str = field(default="auto", metadata={"help": "auto (cuda:LOCAL_RANK when a GPU is present), cpu, cuda"})
    dtype: Dtype = field(default="auto", metadata={"help": "auto: bf16 on GPU, fp32 on CPU"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the UNet"})

    def __post_init__(self):
        bad = [p for p in self.prompts if "=" not in p or p.split("=", 1)[0].strip() not in DEFECTS]
        if bad:
            raise ConfigError(f"prompts: {bad!r} not accepted; write class=prompt with a class of {', '.join(DEFECTS)}")
        check_min(self, 1, "steps", "batch_size")
        if not 0 < self.strength <= 1:
            raise ConfigError(f"strength: {self.strength} not accepted; use a value in (0, 1]")
        _check_device(self.device)

    def prompt_for(self, defect: str, surface: str) -> str:
        overrides = {k.strip(): v.strip() for k, v in (p.split("=", 1) for p in self.prompts)}
        return overrides.get(defect, self.prompt).format(defect=defect, surface=surface)


@dataclass(kw_only=True)
class GenerateConfig:
    # Keys that moved (old dotted key -> new one): still read from YAML files and the command line, with a warning.
    RENAMED_KEYS: ClassVar[dict[str, str]] = {f"procedural.{k}": f"defects.{k}" for k in DEFECT_KEYS}
    backend: str = field(default="procedural", metadata={"help": "generator backend (see generate.backends)"})
    out_dir: str = field(default="shards/synthetic", metadata={
        "help": "dataset folder (shards + _info.json): a local folder, s3://bucket/prefix or gs://..."})
    name: str = field(default="synthvit", metadata={"help": "shard file prefix: <name>-000000.tar"})
    num_samples: int = 1024
    samples_per_shard: int = 256
    image_size: int | str = field(default=256, metadata={"help": "an int (square) or WIDTHxHEIGHT, e.g. 3840x2160"})
    seed: int = 0
    num_workers: int = field(default=2, metadata={"help": "worker processes (0: render in this process)"})
    image_format: ImageFormat = field(default="jpg", metadata={"help": "png for lossless images"})
    jpeg_quality: int = 95
    preview: int = field(default=16, metadata={"help": "samples on the preview contact sheet (0: none)"})
    real_ids: str = field(default="", metadata={
        "help": "a text file of image ids (one per line): backends that draw on a real-data folder (copypaste, "
                "procedural.backgrounds) use only these train images (compare sets it to a budget's own)"})
    verify: bool = field(default=False, metadata={"help": "only check the shards in out_dir against _info.json"})
    defects: DefectsConfig = field(default_factory=DefectsConfig)
    procedural: ProceduralConfig = field(default_factory=ProceduralConfig)
    stylegan: StyleGANConfig = field(default_factory=StyleGANConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    contours: ContoursConfig = field(default_factory=ContoursConfig)
    copypaste: CopyPasteConfig = field(default_factory=CopyPasteConfig)

    def __post_init__(self):
        from generate.backends import list_backends  # light: the registry holds lazy references

        if self.backend not in list_backends():
            raise ConfigError(f"backend: unknown backend {self.backend!r}; available: {', '.join(list_backends())}")
        w, h = parse_size(self.image_size)
        if not (MIN_SIDE <= w <= MAX_SIDE and MIN_SIDE <= h <= MAX_SIDE):
            raise ConfigError(f"image_size: {w}x{h} is impossible here; each side must be in {MIN_SIDE}..{MAX_SIDE}")
        if self.num_samples < 1:
            raise ConfigError(f"num_samples: {self.num_samples} not accepted; use >= 1")
        if self.samples_per_shard < 1:
            raise ConfigError(f"samples_per_shard: {self.samples_per_shard} not accepted; use >= 1")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers: {self.num_workers} not accepted; use 0 (in process) or more")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"jpeg_quality: {self.jpeg_quality} not accepted; use 1..100")
        if not self.name or any(c in self.name for c in "/\\.{} ") or self.name.startswith("-"):
            raise ConfigError(f"name: {self.name!r} not accepted; use letters, digits, '-' or '_' (no dots)")
        if self.preview < 0:
            raise ConfigError(f"preview: {self.preview} not accepted; use >= 0")
        if self.backend == "copypaste" and not self.copypaste.data:
            raise ConfigError("copypaste.data: backend=copypaste needs copypaste.data=FOLDER, a real-data folder with "
                              "labelled defects (masks) in its train split")

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return parse_size(self.image_size)
