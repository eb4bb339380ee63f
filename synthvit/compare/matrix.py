"""The experiment matrix: cells (model x budget x seed, and zero-shot), each a ``synthvit finetune`` run in its
own folder and process.

A cell is finished when its ``metrics.json`` exists (finetune writes it atomically, last), so re-running skips
finished cells and a crash loses at most the cells that were running. Cells run in child processes: peak memory
and wall time are the cell's own, one GPU per child (``CUDA_VISIBLE_DEVICES``), and under ``accelerate launch``
each rank takes every ``world``-th cell on its local GPU.
"""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from finetune.artifacts import CONFIG_FILE, EXPORT_DIR, METRICS_FILE, SPLIT_FILE, config_changes
from finetune.config import FinetuneConfig
from synthvit.compare.config import ZERO_SHOT, CompareConfig, ModelSpec
from synthvit.config import dump_yaml, load_config, to_dict
from synthvit.io import atomic_write_text
from synthvit.progress import progress_bar
from synthvit.ranks import usable_cores

CELL_CONFIG = "cell.yaml"  # a cell's resolved finetune config (the child's --config)
PROBE_FILE = "probe.json"  # a model's cost, written by ``python -m compare.probe`` into its largest cell
CELL_LOG, PROBE_LOG = "log.txt", "probe.log"
PREVIOUS = "previous"  # a stale cell's old results are moved to previous-1, previous-2, ... before it runs again
# Variables of the launching job that must not reach a child: each child is a job of its own.
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
             "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "NODE_RANK")


@dataclass
class Job:
    """One child process: a finetune cell or a model's speed probe. Finished when ``done_file`` exists."""
    name: str
    folder: Path
    argv: list[str]
    done_file: str
    log_name: str = CELL_LOG

    @property
    def done(self) -> bool:
        return (self.folder / self.done_file).is_file()

    @property
    def log(self) -> Path:
        return self.folder / self.log_name


@dataclass
class Cell:
    """One finetune run of the matrix: a model at a budget and seed, or its seed-independent zero-shot cell."""
    spec: ModelSpec
    budget: int  # train images actually used (0: zero-shot)
    seed: int  # finetune.seed (a zero-shot cell, run once, carries the first seed)
    job: Job
    zero_shot: bool = False

    @property
    def folder(self) -> Path:
        return self.job.folder

    @property
    def label(self) -> int | str:
        """The budget as the report and results.csv name it: a train-image count or ``zero-shot``."""
        return ZERO_SHOT if self.zero_shot else self.budget


_LIMIT = {"images": "train_limit", "defective": "defective_limit"}  # the finetune key each budget unit sets
_PREFIX = {"images": "n", "defective": "d"}  # cell folders: n00100 (100 train images), d00005 (5 defective ones)


def budget_folder(cfg: CompareConfig, budget: int) -> str:
    """``n00100`` (100 train images) or ``d00005`` (5 defective ones): a budget's folder name."""
    return f"{_PREFIX[cfg.budget_unit]}{budget:05d}"


def synthetic_folder(cfg: CompareConfig, config: str, budget: int) -> Path:
    """Where the synthetic set of the generate config ``config`` built from ``budget``'s train images lives (shared
    by every seed and every row naming that config); its ``real_ids.txt`` and generate log are in the folder above."""
    return Path(cfg.out_dir) / "synthetic" / Path(config).stem / budget_folder(cfg, budget) / "shards"


def cell_config(cfg: CompareConfig, cell: Cell, n_train: int, test_ids: set[str] | None = None) -> FinetuneConfig:
    """Write ``cell.yaml`` (the resolved finetune config of the cell). A finished cell is stale when the config it
    ran with differs from this one in a value (a key a newer synthvit added reads as its default, so it changes
    nothing) or its test split differs from ``test_ids`` (data or split policy changed): its results are moved to
    ``previous-N/``, never deleted, and it runs again; so is an unfinished cell whose config changed (finetune
    refuses a folder holding another config's run). Every seed and model of a budget gets the same ``data_seed``,
    so the same nested subset of train images; a zero-shot cell trains nothing (``steps=0``)."""
    spec, folder = cell.spec, cell.folder
    tree = to_dict(cfg.finetune)
    tree.update(data=cfg.data, out_dir=str(folder), model=spec.model, init=spec.init,
                task=spec.task or cfg.finetune.task, seed=cell.seed,
                **{_LIMIT[cfg.budget_unit]: 0 if cell.zero_shot or cell.budget >= n_train else cell.budget})
    if spec.pretrained:  # public weights for this row (init= exports carry their own)
        tree["pretrained"] = True
    if spec.synthetic and not cell.zero_shot:  # the set built from this budget's own train images
        tree["synthetic"] = [*cfg.finetune.synthetic, str(synthetic_folder(cfg, spec.synthetic, cell.budget))]
    path = folder / CELL_CONFIG
    atomic_write_text(path, yaml.safe_dump(tree, sort_keys=False))
    resolved = load_config(FinetuneConfig, path, spec.overrides + (["steps=0"] if cell.zero_shot else []))
    atomic_write_text(path, dump_yaml(resolved))
    finished = (folder / METRICS_FILE).is_file()
    if finished or (folder / CONFIG_FILE).is_file():  # an unfinished run of another config would be refused too
        reasons = config_changes(folder, resolved, to_dict, f"no {CONFIG_FILE}") + (
            _split_change(folder / SPLIT_FILE, test_ids) if finished else [])
        if reasons:
            kept = _set_aside(folder)
            print(f"compare: {folder} is stale ({'; '.join(reasons)}); its results are kept in {kept}, "
                  f"it runs again", file=sys.stderr)
    return resolved


