"""Defect painters. Each returns a :class:`Stamp`: a local patch (never a whole-frame array) with

- ``alpha`` (h, w) in [0, 1]: coverage (anti-aliased where the defect is a line or an outline);
- ``gain`` and ``offset``: the defect's look, ``new = img * gain + offset``; each a scalar, a (C, 1, 1) colour,
  an (h, w) field shared by all channels, or a (C, h, w) texture.

Frames are planar float32 (C, H, W). :func:`composite` blends ``img += alpha * (new - img)`` after zeroing
coverage below ``MIN_ALPHA`` and writes the instance id where coverage remains, so a defect's mask is exactly
the set of pixels it changed.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from generate.noise import blur, fractal

MIN_ALPHA = 0.1
SUPERSAMPLE = 4


class Box(NamedTuple):
    """A clipped patch of the frame: rows ``ys:ye``, columns ``xs:xe``."""
    ys: int
    ye: int
    xs: int
    xe: int


class Landed(NamedTuple):
    """What :func:`composite` drew: the pixels a defect covers and its clipped patch."""
    pixels: int
    box: Box


class Light(NamedTuple):
    """A frame's separable illumination, ``column (H, 1) + row (1, W)`` (see the procedural camera's lighting)."""
    column: np.ndarray
    row: np.ndarray


@dataclass
class Stamp:
    y0: int
    x0: int
    alpha: np.ndarray
    gain: float | np.ndarray = 1.0
    offset: float | np.ndarray = 0.0


def _crop(value, shape, sl):
    if isinstance(value, np.ndarray) and value.shape[-2:] == shape:
        return value[..., sl[0], sl[1]]
    return value


def blur_stamp(stamp: Stamp, sigma: float) -> Stamp:
    """The stamp as seen through the same lens blur as its frame: coverage blurred, patch grown by the kernel."""
    r = max(1, math.ceil(2.5 * sigma))

    def grow(v, mode):
        if isinstance(v, np.ndarray) and v.shape[-2:] == stamp.alpha.shape:
            return np.pad(v, [(0, 0)] * (v.ndim - 2) + [(r, r), (r, r)], mode=mode)
        return v

    alpha = blur(np.pad(stamp.alpha, r), sigma)
    return Stamp(stamp.y0 - r, stamp.x0 - r, alpha, grow(stamp.gain, "edge"), grow(stamp.offset, "edge"))


def composite(img: np.ndarray, inst: np.ndarray, mask: np.ndarray, stamp: Stamp, inst_id: int, class_id: int,
              light: Light | None = None, adjust=None) -> Landed | None:
    """Blend ``stamp`` into ``img`` (C, H, W) in place; label its pixels in ``inst`` and ``mask``.

    ``light`` (:class:`Light`: the illumination the frame was multiplied by): offsets
    (light a defect reflects, such as a bright scratch) are lit the same way, so drawing defects after lighting
    equals lighting the defective frame.
    ``adjust(region, change, covered, alpha) -> change``: rescales the defect's change of the frame before blending
    (see :class:`LocalContrast`; ``alpha``: the coverage it is blended with); the mask is still exactly the covered
    pixels.
    Returns the pixels covered and the clipped patch (:class:`Landed`), or None when nothing landed.
    """
    H, W = inst.shape
    h, w = stamp.alpha.shape
    ys, xs, ye, xe = max(0, stamp.y0), max(0, stamp.x0), min(H, stamp.y0 + h), min(W, stamp.x0 + w)
    if ye <= ys or xe <= xs:
        return None
    sl = (slice(ys - stamp.y0, ye - stamp.y0), slice(xs - stamp.x0, xe - stamp.x0))
    alpha = stamp.alpha[sl]
    covered = alpha >= MIN_ALPHA
    count = int(covered.sum())
    if count == 0:
        return None
    a = np.where(covered, alpha, 0.0).astype(np.float32)
    region = img[:, ys:ye, xs:xe]
    offset = _crop(stamp.offset, (h, w), sl)
    if light is not None and not (np.isscalar(offset) and offset == 0):
        offset = offset * (light.column[ys:ye] + light.row[:, xs:xe])
    new = region * _crop(stamp.gain, (h, w), sl) + offset
    new -= region
    if adjust is not None:
        new = adjust(region, new, covered, a)
    new *= a
    region += new
    inst[ys:ye, xs:xe][covered] = inst_id
    mask[ys:ye, xs:xe][covered] = class_id
    return Landed(count, Box(ys, ye, xs, xe))


class LocalContrast:
    """Defects drawn into a real background follow its local statistics: the mean change under a defect is at
    least ``k`` (drawn per defect) times the patch's grey-level std plus ``floor``, so a pit on a dark, busy tile is
    as visible as on a bright, flat one; where the frame has no room in the defect's direction (a dark pit on a
    near-black area) it turns the other way; the defect's pixels get the background's own sensor noise."""

    def __init__(self, rng, k: tuple[float, float] = (1.5, 4.0), floor: float = 0.04):
        self.rng, self.k, self.floor = rng, k, floor

    def __call__(self, region: np.ndarray, change: np.ndarray, covered: np.ndarray,
                 alpha: np.ndarray | None = None) -> np.ndarray:
        lum = region.mean(0)
        mu, sd = float(lum.mean()), float(lum.std())
        d = float(change.mean(0)[covered].mean())
        sign = math.copysign(1.0, d) if abs(d) > 1e-4 else float(self.rng.choice((-1.0, 1.0)))
        target = max(abs(d), float(self.rng.uniform(*self.k)) * sd + self.floor)
        room = 1.0 - mu if sign > 0 else mu
        if room < 0.5 * target and 1.0 - room > room:  # no room this way: the other way round
            sign, room = -sign, 1.0 - room
        target = min(target, 0.95 * max(room, 0.0))
        if abs(d) > 1e-4:
            change = change * (math.copysign(1.0, d) * sign * min(target / abs(d), 10.0))
        else:
            change = np.full_like(change, sign * target)
        noise = background_noise(self.rng, region)
        if noise is not None:
            change = change + noise
        return change


def background_noise(rng, region: np.ndarray) -> np.ndarray | None:
    """(h, w) noise drawn at the sensor noise of ``region`` (C, h, w), estimated from neighbour differences (std =
    mean |diff| * sqrt(pi) / 2); None where it shows none."""
    lum = region.mean(0)
    noise = float(np.abs(np.diff(lum, axis=1)).mean()) * 0.886 / math.sqrt(2) if lum.shape[1] > 1 else 0.0
    return rng.normal(0.0, noise, lum.shape).astype(np.float32) if noise > 0 else None


def _centre(rng, H, W) -> tuple[float, float]:
    return float(rng.uniform(0, W)), float(rng.uniform(0, H))


def _draw(polylines: list[tuple[np.ndarray, float]], cx: float, cy: float, polygon: np.ndarray | None = None,
          ss: int = SUPERSAMPLE) -> tuple[int, int, np.ndarray]:
    """Rasterise lines (points (n, 2) relative to (cx, cy), width px) or a polygon, anti-aliased by drawing at
    ``ss`` times the resolution and box-averaging down."""
    pts_all = np.concatenate([p for p, _ in polylines] + ([polygon] if polygon is not None else []))
    pad = max([wd for _, wd in polylines], default=0.0) + 2
    lo = np.floor(pts_all.min(0) - pad)
    hi = np.ceil(pts_all.max(0) + pad)
    w, h = int(hi[0] - lo[0]), int(hi[1] - lo[1])
    canvas = Image.new("L", (w * ss, h * ss), 0)
    draw = ImageDraw.Draw(canvas)
    for pts, width in polylines:
        xy = ((pts - lo) * ss).ravel().tolist()
        draw.line(xy, fill=255, width=max(1, round(width * ss)), joint="curve")
    if polygon is not None:
        draw.polygon(((polygon - lo) * ss).ravel().tolist(), fill=255)
    alpha = np.asarray(canvas.reduce(ss), dtype=np.float32) * (1.0 / 255.0)
    return int(math.floor(cy + lo[1])), int(math.floor(cx + lo[0])), alpha


def _random_walk(rng, start, angle, n, step, wiggle):
    angles = angle + np.cumsum(rng.normal(0.0, wiggle, n))
    steps = np.stack([np.cos(angles), np.sin(angles)], 1) * step
    return np.concatenate([start[None], start + np.cumsum(steps, 0)]), angles


def crack(rng, H, W, C, scale) -> Stamp:
    """Branching, tapering random walk; dark."""
    length = rng.uniform(0.25, 0.7) * scale
    step = max(1.0, length / 60)
    n = max(4, int(length / step))
    width0 = max(1.0, rng.uniform(0.006, 0.016) * scale)
    main, angles = _random_walk(rng, np.zeros(2), rng.uniform(0, 2 * math.pi), n, step, 0.25)
    lines = []
    taper = width0 * (1 - np.arange(n + 1) / (n + 1)) ** 0.7 + 0.5
    for i in range(0, n, 6):  # chunks of constant width: the line narrows along the walk
        lines.append((main[i:i + 7], float(taper[i])))
    for _ in range(rng.integers(0, 4)):
        i = int(rng.integers(n // 4, n))
        nb = max(3, int(n * rng.uniform(0.15, 0.45)))
        branch, _ = _random_walk(rng, main[i], angles[i - 1] + rng.choice([-1, 1]) * rng.uniform(0.3, 1.0),
                                 nb, step, 0.3)
        bw = taper[i] * 0.7 * (1 - np.arange(nb + 1) / (nb + 1)) + 0.4
        lines.extend((branch[j:j + 7], float(bw[j])) for j in range(0, nb, 6))
    cx, cy = _centre(rng, H, W)
    y0, x0, alpha = _draw(lines, cx, cy, ss=2)
    return Stamp(y0, x0, alpha, gain=rng.uniform(0.15, 0.5))


def scratch(rng, H, W, C, scale) -> Stamp:
    """Thin anti-aliased curves (quadratic Bezier), 1-3 parallel; bright or dark."""
    length = rng.uniform(0.3, 0.9) * scale
    angle = rng.uniform(0, 2 * math.pi)
    d = np.array([math.cos(angle), math.sin(angle)])
    normal = np.array([-d[1], d[0]])
    p0, p2 = -d * length / 2, d * length / 2
    p1 = normal * rng.uniform(-0.25, 0.25) * length
    t = np.linspace(0, 1, 48)[:, None]
    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    width = max(0.5, rng.uniform(0.002, 0.006) * scale)
    lines = [(curve + normal * k * width * rng.uniform(2, 5), width) for k in range(int(rng.integers(1, 4)))]
    cx, cy = _centre(rng, H, W)
    y0, x0, alpha = _draw(lines, cx, cy)
    if rng.random() < 0.6:
        return Stamp(y0, x0, alpha, offset=rng.uniform(0.15, 0.35))
    return Stamp(y0, x0, alpha, gain=rng.uniform(0.35, 0.6))


def _polar(h, w, cy, cx):
    ys = np.arange(h, dtype=np.float32)[:, None] - cy
    xs = np.arange(w, dtype=np.float32)[None, :] - cx
    return ys, xs, np.sqrt(xs * xs + ys * ys), np.arctan2(ys, xs)


def pit(rng, H, W, C, scale) -> Stamp:
    """Pit / blowhole: an irregular round cavity, dark inside, a lit rim on the light's side."""
    r0 = max(2.0, rng.uniform(0.012, 0.04) * scale)
    size = int(2 * r0 * 1.5) + 4
    _, _, rr, th = _polar(size, size, size / 2, size / 2)
    boundary = np.full_like(rr, r0)
    for k in (2, 3, 4):
        boundary += r0 * rng.uniform(0, 0.1) * np.cos(k * th + rng.uniform(0, 2 * math.pi))
    edge = max(0.7, 0.12 * r0)
    alpha = np.clip((boundary - rr) / edge + 0.5, 0.0, 1.0)
    t = np.clip(rr / boundary, 0.0, 1.0)
    light = rng.uniform(0, 2 * math.pi)
    gain = rng.uniform(0.1, 0.3) + 0.5 * t * t
    offset = rng.uniform(0.1, 0.3) * np.clip(np.cos(th - light), 0, None) * t**6
    cx, cy = _centre(rng, H, W)
    return Stamp(int(cy - size / 2), int(cx - size / 2), alpha, gain, offset)


