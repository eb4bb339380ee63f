"""Pretraining speed on this machine, side by side in one run.

1. Loop overhead: images/s of the full `synthvit pretrain` step (data loading, CutMix, optimizer, EMA-free,
   logging) against the bare model's forward + backward + AdamW step on one fixed batch of the same size, for each
   ``--loaders`` choice (``workers``: DataLoader processes; ``main``: the same roles decoded in the training
   process; ``auto``: what pretrain picks on this machine) and ``--caches`` size (``cache_mb``: 0 reads and decodes
   every sample every epoch; the default dataset is 512 samples, 7.5 epochs of the 60 steps), timed in ``--rounds``
   interleaved rounds, best kept.
2. Data pipeline alone: samples/s of the training stream (decode + augment + batch) per worker, against merely
   decoding the same JPEGs (the limit a worker can approach).
3. Against timm's own training path on the same shards, model, batch, CutMix and workers: timm's wds reader
   (`create_dataset("wds/...")`), `create_loader` with train augmentation, timm `Mixup`, AdamW, grad clipping --
   the calls timm's `train.py` makes (train.py itself is not shipped in the timm wheel, so the loop is restated
   here with timm's public functions).

    python benchmarks/bench_pretrain.py [--data shards/demo] [--model vit_tiny_patch16_224] [--size 64]
                                        [--batch 64] [--steps 60] [--workers 2] [--loaders workers,main]

``--profile-stream`` does none of that: it times one loader role's stream in this process and prints cProfile's
own time per function over as many batches again -- where a sample's data time goes.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from timm.optim import create_optimizer_v2

from generate.config import GenerateConfig
from generate.run import run as generate
from pretrain.config import OptimConfig
from pretrain.data import StreamSpec, batches_per_epoch, load_sources, make_loader
from synthvit.models import create_backbone
from synthvit.training import resolve_precision, set_attention


def bare_step_rate(model_name: str, size: int, batch: int, steps: int, num_classes: int, precision: str) -> float:
    """The model alone: forward, backward and the very optimizer the loop uses (AdamW, fused as ``optim.fused``
    defaults), in the loop's precision and attention kernel (``attention=auto``), on one fixed batch."""
    torch.manual_seed(0)
    model = create_backbone(model_name, num_classes, size, 3, 0.1)
    set_attention(model, "auto", "cpu")
    opt = create_optimizer_v2(model, "adamw", lr=1e-4, weight_decay=0.05, fused=OptimConfig().fused)
    x = torch.randn(batch, 3, size, size)
    y = torch.randn(batch, num_classes).softmax(-1)
    bf16 = resolve_precision(precision) == "bf16"
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = torch.sum(-y * torch.log_softmax(logits.float(), -1), -1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(3):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t)


def bare_step_rate_fresh(model_name: str, size: int, batch: int, steps: int, num_classes: int, precision: str) -> float:
    """``bare_step_rate`` in a fresh Python process, as the full step runs: one process's state (the allocator
    after generating the data, imports) moved the bare rate by up to 25 % against the same code in a new process."""
    out = subprocess.run([sys.executable, __file__, "--bare-only", "--model", model_name, "--size", str(size),
                          "--batch", str(batch), "--steps", str(steps), "--precision", precision, "--data", "-"],
                         check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


def full_step_rate(data: str, model_name: str, size: int, batch: int, steps: int, workers: int,
                   precision: str, loader: str = "auto", cache_mb: int = 1024) -> float:
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "synthvit", "pretrain", f"data=[{data}]", f"out_dir={d}/run",
               f"model={model_name}", f"image_size={size}", f"batch_size={batch}", f"steps={steps}",
               f"num_workers={workers}", f"loader={loader}", f"cache_mb={cache_mb}", "log_every=10", f"save_every={steps}", "optim.warmup_steps=5",
               f"precision={precision}"]
        subprocess.run(cmd, check=True, capture_output=True)
        records = [json.loads(line) for line in (Path(d) / "run" / "metrics.jsonl").read_text().splitlines()]
    steady = records[1:]  # the first window holds start-up (worker spawn, first batches)
    return sum(r["images_per_s"] for r in steady) / len(steady)


