"""Cost of one finetuned model, measured in a fresh process (so peak memory is its own):
parameters, GFLOPs per 512x512 tile, full-frame (default 3840x2160) inference seconds and peak memory.

``python -m compare.probe RUN_DIR [--size 3840x2160] [--repeats 2]`` writes ``RUN_DIR/probe.json``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from finetune.artifacts import load_run
from synthvit.compare.matrix import PROBE_FILE
from synthvit.config import parse_size
from synthvit.io import atomic_write_text, dumps_json
from synthvit.training import peak_memory_mb, resolve_device

TILE = 512


def gflops_per_tile(model: torch.nn.Module, in_chans: int) -> float:
    """Forward GFLOPs (multiply-adds x 2) of one 512x512 tile through ``model`` (built for 512 px inputs)."""
    counter = FlopCounterMode(display=False)
    device = next(model.parameters()).device
    with torch.no_grad(), counter:
        model(torch.zeros(1, in_chans, TILE, TILE, device=device))
    return counter.get_total_flops() / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def probe(run_dir: Path, size: tuple[int, int], repeats: int) -> dict:
    run = load_run(run_dir)
    cfg, device = run.cfg, resolve_device()
    predictor = run.predictor(device)
    w, h = size
    rng = np.random.default_rng(0)
    shape = (h, w) if cfg.in_chans == 1 else (h, w, 3)
    frame = rng.integers(0, 256, size=shape, dtype=np.uint8)
    predictor(frame[:2 * cfg.crop_size, :2 * cfg.crop_size])  # warm-up: kernels, allocator
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = peak_memory_mb(torch.device("cpu"))[0]
    seconds = []
    for _ in range(repeats):
        t = time.perf_counter()
        predictor(frame)
        _sync(device)
        seconds.append(time.perf_counter() - t)
    s = float(np.median(seconds))
    out = {"frame": f"{w}x{h}", "seconds_per_frame": round(s, 4), "frames_per_s": round(1 / s, 4),
           "repeats": repeats, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "autocast": "bf16" if predictor.autocast is not None else "fp32",
           "parameters": sum(p.numel() for p in run.model.parameters()),
           "gflops_per_512_tile": round(gflops_per_tile(run.architecture(TILE), cfg.in_chans), 2),
           "inference_peak_rss_mb": peak_memory_mb(torch.device("cpu"))[0], "rss_before_mb": rss_before}
    if device.type == "cuda":
        out["inference_peak_cuda_mb"] = peak_memory_mb(device)[0]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--size", default="3840x2160")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    result = probe(args.run_dir, parse_size(args.size, "probe_size"), args.repeats)
    atomic_write_text(args.run_dir / PROBE_FILE, dumps_json(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
