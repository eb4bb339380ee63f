"""Defects drawn from fitted distributions (``defects.size``, ``aspect``, ``orientation``, ``contrast``, ``count``).

One geometry for real and drawn defects alike, :func:`measure` of a coverage (a real mask's component, or a stamp's
pixels at ``alpha >= MIN_ALPHA``, the pixels its mask gets): the second moments of its pixels give

- ``length``: the long side of the rectangle with the same second moments (``sqrt(12 * l1)``; a w x h rectangle
  measures max(w, h), a line its length);
- ``aspect``: short side / long side of that rectangle (``sqrt(l2 / l1)``, in (0, 1]);
- ``angle``: of the long axis in degrees, counter-clockwise from horizontal as displayed, in [0, 180).

A fitted distribution is a list of quantiles at evenly spaced levels 0, 1/(n-1), ..., 1 (:func:`draw_quantile`:
linear between them, log-linear for sizes and aspects, never through 0 between a darker and a brighter contrast;
one number is a constant). With fitted keys set,
:func:`paint_defect` draws a target length, aspect and angle, lets the class's painter draw its defect at about that
size (its own shape and look), then resamples the stamp by one affine map about its centroid (:func:`reshape`) so
its coverage measures the target; :class:`FittedContrast` sets each defect's mean change of grey level to a drawn
contrast. Unset keys leave every step as it was (the same bytes).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from generate.defects.painters import DEFECT_PAINTERS, MIN_ALPHA, Stamp, background_noise

# A painter's median coverage length per unit of its ``scale`` argument (measured over 500 draws at scale 256):
# a fitted defect is painted at length / NOMINAL so the resampling stays near 1:1.
NOMINAL = {"crack": 0.36, "scratch": 0.61, "pit": 0.05, "stain": 0.16, "inclusion": 0.038, "dent": 0.125,
           "chip": 0.11}
CLOSE = 0.01  # a reshaped coverage within 1 % of its target length and aspect is kept as it is
MAX_SUPERSAMPLE = 4  # a shrunk stamp is resampled at up to 4x and box-averaged (no aliasing of thin lines)


class Geometry(NamedTuple):
    cy: float  # centroid, in px of the array measured (rows, columns)
    cx: float
    length: float
    aspect: float
    angle: float


def measure(covered: np.ndarray) -> Geometry | None:
    """The geometry of the True pixels of ``covered`` (None when there are none); each pixel counts as a unit
    square (so one pixel measures 1 x 1)."""
    ys, xs = np.nonzero(covered)
    if len(ys) == 0:
        return None
    cy, cx = float(ys.mean()), float(xs.mean())
    dy, dx = ys - cy, xs - cx
    vyy, vxx, vxy = float((dy * dy).mean()) + 1 / 12, float((dx * dx).mean()) + 1 / 12, float((dx * dy).mean())
    half, root = (vxx + vyy) / 2, math.hypot((vxx - vyy) / 2, vxy)
    l1, l2 = half + root, max(half - root, 1e-12)
    angle = math.degrees(0.5 * math.atan2(-2.0 * vxy, vxx - vyy)) % 180.0  # rows grow downwards: flip y
    return Geometry(cy, cx, math.sqrt(12.0 * l1), math.sqrt(l2 / l1), angle)


def draw_quantile(rng, quantiles: list[float], log: bool = False, signed: bool = False) -> float:
    """One draw from the distribution whose quantiles at evenly spaced levels 0..1 are ``quantiles`` (linear in
    between, or log-linear: positive values). ``signed``: between a negative and a positive quantile the nearer one
    is taken, not a value near 0 (dark and bright defects: none drawn invisible in between)."""
    if len(quantiles) == 1:
        return float(quantiles[0])
    u = float(rng.random())
    q = np.asarray(quantiles, np.float64)
    levels = np.linspace(0.0, 1.0, len(q))
    if log:
        return float(np.exp(np.interp(u, levels, np.log(q))))
    if signed:
        k = min(int(u * (len(q) - 1)), len(q) - 2)
        if q[k] < 0 < q[k + 1]:
            return float(q[k] if u * (len(q) - 1) - k < 0.5 else q[k + 1])
    return float(np.interp(u, levels, q))


def quantile_cdf(x, quantiles: list[float], log: bool = False) -> np.ndarray:
    """The CDF of :func:`draw_quantile`'s distribution at ``x`` (for tests: a KS test against it)."""
    q = np.asarray(quantiles, np.float64)
    levels = np.linspace(0.0, 1.0, len(q))
    x = np.asarray(x, np.float64)
    return np.interp(np.log(x), np.log(q), levels) if log else np.interp(x, q, levels)


