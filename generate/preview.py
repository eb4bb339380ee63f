"""A contact sheet of samples with their masks overlaid and class names, so a person can look at the data."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from generate.schema import Sample
from synthvit.io import atomic_write_bytes
from synthvit.overlay import class_colours, overlay


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
