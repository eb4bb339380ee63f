"""Training utilities shared by the pretrain and finetune loops: device and Accelerator choice, per-step seeding,
warmup + cosine LR, AdamW (optionally with layer-wise LR decay), the clipped optimizer step, the ``metrics.jsonl``
writer and peak memory. Needs torch (the CLI never imports this module).
"""
from __future__ import annotations

import json
import logging
import math
import os
import resource
from pathlib import Path

import numpy as np
import torch

from synthvit.checkpoint import complete_checkpoints
from synthvit.io import SynthvitError, dumps_json
from synthvit.ranks import usable_cores

log = logging.getLogger("synthvit.training")

METRICS_LOG = "metrics.jsonl"  # one JSON record per logged step, in every training run folder


# ---------------------------------------------------------------------------------------------------- devices
def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: this rank's GPU (``cuda:LOCAL_RANK``) when one is present, else the CPU; else ``device`` as given."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(device)


def _single_cpu_process_trap() -> bool:
    """``accelerate launch --cpu --num_processes N`` starts ONE process (multi-CPU needs mpirun; accelerate#2741).

    The simple launcher exports MASTER_ADDR only when more than one process was asked for.
    """
    env = os.environ
    asked_many = env.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in env
    launched_many = any(k in env for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"))
    return asked_many and not launched_many


def _attention_modules(model: torch.nn.Module):
    """timm's attention modules in ``model``: those with a ``fused_attn`` flag."""
    return (m for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool))


def has_attention(model: torch.nn.Module) -> bool:
    """Whether ``model`` has timm attention modules (a ViT or a hybrid; not a CNN)."""
    return any(True for _ in _attention_modules(model))


def set_attention(model: torch.nn.Module, mode: str, device) -> str:
    """Choose the attention kernel of every timm attention module in ``model`` (those with a ``fused_attn`` flag):
    ``sdpa`` (torch's ``scaled_dot_product_attention``), ``math`` (timm's own q @ k^T, softmax, @ v) or ``auto``:
    math on a CPU -- where torch's fused CPU kernel is the slower one at the token counts synthvit trains on
    (ViT-Tiny / ViT-S training steps 1.2-1.8x faster in bf16, ViT-Tiny tiled inference 1.4-1.7x; BENCHMARKS.md) --
    and sdpa elsewhere. The same function either way (they differ in rounding only). Returns the resolved kernel
    (a model without such modules is left as it is)."""
    resolved = mode if mode != "auto" else ("math" if torch.device(device).type == "cpu" else "sdpa")
    for m in _attention_modules(model):
        m.fused_attn = resolved == "sdpa"
    return resolved


def resolve_loader(loader: str, num_workers: int, device: torch.device, processes_here: int) -> str:
    """``main`` or ``workers`` for a config's ``loader`` (pretrain and finetune): ``auto`` loads in this process on a
    CPU-only machine whose cores do not cover every local process's compute threads plus its ``num_workers`` loader
    processes -- there a worker preempts a compute thread, which stalls the other threads at the next barrier (on 2
    cores, ViT-Tiny pretraining at 64 px: loop overhead +30-38 % in process against +36-51 % with two workers in
    three runs; BENCHMARKS.md) -- and in worker processes elsewhere. Both loops give the same batches either way."""
    if num_workers == 0:
        return "main"
    if loader != "auto":
        return loader
    if torch.device(device).type != "cpu":
        return "workers"
    need = processes_here * (torch.get_num_threads() + num_workers)
    return "main" if need > usable_cores() else "workers"


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 natively through oneDNN (avx512_bf16 or AMX); elsewhere bf16 is emulated and slower
    than fp32."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN or without the probe
        return False