def _split_change(split_file: Path, test_ids: set[str] | None) -> list[str]:
    if test_ids is None:
        return []
    if not split_file.is_file():
        return [f"no {split_file.name}"]
    with open(split_file, newline="") as f:
        old = {row["id"] for row in csv.DictReader(f) if row.get("split") == "test"}
    if old == test_ids:
        return []
    return [f"its test split differs from today's ({len(old - test_ids)} images left it, {len(test_ids - old)} "
            f"joined): the data or the split policy changed"]


def _set_aside(folder: Path) -> Path:
    """Move a stale cell's results into ``previous-N/`` (the lowest free N); ``cell.yaml`` stays."""
    n = 1
    while (folder / f"{PREVIOUS}-{n}").exists():
        n += 1
    kept = folder / f"{PREVIOUS}-{n}"
    kept.mkdir()
    for entry in list(folder.iterdir()):
        if entry.name != CELL_CONFIG and not entry.name.startswith(f"{PREVIOUS}-"):
            shutil.move(str(entry), kept / entry.name)
    return kept


def effective_budgets(budgets: list[int], n_train: int) -> list[int]:
    """Distinct train-image counts, ascending; 0 and budgets above the train split mean all of it."""
    return sorted({n_train if b == 0 or b > n_train else b for b in budgets})


def zero_shot_reason(cfg: CompareConfig, spec: ModelSpec) -> str:
    """Why ``spec`` gets no zero-shot cell ("" when it gets one, or when no zero-shot was asked for)."""
    if not cfg.zero_shot:
        return ""
    if not spec.init:
        return "no init: nothing to evaluate before training"
    if (spec.task or cfg.finetune.task) != "seg":
        return "zero-shot evaluates a dense head: task seg only"
    return ""


def _cell(cfg: CompareConfig, spec: ModelSpec, budget: int, seed: int, zero_shot: bool = False) -> Cell:
    folder = Path(cfg.out_dir) / "cells" / spec.name
    folder = folder / ZERO_SHOT if zero_shot else folder / budget_folder(cfg, budget) / f"s{seed}"
    argv = [sys.executable, "-m", "synthvit", "finetune", "--config", str(folder / CELL_CONFIG)]
    name = f"{spec.name} {ZERO_SHOT}" if zero_shot else f"{spec.name} n={budget} seed={seed}"
    return Cell(spec, budget, seed, Job(name, folder, argv, METRICS_FILE), zero_shot)


def plan_cells(cfg: CompareConfig, n_train: int, write: bool = True,
               test_ids: set[str] | None = None) -> list[Cell]:
    """The cells: each model's zero-shot cell (models with an init, when asked for), then per seed models x
    budgets (the first seed's cells come first: a matrix cut short still has one of every cell). With ``write``,
    each cell folder gets its ``cell.yaml`` (only one process of a launched job writes), a stale finished cell is
    set aside (``cell_config``; ``test_ids``: today's test split) and a cell that will run loses any old
    ``probe.json``."""
    cells = [_cell(cfg, spec, 0, cfg.seeds[0], zero_shot=True) for spec in cfg.models
             if cfg.zero_shot and not zero_shot_reason(cfg, spec)]
    cells += [_cell(cfg, spec, budget, seed) for seed in cfg.seeds for spec in cfg.models
              for budget in effective_budgets(cfg.train_budgets, n_train)]
    if write:
        for cell in cells:
            cell.folder.mkdir(parents=True, exist_ok=True)
            cell_config(cfg, cell, n_train, test_ids)
            if not cell.job.done:
                (cell.folder / PROBE_FILE).unlink(missing_ok=True)
    return cells


