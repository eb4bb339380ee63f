"""Camera effects: small perspective/rotation, lens blur, uneven lighting and vignetting, sensor noise (all on
the surface's single luminance plane, before colour), and JPEG artifacts of the final 8-bit frame.

Defects are drawn after these, with the same blur and lighting applied to each defect's own patch, so every
defect's mask stays exactly the pixels it changed while the frame costs one plane, not three.
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from generate.defects import Light
from generate.noise import add_grain, row_strips


def _perspective_coeffs(dst: np.ndarray, src: np.ndarray) -> np.ndarray:
    """Projective map (8 coefficients, PIL's PERSPECTIVE convention) taking output points ``dst`` to ``src``."""
    rows = []
    for (x, y), (u, v) in zip(dst, src):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    return np.linalg.solve(np.array(rows, np.float64), src.reshape(-1))


def warp(rng, lum: np.ndarray, max_rotation_deg: float, max_perspective: float) -> tuple[np.ndarray, dict]:
    """Small rotation + perspective, bilinear; the source quad lies inside the frame (no empty borders)."""
    H, W = lum.shape
    theta = math.radians(rng.uniform(-max_rotation_deg, max_rotation_deg))
    c, s = abs(math.cos(theta)), abs(math.sin(theta))
    fit = min(W / (W * c + H * s), H / (W * s + H * c))
    corners = np.array([[0, 0], [W - 1, 0], [W - 1, H - 1], [0, H - 1]], np.float64)
    centre = corners.mean(0)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    src = centre + ((corners - centre) @ rot.T) * (fit * (1.0 - rng.uniform(0, max_perspective, (4, 1))))
    coeffs = _perspective_coeffs(corners, src).astype(np.float32)
    out = np.empty_like(lum)
    for sl in row_strips(H, W):
        out[sl] = _warp_rows(lum, coeffs, sl.start, sl.stop)
    return out, dict(rotation_deg=math.degrees(theta))


def _warp_rows(lum: np.ndarray, coeffs: np.ndarray, y0: int, y1: int) -> np.ndarray:
    """Bilinear samples of ``lum`` for output rows y0..y1 under the projective map ``coeffs``."""
    H, W = lum.shape
    a, b, c, d, e, f, g, h = coeffs
    ys = np.arange(y0, y1, dtype=np.float32)[:, None]
    xs = np.arange(W, dtype=np.float32)[None, :]
    inv = 1.0 / (xs * g + (ys * h + 1.0))
    u = (xs * a + (ys * b + c)) * inv
    v = (xs * d + (ys * e + f)) * inv
    np.clip(u, 0, W - 1.001, out=u)
    np.clip(v, 0, H - 1.001, out=v)
    u0, v0 = u.astype(np.intp), v.astype(np.intp)
    u -= u0
    v -= v0
    flat = lum.reshape(-1)
    i00 = v0 * W + u0
    top = np.take(flat, i00)
    top += (np.take(flat, i00 + 1) - top) * u
    i00 += W
    bottom = np.take(flat, i00)
    bottom += (np.take(flat, i00 + 1) - bottom) * u
    bottom -= top
    bottom *= v
    top += bottom
    return top


def lighting(rng, lum: np.ndarray, strength: float) -> tuple[Light, dict]:
    """Multiply (H, W) by a linear illumination gradient and a radial vignette, in place.

    The field is separable, ``column (H, 1) + row (1, W)``; both are returned so a defect patch can be lit
    the same way without a frame-sized field.
    """
    H, W = lum.shape
    g, v = rng.uniform(0, strength), rng.uniform(0, strength)
    a = rng.uniform(0, 2 * math.pi)
    cy, cx = (float(c) for c in rng.uniform(-0.3, 0.3, 2))
    ys = np.linspace(-1, 1, H, dtype=np.float32)[:, None]
    xs = np.linspace(-1, 1, W, dtype=np.float32)[None, :]
    column = 1.0 + g * math.sin(a) * ys - v * (ys - cy) ** 2
    row = g * math.cos(a) * xs - v * (xs - cx) ** 2
    for sl in row_strips(H, W):
        lum[sl] *= column[sl] + row
    return Light(column, row), dict(gradient=g, vignette=v)


def sensor_noise(rng, lum: np.ndarray, std: float) -> None:
    """Add Gaussian luminance noise of ``std`` 8-bit grey levels to (H, W) in place."""
    add_grain(rng, lum, std / 255.0)


def jpeg_artifacts(image: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    with Image.open(buf) as im:
        return np.asarray(im)
