"""Surface families. Each returns ``(lum, tint, params)``:

- ``lum``: (H, W) float32 luminance, about [0, 1] (the grayscale frame);
- ``tint``: (3,) float32 colour gain with mean ~1 (an RGB frame is ``tint[:, None, None] * lum``);
- ``params``: the sampled continuous parameters (JSON-ready), recorded in the sample metadata.

``feature`` is the frame's feature scale in px (see ``feature_scale``): textures scale with it, so a 4K frame
shows finer structure relative to its size, like a real high-resolution camera. Smooth components (shading,
sheen, low-frequency tone) are accumulated at low resolution in a :class:`LowRes` and upsampled once.
"""
from __future__ import annotations

import math

import numpy as np

from generate.noise import LowRes, add_grain, fractal, line_noise, row_strips


def _projected(ys: np.ndarray, xs: np.ndarray, angle: float, step: float) -> np.ndarray:
    """Coordinate across direction ``angle`` in units of ``step`` px, shifted to start at 0."""
    c, s = math.cos(angle) / step, -math.sin(angle) / step
    lo = min(0.0, s * float(xs.max())) + min(0.0, c * float(ys.max()))
    return xs * s + (ys * c - lo)


def _band(low: LowRes, rng, strength: float, width: tuple[float, float]) -> None:
    """A broad reflection band (sheen, gloss) added at low resolution."""
    proj = _projected(low.ys, low.xs, rng.uniform(0, math.pi), 1.0)
    span = float(proj.max()) + 1.0
    low.acc += strength * np.exp(-(((proj - rng.uniform(0, span)) / (span * rng.uniform(*width))) ** 2))


def _neutral_tint(rng: np.random.Generator, spread: float) -> np.ndarray:
    t = 1.0 + rng.uniform(-spread, spread, 3).astype(np.float32)
    return t / t.mean()


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]


def metal(rng, h, w, feature):
    """Brushed (straight streaks) or machined (turning arcs) metal, with a broad sheen."""
    machined = bool(rng.random() < 0.35)
    base, streak = rng.uniform(0.4, 0.7), rng.uniform(0.03, 0.09)
    step = rng.uniform(1.0, 2.5) * max(1.0, feature / 256)
    ys, xs = _grid(h, w)
    if machined:
        cx, cy = rng.uniform(-1.0, 2.0) * w, rng.uniform(-1.0, 2.0) * h
        ys -= cy
        xs -= cx
        idx = np.sqrt(xs * xs + ys * ys)
        idx *= 1.0 / step
    else:
        idx = _projected(ys, xs, rng.uniform(0, math.pi), step)
    idx = idx.astype(np.int32)
    lum = np.take(line_noise(rng, int(idx.max()) + 2, smooth=1), idx)
    lum *= streak
    low = LowRes(h, w)
    low.add_fractal(rng, rng.uniform(0.02, 0.06), cells=rng.uniform(2, 5), octaves=3)
    sheen = rng.uniform(0.0, 0.25)
    _band(low, rng, sheen, (0.1, 0.4))
    low.acc += base
    lum += low.full()
    params = dict(mode="machined" if machined else "brushed", base=base, streak=streak, sheen=sheen)
    return lum, _neutral_tint(rng, 0.06), params