STAIN_COLOURS = np.array([[0.55, 0.32, 0.15], [0.2, 0.2, 0.22], [0.85, 0.8, 0.65], [0.35, 0.45, 0.3]], np.float32)


def stain(rng, H, W, C, scale) -> Stamp:
    """Stain / discoloration: a Perlin-thresholded region, blended DRAEM-style with a tinted texture."""
    ph = max(6, int(rng.uniform(0.1, 0.3) * scale))
    pw = max(6, int(ph * rng.uniform(0.6, 1.6)))
    n = fractal(rng, ph, pw, cells=3, octaves=3)
    ys = np.linspace(-1, 1, ph, dtype=np.float32)[:, None]
    xs = np.linspace(-1, 1, pw, dtype=np.float32)[None, :]
    envelope = 1.0 - (xs * xs + ys * ys)
    alpha = np.clip((envelope + 0.45 * n - rng.uniform(0.2, 0.5)) * 6.0, 0.0, 1.0)
    beta = rng.uniform(0.3, 0.8)
    if C == 3:
        colour = STAIN_COLOURS[rng.integers(len(STAIN_COLOURS))] * rng.uniform(0.8, 1.2)
    else:
        colour = np.array([rng.choice([rng.uniform(0.1, 0.35), rng.uniform(0.7, 0.95)])], np.float32)
    texture = colour[:, None, None] * (1.0 + 0.15 * fractal(rng, ph, pw, cells=6, octaves=2))
    cx, cy = _centre(rng, H, W)
    return Stamp(int(cy - ph / 2), int(cx - pw / 2), alpha, gain=1.0 - beta, offset=beta * texture)