def resolve_precision(precision: str) -> str:
    """Accelerate's ``mixed_precision`` for a config's ``precision``: ``auto`` is bf16 on a GPU that has it and on a
    CPU with native bf16 (DeepLabV3+ steps 1.7x, ViT-Tiny 1.4x faster than fp32 on such a CPU: BENCHMARKS.md), else
    ``no`` (fp32)."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_has_bf16() else "no"


def make_accelerator(precision: str = "no", *, accum_steps: int = 1, compile: bool = False,
                     project_dir: Path | None = None, log_with: str | None = None):
    """An ``Accelerator`` on the GPU when there is one (gloo on CPUs under ``accelerate launch --multi_gpu``)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    if _single_cpu_process_trap():
        log.warning("`accelerate launch --cpu --num_processes N` started a single process: accelerate runs several "
                    "CPU processes only through mpirun. For N CPU processes use `accelerate launch --multi_gpu "
                    "--num_processes N -m synthvit ...` (torchrun; synthvit uses gloo when no GPU is present)")
    project = None if project_dir is None else ProjectConfiguration(project_dir=str(project_dir),
                                                                     logging_dir=str(project_dir / "tb"))
    if precision == "auto":
        log.info("precision auto -> %s", resolve_precision(precision))
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=resolve_precision(precision),
                       gradient_accumulation_steps=accum_steps, log_with=log_with,
                       dynamo_backend="inductor" if compile else "no", project_config=project)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """(peak MB, kind): CUDA memory allocated on a GPU, else the process's resident-set peak."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1), "cuda"
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "rss"


# ---------------------------------------------------------------------------------------------------- schedule
def seed_step(seed: int, step: int, rank: int) -> None:
    """Reseed torch and numpy from (seed, step, rank): augmentation, CutMix, dropout depend on the step alone."""
    s = int(np.random.SeedSequence((seed, step, rank)).generate_state(1)[0])
    torch.manual_seed(s)
    np.random.seed(s)


def lr_at(step: int, base_lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio * base_lr`` at ``total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The step's LR on every group, times the group's ``lr_scale`` (layer-wise decay) where it has one."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


# ---------------------------------------------------------------------------------------------------- optimizer
def build_adamw(model: torch.nn.Module, lr: float, weight_decay: float, betas, layer_decay: float = 0.0,
                fused: bool = False):
    """timm's AdamW groups (no decay on biases, norms and ``no_weight_decay()`` parameters, frozen ones left out);
    with ``layer_decay``, the model's layer-wise LR decay groups (``model.layer_decay_groups``); ``fused``: torch's
    fused AdamW kernel (CPU and CUDA; the same updates as the default implementation)."""
    from timm.optim import create_optimizer_v2

    groups = model.layer_decay_groups(weight_decay, layer_decay) if layer_decay else None
    if layer_decay and groups is None:
        log.warning("layer_decay has no effect on %s (only timm backbones have layer-wise decay)",
                    type(model).__name__)
    if groups is None:
        return create_optimizer_v2(model, "adamw", lr=lr, weight_decay=weight_decay, betas=tuple(betas),
                                   **({"fused": True} if fused else {}))
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas),
                             **({"fused": True} if fused else {}))


def optimizer_step(accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer, clip_grad: float) -> None:
    """Clip the gradient norm (when gradients are synchronised and ``clip_grad`` > 0), step, zero the gradients."""
    if accelerator.sync_gradients and clip_grad > 0:
        accelerator.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------------- metrics
class MetricsLog:
    """``metrics.jsonl`` in the run folder (main process only) and the Accelerator's trackers (TensorBoard)."""

    def __init__(self, run_dir: Path, accelerator):
        self.path, self.acc = Path(run_dir) / METRICS_LOG, accelerator

    def truncate_after(self, step: int) -> None:
        """Drop the records of steps after ``step`` (a resumed run redoes them; 0 empties the log)."""
        if self.acc.is_main_process and self.path.is_file():
            kept = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
            self.path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, step: int, values: dict[str, float]) -> None:
        self.acc.log(dict(values), step=step)
        if self.acc.is_main_process:
            record = {k: v if isinstance(v, int) else float(f"{v:.6g}") for k, v in values.items()}
            with open(self.path, "a") as f:
                f.write(dumps_json({"step": step, **record}) + "\n")


# ---------------------------------------------------------------------------------------------------- non-finite
def first_nonfinite(named) -> str | None:
    """The name of the first floating-point tensor of ``named`` ((name, tensor) pairs) that holds a NaN or an
    infinity, or None (one host sync for all of them)."""
    named = [(n, t) for n, t in named if torch.is_tensor(t) and t.is_floating_point() and t.numel()]
    if not named:
        return None
    device = named[0][1].device
    finite = torch.stack([torch.isfinite(t).all().to(device) for _, t in named]).cpu()
    return None if bool(finite.all()) else named[int((~finite).nonzero()[0])][0]


class NonFiniteGuard:
    """Stops a training run at its first non-finite loss (one is enough: AdamW turns the NaN gradients it brings into
    NaN weights, which no later step repairs). There is no host sync per step: :meth:`observe` folds each step's
    flag into a device-side "first bad step", and :meth:`check` -- which every rank calls at the same steps (log
    steps, before each checkpoint, at the end), so all ranks stop together and none waits in a collective -- reads
    it from every rank and raises one :class:`SynthvitError` naming the step, its learning rate, the last
    checkpoint kept and what to try (``hint``). With ``modules``, :meth:`check` also refuses non-finite weights: no
    checkpoint or export of them is ever written."""

    def __init__(self, accelerator, run_dir: Path, lr_of, hint: str):
        self.acc, self.run_dir, self.lr_of, self.hint = accelerator, Path(run_dir), lr_of, hint
        self.first = torch.full((1,), -1, dtype=torch.long, device=accelerator.device)

    def observe(self, step: int, loss: torch.Tensor) -> None:
        """Step ``step`` (counted from 1) gave ``loss``: remember the step if it is the first non-finite one."""
        bad = ~torch.isfinite(loss.detach()).all()
        self.first.masked_fill_(bad & (self.first < 0), step)

    def check(self, step: int, *modules: torch.nn.Module) -> None:
        """Raise if any rank saw a non-finite loss up to ``step`` or (``modules``) holds non-finite weights."""
        firsts = self.acc.gather(self.first)
        if bool((firsts >= 0).any()):
            bad = int(firsts[firsts >= 0].min())
            raise SynthvitError(f"loss is not finite at step {bad} (NaN or infinity; learning rate "
                                f"{self.lr_of(bad - 1):.3g}); training stopped and wrote no export; "
                                f"{self._kept()}. {self.hint}")
        if not modules:
            return
        name = first_nonfinite((n, p) for m in modules for n, p in m.named_parameters())
        flags = self.acc.gather(torch.tensor([name is not None], device=self.acc.device))
        if bool(flags.any()):
            raise SynthvitError(f"the weights are not finite (NaN or infinity) after step {step}"
                                f"{f' (first: {name})' if name else ''} although every loss was; training stopped "
                                f"and wrote no export; {self._kept()}. {self.hint}")

    def _kept(self) -> str:
        last = complete_checkpoints(self.run_dir)
        return f"the last good checkpoint {last[-1]} is kept" if last else "no checkpoint was written before it"
