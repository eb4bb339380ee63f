"""Tiled 4K inference: synthvit's Tiler against plain batches of the same tiles and MONAI's sliding window.

For one 3840x2160 frame and a ViT-Tiny/16 with a dense head at 512x512 tiles, 10 % overlap, batch 8:
  plain   - the same tiles pushed through the model in plain batches (no blending, no stitching): the floor
  tiler   - finetune.tiling.Tiler (ramp-window blending, stitched full-resolution probabilities)
  monai   - monai.inferers.sliding_window_inference (gaussian importance map), same model, frame, tile, overlap
Each method runs in its own process so peak memory (max RSS) is its own. Prints seconds per frame, the ratio to
plain batches, peak RSS, and how far MONAI's output is from ours.

    python benchmarks/bench_tiling.py [--size 3840x2160] [--model vit_tiny_patch16_224] [--tile 512]
    python benchmarks/bench_tiling.py --model deeplabv3plus_resnet50 --methods tiler
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from finetune.artifacts import build_model
from finetune.config import FinetuneConfig
from finetune.tiling import Tiler


def build(model_name: str, tile: int) -> torch.nn.Module:
    """Any finetune model (timm ViT with dense head, deeplabv3plus_resnet50, hrnet_w18_seg), random init."""
    torch.manual_seed(0)
    return build_model(FinetuneConfig(model=model_name, task="seg", crop_size=tile, drop_path=0.0), 8, 1).eval()


def frame_of(size: str) -> torch.Tensor:
    w, h = (int(v) for v in size.split("x"))
    g = torch.Generator().manual_seed(0)
    low = torch.randint(0, 256, (3, h // 16 + 1, w // 16 + 1), generator=g).float()[None]
    return torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear")[0].clamp(0, 255).to(torch.uint8)


def run_method(method: str, args) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    model = build(args.model, args.tile)
    frame = frame_of(args.size)
    tiler = Tiler(args.tile, args.overlap, args.batch)
    def norm(t):
        return (t - 127.5) / 127.5
    def predict(t):
        return model(t)["seg"].softmax(1)
    with torch.inference_mode():
        predict(norm(frame[:, :args.tile, :args.tile].float()[None].expand(2, -1, -1, -1)))  # warm-up
        t0 = time.perf_counter()
        if method == "plain":
            for _, tiles in tiler.batches(frame):
                predict(norm(tiles))
            out = None
        elif method == "tiler":
            out = tiler(frame, predict, 8, transform=norm)
        else:
            from monai.inferers import sliding_window_inference
            out = sliding_window_inference(norm(frame.float())[None], (args.tile, args.tile), args.batch, predict,
                                           overlap=args.overlap, mode="gaussian")[0]
        seconds = time.perf_counter() - t0
    if out is not None:
        torch.save(out.to(torch.float16), args.dump)
    return {"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "tiles": len(tiler.grid(*frame.shape[-2:]))}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="3840x2160")
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=float, default=0.1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--methods", default="plain,tiler,monai", help="which of plain, tiler, monai to run")
    ap.add_argument("--method", default="", help=argparse.SUPPRESS)
    ap.add_argument("--dump", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.method:
        print(json.dumps(run_method(args.method, args)))
        return
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.model}, {args.size}, tile {args.tile}, overlap {args.overlap}, batch {args.batch}")
    results = {}
    with tempfile.TemporaryDirectory() as d:
        methods = args.methods.split(",")
        for method in methods:
            dump = str(Path(d) / f"{method}.pt")
            cmd = [sys.executable, __file__, "--method", method, "--dump", dump, "--size", args.size,
                   "--model", args.model, "--tile", str(args.tile), "--overlap", str(args.overlap),
                   "--batch", str(args.batch)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
            results[method]["dump"] = dump
        if {"tiler", "monai"} <= set(methods):
            ours, monai = torch.load(results["tiler"]["dump"]).float(), torch.load(results["monai"]["dump"]).float()
            diff = (ours - monai).abs().max().item()
            agree = (ours.argmax(0) == monai.argmax(0)).float().mean().item()
    plain = results["plain"]["seconds"] if "plain" in results else None
    print(f"\n{results[methods[0]]['tiles']} tiles per frame")
    print("| method | s/frame | frames/s | vs plain batches | peak RSS MB |")
    print("|---|---|---|---|---|")
    for m in methods:
        r = results[m]
        ratio = f"{r['seconds'] / plain:.3f}x" if plain else "-"
        print(f"| {m} | {r['seconds']:.2f} | {1 / r['seconds']:.3f} | {ratio} | {r['peak_rss_mb']:.0f} |")
    if not {"tiler", "monai"} <= set(methods):
        return
    print(f"\nMONAI vs synthvit output, ViT: max |diff| of probabilities {diff:.4f}, argmax agreement {agree:.4%} "
          f"(tile predictions of a ViT depend on the tile's position; the two blend overlaps with different windows)")
    print(f"MONAI vs synthvit output, a pointwise model (1x1 conv + softmax, identical predictions in overlaps): "
          f"max |diff| {pointwise_diff(args):.2e}")


def pointwise_diff(args) -> float:
    from monai.inferers import sliding_window_inference

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 1)
    frame = frame_of(args.size)
    def predict(t):
        return conv(t).softmax(1)
    with torch.inference_mode():
        ours = Tiler(args.tile, args.overlap, args.batch)(frame, predict, 8, transform=lambda t: t / 255)
        theirs = sliding_window_inference(frame.float()[None] / 255, (args.tile, args.tile), args.batch, predict,
                                          overlap=args.overlap, mode="gaussian")[0]
    return (ours - theirs).abs().max().item()


if __name__ == "__main__":
    main()