def _blobs(rng, h, w, size_px: float, share: float) -> np.ndarray:
    """Soft blobs of about ``size_px`` covering about ``share`` of the frame, in [0, 1] (pores, aggregate)."""
    cells = max(h, w) / (size_px * 2.0)
    field = fractal(rng, h, w, cells=cells, octaves=1)
    sample = field[:: max(1, h // 48), :: max(1, w // 48)]
    threshold = float(np.quantile(sample, 1 - share))
    field -= threshold
    field *= 4.0 / (float(sample.std()) + 1e-6)
    return np.clip(field, 0.0, 1.0, out=field)


def sintered(rng, h, w, feature):
    """Cast or sintered (porous) surface: grainy base with dark pores of a sampled size and density."""
    base, rough = rng.uniform(0.35, 0.65), rng.uniform(0.03, 0.08)
    pore_px = max(1.5, rng.uniform(0.004, 0.012) * feature)
    porosity = rng.uniform(0.02, 0.12)
    lum = _blobs(rng, h, w, pore_px, porosity)
    lum *= -rng.uniform(0.25, 0.45)
    add_grain(rng, lum, rough)
    low = LowRes(h, w)
    low.add_fractal(rng, rough * 1.5, cells=rng.uniform(3, 8), octaves=4)
    low.acc += base
    lum += low.full()
    params = dict(base=base, roughness=rough, pore_px=pore_px, porosity=porosity)
    return lum, _neutral_tint(rng, 0.05), params


def concrete(rng, h, w, feature):
    """Concrete (aggregate patches, grain) or glazed ceramic (smooth, sparse speckles)."""
    ceramic = bool(rng.random() < 0.4)
    low = LowRes(h, w)
    if ceramic:
        base = rng.uniform(0.65, 0.88)
        low.add_fractal(rng, rng.uniform(0.01, 0.04), cells=rng.uniform(2, 6), octaves=4, persistence=0.6)
        low.acc += base
        lum = low.full()
        density = rng.uniform(2e-4, 2e-3)
        lum.reshape(-1)[rng.integers(0, h * w, int(density * h * w))] -= rng.uniform(0.1, 0.3)
    else:
        base = rng.uniform(0.4, 0.65)
        density = 0.0
        lum = _blobs(rng, h, w, max(2.0, rng.uniform(0.01, 0.03) * feature), rng.uniform(0.1, 0.3))
        lum *= rng.uniform(-0.12, 0.12)
        add_grain(rng, lum, rng.uniform(0.02, 0.05))
        low.add_fractal(rng, rng.uniform(0.05, 0.1), cells=rng.uniform(2, 6), octaves=4, persistence=0.6)
        low.acc += base
        lum += low.full()
    params = dict(mode="ceramic" if ceramic else "concrete", base=base, speckle_density=density)
    return lum, _neutral_tint(rng, 0.08), params


def fabric(rng, h, w, feature):
    """Plain-weave fabric: two thread families crossing over/under, with yarn irregularity."""
    period = max(3.0, rng.uniform(0.012, 0.035) * feature)
    angle = rng.uniform(-0.2, 0.2) + (math.pi / 4 if rng.random() < 0.2 else 0.0)
    contrast, base = rng.uniform(0.2, 0.45), rng.uniform(0.35, 0.7)
    ys, xs = _grid(h, w)
    c, s = math.cos(angle) / period, math.sin(angle) / period
    lum = np.empty((h, w), np.float32)
    for sl in row_strips(h, w):
        lum[sl] = _weave(ys[sl], xs, c, s, contrast)
    low = LowRes(h, w)
    low.add_fractal(rng, rng.uniform(0.02, 0.06), cells=rng.uniform(3, 8), octaves=3)
    low.acc += base - contrast / 2
    lum += low.full()
    colour = rng.uniform(0.2, 1.0, 3).astype(np.float32)
    params = dict(period_px=period, angle=angle, contrast=contrast, base=base)
    return lum, colour / colour.mean(), params


def _weave(ys, xs, c, s, contrast):
    fu = xs * c + ys * s
    fv = ys * c - xs * s
    iu, iv = np.floor(fu), np.floor(fv)
    fu -= iu
    fv -= iv
    iu += iv
    warp_on_top = (iu.astype(np.int32) & 1).astype(bool)
    lum = np.where(warp_on_top, fu, fv)
    lum *= 1.0 - lum  # rounded thread cross-section, 0 in the gaps
    lum *= 4.0 * contrast
    return lum


def painted(rng, h, w, feature):
    """Painted / polished panel: uniform colour, orange-peel texture, a glossy reflection band."""
    colour = rng.uniform(0.05, 0.95, 3).astype(np.float32)
    bright = float(colour.mean())
    peel_px = max(2.0, rng.uniform(0.01, 0.03) * feature)
    lum = fractal(rng, h, w, cells=max(h, w) / peel_px, octaves=2)
    lum *= rng.uniform(0.005, 0.025)
    low = LowRes(h, w)
    gloss = rng.uniform(0.0, 0.3)
    _band(low, rng, gloss, (0.05, 0.3))
    low.acc += bright
    lum += low.full()
    params = dict(colour=colour.tolist(), peel_px=peel_px, gloss=gloss)
    return lum, colour / bright, params


SURFACE_FAMILIES = {"metal": metal, "sintered": sintered, "concrete": concrete, "fabric": fabric, "painted": painted}