def tar_member_rates(data: str, rounds: int = 5) -> tuple[float, float]:
    """Members/s of the dataset's shards (in memory) through webdataset's ``tar_file_iterator`` (Python's tarfile)
    and through the shard contract's ``tar_members``, interleaved, best of ``rounds``."""
    import webdataset as wds

    from generate.schema import tar_members

    sources, _ = load_sources([data], [], [])
    blobs = [Path(u).read_bytes() for u in sources[0].urls]
    readers = {"tarfile": lambda b: wds.tariterators.tar_file_iterator(io.BytesIO(b)),
               "tar_members": lambda b: tar_members(io.BytesIO(b))}
    best = dict.fromkeys(readers, 0.0)
    for _ in range(rounds):
        for name, read in readers.items():
            t = time.perf_counter()
            n = sum(1 for b in blobs for _ in read(b))
            best[name] = max(best[name], n / (time.perf_counter() - t))
    return best["tarfile"], best["tar_members"]


def one_role_stream(data: str, size: int, batch: int):
    """Pretrain's stream of one loader role in this process (no IPC), its first batch taken; and the sources."""
    sources, _ = load_sources([data], [], [])
    spec = StreamSpec(sources, batch, size, 3, (0.25, 1.0), 0.2, False, 0, 0, 1, 1, True, 1000,
                      batches_per_epoch(sources[0].num_samples, batch, 1, 1))
    it = iter(make_loader(spec, 0))
    next(it)
    return it, sources


def profile_stream(data: str, size: int, batch: int, batches: int = 20, top: int = 15) -> None:
    """Samples/s of one role's stream, then cProfile's own time per function over as many batches again."""
    it, _ = one_role_stream(data, size, batch)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    print(f"one role's stream, unprofiled: {batches * batch / (time.perf_counter() - t):,.0f} samples/s")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(batches):
        next(it)
    prof.disable()
    print(f"cProfile over {batches * batch} samples (its own overhead included), by own time:")
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def pipeline_rate(data: str, size: int, batch: int, batches: int) -> tuple[float, float]:
    it, sources = one_role_stream(data, size, batch)  # in this process: one worker's work, no IPC
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    stream = batches * batch / (time.perf_counter() - t)
    jpgs = []
    for url in sources[0].urls:
        with tarfile.open(url) as tar:
            jpgs += [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]
    t = time.perf_counter()
    for b in jpgs:
        with Image.open(io.BytesIO(b)) as im:
            im.load()
    return stream, len(jpgs) / (time.perf_counter() - t)


