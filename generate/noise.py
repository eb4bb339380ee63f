"""Fast noise fields and filters in plain numpy (no per-pixel Python loops, no BLAS: bit-exact anywhere).

Value noise: random grids summed over octaves as a pyramid, then upsampled once to the frame with separable
smoothstep interpolation (per axis: two gathers, a multiply and an add over the frame).
Every function takes the sample's own ``numpy.random.Generator``.
"""
from __future__ import annotations

import functools
import math

import numpy as np

STRIP_PIXELS = 1 << 16  # ~256 KiB of float32: a few temporaries of a strip stay in a core's L2 cache


def row_strips(h: int, w: int, pixels: int = STRIP_PIXELS):
    """Row slices covering an (h, w) frame in strips of about ``pixels`` px.

    Multi-pass pixel arithmetic done strip by strip stays in cache and allocates no frame-sized temporaries;
    at 3840x2160 that is several times faster than whole-frame numpy expressions.
    """
    rows = max(1, pixels // max(1, w))
    for y0 in range(0, h, rows):
        yield slice(y0, min(h, y0 + rows))


@functools.lru_cache(maxsize=64)
def _axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Left neighbour index and smoothstep weight for each output position (grid corners at the ends)."""
    pos = np.linspace(0.0, n_in - 1.0, n_out, dtype=np.float64)
    i0 = np.minimum(np.floor(pos).astype(np.intp), n_in - 2)
    t = pos - i0
    t = t * t * (3.0 - 2.0 * t)
    return i0, t.astype(np.float32)


def upsample(grid: np.ndarray, h: int, w: int) -> np.ndarray:
    """Smooth (C1) separable upsampling of a 2-D float32 grid (at least 2x2) to (h, w).

    Neighbour differences are taken at low resolution, so each axis costs two gathers, a multiply and an add.
    """
    i0, t = _axis(grid.shape[1], w)
    rows = np.take(grid, i0, axis=1)
    rows += np.take(np.diff(grid, axis=1), i0, axis=1) * t
    j0, u = _axis(grid.shape[0], h)
    drows = np.diff(rows, axis=0)
    out = np.empty((h, w), np.float32)
    for sl in row_strips(h, w):
        block = out[sl]
        np.take(rows, j0[sl], axis=0, out=block)
        block += np.take(drows, j0[sl], axis=0) * u[sl, None]
    return out


def fractal(rng: np.random.Generator, h: int, w: int, cells: float = 4.0, octaves: int = 4,
            persistence: float = 0.5) -> np.ndarray:
    """Fractal value noise of shape (h, w), zero-mean, std about 0.5-0.7.

    ``cells``: grid cells along the longer side at the coarsest octave; each octave doubles them. Octaves are
    summed as a pyramid (the running sum is upsampled to the next octave's grid, which is then added), so the
    cost is about one full-resolution upsample whatever the number of octaves.
    """
    long_side = max(h, w)
    acc = None
    amp, total = 1.0, 0.0
    for o in range(octaves):
        c = cells * 2**o
        gh, gw = max(2, math.ceil(c * h / long_side) + 1), max(2, math.ceil(c * w / long_side) + 1)
        if acc is not None and (gh > h or gw > w):
            break  # finer than a pixel
        grid = rng.standard_normal((gh, gw), dtype=np.float32)
        grid *= amp
        acc = grid if acc is None else upsample(acc, gh, gw) + grid
        total += amp
        amp *= persistence
    acc *= 1.0 / total
    return upsample(acc, h, w) if acc.shape != (h, w) else acc


class LowRes:
    """Accumulate smooth components of a (h, w) field at a low working resolution; upsample once at the end.

    ``ys``/``xs`` are the working grid's coordinates in full-resolution pixels (broadcastable columns/rows).
    """

    def __init__(self, h: int, w: int, work: int = 128):
        self.h, self.w = h, w
        scale = min(1.0, work / max(h, w))
        self.wh, self.ww = max(2, round(h * scale)), max(2, round(w * scale))
        self.ys = np.linspace(0, h - 1, self.wh, dtype=np.float32)[:, None]
        self.xs = np.linspace(0, w - 1, self.ww, dtype=np.float32)[None, :]
        self.acc = np.zeros((self.wh, self.ww), np.float32)

    def add_fractal(self, rng: np.random.Generator, amplitude: float, cells: float = 4.0, octaves: int = 4,
                    persistence: float = 0.5) -> None:
        self.acc += amplitude * fractal(rng, self.wh, self.ww, cells, octaves, persistence)

    def full(self) -> np.ndarray:
        return upsample(self.acc, self.h, self.w) if (self.wh, self.ww) != (self.h, self.w) else self.acc.copy()


GRAIN_SHIFTS = 1 << 20


@functools.lru_cache(maxsize=4)
def _grain_table(n: int) -> np.ndarray:
    """A fixed read-only table of n + GRAIN_SHIFTS standard-normal values (same values on every machine)."""
    table = np.random.default_rng(0x5EED).standard_normal(n + GRAIN_SHIFTS, dtype=np.float32)
    table.setflags(write=False)
    return table


def grain(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Per-pixel standard-normal noise of ``shape``: a read-only window of a fixed table at a random offset.

    Drawing n normals costs more than the rest of a frame's noise handling; a window costs nothing. Frames
    share the table at offsets up to 2**20 apart, which no model can exploit in sensor noise or grain.
    """
    n = math.prod(shape)
    offset = int(rng.integers(0, GRAIN_SHIFTS))
    return _grain_table(n)[offset:offset + n].reshape(shape)


def add_grain(rng: np.random.Generator, lum: np.ndarray, amplitude: float) -> None:
    """``lum += amplitude * grain`` in place, strip by strip."""
    noise = grain(rng, lum.shape)
    amp = np.float32(amplitude)
    for sl in row_strips(*lum.shape):
        lum[sl] += noise[sl] * amp


def line_noise(rng: np.random.Generator, n: int, smooth: int = 1) -> np.ndarray:
    """1-D noise of length n, lightly box-smoothed, unit std (brushing streaks, turning marks)."""
    x = rng.standard_normal(n + 2 * smooth).astype(np.float32)
    if smooth > 0:
        x = np.convolve(x, np.full(2 * smooth + 1, 1.0 / (2 * smooth + 1), np.float32), mode="valid")
    return x[:n] / max(float(x.std()), 1e-6)


def gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, math.ceil(2.5 * sigma))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of the last two axes (edges replicated), as shifted adds over the array."""
    if sigma <= 0:
        return a
    k = gaussian_kernel(sigma)
    r = len(k) // 2
    for axis in (-1, -2):
        pad = [(0, 0)] * a.ndim
        pad[axis] = (r, r)
        p = np.pad(a, pad, mode="edge")
        n = a.shape[axis]
        out = _shifted(p, 0, n, axis) * k[0]
        for i in range(1, len(k)):
            out += _shifted(p, i, n, axis) * k[i]
        a = out
    return a


def _shifted(p: np.ndarray, start: int, n: int, axis: int) -> np.ndarray:
    sl = [slice(None)] * p.ndim
    sl[axis] = slice(start, start + n)
    return p[tuple(sl)]
