"""Fine-tuning on a few hundred real high-resolution images: random crops (many centred on defects) or whole-image
resizes, mask-aligned flips and rotations, through Accelerate. Sample ``i`` of the run is drawn from
``default_rng((seed, i))``, so a run is reproducible and the loader is a plain sequential range of sample ids."""
from __future__ import annotations

import logging
import time
from collections import OrderedDict, defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from synthvit.checkpoint import load_checkpoint, read_state, save_checkpoint
from synthvit.config import config_diff, to_dict
from synthvit.data import Item, RealData, has_defect, shown_size, to_array
from synthvit.io import SynthvitError
from synthvit.models import Heads
from synthvit.progress import progress_bar
from synthvit.ranks import local_processes
from synthvit.training import (
    MetricsLog,
    NonFiniteGuard,
    build_adamw,
    lr_at,
    optimizer_step,
    peak_memory_mb,
    resolve_loader,
    seed_step,
    set_attention,
    set_lr,
)

log = logging.getLogger("synthvit.finetune")
NONFINITE_HINT = ("Lower optim.lr, set optim.clip_grad > 0 (e.g. 1.0) or use precision=no (fp32) or bf16 rather than "
                  "fp16, then run again with resume=none (a checkpoint resumes only the config that wrote it)")


class CropDataset(torch.utils.data.Dataset):
    """Index i -> one augmented training sample (uint8 image (C, S, S), mask (S, S), class)."""

    def __init__(self, data: RealData, items: list[Item], cfg, total: int, synthetic=None):
        self.data, self.items, self.cfg, self.total = data, items, cfg, total
        self.with_mask = data.has_masks and Heads.parse(cfg.task).has_seg
        # mixed batches (finetune/synthetic.py): the first n_synthetic samples of every batch are synthetic ones,
        # frames len(items) .. len(items) + len(synthetic) - 1
        self.synthetic = synthetic
        self.n_real, self.n_synthetic = batch_layout(cfg, synthetic)
        self.step_batch = self.n_real + self.n_synthetic
        # the frames that hold a defect pixel: a defect-centred crop is drawn from one of them. Small inspection
        # sets are mostly defect-free frames (71 % of the magnetic tiles); drawing the frame uniformly first made
        # "defect_crop_prob=0.8" mean ~23 % defect crops there, and every ViT settled on "all background".
        self.defective = [k for k, it in enumerate(items) if has_defect(it)] if self.with_mask else []
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()  # per loader worker
        self._cached_bytes = 0
        # a frame's defect pixels (flat indices), found once per cached mask: np.nonzero of a 4K mask costs ~20 ms,
        # once per defect-centred crop before (calibration replays 2,048 of them)
        self._coords: dict[int | None, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self):
        return self.total

    def frame(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoded image and mask of item ``k``, kept in an LRU cache of ``cfg.cache_mb``: decoding a 4K frame
        costs far more than cropping it, and small real sets fit in memory."""
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        with self.item(k).load() as im:
            image = to_array(im, self.cfg.in_chans)
        h, w = image.shape[:2]
        mask = self.mask(k, (w, h))
        self._cache[k] = (image, mask)
        self._cached_bytes += image.nbytes + mask.nbytes
        while self._cached_bytes > self.cfg.cache_mb * 2**20 and self._cache:
            old, (old_image, old_mask) = self._cache.popitem(last=False)
            self._cached_bytes -= old_image.nbytes + old_mask.nbytes
            self._coords.pop(old, None)
        return image, mask

    def defect_coords(self, mask: np.ndarray, k: int | None = None) -> np.ndarray:
        """``np.flatnonzero(mask)``, remembered for frame ``k``'s cached mask (None: the last mask asked about)."""
        hit = self._coords.get(k)
        if hit is None or hit[0] is not mask:
            hit = self._coords[k] = (mask, np.flatnonzero(mask))
        return hit[1]

    def item(self, k: int) -> Item:
        """Frame ``k``: a real train item, or (k >= len(items)) a synthetic sample."""
        return self.items[k] if k < len(self.items) else self.synthetic.items[k - len(self.items)]

    def mask(self, k: int, size: tuple[int, int]) -> np.ndarray:
        """Frame ``k``'s class map at ``size`` (w, h), in the real data's class ids (zeros without masks)."""
        if k >= len(self.items):
            j = k - len(self.items)
            return self.synthetic.luts[j][self.synthetic.items[j].mask(size)]
        return self.items[k].mask(size) if self.with_mask else np.zeros(size[::-1], np.uint8)

    def draw(self, i: int) -> tuple[np.random.Generator, bool, int]:
        """Sample ``i``'s generator, whether it is defect-centred, and its frame (the first draws of the sample)."""
        pos = i % self.step_batch
        added = self.n_synthetic and self.cfg.synthetic_mode == "add"
        if added and pos >= self.n_synthetic:  # a real sample: the id a run without synthetic sets gives it
            i = i // self.step_batch * self.n_real + pos - self.n_synthetic
        rng = np.random.default_rng((self.cfg.seed, 1, i) if added and pos < self.n_synthetic else (self.cfg.seed, i))
        if self.n_synthetic and pos < self.n_synthetic:
            centred = rng.random() < self.cfg.defect_crop_prob  # a defect-free sample falls back to anywhere
            return rng, centred, len(self.items) + int(rng.integers(len(self.synthetic)))
        centred = bool(self.defective) and rng.random() < self.cfg.defect_crop_prob
        k = self.defective[int(rng.integers(len(self.defective)))] if centred else int(rng.integers(len(self.items)))
        return rng, centred, k

    def window(self, image: np.ndarray, mask: np.ndarray, rng, centred: bool,
               k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The crop (or resize) of a frame that a sample trains on, before rotation and flip (``k``: the frame's
        index when ``mask`` is its cached one)."""
        if self.cfg.input == "resize":
            return resize_pair(image, mask, self.cfg, rng)
        return crop_pair(image, mask, self.cfg, rng, centred, self.defect_coords(mask, k) if centred else None)

    def __getitem__(self, i: int) -> dict:
        rng, centred, k = self.draw(i)
        label = self.data.label_index(self.items[k]) if k < len(self.items) else -1  # synthetic: seg only
        image, mask = self.window(*self.frame(k), rng, centred, k)
        k, flip = int(rng.integers(4)), bool(rng.random() < 0.5)
        image, mask = np.rot90(image, k, axes=(0, 1)), np.rot90(mask, k)
        if flip:
            image, mask = image[:, ::-1], mask[:, ::-1]
        image = image[..., None] if image.ndim == 2 else image
        return {"image": torch.from_numpy(np.array(image.transpose(2, 0, 1))),
                "mask": torch.from_numpy(np.array(mask, dtype=np.int64)),
                "cls": label}


def batch_layout(cfg, synthetic=None) -> tuple[int, int]:
    """(real, synthetic) samples per batch: ``synthetic_mode=share`` splits ``batch_size``; ``add`` keeps
    ``batch_size`` real samples and adds ``round(share / (1 - share) * batch_size)`` synthetic ones."""
    if not synthetic:
        return cfg.batch_size, 0
    if cfg.synthetic_mode == "add":
        return cfg.batch_size, max(1, round(cfg.synthetic_share / (1 - cfg.synthetic_share) * cfg.batch_size))
    n = min(max(1, round(cfg.synthetic_share * cfg.batch_size)), cfg.batch_size - 1)  # both kinds in every batch
    return cfg.batch_size - n, n


def replayed_windows(data: RealData, items: list[Item], cfg, max_draws: int, synthetic=None):
    """The mask windows of up to ``max_draws`` of the run's training samples (evenly spread over its sample ids,
    mixed-in synthetic ones included), its own sampler replayed on masks alone, each mask read once."""
    total = max(cfg.steps, 1) * sum(batch_layout(cfg, synthetic))
    ds = CropDataset(data, items, cfg, total, synthetic)
    by_frame = defaultdict(list)
    for i in range(0, total, max(1, total // max_draws)):
        rng, centred, k = ds.draw(i)
        by_frame[k].append((rng, centred))
    for k, draws in by_frame.items():
        with ds.item(k).load() as im:
            size = shown_size(im)
        mask = ds.mask(k, size)
        for rng, centred in draws:
            yield ds.window(mask, mask, rng, centred)[1]


def crop_pair(image: np.ndarray, mask: np.ndarray, cfg, rng, centred: bool,
              coords: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A crop_size crop at full resolution (zero-padded), centred (+- a quarter crop) on a random defect pixel when
    ``centred``, else anywhere. ``coords``: ``np.flatnonzero(mask)`` when the caller has it already."""
    s = cfg.crop_size
    h, w = mask.shape
    flat = (np.flatnonzero(mask) if coords is None else coords) if centred else ()
    if len(flat):
        j = int(rng.integers(len(flat)))
        yj, xj = divmod(int(flat[j]), w)  # row-major, the order np.nonzero lists them in
        y0 = int(np.clip(yj - s // 2 + rng.integers(-s // 4, s // 4 + 1), 0, max(0, h - s)))
        x0 = int(np.clip(xj - s // 2 + rng.integers(-s // 4, s // 4 + 1), 0, max(0, w - s)))
    else:
        y0, x0 = int(rng.integers(0, max(0, h - s) + 1)), int(rng.integers(0, max(0, w - s) + 1))
    image, mask = image[y0:y0 + s, x0:x0 + s], mask[y0:y0 + s, x0:x0 + s]
    ph, pw = s - mask.shape[0], s - mask.shape[1]
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw)) + ((0, 0),) * (image.ndim - 2))
        mask = np.pad(mask, ((0, ph), (0, pw)))
    return image, mask


def resize_pair(image: np.ndarray, mask: np.ndarray, cfg, rng) -> tuple[np.ndarray, np.ndarray]:
    size = (cfg.crop_size, cfg.crop_size)
    return (np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR)),
            np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST)))


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice over the defect classes (not background), pooled over the batch: counters the rarity of defect
    pixels that lets plain cross-entropy settle on "all background"."""
    k = logits.shape[1]
    probs = logits.softmax(1)[:, 1:]
    onehot = F.one_hot(target, k).permute(0, 3, 1, 2)[:, 1:].to(probs.dtype)
    inter = (probs * onehot).sum((0, 2, 3))
    union = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    return 1 - ((2 * inter + eps) / (union + eps)).mean()


def losses(out: dict, batch: dict, label_smoothing: float, seg_loss: str = "ce") -> dict[str, torch.Tensor]:
    parts = {}
    if "seg" in out:
        logits = out["seg"].float()
        parts["seg"] = F.cross_entropy(logits, batch["mask"])
        if seg_loss == "ce+dice":
            parts["dice"] = dice_loss(logits, batch["mask"])
    if "cls" in out:
        parts["cls"] = F.cross_entropy(out["cls"].float(), batch["cls"], label_smoothing=label_smoothing)
    parts["loss"] = sum(parts.values())
    return parts


# keys that do not change what a step computes: a checkpoint resumes across them
RESUME_FREE_KEYS = ("out_dir", "resume", "overwrite", "stop_at", "save_every", "log_every", "evaluate", "num_workers",
                    "loader", "cache_mb", "tiling", "calibrate", "max_pixels")


def training_config(cfg) -> dict:
    """The config a checkpoint records, and a resumed run must match."""
    return {k: v for k, v in to_dict(cfg).items() if k not in RESUME_FREE_KEYS}


def _with_defaults(saved: dict, defaults: dict) -> dict:
    """A checkpoint's recorded config with the keys a newer synthvit added read as their defaults (as a run
    folder's config.yaml is read): they change nothing the checkpoint's steps computed."""
    out = dict(saved)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _with_defaults(out[key], value)
    return out


def check_resumable(cfg, ckpt: Path, num_processes: int | None = None) -> dict:
    """The checkpoint's state, if this config (and process count) wrote it; else a clear error, nothing touched."""
    state = read_state(ckpt)
    changed = config_diff(_with_defaults(state.get("config", {}), training_config(type(cfg)())), training_config(cfg))
    if num_processes is not None and state.get("num_processes") != num_processes:
        changed.append(f"processes: {state.get('num_processes')} -> {num_processes}")
    if changed:
        raise SynthvitError(f"resume: {ckpt} was written by a different run ({'; '.join(changed)}); run with "
                            f"resume=none to start over in {cfg.out_dir}, or use another out_dir")
    return state


