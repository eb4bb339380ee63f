"""A compact StyleGAN2 generator (Karras et al. 2020) in PyTorch, config-F "skip" architecture.

Mapping network (z -> w, 8 equalised-LR layers, w_avg for truncation), synthesis blocks 4x4 .. RxR with
modulated/demodulated 3x3 convolutions, per-layer noise inputs, and toRGB outputs summed through upsampling skips.
Parameter and buffer names follow NVIDIA's stylegan2-ada-pytorch ``G_ema`` (``mapping.fc0.weight``,
``synthesis.b8.conv0.affine.bias``, ``synthesis.b4.const`` ...), so its weights load once converted to safetensors
(``generate.backends.stylegan.convert``). Resampling uses the same [1, 3, 3, 1] FIR filter, through a transposed
depthwise convolution instead of ``upfirdn2d`` (equal up to the border handling).

Random-weight modes ("Learning to See by Looking at Noise", Baradad et al. 2021) replace the synthesis weights per
sample (:func:`sample_synthesis_weights`): every sample is its own weight configuration, drawn from its own seeded
generator, and the batch runs as one grouped convolution per layer, exactly as the per-sample modulated weights do.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SQRT2 = math.sqrt(2.0)
CONV_CLAMP = 256.0


def fir_filter(device=None, dtype=torch.float32) -> torch.Tensor:
    f = torch.tensor([1.0, 3.0, 3.0, 1.0], device=device, dtype=dtype)
    f = torch.outer(f, f)
    return f / f.sum()


def upsample2d(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """2x upsampling with the FIR filter ``f`` (4x4, sum 1; gain 4 keeps the mean)."""
    c = x.shape[1]
    k = (f * 4).to(x.dtype).expand(c, 1, 4, 4)
    return F.conv_transpose2d(x, k, stride=2, padding=1, groups=c)


class FullyConnected(nn.Module):
    """Equalised-learning-rate linear layer (``weight`` [out, in], runtime gain ``lr_mul / sqrt(in)``)."""

    def __init__(self, in_features: int, out_features: int, bias_init: float = 0.0, lr_mul: float = 1.0,
                 act: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init)))
        self.weight_gain, self.bias_gain, self.act = lr_mul / math.sqrt(in_features), lr_mul, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # An elementwise product and a sum over the input axis: each row is computed the same way whatever the
        # batch size, so a sample does not depend on the batch it is rendered in (a GEMM may block differently).
        w = self.weight.to(x.dtype) * self.weight_gain
        y = (x[:, None, :] * w[None]).sum(-1) + self.bias.to(x.dtype) * self.bias_gain
        return F.leaky_relu(y, 0.2) * SQRT2 if self.act else y


class Mapping(nn.Module):
    def __init__(self, z_dim: int = 512, w_dim: int = 512, num_layers: int = 8, lr_mul: float = 0.01):
        super().__init__()
        self.z_dim, self.w_dim, self.num_layers = z_dim, w_dim, num_layers
        dims = [z_dim] + [w_dim] * num_layers
        for i in range(num_layers):
            setattr(self, f"fc{i}", FullyConnected(dims[i], dims[i + 1], lr_mul=lr_mul, act=True))
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z: torch.Tensor, truncation: float = 1.0) -> torch.Tensor:
        x = z * (z.square().mean(1, keepdim=True) + 1e-8).rsqrt()
        for i in range(self.num_layers):
            x = getattr(self, f"fc{i}")(x)
        return self.w_avg.to(x.dtype).lerp(x, truncation) if truncation != 1 else x


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, demodulate: bool) -> torch.Tensor:
    """``weight``: [O, I, k, k] shared, or [B, O, I, k, k] per sample; ``styles`` [B, I]. One grouped conv."""
    b, c, h, w = x.shape
    wt = (weight if weight.dim() == 5 else weight[None]).to(x.dtype) * styles[:, None, :, None, None]
    if demodulate:
        wt = wt * (wt.square().sum(dim=[2, 3, 4], keepdim=True) + 1e-8).rsqrt()
    o, k = wt.shape[1], wt.shape[-1]
    y = F.conv2d(x.reshape(1, b * c, h, w), wt.reshape(b * o, c, k, k), padding=k // 2, groups=b)
    return y.reshape(b, o, y.shape[-2], y.shape[-1])


class SynthesisLayer(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, w_dim: int, res: int, up: bool = False):
        super().__init__()
        self.affine = FullyConnected(w_dim, in_ch, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.register_buffer("noise_const", torch.randn(res, res))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.register_buffer("resample_filter", fir_filter())
        self.up, self.res = up, res

    def forward(self, x, w, noise=None, weight=None, noise_strength=None):
        if self.up:
            x = upsample2d(x, self.resample_filter)
        x = modulated_conv2d(x, self.weight if weight is None else weight, self.affine(w), demodulate=True)
        strength = self.noise_strength if noise_strength is None else noise_strength.view(-1, 1, 1, 1)
        x = x + (self.noise_const if noise is None else noise).to(x.dtype) * strength.to(x.dtype)
        x = F.leaky_relu(x + self.bias.to(x.dtype).view(1, -1, 1, 1), 0.2) * SQRT2
        return x.clamp(-CONV_CLAMP, CONV_CLAMP)


class ToRGB(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, w_dim: int):
        super().__init__()
        self.affine = FullyConnected(w_dim, in_ch, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.weight_gain = 1 / math.sqrt(in_ch)

    def forward(self, x, w, weight=None):
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight if weight is None else weight, styles, demodulate=False)
        return (x + self.bias.to(x.dtype).view(1, -1, 1, 1)).clamp(-CONV_CLAMP, CONV_CLAMP)


class SynthesisBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, w_dim: int, res: int, img_channels: int):
        super().__init__()
        self.res = res
        if in_ch == 0:
            self.const = nn.Parameter(torch.randn(out_ch, res, res))
        else:
            self.conv0 = SynthesisLayer(in_ch, out_ch, w_dim, res, up=True)
        self.conv1 = SynthesisLayer(out_ch, out_ch, w_dim, res)
        self.torgb = ToRGB(out_ch, img_channels, w_dim)
        self.register_buffer("resample_filter", fir_filter())

    def layers(self) -> list[str]:
        return (["conv0"] if hasattr(self, "conv0") else []) + ["conv1"]

    def forward(self, x, img, w, noises: dict, over: dict, prefix: str):
        if x is None:
            const = over.get(prefix + "const", self.const)
            x = (const if const.dim() == 4 else const[None].expand(w.shape[0], -1, -1, -1)).to(w.dtype)
        for name in self.layers():
            key = f"{prefix}{name}."
            x = getattr(self, name)(x, w, noises.get(key), over.get(key + "weight"), over.get(key + "noise_strength"))
        y = self.torgb(x, w, over.get(prefix + "torgb.weight"))
        img = y if img is None else upsample2d(img, self.resample_filter) + y
        return x, img


def channels_at(res: int, channel_base: int, channel_max: int) -> int:
    return min(channel_base // res, channel_max)


class Synthesis(nn.Module):
    def __init__(self, w_dim: int, resolution: int, img_channels: int = 3, channel_base: int = 32768,
                 channel_max: int = 512):
        super().__init__()
        self.resolutions = [2 ** i for i in range(2, int(math.log2(resolution)) + 1)]
        self.resolution, self.img_channels = resolution, img_channels
        for res in self.resolutions:
            in_ch = 0 if res == 4 else channels_at(res // 2, channel_base, channel_max)
            setattr(self, f"b{res}", SynthesisBlock(in_ch, channels_at(res, channel_base, channel_max), w_dim, res,
                                                    img_channels))

    def forward(self, w: torch.Tensor, noises: dict | None = None, over: dict | None = None) -> torch.Tensor:
        x = img = None
        for res in self.resolutions:
            x, img = getattr(self, f"b{res}")(x, img, w, noises or {}, over or {}, f"b{res}.")
        return img


class Generator(nn.Module):
    """``G(z) -> images`` in about [-1, 1], (B, img_channels, R, R). Names match stylegan2-ada-pytorch."""

    def __init__(self, z_dim: int = 512, w_dim: int = 512, resolution: int = 256, img_channels: int = 3,
                 channel_base: int = 32768, channel_max: int = 512, mapping_layers: int = 8):
        super().__init__()
        self.config = dict(z_dim=z_dim, w_dim=w_dim, resolution=resolution, img_channels=img_channels,
                           channel_base=channel_base, channel_max=channel_max, mapping_layers=mapping_layers)
        self.z_dim = z_dim
        self.mapping = Mapping(z_dim, w_dim, mapping_layers)
        self.synthesis = Synthesis(w_dim, resolution, img_channels, channel_base, channel_max)

    def noise_shapes(self) -> dict[str, tuple[int, int]]:
        """Noise input name (``b8.conv0.``) -> its (H, W)."""
        return {f"b{res}.{name}.": (res, res) for res in self.synthesis.resolutions
                for name in getattr(self.synthesis, f"b{res}").layers()}

    def forward(self, z, truncation: float = 1.0, noises: dict | None = None, over: dict | None = None):
        return self.synthesis(self.mapping(z, truncation), noises, over)


def _oriented_kernels(g: torch.Generator, shape: tuple, theta: float, spread: float) -> torch.Tensor:
    """3x3 oriented derivative filters (Sobel pair steered to ``theta`` +- ``spread``), random gain and sign."""
    o, i = shape[:2]
    dev = g.device
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=dev)
    angles = theta + spread * torch.randn(o, i, 1, 1, generator=g, device=dev)
    gain = torch.randn(o, i, 1, 1, generator=g, device=dev)
    blob = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], device=dev) / 4
    k = torch.cos(angles) * sobel_x + torch.sin(angles) * sobel_x.T
    low = torch.randn(o, i, 1, 1, generator=g, device=dev) * 0.3 * blob  # isotropic energy keeps colour fields
    return gain * k + low


def sample_synthesis_weights(g: torch.Generator, G: Generator, oriented: bool) -> dict[str, torch.Tensor]:
    """One sample's weight configuration: every synthesis conv/toRGB weight and the constant input, redrawn
    from ``g`` (a generator on the target device, seeded from (seed, index)); oriented mode steers all 3x3 filters
    to one random orientation per sample. Also a per-layer noise strength."""
    over: dict[str, torch.Tensor] = {}
    dev = g.device

    def randn(shape):
        return torch.randn(shape, generator=g, device=dev)

    def rand():
        return torch.rand((), generator=g, device=dev)

    theta = float(rand()) * math.pi
    spread = float(rand()) * 0.6
    for res in G.synthesis.resolutions:
        block = getattr(G.synthesis, f"b{res}")
        p = f"b{res}."
        if hasattr(block, "const"):
            over[p + "const"] = randn(block.const.shape)
        for name in block.layers():
            shape = tuple(getattr(block, name).weight.shape)
            over[f"{p}{name}.weight"] = (_oriented_kernels(g, shape, theta, spread) if oriented
                                         else randn(shape))
            over[f"{p}{name}.noise_strength"] = rand() * 0.3
        over[p + "torgb.weight"] = randn(tuple(block.torgb.weight.shape))
    return over
