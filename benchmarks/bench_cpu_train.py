"""CPU speed-ups side by side, in one run: today's path (fp32, eager, AdamW's foreach kernels) against each variant
and all of them together, for the steps synthvit spends a CPU's time on.

Parts (``--parts``):

- ``ft-vit``: a fine-tune step of ViT-Tiny + dpt-skip, 8 crops of 128 px (AdamW, cross-entropy)
- ``ft-cnn``: the same step of DeepLabV3+-R50
- ``pt-vits``: a pretrain step of ViT-S/16, 32 images of 64 px (cls + linear seg head)
- ``infer-*``: tiled inference of one 3840x2160 frame through ``finetune.evaluate.Predictor`` (tiles of 128 px,
  10 % overlap) for ViT-Tiny, ViT-S and DeepLabV3+

Variants (``defaults`` is what synthvit now runs on a CPU with native bf16: bf16 + fused AdamW + math attention, and
for inference the auto tile batch -- 32 tiles for a ViT, 8 for a CNN -- and the auto streams):
``math_attn`` (ViTs: timm's q @ k^T, softmax, @ v instead of torch's fused SDPA CPU kernel; ``attention=auto``), ``bf16``
(autocast on the CPU's oneDNN bf16: training's ``precision=auto`` and tiling's
``tiling.precision=auto`` take it where the CPU has native bf16), ``channels_last`` (CNNs), ``fused`` (AdamW's fused
CPU kernel), ``tile_batch`` (inference: tiles of 128 px in batches of 32 instead of 8; ``tiling.batch_size=0`` takes it for
ViTs, not for CNNs), ``streams`` (inference: ``tiling.streams=0``, two threads each running every other batch of
tiles with half the compute threads, where the process runs two or more),
``compile`` (torch.compile, inductor; its one-off compile time is printed apart) and ``all``.
Each variant's loss after ``--steps`` steps is checked against today's: a speed-up that changes what is learnt is a
bug (bf16 variants within ``--bf16-tol``, relative; fp32 ones within ``--fp32-tol``: channels_last's conv kernels and
the fused AdamW sum in another order, which moves DeepLabV3+'s loss by ~4e-4 relative after 5 steps -- rounding
through batch norm, not another update; the ViT's stays equal to 4 decimals).

    python benchmarks/bench_cpu_train.py                                  # everything, 1 and 2 threads
    python benchmarks/bench_cpu_train.py --parts ft-cnn,infer-cnn --threads 1 --no-compile
"""
from __future__ import annotations

import argparse
import copy
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

from synthvit.models.factory import create_model
from synthvit.training import cpu_has_bf16, set_attention

TRAIN = {"ft-vit": ("vit_tiny_patch16_224", dict(decoder="dpt-skip", img_size=128), "seg", 8, 128),
         "ft-cnn": ("deeplabv3plus_resnet50", {}, "seg", 8, 128),
         "pt-vits": ("vit_small_patch16_224", dict(img_size=64, cls_classes=7), "cls+seg", 32, 64)}
INFER = {"infer-vit": ("vit_tiny_patch16_224", dict(img_size=128)), "infer-vits": ("vit_small_patch16_224",
         dict(img_size=128)), "infer-cnn": ("deeplabv3plus_resnet50", {})}
TRAIN_VARIANTS = {"today": {}, "bf16": dict(bf16=True), "channels_last": dict(cl=True), "fused": dict(fused=True),
                  "math_attn": dict(math=True), "compile": dict(compile=True),
                  "all": dict(bf16=True, cl=True, fused=True, math=True, compile=True),
                  # what synthvit runs now on such a CPU: precision=auto, optim.fused, attention=auto
                  "defaults": dict(bf16=True, fused=True, math=True)}
INFER_VARIANTS = {"today": {}, "bf16": dict(bf16=True), "channels_last": dict(cl=True), "math_attn": dict(math=True),
                  "tile_batch": dict(batch=True), "streams": dict(streams=True), "compile": dict(compile=True),
                  "all": dict(bf16=True, cl=True, math=True, batch=True, streams=True, compile=True),
                  "defaults": dict(bf16=True, math=True, batch="auto", streams=True)}


def is_cnn(name: str) -> bool:
    return not name.startswith("vit")