def resume_state(cfg, acc, ckpt: Path, model) -> int:
    """Load a checkpoint written by this config into the prepared model/optimizer; returns its step."""
    state = check_resumable(cfg, ckpt, acc.num_processes)
    load_checkpoint(acc, ckpt, model)
    log.info("resumed from %s at step %d of %d", ckpt, state["step"], cfg.steps)
    return int(state["step"])


def step_lr(cfg, step: int) -> float:
    """The LR of step ``step`` (from 0): warmup, then cosine decay."""
    return lr_at(step, cfg.optim.lr, cfg.optim.warmup_steps, cfg.steps, cfg.optim.min_lr_ratio)


def train_step(cfg, acc, model, optimizer, batch: dict, step: int, mean, std) -> dict[str, torch.Tensor]:
    """One optimizer step on ``batch`` (step ``step`` from 0: its LR, its randomness from (seed, step, rank)); its
    losses, left on the device."""
    seed_step(cfg.seed, step, acc.process_index)
    set_lr(optimizer, step_lr(cfg, step))
    batch = {k: v.to(acc.device) for k, v in batch.items()}
    with acc.autocast():
        parts = losses(model((batch["image"].float() - mean) / std), batch, 0.1, cfg.seg_loss)
    acc.backward(parts["loss"])
    optimizer_step(acc, model, optimizer, cfg.optim.clip_grad)
    return {k: v.detach() for k, v in parts.items()}


