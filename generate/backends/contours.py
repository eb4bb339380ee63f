"""Formula-driven contours: many radial-contour instances over a smooth noise background, exact masks.

In the spirit of VisualAtom (Takashima et al., CVPR 2023) and SegRCDB (Shinoda et al., ICCV 2023): each of
``contours.num_classes`` classes is one fixed radial contour ``r(theta) = 1 + sum_j a_j cos(f_j theta + phi_j)``
plus a smooth periodic value-noise profile, all drawn once from the dataset seed; a class's instances differ in
position, scale, rotation and a little noise of their own. Sample ``index`` is drawn from
``numpy.random.default_rng((seed, index))`` alone (as the procedural backend).

Each instance is rasterised once, without anti-aliasing: a pixel centre is inside when its distance to the
instance centre is below ``r(theta)``. That one boolean array writes the instance's pixels into the image, its
class ``k`` (1..K) into the mask and its id into an instance map, so a later instance overwrites an earlier one in
all three at once: the mask is the class of the topmost instance at every pixel, and every pixel of mask ``k`` got
its value from an instance of class ``k``. ``contours.fill=flat`` paints each instance with its class id as grey
level (image == mask) to check exactly that.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from generate.backends import BaseBackend
from generate.defects import Box, Instance, instance_records
from generate.noise import fractal
from generate.schema import BACKGROUND, Sample, main_class_of

TABLE = 512  # samples of r(theta) over one turn; pixels read it with linear interpolation
TWO_PI = 2.0 * math.pi


def periodic_noise(rng: np.random.Generator, nodes: int, n: int = TABLE) -> np.ndarray:
    """Smooth periodic 1-D value noise over one turn: ``nodes`` random values, smoothstep-interpolated, std ~0.5."""
    values = rng.standard_normal(nodes).astype(np.float32) * 0.5
    pos = np.arange(n, dtype=np.float32) * (nodes / n)
    i0 = pos.astype(np.intp)
    t = pos - i0
    t = t * t * (3.0 - 2.0 * t)
    return values[i0] + (values[(i0 + 1) % nodes] - values[i0]) * t


def class_shapes(seed: int, p) -> tuple[np.ndarray, list[dict]]:
    """The K class contours, (K, TABLE) float32 radius over theta with max 1, and their parameters.

    Drawn from the dataset seed alone (a stream of its own, apart from every sample's ``(seed, index)``).
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0xC0,)))
    theta = np.arange(TABLE, dtype=np.float64) * (TWO_PI / TABLE)
    tables, params = [], []
    for _ in range(p.num_classes):
        n = int(rng.integers(1, p.harmonics + 1))
        freqs = rng.integers(1, p.max_frequency + 1, n)
        raw = rng.uniform(0.2, 1.0, n) / np.sqrt(freqs)
        amps = raw / raw.sum() * rng.uniform(0.15, 0.55)
        phases = rng.uniform(0, TWO_PI, n)
        r = 1.0 + (amps[:, None] * np.cos(freqs[:, None] * theta + phases[:, None])).sum(0)
        nodes = int(rng.integers(6, 25))
        r = r * (1.0 + p.shape_noise * periodic_noise(rng, nodes))
        r = np.maximum(r, 0.05 * r.max())
        tables.append((r / r.max()).astype(np.float32))
        params.append(dict(freqs=freqs.tolist(), amps=[round(float(a), 4) for a in amps], noise_nodes=nodes))
    return np.stack(tables), params