def train_rate(part: str, v: dict, steps: int, warmup: int) -> tuple[float, float, float]:
    """(images/s, loss after the timed steps, compile seconds) of ``steps`` steps after ``warmup``."""
    name, kw, task, batch, size = TRAIN[part]
    torch.manual_seed(0)
    model = create_model(name, task, seg_classes=2, **kw).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, 2, (batch, size, size), generator=g)
    yc = torch.randint(0, 7, (batch,), generator=g)
    if v.get("cl") and is_cnn(name):
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    set_attention(model, "math" if v.get("math") else "sdpa", "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if v.get("fused") else {}))
    fwd = torch.compile(model) if v.get("compile") else model

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(v.get("bf16"))):
            out = fwd(x)
        loss = F.cross_entropy(out["seg"].float(), y)
        if "cls" in out and task != "seg":
            loss = loss + F.cross_entropy(out["cls"].float(), yc)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    t = time.perf_counter()
    step()  # the first step: kernels, and compile's tracing and code generation
    first = time.perf_counter() - t
    for _ in range(warmup - 1):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sec = (time.perf_counter() - t) / steps
    return batch / sec, loss, max(0.0, first - sec) if v.get("compile") else 0.0


def infer_rate(part: str, v: dict, frame: np.ndarray, repeats: int) -> tuple[float, float, float]:
    """(frames/s, mean p(defect) over the frame, compile seconds) through the project's Predictor."""
    from finetune.config import TilingConfig
    from finetune.evaluate import Predictor
    from synthvit.models import ExportMeta, Heads

    name, kw = INFER[part]
    torch.manual_seed(0)
    model = create_model(name, "seg", seg_classes=2, **kw).eval()
    if v.get("cl") and is_cnn(name):
        model = model.to(memory_format=torch.channels_last)
    names = ["background", "defect"]
    meta = ExportMeta(model=name, in_chans=3, img_size=128, heads=Heads.parse("seg"), class_names=names,
                      seg_classes=names, mean=[0.5] * 3, std=[0.5] * 3)
    predictor = Predictor(torch.compile(model) if v.get("compile") else model, meta, torch.device("cpu"),
                          TilingConfig(tile=128, overlap=0.1,
                                       batch_size={True: 32, "auto": 0}.get(v.get("batch"), 8),
                                       streams=0 if v.get("streams") else 1,
                                       precision="bf16" if v.get("bf16") else "fp32",
                                       attention="math" if v.get("math") else "sdpa"))
    t = time.perf_counter()
    out = predictor(frame)
    first = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(repeats):
        out = predictor(frame)
    sec = (time.perf_counter() - t) / repeats
    return 1 / sec, float(out["probs"][1].mean()), max(0.0, first - sec) if v.get("compile") else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=",".join([*TRAIN, *INFER]))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="timed frames per inference variant")
    ap.add_argument("--rounds", type=int, default=3,
                    help="variants are timed in this many interleaved rounds and each keeps its best: on a shared VM "
                         "two timings of one variant in a row differ by up to ~15 %%, and what runs later in a "
                         "process is not slowed the same way as what ran first")
    ap.add_argument("--frame", default="3840x2160")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--bf16-tol", type=float, default=0.05)
    ap.add_argument("--fp32-tol", type=float, default=1e-3)
    args = ap.parse_args()
    parts = args.parts.split(",")
    unknown = set(parts) - set(TRAIN) - set(INFER)
    if unknown:
        ap.error(f"--parts: unknown {sorted(unknown)}; choose from {', '.join([*TRAIN, *INFER])}")
    w, h = (int(s) for s in args.frame.split("x"))
    frame = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, native bf16: {cpu_has_bf16()}")
    print(f"{'part':10} {'thr':>3} {'variant':14} {'rate':>10} {'unit':9} {'vs today':>8} {'compile s':>9}  check")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for part in parts:
            variants = copy.copy(TRAIN_VARIANTS if part in TRAIN else INFER_VARIANTS)
            if args.no_compile:
                variants.pop("compile")
                variants["all"] = {k: x for k, x in variants["all"].items() if k != "compile"}
            name = (TRAIN.get(part) or INFER[part])[0]
            if not is_cnn(name):
                variants.pop("channels_last")
            else:
                variants.pop("math_attn")
            best: dict[str, tuple[float, float, float]] = {}
            for _ in range(args.rounds):
                for vname, v in variants.items():
                    if part in TRAIN:
                        got = train_rate(part, v, args.steps, args.warmup)
                    else:
                        got = infer_rate(part, v, frame, args.repeats)
                    if vname not in best or got[0] > best[vname][0]:
                        best[vname] = got
            unit = "img/s" if part in TRAIN else "frame/s"
            base = best["today"]
            for vname, v in variants.items():
                rate, value, comp = best[vname]
                tol = args.bf16_tol if v.get("bf16") else args.fp32_tol
                ok = abs(value - base[1]) <= tol * max(abs(base[1]), 1e-6)
                print(f"{part:10} {threads:>3} {vname:14} {rate:>10.3f} {unit:9} {rate / base[0]:>7.2f}x "
                      f"{comp:>9.1f}  {'ok' if ok else 'DIFFERS'} ({value:.4f} vs {base[1]:.4f})", flush=True)

if __name__ == "__main__":
    main()