def train(cfg, acc, model, data: RealData, items: list[Item], mean, std, run_dir: Path,
          ckpt: Path | None = None, synthetic=None) -> dict:
    """The loop: every step reseeds from (seed, step, rank); LR = warmup + cosine of the step. Checkpoints every
    ``save_every`` steps (and at ``stop_at``); from ``ckpt`` the run continues exactly where it stopped. The first
    non-finite loss stops the run with an error (:class:`NonFiniteGuard`: seen at the next log step, checkpoint or
    the end, named by its own step); no checkpoint of non-finite weights is written, nor is anything returned."""
    model.train()
    attention = set_attention(model, cfg.attention, acc.device)
    optimizer = build_adamw(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas, cfg.layer_decay,
                            fused=cfg.optim.fused)
    model, optimizer = acc.prepare(model, optimizer)
    start = resume_state(cfg, acc, ckpt, model) if ckpt is not None else 0
    end = cfg.stop_at or cfg.steps
    world, rank, b = acc.num_processes, acc.process_index, sum(batch_layout(cfg, synthetic))
    ds = CropDataset(data, items, cfg, cfg.steps * b * world, synthetic)
    # rank r takes batch slots r, r + world, ...: disjoint sample ids across ranks, same ids on every rerun
    ids = [(s * world + rank) * b + j for s in range(start, end) for j in range(b)]
    where = resolve_loader(cfg.loader, cfg.num_workers, acc.device, local_processes(world))
    workers = 0 if where == "main" else cfg.num_workers
    loader = torch.utils.data.DataLoader(ds, batch_size=b, sampler=ids, num_workers=workers,
                                         persistent_workers=workers > 0)
    bar = progress_bar(total=cfg.steps, initial=start, desc="finetune", unit="step", disable=not acc.is_main_process)
    metrics, t0, window = MetricsLog(run_dir, acc), time.perf_counter(), []
    metrics.truncate_after(start)
    state = {"config": training_config(cfg), "num_processes": world}
    guard = NonFiniteGuard(acc, run_dir, lambda s: step_lr(cfg, s), NONFINITE_HINT)
    with bar:  # closed before an error is printed
        for step, batch in enumerate(loader, start=start):
            parts = train_step(cfg, acc, model, optimizer, batch, step, mean, std)
            guard.observe(step + 1, parts["loss"])
            window.append(parts)  # read back at log steps only: no per-step sync
            bar.update(1)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                guard.check(step + 1)
                rec = {k: float(torch.stack([w[k].float() for w in window]).mean()) for k in window[0]}
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
                metrics.write(step + 1, rec | {"lr": step_lr(cfg, step)})
                window = []
            done = step + 1
            if done < cfg.steps and (done == cfg.stop_at or cfg.save_every and done % cfg.save_every == 0):
                guard.check(done, acc.unwrap_model(model))
                save_checkpoint(acc, run_dir, done, state | {"step": done}, keep_last=1)
        guard.check(end, acc.unwrap_model(model))  # the weights the export (or the stop_at checkpoint) holds
    wall = time.perf_counter() - t0
    peak, kind = peak_memory_mb(acc.device)  # the process peak: training's, in a fresh run
    # the plain model, without the autocast wrapper precision=bf16 put on its forward: the run's test metrics are
    # then what `synthvit evaluate` computes from the export (before, a bf16 run scored itself under CPU autocast)
    resumed = {"resumed_at": start} if start else {}
    return {"steps": cfg.steps, "stopped": end < cfg.steps, **resumed, "train_images": len(items),
            "train_wall_s": round(wall, 2),  # this process's part of the training when resumed
            "precision": acc.mixed_precision,  # what precision=auto (the default) resolved to
            "attention": attention,  # and attention=auto
            "loader": where,  # and loader=auto
            "train_peak_mb": peak, "train_peak_kind": kind,
            "train_images_per_s": round((end - start) * b * acc.num_processes / max(wall, 1e-9), 2),
            "zero_shot": False, "model": acc.unwrap_model(model, keep_fp32_wrapper=False)}
