"""Class masks drawn over images (numpy only): generate's preview sheet and finetune's predict overlays."""
from __future__ import annotations

import math

import numpy as np

PALETTE = np.array([
    [0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128],
], np.uint8)


def class_colours(num_classes: int) -> np.ndarray:
    reps = math.ceil(num_classes / len(PALETTE))
    return np.tile(PALETTE, (reps, 1))[:num_classes]


def overlay(image: np.ndarray, mask: np.ndarray, num_classes: int, opacity: float = 0.35) -> np.ndarray:
    """RGB uint8 image with defect pixels tinted by class colour and their outlines drawn opaque."""
    rgb = np.repeat(image[..., None], 3, 2) if image.ndim == 2 else image[..., :3]
    colours = class_colours(num_classes)[mask].astype(np.float32)
    out = rgb.astype(np.float32)
    hit = mask > 0
    out[hit] = (1 - opacity) * out[hit] + opacity * colours[hit]
    edge = np.zeros_like(hit)
    edge[1:, :] |= mask[1:, :] != mask[:-1, :]
    edge[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    edge &= hit
    out[edge] = colours[edge]
    return out.astype(np.uint8)
