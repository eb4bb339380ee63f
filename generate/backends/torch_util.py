"""Device, dtype and per-sample generators shared by the neural backends (imported only by them: needs torch)."""
from __future__ import annotations

import numpy as np
import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on GPUs, fp32 on CPUs."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def sample_rng(seed: int, index: int) -> tuple[np.random.Generator, int]:
    """The numpy generator of sample ``index`` and a torch seed drawn first from it (sample i depends on (seed, i))."""
    rng = np.random.default_rng((seed, index))
    return rng, int(rng.integers(2 ** 62))


def torch_generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)
