"""Images/s of the neural generate backends (StyleGAN, diffusion), with the procedural one for reference.

Each row creates the backend through the registry exactly as `synthvit generate` does, renders one warm-up batch,
then times whole batches (``render_batch``: textures/denoising + procedural defects + masks, numpy out; shard
encoding excluded, see bench_generate.py for that) until ``--row-seconds`` have passed. A row that fails prints
its error in the table instead of stopping the script.

    python benchmarks/bench_neural_generate.py                                  # CPU, small sizes (default)
    python benchmarks/bench_neural_generate.py --device cuda --dtype bf16 --compile

On a GPU: StyleGAN at 256 and 512 px (batch 32; random weights with 128 channels, and StyleGAN2 config-F sized
networks with 512 channels loaded through the checkpoint path), and diffusion inpainting at 512x512 with 30 steps,
batch 16, with a randomly initialised pipeline of Stable Diffusion 1.5's UNet/VAE shapes (no weights can be
downloaded; speed does not depend on weight values). ``--compile`` adds a torch.compile'd UNet row.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import traceback
from pathlib import Path

import torch

from generate.backends import create_backend
from generate.config import GenerateConfig
from synthvit.config import load_config


def cpu_rows(tiny_dirs: dict) -> list[dict]:
    return [
        dict(name="procedural", size=64, batch=8, over=[]),
        dict(name="procedural", size=256, batch=8, over=[]),
        dict(name="stylegan random", size=64, batch=8, over=["stylegan.mode=random"]),
        dict(name="stylegan oriented", size=128, batch=8, over=["stylegan.mode=oriented"]),
        dict(name="stylegan oriented + anomalies", size=128, batch=8,
             over=["stylegan.mode=oriented", "stylegan.anomaly_prob=0.3"]),
        dict(name="diffusion inpaint (tiny), 2 steps", size=64, batch=8, diffusion=tiny_dirs["inpaint"],
             over=["diffusion.steps=2", "defects.defect_free_prob=0"]),
        dict(name="diffusion inpaint (tiny), 10 steps", size=128, batch=8, diffusion=tiny_dirs["inpaint"],
             over=["diffusion.steps=10", "defects.defect_free_prob=0"]),
        dict(name="diffusion img2img (tiny), 2 steps", size=64, batch=8, diffusion=tiny_dirs["img2img"],
             over=["diffusion.mode=img2img", "diffusion.steps=2"]),
        dict(name="diffusion unconditional (tiny), 2 steps", size=64, batch=8, diffusion=tiny_dirs["unconditional"],
             over=["diffusion.mode=unconditional", "diffusion.steps=2"]),
    ]


def gpu_rows(args, ckpt_dir: Path) -> list[dict]:
    """The issue's figure first (eager diffusion), the compiled row last: its compilation is the slowest part."""
    sd = ["diffusion.steps=30", "defects.defect_free_prob=0"]
    rows = [dict(name="diffusion inpaint SD-1.5 shapes, 30 steps", size=512, batch=16, sd15=True, over=sd)]
    for size in (256, 512):
        rows.append(dict(name="stylegan oriented (128 ch)", size=size, batch=32, over=["stylegan.mode=oriented"]))
        rows.append(dict(name="stylegan config-F (512 ch, checkpoint)", size=size, batch=32,
                         stylegan_ckpt=(ckpt_dir, size), over=[]))
    if args.compile:
        rows.append(dict(name="diffusion inpaint SD-1.5 shapes, 30 steps, compiled", size=512, batch=16, sd15=True,
                         over=sd + ["diffusion.compile=true"]))
    return rows


def stylegan_checkpoint(folder: Path, resolution: int) -> Path:
    """A randomly initialised StyleGAN2 config-F generator saved as the backend's safetensors checkpoint."""
    from safetensors.torch import save_file

    from generate.backends.stylegan import FORMAT
    from generate.backends.stylegan.network import Generator

    path = folder / f"stylegan2-f-{resolution}.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        G = Generator(resolution=resolution)
        meta = {"format": FORMAT, "config": json.dumps(G.config)}
        save_file({k: v.contiguous() for k, v in G.state_dict().items()}, str(path), metadata=meta)
    return path


def make_backend(row: dict, args):
    backend_name = "diffusion" if ("diffusion" in row or row.get("sd15")) else (
        "stylegan" if row["name"].startswith("stylegan") else "procedural")
    over = [f"backend={backend_name}", f"image_size={row['size']}", f"seed={args.seed}", *row["over"]]
    if backend_name == "stylegan":
        over += [f"stylegan.batch_size={row['batch']}", f"stylegan.device={args.device}",
                 f"stylegan.dtype={args.dtype}"]
        if "stylegan_ckpt" in row:
            folder, res = row["stylegan_ckpt"]
            over += ["stylegan.mode=checkpoint", f"stylegan.checkpoint={stylegan_checkpoint(folder, res)}"]
    if backend_name == "diffusion":
        over += [f"diffusion.batch_size={row['batch']}", f"diffusion.device={args.device}",
                 f"diffusion.dtype={args.dtype}", f"diffusion.weights={row.get('diffusion', 'in-memory')}"]
    cfg = load_config(GenerateConfig, overrides=over)
    if row.get("sd15"):
        return sd15_backend(cfg)
    return create_backend(backend_name, cfg)