def defect_count(rng, d) -> int:
    """Defects in a defective frame: 1..len(count) with the probabilities of ``d.count``, else 1..max_defects."""
    if not d.count:
        return int(rng.integers(1, d.max_defects + 1))
    cum = np.cumsum(d.count)
    return 1 + min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(cum) - 1)


def fitted_shape(d) -> bool:
    return bool(d.size or d.aspect or d.orientation)


def paint_defect(rng, d, name: str, H: int, W: int, C: int, scale: float) -> Stamp:
    """A defect of class ``name`` by its painter: as drawn, or (``d`` with fitted keys) reshaped to a length,
    aspect and angle drawn from them; a fitted length is a share of the short side, times ``d.defect_scale``."""
    painter = DEFECT_PAINTERS[name]
    if not fitted_shape(d):
        return painter(rng, H, W, C, scale)
    length = draw_quantile(rng, d.size, log=True) * min(H, W) * d.defect_scale if d.size else None
    aspect = draw_quantile(rng, d.aspect, log=True) if d.aspect else None
    angle = draw_quantile(rng, d.orientation) % 180.0 if d.orientation else None
    stamp = painter(rng, H, W, C, length / NOMINAL[name] if length else scale)
    return reshape(stamp, length, aspect, angle)


def _axes(angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors (row, column) of the long and short axes of a shape at ``angle`` degrees (counter-clockwise
    as displayed)."""
    t = math.radians(angle)
    return np.array([-math.sin(t), math.cos(t)]), np.array([math.cos(t), math.sin(t)])


def reshape(stamp: Stamp, length: float | None, aspect: float | None, angle: float | None) -> Stamp:
    """``stamp`` resampled by the affine map about its coverage's centroid that takes its length, aspect and angle
    to the given ones (None: its own); the centroid stays where it was in the frame. Resampling grows a coverage
    by a fringe (a few % of a small defect): a second map from the stamp, aimed past the target by what the first
    missed, corrects it."""
    g = measure(stamp.alpha >= MIN_ALPHA)
    if g is None:
        return stamp
    length = g.length if length is None else length
    aspect = g.aspect if aspect is None else aspect
    angle = g.angle if angle is None else angle
    m = _affine(stamp, g, length, aspect, angle)
    alpha = _coverage(stamp, m)
    got = measure(alpha >= MIN_ALPHA)
    if got is not None and (abs(got.length / length - 1) > CLOSE or abs(got.aspect / aspect - 1) > CLOSE):
        m = _affine(stamp, g, length * length / got.length, min(1.0, aspect * aspect / got.aspect), angle)
        alpha = _coverage(stamp, m)
    return _mapped(stamp, m, alpha)


class _Map(NamedTuple):
    """Output pixel o (frame px ``(y0, x0) + o``) reads the stamp at ``inverse @ o + offset``; ``ss``: the
    supersampling of its coverage."""
    inverse: np.ndarray
    offset: np.ndarray
    shape: tuple[int, int]
    y0: int
    x0: int
    ss: int


def _affine(stamp: Stamp, g: Geometry, length: float, aspect: float, angle: float) -> _Map:
    """The map about the centroid of ``stamp`` (of geometry ``g``) to ``length``, ``aspect`` and ``angle``."""
    u0, v0 = _axes(g.angle)
    u1, v1 = _axes(angle)
    s_long, s_short = length / g.length, (aspect * length) / (g.aspect * g.length)
    forward = s_long * np.outer(u1, u0) + s_short * np.outer(v1, v0)  # (row, col) offsets from the centroid
    inverse = np.outer(u0, u1) / s_long + np.outer(v0, v1) / s_short
    h, w = stamp.alpha.shape
    corners = np.array([[-0.5, -0.5], [-0.5, w - 0.5], [h - 0.5, -0.5], [h - 0.5, w - 0.5]]) - (g.cy, g.cx)
    moved = corners @ forward.T
    centre = np.array([stamp.y0 + g.cy, stamp.x0 + g.cx])  # in frame px
    lo = np.floor(centre + moved.min(0)).astype(int) - 1
    hi = np.ceil(centre + moved.max(0)).astype(int) + 2
    ss = int(min(MAX_SUPERSAMPLE, math.ceil(1.0 / min(s_long, s_short, 1.0))))
    offset = inverse @ (lo - centre) + (g.cy, g.cx)
    return _Map(inverse, offset, (int(hi[0] - lo[0]), int(hi[1] - lo[1])), int(lo[0]), int(lo[1]), ss)


def _coverage(stamp: Stamp, m: _Map) -> np.ndarray:
    """The stamp's alpha through ``m``: shrunk, at ss x ss points per output pixel, box-averaged (the area each
    covers: thin lines do not alias away)."""
    if m.ss == 1:
        return ndimage.affine_transform(stamp.alpha, m.inverse, m.offset, m.shape, order=1, mode="constant")
    ss = m.ss
    start = m.offset + m.inverse @ np.full(2, (1.0 / ss - 1.0) / 2)
    fine = ndimage.affine_transform(stamp.alpha, m.inverse / ss, start, (m.shape[0] * ss, m.shape[1] * ss),
                                    order=1, mode="constant")
    return fine.reshape(m.shape[0], ss, m.shape[1], ss).mean((1, 3))


def _mapped(stamp: Stamp, m: _Map, alpha: np.ndarray) -> Stamp:
    """The stamp through ``m`` with its coverage ``alpha``: gain and offset fields resampled (edges extended)."""
    h, w = stamp.alpha.shape

    def field(v):
        if not (isinstance(v, np.ndarray) and v.shape[-2:] == (h, w)):
            return v
        planes = [ndimage.affine_transform(p, m.inverse, m.offset, m.shape, order=1, mode="nearest")
                  for p in v.reshape(-1, h, w).astype(np.float32)]
        return np.stack(planes).reshape(*v.shape[:-2], *m.shape)

    return Stamp(m.y0, m.x0, alpha.astype(np.float32), field(stamp.gain), field(stamp.offset))


class FittedContrast:
    """A composite ``adjust``: each defect's mean change of grey level over its pixels (coverage-weighted, as the
    frame gets it) set to a contrast drawn from ``quantiles`` by shifting its change (its own shading kept); with
    ``noise``, the background's own sensor noise added to its pixels (defects in real frames)."""

    def __init__(self, rng, quantiles: list[float], noise: bool = False):
        self.rng, self.quantiles, self.noise = rng, quantiles, noise

    def __call__(self, region: np.ndarray, change: np.ndarray, covered: np.ndarray,
                 alpha: np.ndarray | None = None) -> np.ndarray:
        target = draw_quantile(self.rng, self.quantiles, signed=True)
        a = covered.astype(np.float32) if alpha is None else alpha
        weight = float(a.sum())
        if weight > 0:
            now = float((change.mean(0) * a).sum())
            change = change + np.float32((target * float(covered.sum()) - now) / weight)
        if self.noise:
            change = change + background_noise(self.rng, region)
        return change
