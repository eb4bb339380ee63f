"""Defect-free backgrounds for the diffusion backend: procedural surfaces, or crops of the user's own images."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

from generate.backends.procedural import ProceduralBackend
from synthvit.io import SynthvitError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ProceduralBackgrounds:
    """The procedural renderer with defects turned off: sample ``index``'s surface, camera effects included."""

    def __init__(self, cfg):
        clean = dataclasses.replace(cfg.procedural, defect_free_prob=1.0)
        self.renderer = ProceduralBackend(dataclasses.replace(cfg, procedural=clean))

    def __call__(self, index: int, rng) -> tuple[np.ndarray, dict]:
        s = self.renderer.render(index)
        return s.image, {"family": s.meta["surface"]["family"], "source": "procedural", "surface": s.meta["surface"]}


class FolderBackgrounds:
    """Random crops (or cover-resizes, for smaller images) of the images in a folder; the choice from ``rng``."""

    def __init__(self, folder: str | Path, width: int, height: int):
        self.folder, self.width, self.height = Path(folder), width, height
        if not self.folder.is_dir():
            raise SynthvitError(f"diffusion.backgrounds: {self.folder} is not a folder; give a folder of "
                                f"defect-free images ({', '.join(IMAGE_EXTS)}) or leave it empty for procedural ones")
        self.files = sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
        if not self.files:
            raise SynthvitError(f"diffusion.backgrounds: {self.folder} holds no images ({', '.join(IMAGE_EXTS)})")

    def __call__(self, index: int, rng) -> tuple[np.ndarray, dict]:
        path = self.files[int(rng.integers(len(self.files)))]
        try:
            with Image.open(path) as im:
                im = im.convert("L" if im.mode in ("L", "I;16", "I", "1") else "RGB")
                scale = max(self.width / im.width, self.height / im.height, 1.0)
                if scale > 1.0:
                    im = im.resize((round(im.width * scale + 0.5), round(im.height * scale + 0.5)),
                                   Image.Resampling.BICUBIC)
                x0 = int(rng.integers(im.width - self.width + 1))
                y0 = int(rng.integers(im.height - self.height + 1))
                crop = np.asarray(im.crop((x0, y0, x0 + self.width, y0 + self.height)))
        except OSError as e:
            raise SynthvitError(f"diffusion.backgrounds: cannot read {path}: {e}") from None
        return crop, {"family": "product", "source": "folder", "file": path.name, "crop": [x0, y0]}


def make_backgrounds(cfg):
    d = cfg.diffusion
    if d.backgrounds:
        return FolderBackgrounds(d.backgrounds, *cfg.size)
    return ProceduralBackgrounds(cfg)
