"""The training loop: ``Trainer.train()`` -> ``train_step()``, readable top to bottom.

Every step reseeds torch and numpy from (seed, step, rank), so CutMix boxes, drop-path and dropout depend on the
step alone: a resumed run matches an uninterrupted one. The LR is a pure function of the step (warmup + cosine),
set on the optimizer each step, so the only state to restore is Accelerate's (model, optimizer, scaler) and the
EMA weights (safetensors).
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3

from pretrain.data import StreamSpec, batches_per_epoch, jitter_batch, make_loader
from pretrain.mix import create_mixer
from synthvit import checkpoint
from synthvit.models import Heads, save_tensors
from synthvit.models.export import read_tensors
from synthvit.progress import progress_bar
from synthvit.ranks import available_memory_gb, local_processes, usable_cores
from synthvit.training import (
    MetricsLog,
    NonFiniteGuard,
    build_adamw,
    lr_at,
    optimizer_step,
    resolve_loader,
    seed_step,
    set_attention,
    set_lr,
)

log = logging.getLogger("synthvit.pretrain")
EMA_FILE = "ema.safetensors"
NONFINITE_HINT = ("Lower optim.lr, set optim.clip_grad > 0 (e.g. 1.0) or use precision=no (fp32) or bf16 rather than "
                  "fp16, then run again: resume=auto continues from the last good checkpoint")


def cache_budget(cache_mb: int, roles: int, processes: int) -> int:
    """Bytes each loader role may keep in its sample cache: ``cache_mb``, and all the roles of all this machine's
    processes together at most a quarter of its available memory (a node of 8 ranks x 8 workers is not handed
    64 GB by default)."""
    if cache_mb <= 0:
        return 0
    memory = available_memory_gb()
    share = int(memory * 2**30) // (4 * roles * processes) if memory is not None else cache_mb << 20
    return min(cache_mb << 20, share)


def scaled_lr(optim_cfg, global_batch: int) -> float:
    ratio = global_batch / optim_cfg.lr_base_batch
    return optim_cfg.lr * {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[optim_cfg.lr_scale]


class Trainer:
    def __init__(self, cfg, accelerator, model, sources, class_names: list[str], run_dir: Path):
        self.cfg, self.acc, self.run_dir = cfg, accelerator, run_dir
        self.class_names, self.sources = class_names, sources
        self.mean, self.std = (t.to(accelerator.device) for t in model.input_stats(cfg.in_chans))
        self.global_batch = cfg.batch_size * accelerator.num_processes * cfg.optim.accum_steps
        self.base_lr = scaled_lr(cfg.optim, self.global_batch) * (cfg.pretrained_lr_scale if cfg.pretrained else 1.0)
        if cfg.pretrained:
            log.info("pretrained=true: LR %.3g = optim.lr %.3g x batch scaling %.3g x pretrained_lr_scale %g",
                     self.base_lr, cfg.optim.lr, scaled_lr(cfg.optim, self.global_batch) / cfg.optim.lr,
                     cfg.pretrained_lr_scale)
        self.attention = set_attention(model, cfg.attention, accelerator.device)
        optimizer = build_adamw(model, self.base_lr, cfg.optim.weight_decay, cfg.optim.betas,
                                    fused=cfg.optim.fused)
        self.ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.mixer = create_mixer(cfg.mix, cfg.objective, len(class_names))
        self.soft_ce = SoftTargetCrossEntropy()
        self.step, self.images_seen, self.skipped_before = 0, 0, 0
        self.skipped: dict[int, int] = {}
        self.guard = NonFiniteGuard(accelerator, run_dir, self.lr_at, NONFINITE_HINT)

    # ------------------------------------------------------------------ state
    def _state(self) -> dict:
        return dict(step=self.step, images_seen=self.images_seen, skipped=self.skipped_total_local(),
                    num_processes=self.acc.num_processes)

    def skipped_total_local(self) -> int:
        return self.skipped_before + sum(self.skipped.values())

    def lr_at(self, step: int) -> float:
        """The LR of step ``step`` (from 0): warmup, then cosine decay."""
        cfg = self.cfg
        return lr_at(step, self.base_lr, cfg.optim.warmup_steps, cfg.steps, cfg.optim.min_lr_ratio)

    def trained_modules(self) -> list[torch.nn.Module]:
        """The weights a checkpoint or the export holds: the model's, and the EMA's."""
        return [self.acc.unwrap_model(self.model)] + ([self.ema.module] if self.ema is not None else [])

    def save(self) -> Path:
        self.guard.check(self.step, *self.trained_modules())  # never a checkpoint of non-finite weights
        path = checkpoint.save_checkpoint(self.acc, self.run_dir, self.step, self._state(), self.cfg.keep_last)
        if self.ema is not None and self.acc.is_main_process:
            save_tensors(self.ema.module.state_dict(), path / EMA_FILE)
        return path

    def resume(self, ckpt: Path) -> None:
        checkpoint.load_checkpoint(self.acc, ckpt, self.model)
        state = checkpoint.read_state(ckpt)
        if state.get("num_processes", self.acc.num_processes) != self.acc.num_processes:
            log.warning("resuming a %s-process run on %s processes: the data stream will differ",
                        state["num_processes"], self.acc.num_processes)
        self.step, self.images_seen, self.skipped_before = state["step"], state["images_seen"], state["skipped"]
        if self.ema is not None and (ckpt / EMA_FILE).is_file():
            self.ema.module.load_state_dict(read_tensors(ckpt / EMA_FILE))
        log.info("resumed from %s at step %d", ckpt, self.step)

    # ------------------------------------------------------------------ one step
    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        cfg, dev = self.cfg, self.acc.device
        x = jitter_batch(batch["image"].to(dev, non_blocking=True).float(), batch["jitter"].to(dev))
        x = x.sub_(self.mean).div_(self.std)
        target = batch["cls"].to(dev, non_blocking=True)
        mask = batch["mask"].to(dev, non_blocking=True).long() if "mask" in batch else None
        soft = None
        if self.mixer is not None and mask is None:
            x, soft = self.mixer(x, target)
        elif self.mixer is not None:
            x, mask, soft, _ = self.mixer(x, mask, target)
        with self.acc.autocast():
            out = self.model(x)
        losses = {}
        if "cls" in out:
            logits = out["cls"].float()
            losses["cls"] = self.soft_ce(logits, soft) if soft is not None else F.cross_entropy(
                logits, target, label_smoothing=cfg.mix.label_smoothing)
        if "seg" in out:
            losses["seg"] = F.cross_entropy(out["seg"].float(), mask)
        losses["loss"] = losses.get("cls", 0.0) + cfg.seg_weight * losses.get("seg", 0.0)
        return losses

    def train_step(self, batches: list[dict]) -> dict[str, torch.Tensor]:
        """One optimizer step (``accum_steps`` batches); this rank's mean losses, left on the device (no host
        sync: they are read at log steps)."""
        cfg = self.cfg
        set_lr(self.optimizer, self.lr_at(self.step))
        totals: dict[str, torch.Tensor] = {}
        for batch in batches:
            with self.acc.accumulate(self.model):
                losses = self.losses(batch)
                self.acc.backward(losses["loss"])
                optimizer_step(self.acc, self.model, self.optimizer, cfg.optim.clip_grad)
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + v.detach() / len(batches)
        if self.ema is not None:
            self.ema.update(self.acc.unwrap_model(self.model), step=self.step)
        self.guard.observe(self.step + 1, totals["loss"])
        return totals

    # ------------------------------------------------------------------ the loop
    def train(self, end_step: int) -> dict:
        cfg, acc = self.cfg, self.acc
        workers = max(1, cfg.num_workers)
        total = sum(s.num_samples for s in self.sources)
        spec = StreamSpec(self.sources, cfg.batch_size, cfg.image_size, cfg.in_chans, tuple(cfg.scale), cfg.jitter,
                          Heads.parse(cfg.objective).has_seg, cfg.seed, acc.process_index, acc.num_processes, workers,
                          cfg.resample, cfg.shuffle_buffer,
                          batches_per_epoch(total, cfg.batch_size, acc.num_processes, workers),
                          start_batch=self.step * cfg.optim.accum_steps,
                          cache_bytes=cache_budget(cfg.cache_mb, workers, local_processes(acc.num_processes)))
        self.cache_mb = spec.cache_bytes >> 20
        self.loader = resolve_loader(cfg.loader, cfg.num_workers, acc.device, local_processes(acc.num_processes))
        batches = iter(make_loader(spec, cfg.num_workers, in_process=self.loader == "main"))
        if cfg.loader == "auto" and cfg.num_workers and acc.is_main_process:
            log.info("loader=auto: %s (%d core(s) for %d process(es) x %d compute thread(s) + %d loader role(s))",
                     "decoding the roles in this process" if self.loader == "main" else f"{cfg.num_workers} worker "
                     "processes", usable_cores(), local_processes(acc.num_processes), torch.get_num_threads(),
                     cfg.num_workers)
        metrics, keys = MetricsLog(self.run_dir, acc), KeyLog(self.run_dir, acc.process_index, cfg.record_keys)
        metrics.truncate_after(self.step)
        keys.truncate_after(self.step)
        bar = progress_bar(total=cfg.steps, initial=self.step, desc="pretrain", unit="step",
                           disable=not acc.is_main_process)
        t_start = t_log = time.perf_counter()
        start_step, images_at_log = self.step, self.images_seen
        window: dict = {}  # sums over the steps since the last log line (losses: on the device)
        with bar:  # closed before an error is printed
            while self.step < end_step:
                seed_step(cfg.seed, self.step, acc.process_index)
                group = [next(batches) for _ in range(cfg.optim.accum_steps)]
                for b in group:
                    self.skipped[b["skipped"][0]] = int(b["skipped"][1])
                    keys.write(self.step, b["keys"])
                out = self.train_step(group)
                self.step += 1
                self.images_seen += self.global_batch
                bar.update(1)
                for k, v in out.items():
                    window[k] = window.get(k, 0.0) + v
                window["n"] = window.get("n", 0) + 1
                if self.step % cfg.log_every == 0 or self.step == end_step:
                    out, window, now = self.log_record(window), {}, time.perf_counter()
                    out["images_per_s"] = (self.images_seen - images_at_log) / max(now - t_log, 1e-9)
                    t_log, images_at_log = now, self.images_seen
                    metrics.write(self.step, out)
                    bar.set_postfix(loss=f"{out['loss']:.4f}", lr=f"{out['lr']:.2e}",
                                    img_s=f"{out['images_per_s']:.0f}")
                if self.step % cfg.save_every == 0 or self.step == end_step:
                    self.save()
            self.guard.check(self.step, *self.trained_modules())  # the weights the export holds
        wall = time.perf_counter() - t_start
        trained = (self.step - start_step) * self.global_batch
        return dict(steps=self.step, images_seen=self.images_seen, wall_time_s=round(wall, 2),
                    images_per_s=round(trained / wall, 2) if trained else 0.0,
                    skipped_samples=int(acc.reduce(torch.tensor(self.skipped_total_local(), device=acc.device),
                                                   "sum")),
                    ranks_in_sync=self.ranks_in_sync(), attention=self.attention, loader=self.loader,
                    cache_mb_per_role=self.cache_mb, base_lr=self.base_lr)

    def log_record(self, window: dict) -> dict[str, float]:
        """The log line of the steps since the last (``window``: their summed losses and their count ``n``): a
        non-finite loss among them stops the run; else the mean losses over them and the ranks (the host syncs at
        log steps only), the LR and the skipped samples."""
        self.guard.check(self.step)
        n = window.pop("n")
        out = {k: float(self.acc.reduce(v / n, "mean")) for k, v in window.items()}
        out["lr"] = self.lr_at(self.step - 1)
        out["skipped"] = int(self.acc.reduce(torch.tensor(self.skipped_total_local(), device=self.acc.device), "sum"))
        return out

    def ranks_in_sync(self) -> bool:
        """Gather a fingerprint of every rank's parameters and compare them."""
        params = [p.detach().float() for p in self.acc.unwrap_model(self.model).parameters()]
        fp = torch.stack([torch.stack([p.sum(), (p * p).sum()]) for p in params]).flatten()[None]
        everyone = self.acc.gather(fp)
        return bool(torch.allclose(everyone, everyone[:1].expand_as(everyone), rtol=1e-6, atol=1e-6))


class KeyLog:
    """With ``record_keys``: the sample keys each rank trains on, one line per step (``keys_rank<R>.txt``)."""

    def __init__(self, run_dir: Path, rank: int, enabled: bool):
        self.path = run_dir / f"keys_rank{rank}.txt" if enabled else None

    def truncate_after(self, step: int) -> None:
        """On resume, drop the steps the resumed run will redo."""
        if self.path is not None and self.path.is_file():
            kept = [ln for ln in self.path.read_text().splitlines() if int(ln.split(" ", 1)[0]) < step]
            self.path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, step: int, keys: list[str]) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(f"{step} {' '.join(keys)}\n")
