"""Real data: does synthetic pretraining pay on magnetic tiles? ViT from scratch vs ViT from a synthvit pretrain
export vs DeepLabV3+-R50, at equal budgets (steps, batch, crop, augmentation), test metrics at full resolution.

    python benchmarks/bench_finetune_real.py [--data ../shared/datasets/magnetic-tile] [--steps 300] [--crop 128]
        [--batch 8] [--pretrain-steps 600] [--work runs/bench-real]

Steps: 1. procedural shards (grayscale, 256 px); 2. pretrain vit_tiny on them (cls+seg, CutMix); 3. fine-tune the
three models on the real train split (task=seg); 4. print a table of test mIoU, defect IoU, pixel AP, image AUROC,
seconds per image and training time. Everything runs through the `synthvit` CLI, as a user would.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from finetune.artifacts import read_metrics  # noqa: E402
from generate.schema import INFO_FILE  # noqa: E402
from synthvit.models.export import EXPORT_CONFIG, EXPORT_DIR  # noqa: E402


def synthvit(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "synthvit", *map(str, args)], check=True, cwd=ROOT,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "magnetic-tile"))
    ap.add_argument("--work", default="runs/bench-real")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--defect-prob", type=float, default=0.5, help="defect_crop_prob")
    ap.add_argument("--runs", default="", help="folder for the fine-tune runs (default: --work)")
    args = ap.parse_args(argv)
    work = Path(args.work)
    shards, pre = work / "shards", work / "pretrain"
    if not (shards / INFO_FILE).is_file():
        synthvit("generate", f"out_dir={shards}", f"num_samples={args.samples}", "samples_per_shard=250",
                 "image_size=256", "num_workers=2", "procedural.gray_prob=1.0", "preview=16")
    if not (pre / EXPORT_DIR / EXPORT_CONFIG).is_file():
        synthvit("pretrain", f"data=[{shards}]", f"out_dir={pre}", "model=vit_tiny_patch16_224", "in_chans=3",
                 f"image_size={args.crop}", "batch_size=32", f"steps={args.pretrain_steps}", "objective=cls+seg",
                 "num_workers=1", "optim.lr=2e-3", "optim.warmup_steps=50", "save_every=200", "log_every=50")
    common = [f"data={args.data}", "task=seg", f"crop_size={args.crop}", f"steps={args.steps}",
              f"batch_size={args.batch}", "num_workers=1", f"optim.lr={args.lr}", "log_every=50",
              f"defect_crop_prob={args.defect_prob}"]
    runs = Path(args.runs or args.work)
    cells = {"vit_tiny scratch": ["model=vit_tiny_patch16_224"],
             "vit_tiny synthvit-pretrained": ["model=vit_tiny_patch16_224", f"init={pre / EXPORT_DIR}"],
             "deeplabv3plus_resnet50": ["model=deeplabv3plus_resnet50"]}
    rows = []
    for name, extra in cells.items():
        run = runs / name.replace(" ", "_")
        if read_metrics(run) is None:
            synthvit("finetune", f"out_dir={run}", *common, *extra)
        m = read_metrics(run)
        rows.append((name, m))
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores; data {args.data}; task seg; "
          f"{args.steps} steps x batch {args.batch} at {args.crop} px crops, lr {args.lr}, defect_crop_prob "
          f"{args.defect_prob}; test at full resolution")
    print("| model | test mIoU | defect IoU | pixel AP | image AUROC | s/image | train s | params |")
    print("|---|---|---|---|---|---|---|---|")
    for name, m in rows:
        p, i = m["pixel"], m["image"]
        print(f"| {name} | {p['miou']:.4f} | {p['iou']['defect']:.4f} | {p['defect_ap']:.4f} | "
              f"{i['auroc']:.4f} | {m['speed']['seconds_per_image']:.3f} | {m['train_wall_s']:.0f} | "
              f"{m['parameters'] / 1e6:.1f} M |")


if __name__ == "__main__":
    main()
