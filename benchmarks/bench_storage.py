"""Object storage against local disk, side by side in one run: a real S3 server (SeaweedFS, started here on
127.0.0.1, the one the tests use) and a local folder, on the same machine and the same shards.

  generate  - `synthvit generate` (procedural, ``--workers`` processes) into a local folder and into s3://: samples/s
  stream    - the pretrain stream (decode + augment + batch, one worker role in this process) over the same shards,
              local and s3://: samples/s per worker

Each measurement runs ``--repeats`` times, alternating local and s3, and the best of each is kept (the machine is
shared: the best is the least disturbed); the last column is s3 as a share of local. Aim (issue: object storage):
>= 80 % for both.

    python benchmarks/bench_storage.py [--samples 2000] [--size 256] [--per-shard 100] [--workers 2] [--repeats 2]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from s3server import SeaweedS3  # noqa: E402


def generate(out: str, args) -> float:
    from generate.config import GenerateConfig
    from generate.run import run
    from synthvit.config import load_config

    cfg = load_config(GenerateConfig, overrides=[
        f"out_dir={out}", f"num_samples={args.samples}", f"samples_per_shard={args.per_shard}",
        f"image_size={args.size}", f"num_workers={args.workers}", "preview=0"])
    t = time.perf_counter()
    run(cfg)
    return args.samples / (time.perf_counter() - t)


def stream(data: str, args) -> float:
    from pretrain.data import StreamSpec, batches_per_epoch, load_sources, make_loader

    sources, _ = load_sources([data], [], [])
    n_batches = args.stream_samples // args.batch
    spec = StreamSpec(sources=sources, batch_size=args.batch, image_size=args.image_size, in_chans=3,
                      scale=(0.3, 1.0), jitter=0.2, with_mask=True, seed=0, rank=0, world=1, workers=1,
                      resample=False, shuffle_buffer=100,
                      batches_per_epoch=batches_per_epoch(args.samples, args.batch, 1, 1))
    it = iter(make_loader(spec, 0))
    next(it)  # opens the client, fills the shuffle buffer's first shard
    t = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches * args.batch / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--per-shard", type=int, default=100)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--stream-samples", type=int, default=1024)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp, SeaweedS3(Path(tmp) / "s3") as s3:
        os.environ.update(s3.env)
        best = {"generate": {"local": 0.0, "s3": 0.0}, "stream": {"local": 0.0, "s3": 0.0}}
        for r in range(args.repeats):
            where = {"local": str(Path(tmp) / f"local-{r}"), "s3": s3.url(f"bench-{r}")}
            for kind in ("local", "s3"):
                best["generate"][kind] = max(best["generate"][kind], generate(where[kind], args))
            for kind in ("local", "s3"):
                best["stream"][kind] = max(best["stream"][kind], stream(where[kind], args))
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
              f"{args.samples} samples of {args.size} px in shards of {args.per_shard}; generate with "
              f"{args.workers} workers; stream: batches of {args.batch} at {args.image_size} px, one worker; "
              f"best of {args.repeats}")
        print("| measurement | local disk samples/s | S3 (SeaweedFS, 127.0.0.1) samples/s | S3 / local |")
        print("|---|---|---|---|")
        for name, row in best.items():
            print(f"| {name} | {row['local']:.1f} | {row['s3']:.1f} | {100 * row['s3'] / row['local']:.0f} % |")


if __name__ == "__main__":
    main()
