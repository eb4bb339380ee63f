"""Generation speed per core against the JPEG-encode-only limit, at 512x512 and 3840x2160.

For each size, in one process (one core) and side by side:
  render      - the procedural renderer alone (image + mask + metadata in memory)
  write-only  - encoding already-rendered samples (jpg, mask.png, cls, json) into a tar: generation at zero render cost
  generate    - render + write + sha256: what `synthvit generate` does per shard
  encode-only - JPEG-encoding the very same final images at the same quality (the limit this stage can approach)
and the ratios generate/encode-only and write-only/encode-only (the ceiling any renderer could reach).
Then the whole CLI stage with all cores (workers) for the wall rate.

With ``--profile`` it instead profiles one shard's worth of ``generate`` (render + write + sha256) per size under
cProfile and prints where each sample's milliseconds go: the surface, each camera step, the defects, then the
JPEG, the mask PNG, the JSON/tar and the hash (cumulative times of those functions, per sample):

    OMP_NUM_THREADS=1 python benchmarks/bench_generate.py --profile --samples 200 --samples-4k 8

    python benchmarks/bench_generate.py [--samples 200] [--samples-4k 12] [--workers 2]

With ``--backends procedural,contours`` it instead compares backends, one process (one core) each in turn, at
``--backend-size`` (default 256): render (image + mask + metadata) and generate (render + write + sha256)
samples/s per core, one row per backend (set OMP_NUM_THREADS=1 to keep numpy on one core). ``--backgrounds FOLDER``
adds a row ``procedural+bg``: the procedural defects drawn into FOLDER's defect-free images (``procedural.backgrounds``),
its render rate with every background decoded for the first time (cold) and decoded already (warm: a long run).
``--copypaste-data FOLDER`` is the real-data folder of ``copypaste`` in ``--backends`` (its defects cut out once,
before timing; render cold and warm as for backgrounds):

    OMP_NUM_THREADS=1 python benchmarks/bench_generate.py --backends procedural,copypaste \
        --copypaste-data ../shared/datasets/magnetic-tile --samples 400
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import tempfile
import time
from pathlib import Path

import webdataset as wds
from PIL import Image

from generate.backends import create_backend
from generate.config import CopyPasteConfig, GenerateConfig, ProceduralConfig
from generate.run import run
from generate.schema import encode_sample
from generate.writer import TAR_MTIME, ShardPlan, tune_allocator, write_shard


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def bench_size(size: str, n: int, quality: int = 95) -> dict:
    cfg = GenerateConfig(image_size=size, num_samples=n, samples_per_shard=n, jpeg_quality=quality)
    backend = create_backend("procedural", cfg)
    backend.render(10_000)  # warm-up (allocator, caches)
    t = time.perf_counter()
    samples = [backend.render(i) for i in range(n)]
    render_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        write_shard(backend, ShardPlan(0, 0, n), Path(d), cfg)
        generate_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as d, open(Path(d) / "w.tar", "wb") as f:
        writer = wds.TarWriter(f, encoder=False, mtime=TAR_MTIME)
        t = time.perf_counter()
        for i, s in enumerate(samples):
            writer.write(encode_sample(i, s, "jpg", quality))
        writer.close()
        write_s = time.perf_counter() - t
    images = [Image.fromarray(s.image) for s in samples]
    t = time.perf_counter()
    for im in images:
        im.save(io.BytesIO(), format="JPEG", quality=quality)
    encode_s = time.perf_counter() - t
    return dict(size=size, n=n, render=_rate(n, render_s), write=_rate(n, write_s), generate=_rate(n, generate_s),
                encode=_rate(n, encode_s), ratio=encode_s / generate_s, ceiling=encode_s / write_s)


def bench_backend(name: str, size: str, n: int, quality: int = 95, backgrounds: str = "",
                  copypaste_data: str = "") -> dict:
    """Render-only and render+write rates of backend ``name`` at ``size``, in this process (one core); with
    ``backgrounds`` (or backend copypaste, ``copypaste_data``) the first render pass decodes the frames (cold) and a
    second one is timed too (warm). Creating the backend (copypaste: cutting the defects out) is not timed."""
    cfg = GenerateConfig(backend=name, image_size=size, num_samples=n, samples_per_shard=n, jpeg_quality=quality,
                         procedural=ProceduralConfig(backgrounds=backgrounds),
                         copypaste=CopyPasteConfig(data=copypaste_data))
    backend = create_backend(name, cfg)
    label = name + ("+bg" if backgrounds else "")
    backgrounds = backgrounds or copypaste_data
    backend.render(10_000)  # warm-up (allocator, caches)
    t = time.perf_counter()
    for i in range(n):
        backend.render(i)
    render_s = time.perf_counter() - t
    warm = None
    if backgrounds:
        t = time.perf_counter()
        for i in range(n):
            backend.render(i)
        warm = _rate(n, time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        write_shard(backend, ShardPlan(0, 0, n), Path(d), cfg)
        generate_s = time.perf_counter() - t
    return dict(backend=label, size=size, n=n, render=_rate(n, render_s),
                generate=_rate(n, generate_s), warm=warm)


# (label, file suffix, function name): the stages of one generated sample, as cProfile names them
STAGES = [("surface (texture family)", "procedural/surfaces.py",
           ("metal", "sintered", "concrete", "fabric", "painted")),
          ("camera: warp", "procedural/camera.py", ("warp",)),
          ("camera: blur (some samples)", "generate/noise.py", ("blur",)),
          ("camera: lighting", "procedural/camera.py", ("lighting",)),
          ("camera: sensor noise", "procedural/camera.py", ("sensor_noise",)),
          ("defects (draw + composite)", "defects/__init__.py", ("draw_defects",)),
          ("camera: jpeg artifacts (some samples)", "procedural/camera.py", ("jpeg_artifacts",)),
          ("defect records (json)", "defects/__init__.py", ("instance_records",)),
          ("float -> uint8", "defects/__init__.py", ("to_uint8",)),
          ("render, all of it", "procedural/__init__.py", ("render",)),
          ("encode sample (jpg + mask png + json)", "generate/schema.py", ("encode_sample",)),
          ("  of which Image.save", "PIL/Image.py", ("save",)),
          ("tar write", "webdataset/writer.py", ("write",)),
          ("sha256 of the shard", "synthvit/io.py", ("sha256_file",)),
          ("write_shard, all of it", "generate/writer.py", ("write_shard",))]


def profile_size(size: str, n: int, quality: int = 95) -> list[tuple[str, float]]:
    """ms per sample of each of ``STAGES`` in ``n`` samples of ``generate`` at ``size`` (cumulative times; cProfile
    adds its own cost to every call, so the whole is ~10-20 % slower than unprofiled)."""
    cfg = GenerateConfig(image_size=size, num_samples=n, samples_per_shard=n, jpeg_quality=quality)
    backend = create_backend("procedural", cfg)
    backend.render(10_000)
    prof = cProfile.Profile()
    with tempfile.TemporaryDirectory() as d:
        prof.enable()
        write_shard(backend, ShardPlan(0, 0, n), Path(d), cfg)
        prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    rows = []
    for label, suffix, names in STAGES:
        ct = sum(v[3] for (file, _, name), v in stats.items()
                 if name in names and file.replace("\\", "/").endswith(suffix))
        rows.append((label, 1000 * ct / n))
        if label == "render, all of it":  # what the render's own line-level numpy work costs (tint, stacking)
            rows.insert(-1, ("render: the rest (its own numpy lines)", rows[-1][1] - sum(ms for _, ms in rows[:-1])))
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:8]
    rows += [(f"top tottime: {Path(f).name}:{name}", 1000 * v[2] / n) for (f, _, name), v in top]
    return rows


def tar_headers(n: int, size: str = "256", quality: int = 95) -> list[tuple[str, float, float, float]]:
    """(mtime, write samples/s, read samples/s, bytes/sample) of the very same encoded samples written with a float
    mtime (a PAX header before every member: synthvit before this was measured) and an int one (today), then read
    back with webdataset's tar iterator, as the pretraining stream does."""
    from webdataset.tariterators import tar_file_iterator

    cfg = GenerateConfig(image_size=size, num_samples=n, samples_per_shard=n, jpeg_quality=quality)
    backend = create_backend("procedural", cfg)
    encoded = [encode_sample(i, backend.render(i), "jpg", quality) for i in range(n)]
    rows = []
    for mtime in (0.0, 0):
        buf = io.BytesIO()
        t = time.perf_counter()
        writer = wds.TarWriter(buf, encoder=False, mtime=mtime, user="synthvit", group="synthvit")
        for sample in encoded:
            writer.write(sample)
        writer.close()
        write_s = time.perf_counter() - t
        raw = buf.getvalue()
        t = time.perf_counter()
        for _ in tar_file_iterator(io.BytesIO(raw)):
            pass
        read_s = time.perf_counter() - t
        rows.append((repr(mtime), _rate(n, write_s), _rate(n, read_s), len(raw) / n))
    return rows


