"""Full-frame (default 3840x2160) inference per model through the project's own path (``finetune.evaluate.Predictor``:
tiles of 512 px with 10 % overlap, ramp blending, bf16 autocast on CUDA), random init, one frame in memory.

Prints seconds per frame, frames/s, peak memory and GFLOPs per 512 tile for ViTs (tiny/small/base, hybrid) and the
CNN baselines (DeepLabV3+-R50, HRNet-W18; ResNet-50 classification resizes the frame to one 512 input instead).
``--compile`` adds a torch.compile row per model; timm's ViTs use SDPA (fused attention) unless ``--no-sdpa``.

    python benchmarks/bench_4k.py                       # CPU: vit_tiny and deeplabv3plus_resnet50
    python benchmarks/bench_4k.py --device cuda --models all --compile
    python benchmarks/bench_4k.py --models vit_small_patch16_224 --decoders linear,dpt,dpt-skip   # decoder cost
"""
from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from finetune.artifacts import build_model
from finetune.config import FinetuneConfig, TilingConfig
from finetune.evaluate import Predictor
from synthvit.compare.probe import TILE, gflops_per_tile
from synthvit.models import SEG_BASELINES, ExportMeta, Heads

ALL = ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224", "vit_small_r26_s32_224",
       "deeplabv3plus_resnet50", "hrnet_w18_seg", "resnet50:cls"]


def measure(name: str, device: torch.device, args, compiled: bool) -> dict:
    spec, _, decoder = name.partition("@")
    model_name, _, task = spec.partition(":")
    cfg = FinetuneConfig(model=model_name, task=task or "seg", crop_size=TILE, drop_path=0.0,
                         decoder=decoder or "linear")
    torch.manual_seed(0)
    model = build_model(cfg, 8, 8).eval().to(device)
    if args.no_sdpa:
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
    names = [f"c{i}" for i in range(8)]
    meta = ExportMeta(model=cfg.model, in_chans=3, img_size=TILE, heads=Heads.parse(cfg.task), class_names=names,
                      seg_classes=names if cfg.task == "seg" else [], cls_classes=names if cfg.task == "cls" else [],
                      mean=[0.5] * 3, std=[0.5] * 3)
    predictor = Predictor(torch.compile(model) if compiled else model, meta, device,
                          TilingConfig(tile=TILE, overlap=0.1, batch_size=args.batch))
    w, h = (int(v) for v in args.size.split("x"))
    frame = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    for _ in range(2 if compiled else 1):  # warm-up: kernels, autotuning, the last partial batch's shape
        predictor(frame)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        predictor(frame)
        sync()
        seconds.append(time.perf_counter() - t)
    s = float(np.median(seconds))
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return {"model": name + (" (compiled)" if compiled else ""), "s": s, "fps": 1 / s, "peak": peak,
            "gflops": gflops_per_tile(model, 3), "params": sum(p.numel() for p in model.parameters()) / 1e6}


def with_decoders(names: list[str], decoders: list[str]) -> list[str]:
    """One row per decoder (``name@decoder``) for each timm segmentation model; baselines and ``:cls`` rows once."""
    rows = []
    for name in names:
        dense = ":" not in name and name not in SEG_BASELINES
        rows += [f"{name}@{d}" for d in decoders] if dense else [name]
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default="vit_tiny_patch16_224,deeplabv3plus_resnet50", help="comma list or all")
    ap.add_argument("--size", default="3840x2160")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--no-sdpa", action="store_true")
    ap.add_argument("--decoders", default="linear", help="comma list of dense decoders for the timm seg models "
                                                          "(linear, dpt, dpt-skip): one row each")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    names = ALL if args.models == "all" else args.models.split(",")
    names = with_decoders(names, args.decoders.split(","))
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.machine()} CPU"
    print(f"# {args.size} frame, {TILE} px tiles, 10 % overlap, batch {args.batch}, {where}, torch "
          f"{torch.__version__}, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}, median of {args.repeats}")
    print("| model | params M | GFLOPs/512 tile | s/frame | frames/s | peak GPU MB |")
    print("|---|---|---|---|---|---|")
    for name in names:
        for compiled in ([False, True] if args.compile else [False]):
            try:
                r = measure(name, device, args, compiled)
                print(f"| {r['model']} | {r['params']:.1f} | {r['gflops']:.1f} | {r['s']:.3f} | {r['fps']:.2f} | "
                      f"{r['peak']:.0f} |", flush=True)
            except Exception as e:  # one model failing must not lose the other rows
                print(f"| {name}{' (compiled)' if compiled else ''} | error: {type(e).__name__}: "
                      f"{str(e)[:120]} | | | | |", flush=True)


if __name__ == "__main__":
    main()
