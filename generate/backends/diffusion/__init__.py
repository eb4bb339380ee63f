"""The diffusion backend (diffusers): defects inpainted into defect-free backgrounds, or diffusion surfaces.

Modes (``diffusion.mode``):

- ``inpaint``: a background (a procedural surface, or a crop of your own defect-free images in
  ``diffusion.backgrounds``) gets one defect class per frame: 1..``defects.max_defects`` procedural defect
  shapes of that class form the inpainting mask, the class's prompt (``diffusion.prompt``/``prompts``) says what to
  paint. The generated pixels are pasted inside the mask only, so every pixel outside it is exactly the
  background and the mask is the inpainted region;
- ``img2img``: the background restyled by ``diffusion.surface_prompt``, then procedural defects (exact masks);
- ``unconditional``: any unconditional diffusers pipeline (e.g. a DDPM trained on your surfaces) makes the
  surface, then procedural defects.

Weights come only from the local folder ``diffusion.weights`` (see ``loading.py``). Each sample has its own
``torch.Generator`` seeded from (seed, index), so it is reproducible; samples run in batches of
``diffusion.batch_size`` on the GPU in bf16/fp16 with SDPA attention (``diffusion.compile``: torch.compile the
UNet). Batched and single renders agree to rounding only (GEMM shapes change with the batch): the bytes are
reproducible for a given batch size and device, which ``index_batches`` keeps fixed for any worker or rank count
when ``samples_per_shard`` is a multiple of ``diffusion.batch_size``.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from generate.backends import BaseBackend
from generate.backends.diffusion.backgrounds import make_backgrounds
from generate.backends.diffusion.loading import load_pipeline
from generate.backends.torch_util import resolve_dtype, sample_rng, torch_generator
from generate.defects import (
    DrawnDefects,
    Instance,
    composite,
    defect_count,
    feature_scale,
    instance_records,
    paint_defect,
    sample_on_surface,
)
from generate.schema import BACKGROUND, Sample, main_class_of
from synthvit.config import ConfigError
from synthvit.io import SynthvitError
from synthvit.training import resolve_device


def to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def as_gray(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).convert("L"))


class InpaintPlan(NamedTuple):
    """One sample of an inpaint batch before the pipeline runs: its background, defect shapes and prompt ("" for a
    defect-free frame, which skips the pipeline)."""
    index: int
    seed: int
    background: np.ndarray  # (H, W) or (H, W, 3) uint8
    surface: dict
    shapes: DrawnDefects
    prompt: str


class SurfacePlan(NamedTuple):
    """One sample of an img2img batch before the pipeline runs."""
    index: int
    rng: np.random.Generator
    seed: int
    background: np.ndarray
    surface: dict
    prompt: str


class DiffusionBackend(BaseBackend):
    """Defects inpainted by a diffusers pipeline into backgrounds, or diffusion surfaces with ``defects.*``."""

    name = "diffusion"
    in_process = True  # one pipeline per process (GPU); batches instead of worker processes

    def __init__(self, cfg):
        self.cfg, self.d, self.p, self.defects = cfg, cfg.diffusion, cfg.procedural, cfg.defects
        self.width, self.height = cfg.size
        if self.d.mode != "unconditional" and (self.width % 8 or self.height % 8):
            raise ConfigError(f"image_size: {self.width}x{self.height} not accepted by the diffusion backend; "
                              f"each side must be a multiple of 8 (the VAE's factor)")
        self.device = resolve_device(self.d.device)
        self.dtype = resolve_dtype(self.d.dtype, self.device)
        self.batch_size = self.d.batch_size
        self.class_names = [BACKGROUND, *self.defects.classes]
        self.scale = feature_scale(self.width, self.height, self.defects.scale_exponent, self.defects.defect_scale)
        self.backgrounds = make_backgrounds(cfg) if self.d.mode != "unconditional" else None
        self.pipe = load_pipeline(self.d.weights, self.d.mode, self.device, self.dtype, self.d.compile)
        if self.d.mode != "unconditional" and (getattr(self.pipe, "text_encoder", None) is None
                                               or getattr(self.pipe, "tokenizer", None) is None):
            raise SynthvitError(f"diffusion.weights: {self.d.weights} has no text_encoder/ or tokenizer/; "
                                f"mode={self.d.mode} encodes the per-class prompts with them")
        self._embeds: dict[str, tuple] = {}

    def render(self, index: int) -> Sample:
        return self.render_batch([index])[0]

    def render_batch(self, indices: list[int]) -> list[Sample]:
        with torch.inference_mode():
            if self.d.mode == "inpaint":
                return self._inpaint(indices)
            if self.d.mode == "img2img":
                return self._img2img(indices)
            return self._unconditional(indices)

    def _meta(self, index: int, channels: int, surface: dict, **extra) -> dict:
        return dict(backend=self.name, seed=self.cfg.seed, index=index, size=[self.width, self.height],
                    channels=channels, surface=surface, diffusion=dict(mode=self.d.mode, **extra))

    def _embed(self, prompts: list[str]) -> dict:
        """``prompt_embeds`` (and negatives) for a batch; each distinct prompt is encoded once per process."""
        guided = self.d.guidance_scale > 1
        for p in set(prompts) - set(self._embeds):
            self._embeds[p] = self.pipe.encode_prompt(p, self.device, 1, guided, self.d.negative_prompt or None)
        kw = {"prompt_embeds": torch.cat([self._embeds[p][0] for p in prompts])}
        if guided:
            kw["negative_prompt_embeds"] = torch.cat([self._embeds[p][1] for p in prompts])
        return kw

    def _call(self, prompts: list[str], seeds: list[int], **kw) -> np.ndarray:
        """The pipeline on one batch: (B, H, W, 3) float in [0, 1]."""
        gens = [torch_generator(s, self.device) for s in seeds]
        out = self.pipe(**self._embed(prompts), generator=gens, num_inference_steps=self.d.steps,
                        guidance_scale=self.d.guidance_scale, output_type="np", **kw)
        return np.asarray(out.images, dtype=np.float32)

    def _shapes(self, rng, channels: int) -> tuple[int, DrawnDefects]:
        """One class per frame (0: none) and 1..max_defects procedural shapes of it: the inpainting mask."""
        H, W, d = self.height, self.width, self.defects
        drawn = DrawnDefects(np.zeros((H, W), np.uint8), np.zeros((H, W), np.uint8), [])
        if rng.random() < d.defect_free_prob:
            return 0, drawn
        k = int(rng.integers(len(d.classes))) + 1
        scratch = np.zeros((channels, H, W), np.float32)  # composite() rasterises coverage; the look is diffusion's
        for _ in range(defect_count(rng, d)):
            stamp = paint_defect(rng, d, self.class_names[k], H, W, channels, self.scale)
            landed = composite(scratch, drawn.inst, drawn.mask, stamp, len(drawn.instances) + 1, k)
            if landed:
                drawn.instances.append(Instance(k, landed.box))
        return (k if drawn.instances else 0), drawn

    def _inpaint(self, indices: list[int]) -> list[Sample]:
        plans = []
        for index in indices:
            rng, seed = sample_rng(self.cfg.seed, index)
            bg, surface = self.backgrounds(index, rng)
            k, shapes = self._shapes(rng, 1 if bg.ndim == 2 else 3)
            prompt = self.d.prompt_for(self.class_names[k], surface["family"]) if k else ""
            plans.append(InpaintPlan(index, seed, bg, surface, shapes, prompt))
        todo = [pl for pl in plans if pl.prompt]
        if todo:
            rgb = [Image.fromarray(pl.background).convert("RGB") for pl in todo]
            masks = [Image.fromarray((pl.shapes.mask > 0).astype(np.uint8) * 255) for pl in todo]
            gen = self._call([pl.prompt for pl in todo], [pl.seed for pl in todo], image=rgb, mask_image=masks,
                             height=self.height, width=self.width, strength=self.d.strength)
            painted = {pl.index: to_uint8(g) for pl, g in zip(todo, gen)}
        out = []
        for pl in plans:
            image, mask = pl.background.copy(), pl.shapes.mask
            if pl.prompt:
                new = painted[pl.index] if image.ndim == 3 else as_gray(painted[pl.index])
                inside = mask > 0
                image[inside] = new[inside]  # outside the mask: exactly the background
            defects = instance_records(pl.shapes.inst, pl.shapes.instances, self.class_names)
            meta = self._meta(pl.index, 1 if image.ndim == 2 else 3, pl.surface, prompt=pl.prompt, steps=self.d.steps)
            out.append(Sample(image, mask, main_class_of(defects, len(self.class_names)), dict(meta, defects=defects)))
        return out

    def _finish(self, index, rng, surface_rgb: np.ndarray, gray: bool, surface: dict, **extra) -> Sample:
        """Procedural defects with exact masks on a diffusion surface ((H, W, 3) float in [0, 1])."""
        img = surface_rgb.transpose(2, 0, 1)
        img = np.ascontiguousarray(img.mean(0, keepdims=True) if gray else img, dtype=np.float32)
        meta = self._meta(index, img.shape[0], surface, **extra)
        return sample_on_surface(rng, img, self.defects, self.scale, self.class_names, meta)

    def _img2img(self, indices: list[int]) -> list[Sample]:
        plans = []
        for index in indices:
            rng, seed = sample_rng(self.cfg.seed, index)
            bg, surface = self.backgrounds(index, rng)
            prompt = self.d.surface_prompt.format(surface=surface["family"])
            plans.append(SurfacePlan(index, rng, seed, bg, surface, prompt))
        gen = self._call([pl.prompt for pl in plans], [pl.seed for pl in plans],
                         image=[Image.fromarray(pl.background).convert("RGB") for pl in plans],
                         strength=self.d.strength)
        return [self._finish(pl.index, pl.rng, g, pl.background.ndim == 2, pl.surface, prompt=pl.prompt,
                             steps=self.d.steps) for pl, g in zip(plans, gen)]

    def _unconditional(self, indices: list[int]) -> list[Sample]:
        rngs, seeds = zip(*(sample_rng(self.cfg.seed, i) for i in indices))
        gens = [torch_generator(s, self.device) for s in seeds]
        out = self.pipe(batch_size=len(indices), generator=gens, num_inference_steps=self.d.steps, output_type="np")
        x = torch.from_numpy(np.asarray(out.images, dtype=np.float32)).permute(0, 3, 1, 2)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        side = max(self.width, self.height)
        x = F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False).clamp(0, 1)
        x = x[..., :self.height, :self.width].permute(0, 2, 3, 1).numpy()
        return [self._finish(i, rng, x[b], bool(rng.random() < self.p.gray_prob), {"family": "diffusion"},
                             steps=self.d.steps) for b, (i, rng) in enumerate(zip(indices, rngs))]
