"""Fine-tuning budgets that learn: sweep (steps x batch x crop, LR) for one model on real data and print, per
budget, test defect IoU, mIoU, pixel AP and image AUROC at full resolution, and the training time.

    python benchmarks/sweep_budget.py [--data ../shared/datasets/magnetic-tile] [--model deeplabv3plus_resnet50]
        [--budgets 500x8x128@5e-4,2000x8x128@5e-4,2000x16x128@1e-3] [--work runs/sweep-budget] [--threads 2]

A budget is ``STEPSxBATCHxCROP@LR``. Every run is a ``synthvit finetune`` (task=seg, ce+dice, half the crops centred
on defects, seed 0) in ``<work>/<model>/<budget>/``; finished runs (their metrics.json) are skipped, so the sweep
resumes. The table also goes to ``<work>/<model>/sweep.md``.
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


def parse_budget(text: str) -> dict:
    shape, _, lr = text.partition("@")
    steps, batch, crop = (int(v) for v in shape.lower().split("x"))
    return {"steps": steps, "batch_size": batch, "crop_size": crop, "optim.lr": float(lr or 5e-4)}


def run(model: str, data: str, budget: str, folder: Path, threads: int, extra: list[str]) -> dict:
    if read_metrics(folder) is None:
        keys = [f"{k}={v}" for k, v in parse_budget(budget).items()]
        cmd = [sys.executable, "-m", "synthvit", "finetune", f"data={data}", f"out_dir={folder}", f"model={model}",
               "task=seg", "num_workers=1", "log_every=50", *keys, *extra]
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder.parent / f"{folder.name}.log", "w") as log:
            subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return read_metrics(folder)


def row(budget: str, m: dict) -> str:
    p, i = m["pixel"], m["image"]
    defect = [v for k, v in p["iou"].items() if k != "background"]
    return (f"| {budget} | {sum(defect) / len(defect):.4f} | {p['miou']:.4f} | {p['defect_ap']:.4f} | "
            f"{i['auroc']:.4f} | {m['train_wall_s']:.0f} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "magnetic-tile"))
    ap.add_argument("--model", default="deeplabv3plus_resnet50")
    ap.add_argument("--budgets", default="500x8x128@5e-4,2000x8x128@5e-4,2000x16x128@1e-3")
    ap.add_argument("--work", default="runs/sweep-budget")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("extra", nargs="*", help="more finetune key=value for every run")
    args = ap.parse_args(argv)
    lines = [f"machine: {platform.machine()}, {os.cpu_count()} cores; data {args.data}; model {args.model}, from "
             f"scratch; task seg, ce+dice, test split at full resolution",
             "| budget (steps x batch x crop @ lr) | defect IoU | mIoU | pixel AP | image AUROC | train s |",
             "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for budget in args.budgets.split(","):
        m = run(args.model, args.data, budget, Path(args.work) / args.model / budget, args.threads, args.extra)
        lines.append(row(budget, m))
        print(lines[-1], flush=True)
    (Path(args.work) / args.model / "sweep.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
