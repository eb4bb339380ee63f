"""4K inference per model and runtime, side by side (issue 36): PyTorch eager against the folders `synthvit export`
writes -- ONNX Runtime fp32, OpenVINO fp32 and OpenVINO int8 -- through the same tiler, blending and decision.

Speed: for each model a finetune run is made on a few tiny frames (1 step, random weights but for the step; tile
512), exported per runtime, and each (model, runtime) runs in its own process (so its peak RSS is its own) over
``--frames`` frames of ``--size``: seconds per frame, frames/s, the ratio to PyTorch eager and peak RSS.

Accuracy (``--runs RUN ...``, finished finetune runs): each run's test split evaluated through every runtime (int8
calibrated on the run's training frames): pixel AP, defect IoU at the run's decision, image AUROC; int8's loss is
the difference to fp32.

    python benchmarks/bench_deploy.py [--size 3840x2160] [--models vit_tiny_patch16_224:dpt-skip,...]
    python benchmarks/bench_deploy.py --runs runs/my-run --runtimes torch,onnx,openvino,openvino-int8 --no-speed
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

import numpy as np

RUNTIMES = {"torch": None, "onnx": ("onnx", "fp32"), "openvino": ("openvino", "fp32"),
            "openvino-int8": ("openvino", "int8"), "onnx-int8": ("onnx", "int8")}
DEFAULT_MODELS = "vit_tiny_patch16_224:dpt-skip,vit_small_patch16_224:dpt-skip,vit_small_r26_s32_224:dpt-skip," \
                 "deeplabv3plus_resnet50"


def cli(*args: str) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-m", "synthvit", *args], check=True, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def tiny_data(root: Path) -> Path:
    """Six 600 x 600 frames with a dark square defect (canonical layout), enough for a one-step run at tile 512."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    for i in range(6):
        img = rng.integers(90, 160, (600, 600, 3), dtype=np.uint8)
        mask = np.zeros((600, 600), np.uint8)
        mask[200 + 20 * i:260 + 20 * i, 250:330] = 1
        img[mask > 0] = 30
        Image.fromarray(img).save(root / "images" / f"f{i}.png")
        Image.fromarray(mask * 255).save(root / "masks" / f"f{i}.png")
    return root


def make_run(work: Path, spec: str, tile: int) -> Path:
    name, _, decoder = spec.partition(":")
    run = work / "runs" / spec.replace(":", "-")
    if not (run / "export").is_dir():
        cli("finetune", f"data={tiny_data(work / 'data')}", f"out_dir={run}", f"model={name}", f"crop_size={tile}",
            "steps=1", "batch_size=2", "num_workers=0", "evaluate=false", f"tiling.tile={tile}",
            *([f"decoder={decoder}"] if decoder else []))
    return run


def exported(run: Path, runtime: str, out: Path) -> Path:
    fmt, precision = RUNTIMES[runtime]
    folder = out / f"{run.name}-{runtime}"
    if not (folder / "deploy.json").is_file():
        cli("export", f"checkpoint={run}", f"format={fmt}", f"precision={precision}", f"out={folder}",
            "exporter=torchscript", "calibration_tiles=32", "overwrite=true")
    return folder


def predictor_of(target: str):
    import torch

    if (Path(target) / "deploy.json").is_file():
        from finetune.deploy import load_deployed

        return load_deployed(target).predictor()
    from finetune.artifacts import load_run

    return load_run(target).predictor(torch.device("cpu"))


def frame_of(size: str) -> np.ndarray:
    w, h = (int(v) for v in size.split("x"))
    rng = np.random.default_rng(0)
    low = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    from PIL import Image

    return np.asarray(Image.fromarray(low).resize((w, h), Image.BILINEAR))


def time_one(target: str, size: str, frames: int) -> dict:
    """Seconds per frame of ``target`` (a run or a deploy folder) after one warm-up frame, and peak RSS."""
    predictor = predictor_of(target)
    frame = frame_of(size)
    predictor(frame)
    t0 = time.perf_counter()
    for _ in range(frames):
        predictor(frame)
    seconds = (time.perf_counter() - t0) / frames
    return {"s_per_frame": round(seconds, 3), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                                                   / 1024)}


def speed(args) -> list[dict]:
    work = Path(args.workdir)
    rows = []
    for spec in args.models.split(","):
        run = make_run(work, spec, args.tile)
        base = None
        for runtime in args.runtimes.split(","):
            target = run if runtime == "torch" else exported(run, runtime, work / "deploy")
            out = subprocess.run([sys.executable, __file__, "--one", str(target), "--size", args.size, "--frames",
                                  str(args.frames)], capture_output=True, text=True, check=True,
                                 env=dict(os.environ, HF_HUB_OFFLINE="1"))
            r = json.loads(out.stdout.strip().splitlines()[-1])
            base = r["s_per_frame"] if runtime == "torch" else base
            rows.append({"model": spec, "runtime": runtime, **r,
                         "vs_torch": round(base / r["s_per_frame"], 2) if base else None})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def accuracy(args) -> list[dict]:
    import torch

    from finetune.artifacts import load_run, read_split
    from finetune.evaluate import evaluate
    from synthvit.data import load_real_data

    rows = []
    work = Path(args.workdir)
    for run_dir in args.runs:
        run = load_run(run_dir)
        split = read_split(run_dir) or {}
        data = load_real_data(Path(run.cfg.data), run.cfg.format, check=False, split_missing=run.cfg.split_missing)
        test = sorted((i for i in data.items if split.get(i.id) == "test"), key=lambda i: i.id)[:args.test_frames or None]
        for runtime in args.runtimes.split(","):
            target = run_dir if runtime == "torch" else exported(Path(run_dir), runtime, work / "deploy")
            torch.set_num_threads(os.cpu_count() or 1)
            m = evaluate(predictor_of(str(target)), data, test, run.meta.in_chans)
            rows.append({"run": str(run_dir), "runtime": runtime, "frames": len(test),
                         "pixel_ap": round(m["pixel"]["defect_ap"], 4),
                         "defect_iou": round(float(np.mean(list(m["pixel"]["iou"].values())[1:])), 4),
                         "image_auroc": m["image"]["auroc"] and round(m["image"]["auroc"], 4),
                         "s_per_frame": m["speed"]["seconds_per_image"]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict], keys: list[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join("" if r.get(k) is None else str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=DEFAULT_MODELS)
    p.add_argument("--runtimes", default="torch,onnx,openvino,openvino-int8")
    p.add_argument("--size", default="3840x2160")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--frames", type=int, default=2)
    p.add_argument("--runs", nargs="*", default=[])
    p.add_argument("--test-frames", type=int, default=0, help="accuracy: the first N test frames (0: all)")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--workdir", default="")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(time_one(args.one, args.size, args.frames)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        args.workdir = args.workdir or tmp
        print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.size}, tile "
              f"{args.tile}, {args.frames} frame(s) after a warm-up", flush=True)
        if not args.no_speed:
            rows = speed(args)
            print(table(rows, ["model", "runtime", "s_per_frame", "vs_torch", "peak_rss_mb"]))
        if args.runs:
            rows = accuracy(args)
            print(table(rows, ["run", "runtime", "frames", "pixel_ap", "defect_iou", "image_auroc", "s_per_frame"]))


if __name__ == "__main__":
    main()