def reference_cells(cells: list[Cell]) -> dict[str, Cell]:
    """Per model: the cell its probe, pictures and saliency come from -- its finished trained cell with the most
    training images, of the first seed that finished there (cells list the seeds in the config's order), among the
    cells that kept their weights (a cell whose results were copied from another machine without them still counts
    in the tables)."""
    best: dict[str, Cell] = {}
    for c in cells:
        if (c.job.done and not c.zero_shot and has_weights(c.folder)
                and c.budget > getattr(best.get(c.spec.name), "budget", -1)):
            best[c.spec.name] = c
    return best


def has_weights(folder: Path) -> bool:
    """Whether a finished cell's export still holds its weights."""
    return any((folder / EXPORT_DIR).glob("*.safetensors"))


DOCTOR_DIR, DOCTOR_JSON = "doctor", "doctor.json"  # synthvit doctor's findings on the compare's data (finetune/doctor.py)
CELL_MEMORY_GB = 3.0  # a cell's peak: ~2.3 GB resident evaluating 3840x2160 frames (BENCHMARKS.md), + its loader


def cpu_cells(cores: int, memory_gb: float | None) -> int:
    """Cells at once on a CPU-only machine: one per core with one compute thread each (on 2 cores two one-thread
    cells finish a compare ~1.4x sooner than one two-thread cell, BENCHMARKS.md), never more than memory holds."""
    n = cores if memory_gb is None else min(cores, int(memory_gb // CELL_MEMORY_GB))
    return max(1, n)


def child_env(gpu: int | None, cpu_jobs: int = 1) -> dict[str, str]:
    """The environment of a child job: no variables of a launched job, offline hub, its GPU; CPU jobs running
    ``cpu_jobs`` at once share the cores (``OMP_NUM_THREADS``, unless the user set it), not oversubscribe them."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV and not k.startswith("ACCELERATE_")}
    env.setdefault("HF_HUB_OFFLINE", "1")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    elif cpu_jobs > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // cpu_jobs)))
    return env


def core_shares(cpu_jobs: int) -> list[set[int]]:
    """Disjoint sets of this process's cores, one per CPU job run at once (sizes differ by at most one); empty when
    there is one job or the platform cannot pin processes to cores."""
    if cpu_jobs <= 1 or not hasattr(os, "sched_setaffinity"):
        return []
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < cpu_jobs:
        return []
    per, extra = divmod(len(cores), cpu_jobs)
    shares, start = [], 0
    for k in range(cpu_jobs):
        size = per + (k < extra)
        shares.append(set(cores[start:start + size]))
        start += size
    return shares


def run_jobs(jobs: list[Job], slots: list[int | None], desc: str) -> list[Job]:
    """Run the unfinished ``jobs``, one per slot at a time (a slot is a GPU index or None); returns failures. CPU
    jobs run at once are each pinned to their own cores (:func:`core_shares`): their compute threads and loader
    processes never compete with another job's, and a job's ``loader=auto`` sees the cores it really has."""
    todo = [j for j in jobs if not j.done]
    cpu_jobs = sum(s is None for s in slots)
    shares = core_shares(cpu_jobs)
    cpu_index = {slot: k for k, slot in enumerate(i for i, s in enumerate(slots) if s is None)}
    if len(todo) < len(jobs):
        print(f"{desc}: {len(jobs) - len(todo)} of {len(jobs)} already finished, skipped", file=sys.stderr)
    failed: list[Job] = []
    running: dict[int, tuple[Job, subprocess.Popen, float]] = {}
    bar = progress_bar(total=len(todo), desc=desc, unit="job")
    try:
        while todo or running:
            for slot in range(len(slots)):
                if slot not in running and todo:
                    job = todo.pop(0)
                    with open(job.log, "w") as log:
                        log.write(f"# {' '.join(job.argv)}\n# rank {os.environ.get('RANK', '0')}, "
                                  f"GPU {slots[slot] if slots[slot] is not None else 'none'}\n")
                        log.flush()
                        proc = subprocess.Popen(job.argv, stdout=log, stderr=subprocess.STDOUT,
                                                env=child_env(slots[slot], cpu_jobs))
                    if shares and slot in cpu_index:  # before the child starts its threads (torch's import)
                        try:
                            os.sched_setaffinity(proc.pid, shares[cpu_index[slot]])
                        except OSError:  # it has already ended: its exit is read below
                            pass
                    running[slot] = (job, proc, time.perf_counter())
            time.sleep(0.2)
            for slot, (job, proc, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[slot]
                bar.update(1)
                ok = proc.returncode == 0 and job.done
                bar.write(f"{desc}: {job.name} {'done' if ok else 'FAILED'} in {time.perf_counter() - t0:.0f} s"
                          + ("" if ok else f" (exit {proc.returncode}; see {job.log})"), file=sys.stderr)
                if not ok:
                    failed.append(job)
    finally:
        for job, proc, _ in running.values():
            proc.terminate()
        for job, proc, _ in running.values():
            proc.wait()
        bar.close()
    return failed
