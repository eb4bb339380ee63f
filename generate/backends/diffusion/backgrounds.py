"""Defect-free backgrounds for the diffusion backend: procedural surfaces, or crops of the user's own images."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from generate.backends import create_backend
from generate.backgrounds import BackgroundPool, find_backgrounds


class ProceduralBackgrounds:
    """The procedural renderer with defects turned off: sample ``index``'s surface, camera effects included."""

    def __init__(self, cfg):
        clean = dataclasses.replace(cfg.defects, defect_free_prob=1.0)
        self.renderer = create_backend("procedural", dataclasses.replace(cfg, defects=clean))

    def __call__(self, index: int, rng) -> tuple[np.ndarray, dict]:
        s = self.renderer.render(index)
        return s.image, {"family": s.meta["surface"]["family"], "source": "procedural", "surface": s.meta["surface"]}


class FolderBackgrounds:
    """Random crops (or cover-resizes, for smaller images) of the user's images: the shared pool of
    ``generate.backgrounds`` (a plain folder, or the defect-free train images of a real-data folder)."""

    def __init__(self, folder: str | Path, width: int, height: int):
        sources, self.record = find_backgrounds(str(folder), key="diffusion.backgrounds")
        self.pool = BackgroundPool(sources, width, height, key="diffusion.backgrounds")

    def __call__(self, index: int, rng) -> tuple[np.ndarray, dict]:
        crop, record = self.pool(rng)
        return crop, {"family": "product", "source": "folder", **record}


def make_backgrounds(cfg):
    d = cfg.diffusion
    if d.backgrounds:
        return FolderBackgrounds(d.backgrounds, *cfg.size)
    return ProceduralBackgrounds(cfg)
