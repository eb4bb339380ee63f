"""The procedural defects every backend draws, with exact masks (config group ``defects.*``).

Any backend makes a frame (a procedural surface, a StyleGAN texture, a diffusion image, your own background) and
hands it here: :func:`draw_defects` paints ``1..defects.max_defects`` defects of ``defects.classes`` into it (the
painters of :mod:`generate.defects.painters`), writing each one's class into the mask and its id into an instance
map; :func:`instance_records` reads each instance's bbox and area off that map, so labels always agree with the
mask. :func:`sample_on_surface` and :func:`on_background` are the whole path from a float frame to a
:class:`~generate.schema.Sample`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from PIL import Image

from generate.backgrounds import BackgroundPool
from generate.defects.painters import DEFECT_PAINTERS, Box, Landed, Light, LocalContrast, Stamp, blur_stamp, composite
from generate.defects.shape import FittedContrast, defect_count, paint_defect
from generate.noise import row_strips
from generate.schema import Sample, main_class_of

__all__ = ["DEFECT_PAINTERS", "Box", "DrawnDefects", "FittedContrast", "Instance", "Landed", "Light", "LocalContrast",
           "Stamp", "Substitute", "composite", "defect_count", "draw_defects", "feature_scale", "instance_records",
           "on_background", "paint_defect", "sample_on_surface", "to_uint8"]

REFERENCE_SIDE = 256


class Instance(NamedTuple):
    """One drawn defect: its class id and the clipped patch that holds all its pixels."""
    cls: int
    box: Box


class DrawnDefects(NamedTuple):
    """The labels of the defects drawn into a frame: an instance map (id 1..n per pixel), the class mask and the
    instances, ``instances[i - 1]`` being instance id ``i``."""
    inst: np.ndarray
    mask: np.ndarray
    instances: list[Instance]


class Substitute(NamedTuple):
    """A ``share`` of defects drawn by ``paint(rng, shape) -> Stamp`` in the shape of a procedural defect instead,
    labelled ``class_id`` (e.g. a DRAEM-style blended texture)."""
    share: float
    class_id: int
    paint: Callable[[np.random.Generator, Stamp], Stamp]


def feature_scale(width: int, height: int, exponent: float, multiplier: float = 1.0) -> float:
    """Defect scale in px: the short side up to 256 px, then growing as side**exponent.

    With the default exponent 0.5 a crack spans about the same share of a 256 px frame as of a 64 px one,
    but only ~1/3 of that share in a 3840x2160 frame: small defects in 4K, as in real inspection.
    """
    side = min(width, height)
    base = side if side <= REFERENCE_SIDE else REFERENCE_SIDE * (side / REFERENCE_SIDE) ** exponent
    return float(base * multiplier)


def draw_defects(rng, img: np.ndarray, d, scale: float, sigma: float = 0.0, light: Light | None = None,
                 substitute: Substitute | None = None, adjust=None) -> DrawnDefects:
    """Draw ``d.defect_free_prob``-gated defects (``d``: the ``defects`` config) into ``img`` (C, H, W) float,
    in place. ``sigma``: the frame's lens blur, applied to each defect; ``light``: its illumination (see
    :func:`composite`); ``substitute``: a share of defects drawn by another painter; ``adjust``: passed to
    :func:`composite` (defects on real backgrounds). Fitted keys of ``d`` (:mod:`generate.defects.shape`) set each
    defect's count, length, aspect, angle and contrast (a fitted contrast replaces ``adjust``, keeping its sensor
    noise)."""
    _, H, W = img.shape
    inst = np.zeros((H, W), np.uint8)
    mask = np.zeros((H, W), np.uint8)
    instances: list[Instance] = []
    if d.contrast:
        adjust = FittedContrast(rng, d.contrast, noise=adjust is not None)
    if rng.random() >= d.defect_free_prob:
        for _ in range(defect_count(rng, d)):
            k = int(rng.integers(len(d.classes)))
            stamp = paint_defect(rng, d, d.classes[k], H, W, img.shape[0], scale)
            cls = k + 1
            if substitute is not None and substitute.share > 0 and rng.random() < substitute.share:
                cls, stamp = substitute.class_id, substitute.paint(rng, stamp)
            if sigma:
                stamp = blur_stamp(stamp, sigma)
            landed = composite(img, inst, mask, stamp, len(instances) + 1, cls, light, adjust)
            if landed:
                instances.append(Instance(cls, landed.box))
    return DrawnDefects(inst, mask, instances)


def instance_records(inst: np.ndarray, instances: list[Instance], class_names: list[str]) -> list[dict]:
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


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Planar (C, H, W) float in [0, 1] -> (H, W) or interleaved (H, W, 3) uint8 (rounded, clipped); ``img`` is
    scaled in place."""
    C, H, W = img.shape
    planes = np.empty((C, H, W), np.uint8)
    for sl in row_strips(H, W, pixels=(1 << 16) // C):
        block = img[:, sl]
        block *= 255.0
        block += 0.5
        np.clip(block, 0.0, 255.0, out=block)
        planes[:, sl] = block
    if C == 1:
        return planes[0]
    return np.asarray(Image.merge("RGB", [Image.fromarray(p) for p in planes]))


def _sample(image: np.ndarray, drawn: DrawnDefects, class_names: list[str], meta: dict) -> Sample:
    defects = instance_records(drawn.inst, drawn.instances, class_names)
    return Sample(image, drawn.mask, main_class_of(defects, len(class_names)), dict(meta, defects=defects))


def sample_on_surface(rng, img: np.ndarray, d, scale: float, class_names: list[str], meta: dict,
                      substitute: Substitute | None = None) -> Sample:
    """Defects (exact masks) drawn on a given surface ``img`` (C, H, W) float in [0, 1], in place: the path every
    neural backend takes. ``meta`` gets ``defects``; ``cls`` follows the mask."""
    drawn = draw_defects(rng, img, d, scale, substitute=substitute)
    return _sample(to_uint8(img), drawn, class_names, meta)


def on_background(rng, pool: BackgroundPool, d, scale: float, class_names: list[str], meta: dict,
                  substitute: Substitute | None = None) -> Sample:
    """Defects (and ``substitute``'s) drawn into a background from ``pool``, each at the local contrast of its
    spot and through a light lens blur; ``meta`` gets ``channels``, ``background`` ({id, box}) and ``defects``."""
    crop, record = pool(rng)
    img = (crop[None] if crop.ndim == 2 else crop.transpose(2, 0, 1)).astype(np.float32) / 255.0
    sigma = float(rng.uniform(0.3, 0.8))
    drawn = draw_defects(rng, img, d, scale, sigma, substitute=substitute, adjust=LocalContrast(rng))
    return _sample(to_uint8(img), drawn, class_names, dict(meta, channels=img.shape[0], background=record))
