"""The StyleGAN backend: StyleGAN2 images as surfaces for procedural defects (exact masks), or as DRAEM-style
anomaly textures blended into defect shapes.

Modes (``stylegan.mode``):

- ``random``: no weights, no training ("Learning to See by Looking at Noise", Baradad et al., NeurIPS 2021): each
  sample draws its own synthesis weights (its weight configuration) from a generator seeded by (seed, index);
- ``oriented``: the same, with every 3x3 filter an oriented derivative kernel around one random orientation per
  sample (streaks, brushing, weave-like structure);
- ``checkpoint``: a trained generator from a local ``.safetensors`` file (see ``convert.py`` for NVIDIA pickles),
  e.g. trained on your own defect-free surfaces.

Samples are rendered in batches (``render_batch``) with per-sample generators: on the CPU a sample's bytes do
not depend on the batch it is in (tested); on a GPU they are reproducible for a given batch size.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from generate.backends.stylegan.network import Generator, sample_synthesis_weights
from generate.backends.torch_util import resolve_dtype, sample_rng, torch_generator
from generate.backgrounds import UsesBackgrounds, background_pool
from generate.defects import Stamp, Substitute, feature_scale, on_background, sample_on_surface
from generate.schema import BACKGROUND, Sample
from synthvit.config import ConfigError
from synthvit.io import SynthvitError
from synthvit.training import resolve_device

FORMAT = "synthvit.stylegan2/1"
ANOMALY = "anomaly"
RANDOM_CHANNEL_BASE = 16384


def load_checkpoint(path: str | Path) -> Generator:
    """A :class:`Generator` from a safetensors file written by ``convert.py`` (metadata ``format``, ``config``)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise SynthvitError(f"stylegan.checkpoint: {path} does not exist; convert a stylegan2-ada-pytorch pickle "
                            f"with `python -m generate.backends.stylegan.convert --trust-pickle IN.pkl {path}`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise SynthvitError(f"stylegan.checkpoint: {path} is not a readable .safetensors file ({e}); write it with "
                            f"`python -m generate.backends.stylegan.convert --trust-pickle IN.pkl {path}`") from None
    if meta.get("format") != FORMAT or "config" not in meta:
        raise SynthvitError(f"{path}: not a synthvit StyleGAN2 file (metadata format={meta.get('format')!r}, "
                            f"expected {FORMAT!r} with a config); write it with generate.backends.stylegan.convert")
    G = Generator(**json.loads(meta["config"]))
    expected = G.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or bad_shape:
        raise SynthvitError(f"{path}: tensors do not match its config {meta['config']}: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}, wrong shape {bad_shape[:5]}")
    G.load_state_dict(state)
    return G


def network_resolution(width: int, height: int, requested: int) -> int:
    return requested or max(8, 2 ** math.ceil(math.log2(max(width, height))))


