"""Typed config of ``synthvit generate`` (a light module: the CLI imports it for ``--help``)."""
from __future__ import annotations

from dataclasses import dataclass, field

from synthvit.config import ConfigError, parse_size

SURFACES = ("metal", "sintered", "concrete", "fabric", "painted")
DEFECTS = ("crack", "scratch", "pit", "stain", "inclusion", "dent", "chip")

# Sizes outside this range are refused: below, a defect cannot be drawn; above, one frame needs > 2 GiB of floats.
MIN_SIDE, MAX_SIDE = 32, 16384


def _check_prob(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name}: {value} is not a probability; use a value in [0, 1]")


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
        for name in ("lighting", "noise", "max_blur_sigma", "max_rotation_deg", "max_perspective"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")


@dataclass(kw_only=True)
class ProceduralConfig:
    surfaces: list[str] = field(default_factory=lambda: list(SURFACES),
                                metadata={"help": f"surface families to draw from: {', '.join(SURFACES)}"})
    classes: list[str] = field(default_factory=lambda: list(DEFECTS),
                               metadata={"help": f"defect classes (ids 1..K in this order): {', '.join(DEFECTS)}"})
    defect_free_prob: float = field(default=0.25, metadata={"help": "share of defect-free frames"})
    max_defects: int = field(default=3, metadata={"help": "defects per defective frame: 1..max_defects"})
    gray_prob: float = field(default=0.5, metadata={"help": "share of grayscale frames (the rest are RGB)"})
    defect_scale: float = field(default=1.0, metadata={"help": "multiplies every defect's size"})
    scale_exponent: float = field(
        default=0.5, metadata={"help": "defect size grows as side**exponent above 256 px (0.5: small in 4K)"})
    camera: CameraConfig = field(default_factory=CameraConfig)

    def __post_init__(self):
        for name, accepted, values in (("surfaces", SURFACES, self.surfaces), ("classes", DEFECTS, self.classes)):
            bad = [v for v in values if v not in accepted]
            if bad or not values:
                raise ConfigError(f"{name}: {bad or values!r} not accepted; choose from {', '.join(accepted)}")
            if len(set(values)) != len(values):
                raise ConfigError(f"{name}: {values!r} lists a name twice")
        _check_prob("defect_free_prob", self.defect_free_prob)
        _check_prob("gray_prob", self.gray_prob)
        if not 1 <= self.max_defects <= 32:
            raise ConfigError(f"max_defects: {self.max_defects} not accepted; use 1..32")
        if self.defect_scale <= 0 or not 0 <= self.scale_exponent <= 1:
            raise ConfigError("defect_scale must be > 0 and scale_exponent in [0, 1]")


@dataclass(kw_only=True)
class GenerateConfig:
    backend: str = field(default="procedural", metadata={"help": "generator backend (see generate.backends)"})
    out_dir: str = field(default="shards/synthetic", metadata={"help": "dataset folder (shards + _info.json)"})
    name: str = field(default="synthvit", metadata={"help": "shard file prefix: <name>-000000.tar"})
    num_samples: int = 1024
    samples_per_shard: int = 256
    image_size: int | str = field(default=256, metadata={"help": "an int (square) or WIDTHxHEIGHT, e.g. 3840x2160"})
    seed: int = 0
    num_workers: int = field(default=2, metadata={"help": "worker processes (0: render in this process)"})
    image_format: str = field(default="jpg", metadata={"help": "jpg, or png for lossless images"})
    jpeg_quality: int = 95
    preview: int = field(default=16, metadata={"help": "samples on the preview contact sheet (0: none)"})
    verify: bool = field(default=False, metadata={"help": "only check the shards in out_dir against _info.json"})
    procedural: ProceduralConfig = field(default_factory=ProceduralConfig)

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
        if self.image_format not in ("jpg", "png"):
            raise ConfigError(f"image_format: {self.image_format!r} not accepted; use jpg or png")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"jpeg_quality: {self.jpeg_quality} not accepted; use 1..100")
        if not self.name or any(c in self.name for c in "/\\.{} ") or self.name.startswith("-"):
            raise ConfigError(f"name: {self.name!r} not accepted; use letters, digits, '-' or '_' (no dots)")
        if self.preview < 0:
            raise ConfigError(f"preview: {self.preview} not accepted; use >= 0")

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return parse_size(self.image_size)