def inclusion(rng, H, W, C, scale) -> Stamp:
    """Inclusion / spot: a small cluster of 1-4 compact soft spots, dark or bright (or coloured)."""
    r = max(1.2, rng.uniform(0.004, 0.012) * scale)
    k = int(rng.integers(1, 5))
    spread = r * 3 * (k > 1)
    centres = rng.uniform(-spread, spread, (k, 2))
    radii = r * rng.uniform(0.6, 1.2, k)
    size = int(2 * (spread + r * 1.2)) + 4
    ys = np.arange(size, dtype=np.float32)[:, None] - size / 2
    xs = np.arange(size, dtype=np.float32)[None, :] - size / 2
    alpha = np.zeros((size, size), np.float32)
    for (dy, dx), rad in zip(centres, radii):
        d = np.sqrt((xs - dx) ** 2 + (ys - dy) ** 2)
        np.maximum(alpha, np.clip((rad - d) / 0.8 + 0.5, 0.0, 1.0), out=alpha)
    cx, cy = _centre(rng, H, W)
    y0, x0 = int(cy - size / 2), int(cx - size / 2)
    if rng.random() < 0.6:
        return Stamp(y0, x0, alpha, gain=rng.uniform(0.1, 0.4))
    colour = rng.uniform(0.3, 0.6, (C, 1, 1)).astype(np.float32)
    return Stamp(y0, x0, alpha, offset=colour)