def _lookup(table: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Linear interpolation of a periodic table at float positions ``pos`` in [0, len) (any shape)."""
    i0 = pos.astype(np.intp)
    t = pos - i0
    i0 %= len(table)
    lo = table[i0]
    return lo + (table[(i0 + 1) % len(table)] - lo) * t


class InstanceLook(NamedTuple):
    """One instance's fill: colour, linear shading gradient, texture contrast, inner outline (px, 0: none) and the
    outline's shade."""
    colour: np.ndarray
    gx: float
    gy: float
    contrast: float
    outline: float
    rim: float

    def fill(self, radius: float, dx: np.ndarray, dy: np.ndarray, rr: np.ndarray, edge: np.ndarray,
             detail: np.ndarray, inside: np.ndarray) -> np.ndarray:
        """The colours (n, C) of the pixels ``inside`` an instance's patch: ``dx``, ``dy``, ``rr`` their offsets and
        distance from the centre (px), ``edge`` the contour's radius at their angle, ``detail`` the texture."""
        shade = (1.0 + (self.gx / radius) * dx + (self.gy / radius) * dy)
        shade += self.contrast * detail
        if self.outline:
            shade = np.where(rr > edge - self.outline, self.rim, shade)
        return shade[inside][:, None] * self.colour


def _to_uint8(img: np.ndarray) -> np.ndarray:
    """(H, W, C) float in [0, 1] -> uint8 (rounded, clipped); ``img`` is scaled in place."""
    image = np.empty(img.shape, np.uint8)
    img *= 255.0
    img += 0.5
    np.clip(img, 0.0, 255.0, out=img)
    image[...] = img
    return image


class ContoursBackend(BaseBackend):
    """Radial-contour instances of ``contours.num_classes`` classes over a smooth noise background."""

    name = "contours"

    def __init__(self, cfg):
        self.cfg = cfg
        self.p = cfg.contours
        self.width, self.height = cfg.size
        digits = max(2, len(str(self.p.num_classes)))
        self.class_names = [BACKGROUND, *(f"contour_{k:0{digits}d}" for k in range(1, self.p.num_classes + 1))]
        self.shapes, self.shape_params = class_shapes(cfg.seed, self.p)

    def render(self, index: int) -> Sample:
        rng = np.random.default_rng((self.cfg.seed, index))
        H, W, p = self.height, self.width, self.p
        flat = p.fill == "flat"
        gray = bool(rng.random() < p.gray_prob)
        C = 1 if gray else 3
        # flat fill draws the same random numbers as texture fill: the same (seed, index) gives the same mask
        img, background = self._background(rng, H, W, C)
        detail = fractal(rng, H, W, cells=float(rng.uniform(8, 24)), octaves=2)
        if flat:
            img[...] = 0.0
        mask = np.zeros((H, W), np.uint8)
        inst = np.zeros((H, W), np.uint8)
        instances: list[Instance] = []
        shapes: list[dict] = []  # per landed instance: its placement (``defects`` holds class, bbox, visible area)
        short = min(H, W)
        lo, hi = math.log(p.min_scale * short), math.log(p.max_scale * short)
        drawn = int(rng.integers(p.min_instances, p.max_instances + 1))
        for _ in range(drawn):
            k = int(rng.integers(p.num_classes))
            cx, cy = float(rng.uniform(0, W)), float(rng.uniform(0, H))
            radius = max(1.5, math.exp(rng.uniform(lo, hi)))
            rot = float(rng.uniform(0, TABLE))  # rotation, in table steps
            wobble = p.instance_noise * float(rng.uniform(0, 1)) * periodic_noise(rng, int(rng.integers(4, 13)))
            # this instance's radius over theta (px): the class contour rotated, times its own noise
            table = _lookup(self.shapes[k], np.arange(TABLE, dtype=np.float32) + (TABLE - rot)) * (1.0 + wobble)
            table *= radius
            reach = float(table.max())
            xs, xe = max(0, math.floor(cx - reach)), min(W, math.ceil(cx + reach) + 1)
            ys, ye = max(0, math.floor(cy - reach)), min(H, math.ceil(cy + reach) + 1)
            look = self._look(rng, C, p.outline_prob)
            if xe <= xs or ye <= ys:
                continue
            dy = np.arange(ys, ye, dtype=np.float32)[:, None] + (0.5 - cy)
            dx = np.arange(xs, xe, dtype=np.float32)[None, :] + (0.5 - cx)
            rr = np.sqrt(dx * dx + dy * dy)
            pos = np.arctan2(dy, dx)
            pos *= TABLE / TWO_PI
            pos += TABLE  # arctan2 is in [-pi, pi]: positions in [TABLE/2, 3 TABLE/2]
            edge = _lookup(table, pos)
            inside = rr < edge
            if not inside.any():
                continue
            region = img[ys:ye, xs:xe]
            if flat:
                region[inside] = (k + 1) / 255.0
            else:
                region[inside] = look.fill(radius, dx, dy, rr, edge, detail[ys:ye, xs:xe], inside)
            mask[ys:ye, xs:xe][inside] = k + 1
            inst[ys:ye, xs:xe][inside] = len(instances) + 1
            instances.append(Instance(k + 1, Box(ys, ye, xs, xe)))
            shapes.append(dict(class_id=k + 1, centre=[round(cx, 3), round(cy, 3)], radius=round(radius, 3),
                               rotation_deg=round(rot * 360.0 / TABLE, 3)))
        image = _to_uint8(img)
        defects = instance_records(inst, instances, self.class_names)
        meta = dict(backend=self.name, seed=self.cfg.seed, index=index, size=[W, H], channels=C, fill=p.fill,
                    background=background, instances_drawn=drawn, instances=shapes, defects=defects)
        return Sample(image[..., 0] if gray else image, mask, main_class_of(defects, len(self.class_names)), meta)

    @staticmethod
    def _background(rng, H, W, C) -> tuple[np.ndarray, dict]:
        """Smooth fractal noise blended between two random colours: (H, W, C) float32 in [0, 1]."""
        cells = float(rng.uniform(2, 8))
        n = fractal(rng, H, W, cells=cells, octaves=4)
        a, b = rng.uniform(0.05, 0.95, (2, C)).astype(np.float32)
        t = np.clip(n * 0.8 + 0.5, 0.0, 1.0)[..., None]
        return a + (b - a) * t, dict(cells=round(cells, 4))

    @staticmethod
    def _look(rng, C, outline_prob: float) -> InstanceLook:
        """One instance's fill, drawn from ``rng``."""
        colour = rng.uniform(0.05, 1.0, C).astype(np.float32)
        gx, gy = (float(g) for g in rng.uniform(-0.35, 0.35, 2))
        contrast = float(rng.uniform(0.0, 0.3))
        outline = float(rng.uniform(1.0, 3.0)) if rng.random() < outline_prob else 0.0
        rim = float(rng.choice([0.35, 1.6]))
        return InstanceLook(colour, gx, gy, contrast, outline, rim)
