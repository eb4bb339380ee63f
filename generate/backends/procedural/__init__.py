"""The procedural renderer: the default backend, CPU only, no weights.

Sample ``index`` is drawn from ``numpy.random.default_rng((seed, index))`` alone, so its bytes do not depend on
worker count, shard size or machine. Pipeline on planar float32 frames:
surface luminance -> [perspective/rotation] -> [lens blur] -> lighting -> sensor noise -> colour -> defects
(local patches, blurred and lit like the frame) -> uint8 -> [JPEG artifacts]. Each defect writes its class
into the mask and its id into an instance map; ``cls`` and each instance's bbox/area are read off those, so
labels always agree with the mask.

With ``procedural.backgrounds`` the surface is the user's own defect-free image instead (``generate.backgrounds``,
no camera effects: the photo has its own), and each defect follows the local statistics of the spot it lands on
(:class:`~generate.backends.procedural.defects.LocalContrast`); the sample's json names its ``background``.
"""
from __future__ import annotations

import numpy as np

from generate.backends.procedural import camera
from generate.backends.procedural.defects import DEFECT_PAINTERS, LocalContrast, blur_stamp, composite
from generate.backends.procedural.noise import blur
from generate.backends.procedural.surfaces import SURFACE_FAMILIES
from generate.backgrounds import BackgroundPool, find_backgrounds
from generate.schema import BACKGROUND, Sample, main_class_of

REFERENCE_SIDE = 256


def feature_scale(width: int, height: int, exponent: float, multiplier: float = 1.0) -> float:
    """Defect scale in px: the short side up to 256 px, then growing as side**exponent.

    With the default exponent 0.5 a crack spans about the same share of a 256 px frame as of a 64 px one,
    but only ~1/3 of that share in a 3840x2160 frame: small defects in 4K, as in real inspection.
    """
    side = min(width, height)
    base = side if side <= REFERENCE_SIDE else REFERENCE_SIDE * (side / REFERENCE_SIDE) ** exponent
    return float(base * multiplier)


def _r(params: dict) -> dict:
    """JSON-ready parameters: floats rounded to 4 decimals (lists too)."""
    def r(v):
        if isinstance(v, (list, tuple)):
            return [r(x) for x in v]
        return round(float(v), 4) if isinstance(v, (float, np.floating)) else v
    return {k: r(v) for k, v in params.items()}


def draw_defects(rng, img: np.ndarray, p, scale: float, sigma: float = 0.0, light=None, extra=None, adjust=None):
    """Draw ``p.defect_free_prob``-gated procedural defects into ``img`` (C, H, W) float, in place.

    ``extra``: optional ``(probability, class id, painter(rng, shape_stamp) -> Stamp)``: that share of defects is
    drawn by ``painter`` in the shape of a procedural defect instead (e.g. a DRAEM-style blended texture).
    ``adjust``: passed to :func:`composite` (defects on real backgrounds).
    Returns (instance map, class mask, [(class id, clipped patch box)] per instance id 1..n).
    """
    _, H, W = img.shape
    inst = np.zeros((H, W), np.uint8)
    mask = np.zeros((H, W), np.uint8)
    instances = []  # (class id, clipped patch box) per instance id 1..n
    if rng.random() >= p.defect_free_prob:
        for _ in range(int(rng.integers(1, p.max_defects + 1))):
            k = int(rng.integers(len(p.classes)))
            stamp = DEFECT_PAINTERS[p.classes[k]](rng, H, W, img.shape[0], scale)
            cls = k + 1
            if extra is not None and extra[0] > 0 and rng.random() < extra[0]:
                cls, stamp = extra[1], extra[2](rng, stamp)
            if sigma:
                stamp = blur_stamp(stamp, sigma)
            landed = composite(img, inst, mask, stamp, len(instances) + 1, cls, light, adjust)
            if landed:
                instances.append((cls, landed[1]))
    return inst, mask, instances


def instance_records(inst: np.ndarray, instances: list[tuple[int, tuple]], class_names: list[str]) -> list[dict]:
    """Per visible instance: class id/name, bbox [x0, y0, x1, y1) and pixel area, read off the instance map.

    An instance's pixels lie inside its own patch box, so only that box is scanned.
    """
    out = []
    for i, (cls, (ys, ye, xs, xe)) in enumerate(instances, start=1):
        hit = inst[ys:ye, xs:xe] == i
        area = int(hit.sum())
        if area == 0:  # hidden under later defects
            continue
        rows, cols = np.flatnonzero(hit.any(1)), np.flatnonzero(hit.any(0))
        out.append({"class": cls, "name": class_names[cls], "area": area,
                    "bbox": [xs + int(cols[0]), ys + int(rows[0]), xs + int(cols[-1]) + 1, ys + int(rows[-1]) + 1]})
    return out


def background_pool(cfg, check: bool = False) -> BackgroundPool | None:
    """The pool of ``procedural.backgrounds`` (None without one); ``check``: decode every file first, warn about
    small ones (``generate`` does this once, before any shard). ``pool.record`` goes into ``_info.json``."""
    p = cfg.procedural
    if not p.backgrounds:
        return None
    sources, record = find_backgrounds(p.backgrounds, p.backgrounds_format, tuple(x.lower() for x in
                                       p.defect_free_labels), p.backgrounds_test_fraction, p.backgrounds_data_seed,
                                       check)
    pool = BackgroundPool(sources, *cfg.size, p.backgrounds_fit, warn=check)
    pool.record = record
    return pool