def timm_path_rate(data: str, model_name: str, size: int, batch: int, steps: int, workers: int) -> float:
    import timm
    from timm.data import Mixup, create_dataset, create_loader, resolve_data_config
    from timm.loss import SoftTargetCrossEntropy

    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=8, img_size=size, drop_path_rate=0.1)
    data_cfg = resolve_data_config({}, model=model)
    ds = create_dataset("wds/synthvit", root=data, split="train", is_training=True, batch_size=batch)
    loader = create_loader(ds, input_size=(3, size, size), batch_size=batch, is_training=True, use_prefetcher=False,
                           scale=(0.25, 1.0), hflip=0.5, vflip=0.5, color_jitter=0.2, interpolation="bilinear",
                           mean=data_cfg["mean"], std=data_cfg["std"], num_workers=workers,
                           persistent_workers=workers > 0)
    mixup = Mixup(cutmix_alpha=0.7, mixup_alpha=0.0, label_smoothing=0.1, num_classes=8)
    opt = create_optimizer_v2(model, "adamw", lr=1e-4, weight_decay=0.05)
    loss_fn = SoftTargetCrossEntropy()
    done, t = 0, None
    while done < steps + 5:
        for x, y in loader:
            if done == 5:
                t = time.perf_counter()  # after 5 warm-up steps, like the first skipped window of ours
            x, y = mixup(x, y)
            loss = loss_fn(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            done += 1
            if done == steps + 5:
                break
    return steps * batch / (time.perf_counter() - t)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="", help="a synthvit dataset (default: generate 512 samples at 256 px)")
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--workers", type=int, default=2, help="num_workers (loader roles; pretrain's default 2)")
    ap.add_argument("--loaders", default="workers,main", help="loader choices to time side by side")
    ap.add_argument("--caches", default="1024,0", help="cache_mb values to time side by side (0: off)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; each rate keeps its best")
    ap.add_argument("--precision", default="auto", help="the loop's precision (and the bare step's): auto, no, bf16")
    ap.add_argument("--bare-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--profile-stream", action="store_true",
                    help="only profile one loader role's stream (where a sample's data time goes), then stop")
    args = ap.parse_args(argv)
    if args.bare_only:  # one bare measurement, for bare_step_rate_fresh
        print(bare_step_rate(args.model, args.size, args.batch, args.steps, 8, args.precision))
        return
    with tempfile.TemporaryDirectory() as d:
        data = args.data
        if not data:
            data = str(Path(d) / "ds")
            generate(GenerateConfig(out_dir=data, num_samples=512, samples_per_shard=64, image_size=256,
                                    num_workers=2, preview=0))
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
              f"({torch.get_num_threads()} threads), Python {platform.python_version()}")
        if args.profile_stream:
            return profile_stream(data, args.size, args.batch)
        print(f"\n1. loop overhead: {args.model} at {args.size}px, batch {args.batch}, {args.steps} steps, "
              f"num_workers {args.workers}, precision {args.precision} "
              f"({resolve_precision(args.precision)})")
        runs = [(loader, int(mb)) for loader in args.loaders.split(",") for mb in args.caches.split(",")]
        bare, full = 0.0, dict.fromkeys(runs, 0.0)
        for _ in range(args.rounds):
            bare = max(bare, bare_step_rate_fresh(args.model, args.size, args.batch, args.steps, 8, args.precision))
            for loader, mb in runs:
                full[loader, mb] = max(full[loader, mb], full_step_rate(
                    data, args.model, args.size, args.batch, args.steps, args.workers, args.precision, loader, mb))
        print("| loader | cache_mb | bare fwd+bwd+AdamW img/s | full synthvit step img/s | overhead |")
        print("|---|---|---|---|---|")
        for (loader, mb), rate in full.items():
            print(f"| {loader} | {mb} | {bare:.1f} | {rate:.1f} | {bare / rate - 1:+.1%} |")
        stream, decode = pipeline_rate(data, args.size, args.batch, 20)
        print(f"\n2. data pipeline, one worker, {args.size}px crops from 256 px JPEGs")
        print("| stream (decode+augment+batch) samples/s | decode-only samples/s | ratio |")
        print("|---|---|---|")
        print(f"| {stream:.1f} | {decode:.1f} | {stream / decode:.1%} |")
        old, new = tar_member_rates(data)
        print("\n| tar members/s: tarfile (webdataset's reader) | tar_members (synthvit's) | ratio |")
        print("|---|---|---|")
        print(f"| {old:,.0f} | {new:,.0f} | {new / old:.2f}x |")
        timm_rate = timm_path_rate(data, args.model, args.size, args.batch, args.steps, args.workers)
        full = next((r for (loader, _), r in full.items() if loader == "workers"), next(iter(full.values())))
        print(f"\n3. same shards, model, batch, CutMix and {args.workers} worker(s): timm's training path vs synthvit")
        print("| timm wds reader + create_loader + Mixup img/s | synthvit pretrain img/s | synthvit / timm |")
        print("|---|---|---|")
        print(f"| {timm_rate:.1f} | {full:.1f} | {full / timm_rate:.2f}x |")


if __name__ == "__main__":
    main()