def dent(rng, H, W, C, scale) -> Stamp:
    """Dent / bump: shading of a compact smooth height field h = (1 - r^2)^3 under a directional light."""
    rx, ry = (max(3.0, rng.uniform(0.03, 0.09) * scale) for _ in range(2))
    rot, light = rng.uniform(0, math.pi), rng.uniform(0, 2 * math.pi)
    size = int(2 * max(rx, ry)) + 4
    ys, xs, _, _ = _polar(size, size, size / 2, size / 2)
    c, s = math.cos(rot), math.sin(rot)
    u, v = (xs * c + ys * s) / rx, (ys * c - xs * s) / ry
    r2 = u * u + v * v
    inside = r2 < 1.0
    k = -6.0 * np.where(inside, (1.0 - r2) ** 2, 0.0)
    dhdu, dhdv = k * u, k * v
    dhdx = dhdu * (c / rx) - dhdv * (s / ry)
    dhdy = dhdu * (s / rx) + dhdv * (c / ry)
    amp = rng.uniform(0.12, 0.3) * rng.choice([-1.0, 1.0]) * (rx + ry) / 2 / 1.72
    shade = -amp * (dhdx * math.cos(light) + dhdy * math.sin(light))
    cx, cy = _centre(rng, H, W)
    return Stamp(int(cy - size / 2), int(cx - size / 2), inside.astype(np.float32), offset=shade.astype(np.float32))


def chip(rng, H, W, C, scale) -> Stamp:
    """Edge break / chip: an irregular piece missing at the frame's border, showing the dark (or lit) background."""
    radius = max(3.0, rng.uniform(0.03, 0.1) * scale)
    m = int(rng.integers(10, 20))
    theta = np.sort(rng.uniform(0, 2 * math.pi, m))
    rad = radius * rng.uniform(0.55, 1.15, m)
    polygon = np.stack([np.cos(theta) * rad, np.sin(theta) * rad], 1)
    side = int(rng.integers(4))
    along = rng.uniform(0.1, 0.9)
    cx, cy = [(along * W, 0.0), (along * W, H - 1.0), (0.0, along * H), (W - 1.0, along * H)][side]
    y0, x0, alpha = _draw([], cx, cy, polygon=polygon, ss=2)
    tone = rng.uniform(0.03, 0.15) if rng.random() < 0.8 else rng.uniform(0.85, 0.98)
    return Stamp(y0, x0, alpha, gain=0.0, offset=np.float32(tone))


DEFECT_PAINTERS: dict[str, Callable[..., Stamp]] = {
    "crack": crack, "scratch": scratch, "pit": pit, "stain": stain,
    "inclusion": inclusion, "dent": dent, "chip": chip,
}
