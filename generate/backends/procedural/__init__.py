"""The procedural renderer: the default backend, CPU only, no weights.

Sample ``index`` is drawn from ``numpy.random.default_rng((seed, index))`` alone, so its bytes do not depend on
worker count, shard size or machine. Pipeline on planar float32 frames:
surface luminance -> [perspective/rotation] -> [lens blur] -> lighting -> sensor noise -> colour -> defects
(local patches, blurred and lit like the frame) -> uint8 -> [JPEG artifacts]. Each defect writes its class
into the mask and its id into an instance map; ``cls`` and each instance's bbox/area are read off those, so
labels always agree with the mask.

With ``procedural.backgrounds`` the surface is the user's own defect-free image instead (``generate.backgrounds``,
no camera effects: the photo has its own), and each defect follows the local statistics of the spot it lands on
(:class:`~generate.defects.LocalContrast`); the sample's json names its ``background``.
"""
from __future__ import annotations

import numpy as np

from generate.backends.procedural import camera
from generate.backends.procedural.surfaces import SURFACE_FAMILIES
from generate.backgrounds import UsesBackgrounds, background_pool
from generate.defects import draw_defects, feature_scale, instance_records, on_background, to_uint8
from generate.noise import blur
from generate.schema import BACKGROUND, Sample, main_class_of


def _r(params: dict) -> dict:
    """JSON-ready parameters: floats rounded to 4 decimals (lists too)."""
    def r(v):
        if isinstance(v, (list, tuple)):
            return [r(x) for x in v]
        return round(float(v), 4) if isinstance(v, (float, np.floating)) else v
    return {k: r(v) for k, v in params.items()}


class ProceduralBackend(UsesBackgrounds):
    """Procedural surfaces through a camera model (or your backgrounds), with the defects of ``defects.*``."""

    name = "procedural"

    def __init__(self, cfg):
        self.cfg = cfg
        self.p, self.d = cfg.procedural, cfg.defects
        self.width, self.height = cfg.size
        self.class_names = [BACKGROUND, *self.d.classes]
        self.scale = feature_scale(self.width, self.height, self.d.scale_exponent, self.d.defect_scale)
        self.backgrounds = background_pool(cfg)

    def render(self, index: int) -> Sample:
        rng = np.random.default_rng((self.cfg.seed, index))
        if self.backgrounds is not None:
            meta = dict(backend=self.name, seed=self.cfg.seed, index=index, size=[self.width, self.height],
                        surface=dict(family="background"))
            return on_background(rng, self.backgrounds, self.d, self.scale, self.class_names, meta)
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
        drawn = draw_defects(rng, img, self.d, self.scale, sigma, light)
        image = to_uint8(img)
        if rng.random() < cam.jpeg_artifact_prob:
            camera_params["jpeg_quality"] = quality = int(rng.integers(30, 75))
            image = camera.jpeg_artifacts(image, quality)
        defects = instance_records(drawn.inst, drawn.instances, self.class_names)
        meta = dict(backend=self.name, seed=self.cfg.seed, index=index, size=[W, H], channels=1 if gray else 3,
                    surface=dict(family=family, **_r(surface_params)), camera=_r(camera_params), defects=defects)
        return Sample(image, drawn.mask, main_class_of(defects, len(self.class_names)), meta)