def background_frame(pool: BackgroundPool, rng) -> tuple[np.ndarray, dict]:
    """A background from ``rng`` as a planar float32 frame in [0, 1] (one channel when it is grey) + its record."""
    crop, record = pool(rng)
    img = crop[None] if crop.ndim == 2 else crop.transpose(2, 0, 1)
    return img.astype(np.float32) / 255.0, record


def on_background(rng, pool: BackgroundPool, p, scale: float, class_names: list[str], meta: dict,
                  extra=None) -> Sample:
    """Procedural defects (and ``extra``'s) drawn into a background from ``pool``, each at the local contrast of
    its spot and through a light lens blur; ``meta`` gets ``background`` ({id, box}) and ``channels``."""
    img, record = background_frame(pool, rng)
    sigma = float(rng.uniform(0.3, 0.8))
    inst, mask, instances = draw_defects(rng, img, p, scale, sigma, extra=extra, adjust=LocalContrast(rng))
    defects = instance_records(inst, instances, class_names)
    meta = dict(meta, channels=img.shape[0], background=record, defects=defects)
    return Sample(camera.to_uint8(img), mask, main_class_of(defects, len(class_names)), meta)


class UsesBackgrounds:
    """What ``generate`` asks of a backend that draws into ``procedural.backgrounds`` (``self.backgrounds``, the
    pool or None, and ``self.cfg``)."""
    cfg: object
    backgrounds: BackgroundPool | None

    def validate(self) -> None:
        """Every background decodes (one error listing those that do not); run once before any shard."""
        if self.backgrounds is not None:
            background_pool(self.cfg, check=True)

    @property
    def info(self) -> dict:
        """What ``_info.json`` records beside the config: the backgrounds used (ids included)."""
        return {"backgrounds": self.backgrounds.record} if self.backgrounds is not None else {}


class ProceduralBackend(UsesBackgrounds):
    name = "procedural"

    def __init__(self, cfg):
        self.cfg = cfg
        self.p = cfg.procedural
        self.width, self.height = cfg.size
        self.class_names = [BACKGROUND, *self.p.classes]
        self.scale = feature_scale(self.width, self.height, self.p.scale_exponent, self.p.defect_scale)
        self.backgrounds = background_pool(cfg)

    def render(self, index: int) -> Sample:
        rng = np.random.default_rng((self.cfg.seed, index))
        if self.backgrounds is not None:
            meta = dict(backend=self.name, seed=self.cfg.seed, index=index, size=[self.width, self.height],
                        surface=dict(family="background"))
            return on_background(rng, self.backgrounds, self.p, self.scale, self.class_names, meta)
        H, W, p, cam = self.height, self.width, self.p, self.p.camera
        family = p.surfaces[int(rng.integers(len(p.surfaces)))]
        lum, tint, surface_params = SURFACE_FAMILIES[family](rng, H, W, self.scale)
        camera_params: dict = {}
        if rng.random() < cam.warp_prob:
            lum, geo = camera.warp(rng, lum, cam.max_rotation_deg, cam.max_perspective)
            camera_params.update(geo)
        sigma = float(rng.uniform(0.3, cam.max_blur_sigma)) if rng.random() < cam.blur_prob else 0.0
        if sigma:
            camera_params["blur_sigma"] = sigma
            lum = blur(lum, sigma)
        light, lit = camera.lighting(rng, lum, cam.lighting)
        camera_params.update(lit)
        camera_params["noise_std"] = std = rng.uniform(0, cam.noise)
        camera.sensor_noise(rng, lum, std)
        gray = bool(rng.random() < p.gray_prob)
        img = lum[None] if gray else tint[:, None, None] * lum
        inst, mask, instances = draw_defects(rng, img, p, self.scale, sigma, light)
        image = camera.to_uint8(img)
        if rng.random() < cam.jpeg_artifact_prob:
            camera_params["jpeg_quality"] = quality = int(rng.integers(30, 75))
            image = camera.jpeg_artifacts(image, quality)
        defects = instance_records(inst, instances, self.class_names)
        meta = dict(backend=self.name, seed=self.cfg.seed, index=index, size=[W, H], channels=1 if gray else 3,
                    surface=dict(family=family, **_r(surface_params)), camera=_r(camera_params), defects=defects)
        return Sample(image, mask, main_class_of(defects, len(self.class_names)), meta)


def sample_on_surface(rng, img: np.ndarray, p, scale: float, class_names: list[str], meta: dict,
                      extra=None) -> Sample:
    """Procedural defects (exact masks) drawn on a given surface ``img`` (C, H, W) float in [0, 1], in place:
    the path neural backends share with this one. ``meta`` gets ``defects``; ``cls`` follows the mask."""
    inst, mask, instances = draw_defects(rng, img, p, scale, extra=extra)
    image = camera.to_uint8(img)
    defects = instance_records(inst, instances, class_names)
    return Sample(image, mask, main_class_of(defects, len(class_names)), dict(meta, defects=defects))