class StyleGANBackend(UsesBackgrounds):
    """StyleGAN2 textures (random weights, oriented filters or a checkpoint) with the defects of ``defects.*``."""

    name = "stylegan"
    in_process = True  # one model per process (GPU); batches instead of worker processes

    def __init__(self, cfg):
        self.cfg, self.s, self.p, self.d = cfg, cfg.stylegan, cfg.procedural, cfg.defects
        self.width, self.height = cfg.size
        self.device = resolve_device(self.s.device)
        self.dtype = resolve_dtype(self.s.dtype, self.device)
        self.batch_size = self.s.batch_size
        self.class_names = [BACKGROUND, *self.d.classes] + ([ANOMALY] if self.s.anomaly_prob > 0 else [])
        self.scale = feature_scale(self.width, self.height, self.d.scale_exponent, self.d.defect_scale)
        if self.s.mode == "checkpoint":
            G = load_checkpoint(self.s.checkpoint)
        else:
            with torch.random.fork_rng(devices=[]):  # the shared mapping/affine weights from the seed alone
                torch.manual_seed(cfg.seed)
                res = network_resolution(self.width, self.height, self.s.resolution)
                G = Generator(resolution=res, channel_base=RANDOM_CHANNEL_BASE, channel_max=self.s.channel_max)
        self.G = G.eval().requires_grad_(False).to(self.device)
        # procedural.backgrounds: the user's frames are the surfaces, the network's textures the anomalies' source
        self.backgrounds = background_pool(cfg)
        if self.backgrounds is not None and not self.s.anomaly_prob:
            raise ConfigError("stylegan.anomaly_prob: 0 with procedural.backgrounds draws no StyleGAN texture at all; "
                              "set stylegan.anomaly_prob > 0 (DRAEM-style anomalies in your frames) or use "
                              "backend=procedural")

    def render(self, index: int) -> Sample:
        return self.render_batch([index])[0]

    @torch.inference_mode()
    def textures(self, seeds: list[int]) -> np.ndarray:
        """(B, C, H, W) float32 in [0, 1] at the frame size, one per torch seed."""
        if len(seeds) == 1:  # a batch of one runs an ungrouped conv whose rounding differs: render it as a pair
            return self.textures(seeds * 2)[:1]
        G, dev = self.G, self.device
        gens = [torch_generator(s, dev) for s in seeds]
        z = torch.stack([torch.randn(G.z_dim, generator=g, device=dev) for g in gens])
        noises = {k: torch.stack([torch.randn(1, *hw, generator=g, device=dev) for g in gens])
                  for k, hw in G.noise_shapes().items()}
        over = None
        if self.s.mode != "checkpoint":
            per = [sample_synthesis_weights(g, G, oriented=self.s.mode == "oriented") for g in gens]
            over = {k: torch.stack([o[k] for o in per]) for k in per[0]}
        # Mapping, styles and demodulation stay in float32; autocast runs the convolutions in bf16/fp16.
        with torch.autocast(dev.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            x = G(z, self.s.truncation, noises, over).float()
        if self.s.mode == "checkpoint":
            x = (x + 1) / 2
        else:  # random weights have no calibrated range: standardise each sample, then a soft contrast curve
            x = x - x.mean(dim=(1, 2, 3), keepdim=True)
            x = torch.sigmoid(1.6 * x / (x.std(dim=(1, 2, 3), keepdim=True) + 1e-6))
        return self._fit(x.clamp(0, 1)).cpu().numpy()

    def _fit(self, x: torch.Tensor) -> torch.Tensor:
        """Scale the square network output so it covers the frame, then crop to (H, W)."""
        side = max(self.width, self.height)
        if x.shape[-1] != side:
            x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        return x[..., :self.height, :self.width].contiguous()

    def _to_frame(self, rng, tex: np.ndarray, gray: bool) -> np.ndarray:
        if tex.shape[0] == 1 or gray:  # a one-channel checkpoint gives grayscale frames only
            return np.ascontiguousarray(tex.mean(0, keepdims=True), dtype=np.float32)
        if self.s.mode != "checkpoint":  # random colours are garish: keep a sampled share of saturation
            lum = tex.mean(0, keepdims=True)
            tex = lum + float(rng.uniform(0.0, 0.4)) * (tex - lum)
        return np.ascontiguousarray(tex, dtype=np.float32)

    def render_batch(self, indices: list[int]) -> list[Sample]:
        rngs, seeds = zip(*(sample_rng(self.cfg.seed, i) for i in indices))
        if self.backgrounds is not None:
            return self._on_backgrounds(indices, rngs, seeds)
        anomalies = self.s.anomaly_prob > 0
        # A second texture per sample (its own seed) is the source of DRAEM-style anomalies.
        tex = self.textures(list(seeds) + ([s + 1 for s in seeds] if anomalies else []))
        out = []
        for b, (index, rng) in enumerate(zip(indices, rngs)):
            gray = bool(rng.random() < self.p.gray_prob)
            img = self._to_frame(rng, tex[b], gray)
            anomaly = None
            if anomalies:
                source = self._to_frame(rng, tex[len(indices) + b], gray)
                anomaly = Substitute(self.s.anomaly_prob, len(self.class_names) - 1, _blend_painter(source))
            meta = dict(backend=self.name, seed=self.cfg.seed, index=index, size=[self.width, self.height],
                        channels=img.shape[0], surface=dict(family=f"stylegan-{self.s.mode}"))
            out.append(sample_on_surface(rng, img, self.d, self.scale, self.class_names, meta, anomaly))
        return out

    def _on_backgrounds(self, indices, rngs, seeds) -> list[Sample]:
        """DRAEM on the user's frames: procedural defects and anomalies (this network's texture blended into a
        defect's shape) drawn into backgrounds, each at its spot's local contrast."""
        tex = self.textures([s + 1 for s in seeds])
        out = []
        for b, (index, rng) in enumerate(zip(indices, rngs)):
            gray = bool(rng.random() < self.p.gray_prob)  # drawn as without backgrounds: the same stream
            source = self._to_frame(rng, tex[b], gray)
            meta = dict(backend=self.name, seed=self.cfg.seed, index=index, size=[self.width, self.height],
                        surface=dict(family="background"))
            anomaly = Substitute(self.s.anomaly_prob, len(self.class_names) - 1,
                                 _blend_painter(source, match_channels=True))
            out.append(on_background(rng, self.backgrounds, self.d, self.scale, self.class_names, meta, anomaly))
        return out


def _blend_painter(source: np.ndarray, match_channels: bool = False):
    """DRAEM-style: blend ``source`` (C, H, W) into the shape of a procedural defect with opacity beta."""
    _, H, W = source.shape

    def paint(rng, shape: Stamp) -> Stamp:
        h, w = shape.alpha.shape
        rows = (shape.y0 + np.arange(h)) % H
        cols = (shape.x0 + np.arange(w)) % W
        patch = source[:, rows][:, :, cols]
        if match_channels:  # onto a frame whose channel count is the background's: the texture's grey level
            patch = patch.mean(0)
        beta = float(rng.uniform(0.5, 1.0))
        alpha = np.clip(shape.alpha * 4.0, 0.0, 1.0) * beta  # a filled region, not the defect's own shading
        return Stamp(shape.y0, shape.x0, alpha.astype(np.float32), gain=0.0, offset=patch)

    return paint
