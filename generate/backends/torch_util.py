"""Device, dtype and per-sample generators shared by the neural backends (imported only by them: needs torch)."""
from __future__ import annotations

import os

import numpy as np
import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    """``auto``: this rank's GPU (``cuda:LOCAL_RANK``) when one is present, else the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(device)


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