def sd15_backend(cfg):
    """The diffusion backend with an in-memory random SD-1.5-shaped pipeline (saving 4 GB to disk is not the point;
    everything after ``from_pretrained`` is the backend's own path)."""
    import generate.backends.diffusion as diffusion
    from generate.backends.diffusion.loading import prepare_pipeline
    from generate.backends.diffusion.random_init import make_pipeline

    device = "cuda" if torch.cuda.is_available() and cfg.diffusion.device != "cpu" else "cpu"
    pipe = make_pipeline("inpaint", "sd15", device=device)
    original = diffusion.load_pipeline
    diffusion.load_pipeline = lambda path, mode, dev, dtype, compile_unet: prepare_pipeline(pipe, dev, dtype,
                                                                                             compile_unet)
    try:
        return diffusion.DiffusionBackend(cfg)
    finally:
        diffusion.load_pipeline = original


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_row(row: dict, args) -> dict:
    result = dict(name=row["name"], size=row["size"], batch=row["batch"])
    try:
        t = time.perf_counter()
        backend = make_backend(row, args)
        result["load_s"] = time.perf_counter() - t
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        batch = list(range(row["batch"]))
        t = time.perf_counter()
        backend.render_batch(batch) if hasattr(backend, "render_batch") else [backend.render(i) for i in batch]
        sync()
        result["warmup_s"] = time.perf_counter() - t
        done, start = 0, time.perf_counter()
        while done == 0 or (time.perf_counter() - start < args.row_seconds and done < args.max_batches * len(batch)):
            idx = [10_000 + done + i for i in batch]
            backend.render_batch(idx) if hasattr(backend, "render_batch") else [backend.render(i) for i in idx]
            done += len(batch)
        sync()
        result["images_per_s"] = done / (time.perf_counter() - start)
        result["n"] = done
        if torch.cuda.is_available():
            result["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    except Exception as e:  # one failing row must not hide the others
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        if args.verbose:
            traceback.print_exc()
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result


def print_table(results: list[dict]) -> None:
    print("| backend | size | batch | images/s | n | warm-up s | load s | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['name']} | {r['size']} | {r['batch']} | ERROR: {r['error']} | | | | |")
            continue
        peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
        print(f"| {r['name']} | {r['size']} | {r['batch']} | {r['images_per_s']:.2f} | {r['n']} | "
              f"{r['warmup_s']:.1f} | {r['load_s']:.1f} | {peak} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu (small sizes) or cuda (the GPU rows)")
    ap.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    ap.add_argument("--compile", action="store_true", help="GPU: add a torch.compile'd diffusion row")
    ap.add_argument("--row-seconds", type=float, default=10.0, help="timed seconds per row (at least one batch)")
    ap.add_argument("--max-batches", type=int, default=20)
    ap.add_argument("--budget-seconds", type=float, default=240.0,
                    help="start no new row after this many seconds (rows already running finish)")
    ap.add_argument("--only", default="", help="run only rows whose name contains this text")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (default: 1 on cpu -- per-core figures, steady on shared machines --, "
                         "torch's default with cuda)")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failing rows")
    args = ap.parse_args()
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # no progress bars or cast notes between the rows
    gpu = args.device.startswith("cuda")
    if args.threads or not gpu:
        torch.set_num_threads(args.threads or 1)
    print(f"# {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}"
          + (f", {torch.cuda.get_device_name(0)}" if gpu and torch.cuda.is_available() else "")
          + f"; device={args.device} dtype={args.dtype}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if gpu:
            rows = gpu_rows(args, tmp)
        else:
            from generate.backends.diffusion.random_init import build_pipeline
            rows = cpu_rows({k: build_pipeline(tmp / k, k) for k in ("inpaint", "img2img", "unconditional")})
        results, start = [], time.perf_counter()
        for row in rows:
            if args.only and args.only not in row["name"]:
                continue
            if time.perf_counter() - start > args.budget_seconds:
                results.append(dict(name=row["name"], size=row["size"], batch=row["batch"],
                                    error=f"skipped: --budget-seconds {args.budget_seconds:.0f} spent"))
                continue
            results.append(bench_row(row, args))
            r = results[-1]
            print(f"  {r['name']} @ {r['size']}: {r.get('images_per_s', r.get('error'))}", flush=True)
    print()
    print_table(results)


if __name__ == "__main__":
    main()
