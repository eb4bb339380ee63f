"""A contact sheet of samples with their masks overlaid and class names, so a person can look at the data."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from generate.schema import Sample
from synthvit.io import atomic_write_bytes

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


def _tile(sample: Sample, class_names: list[str], tile: int) -> Image.Image:
    h, w = sample.mask.shape
    k = tile / max(h, w)
    size = (max(1, round(w * k)), max(1, round(h * k)))
    # Downscale image and mask separately (mask by nearest) so tiny 4K defects stay visible as class colours.
    image = np.asarray(Image.fromarray(sample.image).resize(size, Image.BILINEAR))
    mask = np.asarray(Image.fromarray(sample.mask).resize(size, Image.NEAREST))
    panel = Image.new("RGB", (tile, tile + 14), (32, 32, 32))
    panel.paste(Image.fromarray(overlay(image, mask, len(class_names))), (0, 0))
    names = sorted({d["name"] for d in sample.meta.get("defects", [])}) or [class_names[0]]
    surface = sample.meta.get("surface", {}).get("family", "")
    ImageDraw.Draw(panel).text((2, tile + 1), f"{surface}: {','.join(names)}"[:48], fill=(255, 255, 255))
    return panel


def contact_sheet(samples: list[Sample], class_names: list[str], tile: int = 192) -> Image.Image:
    cols = max(1, math.ceil(math.sqrt(len(samples))))
    rows = math.ceil(len(samples) / cols)
    legend_h = 16
    sheet = Image.new("RGB", (cols * (tile + 4), rows * (tile + 18) + legend_h), (16, 16, 16))
    for i, s in enumerate(samples):
        sheet.paste(_tile(s, class_names, tile), ((i % cols) * (tile + 4), legend_h + (i // cols) * (tile + 18)))
    draw = ImageDraw.Draw(sheet)
    x = 4
    for k, name in enumerate(class_names[1:], start=1):
        draw.rectangle((x, 4, x + 9, 13), fill=tuple(int(c) for c in class_colours(len(class_names))[k]))
        draw.text((x + 12, 3), name, fill=(255, 255, 255))
        x += 16 + 7 * len(name)
    return sheet


def write_preview(path: str | Path, samples: list[Sample], class_names: list[str]) -> Path:
    buf = io.BytesIO()
    contact_sheet(samples, class_names).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