def bench_stage(size: str, n: int, workers: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        cfg = GenerateConfig(image_size=size, num_samples=n, samples_per_shard=max(1, n // (4 * workers)),
                             num_workers=workers, preview=0, out_dir=str(Path(d) / "ds"))
        t = time.perf_counter()
        run(cfg)
        return _rate(n, time.perf_counter() - t)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=200, help="samples at 512x512")
    ap.add_argument("--samples-4k", type=int, default=12, help="samples at 3840x2160")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--backends", default="", help="compare these backends (comma-separated) instead")
    ap.add_argument("--backend-size", default="256", help="image size for --backends")
    ap.add_argument("--backgrounds", default="", help="with --backends: add procedural into this folder's frames")
    ap.add_argument("--copypaste-data", default="", help="with --backends ...,copypaste: its real-data folder")
    ap.add_argument("--profile", action="store_true", help="where each sample's time goes, per stage")
    args = ap.parse_args(argv)
    if "copypaste" in args.backends.split(",") and not args.copypaste_data:
        ap.error("--backends copypaste needs --copypaste-data FOLDER (a real-data folder with labelled defects)")
    tune_allocator()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{platform.platform()}")
    if args.profile:
        for size, n in (("512", args.samples), ("3840x2160", args.samples_4k)):
            print(f"\n{size}, {n} samples under cProfile, ms per sample (cumulative):")
            for label, ms in profile_size(size, n):
                print(f"| {label:40} | {ms:9.2f} |")
        print(f"\ntar headers, {args.samples} samples of 256 px (jpg + mask.png + cls + json), one core:")
        print("| mtime | write samples/s | read samples/s | bytes/sample |")
        print("|---|---|---|---|")
        for mtime, w, r, b in tar_headers(args.samples):
            print(f"| {mtime} | {w:.0f} | {r:.0f} | {b:.0f} |")
        return
    if args.backends:
        print(f"\nper core (one process), {args.backend_size} px, jpg q95, samples/s:")
        print(f"| {'backend':>14} | {'n':>4} | {'render':>8} | {'generate':>9} | {'render warm':>11} | vs procedural |")
        print(f"|{'-' * 16}|{'-' * 6}|{'-' * 10}|{'-' * 11}|{'-' * 13}|{'-' * 15}|")
        runs = [(name.strip(), "") for name in args.backends.split(",")]
        runs += [("procedural", args.backgrounds)] if args.backgrounds else []
        base = None
        for name, folder in runs:
            r = bench_backend(name, args.backend_size, args.samples, backgrounds=folder,
                              copypaste_data=args.copypaste_data if name == "copypaste" else "")
            base = r["generate"] if name == "procedural" and not folder else base
            warm = f"{r['warm']:11.1f}" if r["warm"] else f"{'':>11}"
            ratio = f"{r['generate'] / base:13.0%}" if base else f"{'':>13}"
            print(f"| {r['backend']:>14} | {r['n']:>4} | {r['render']:8.1f} | {r['generate']:9.1f} | {warm} | {ratio} |")
        return
    print("\nper core (one process), samples/s:")
    print(f"| {'size':>10} | {'n':>4} | {'render':>8} | {'write-only':>10} | {'generate':>9} | {'encode-only':>11} "
          f"| generate/encode | write-only/encode | generate/write-only |")
    print(f"|{'-' * 12}|{'-' * 6}|{'-' * 10}|{'-' * 12}|{'-' * 11}|{'-' * 13}|{'-' * 17}|{'-' * 19}|{'-' * 21}|")
    for size, n in (("512", args.samples), ("3840x2160", args.samples_4k)):
        r = bench_size(size, n)
        print(f"| {r['size']:>10} | {r['n']:>4} | {r['render']:8.1f} | {r['write']:10.1f} | {r['generate']:9.1f} "
              f"| {r['encode']:11.1f} | {r['ratio']:15.1%} | {r['ceiling']:17.1%} | {r['generate'] / r['write']:19.1%} |")
    print(f"\nwhole stage (`synthvit generate`, {args.workers} workers, incl. start-up and _info.json), samples/s:")
    for size, n in (("512", args.samples * 2), ("3840x2160", args.samples_4k * 2)):
        print(f"  {size:>10}: {bench_stage(size, n, args.workers):.1f}")


if __name__ == "__main__":
    main()
