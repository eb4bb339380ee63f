"""``synthvit compare``: run the matrix (skipping finished cells), probe each model's cost, write the report.

Under ``accelerate launch`` (or any launcher that sets RANK / WORLD_SIZE / LOCAL_RANK) each rank runs every
``world``-th cell on its local GPU; ranks meet at the barrier of :mod:`synthvit.ranks` (long timeout), and rank 0
writes the report.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

import timm
import torch

import generate.schema  # noqa: F401  (registers format=shards with synthvit.data)
from finetune.artifacts import read_split
from synthvit.compare.config import CompareConfig
from synthvit.compare.matrix import (
    CELL_MEMORY_GB,
    DOCTOR_DIR,
    DOCTOR_JSON,
    PROBE_FILE,
    PROBE_LOG,
    Job,
    child_env,
    cpu_cells,
    effective_budgets,
    plan_cells,
    reference_cells,
    run_jobs,
    zero_shot_reason,
)
from synthvit.compare.synthetic import plan_sets
from synthvit.config import CONFIG_FILE, ConfigError, dump_yaml
from synthvit.data import has_defect, load_real_data, near_duplicates, pairs_record, pairs_text, split_ids
from synthvit.io import SynthvitError, atomic_write_text, dumps_json
from synthvit.lock import folder_lock
from synthvit.models import SEG_BASELINES, ExportMeta, class_groups, read_export_meta
from synthvit.progress import progress_bar
from synthvit.ranks import Ranks, available_memory_gb, join, usable_cores

log = logging.getLogger("synthvit.compare")
NEAR_DUPLICATES_FILE = "near_duplicates.json"  # the compare folder's list of train/test near-duplicates


def _slots(ranks: Ranks, parallel: int) -> list[int | None]:
    """GPU per concurrent job: the local GPU under a launcher, else the first ``parallel`` GPUs (default all),
    or ``parallel`` CPU jobs (default: see :func:`cpu_cells`)."""
    gpus = torch.cuda.device_count()
    if ranks.world > 1:
        return [ranks.local % gpus] if gpus else [None]
    if gpus:
        return [i % gpus for i in range(parallel or gpus)]
    cores = usable_cores()
    n = parallel or cpu_cells(cores, available_memory_gb())
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, cores // n))
    print(f"compare: {n} cell(s) at once on {cores} CPU core(s), {threads} compute thread(s) each"
          + (" (parallel=0: one cell per core, at most one per "
             f"{CELL_MEMORY_GB:g} GB of available memory)" if not parallel else f" (parallel={parallel})")
          + ("; each pinned to its own core(s), where a cell's loader=auto cuts its crops in process unless its "
             "cores cover its threads plus num_workers" if n > 1 and n <= cores else ""), file=sys.stderr)
    return [None] * n


def _check_models(cfg: CompareConfig, data) -> None:
    """Fail before any cell runs: a task the data cannot serve, an unknown model, a missing init export, or a
    zero-shot cell that cannot run (an export without a dense head, or pretrain classes the data cannot take)."""
    for spec in cfg.models:
        data.check_task(spec.task or cfg.finetune.task)
        if spec.model not in SEG_BASELINES and not timm.is_model(spec.model):
            raise ConfigError(f"models.{spec.name}.model: {spec.model!r} is neither a timm model nor one of "
                              f"{', '.join(SEG_BASELINES)}")
        if spec.init and not Path(spec.init).is_dir():
            raise SynthvitError(f"models.{spec.name}.init: {spec.init} is not a folder; give a synthvit pretrain "
                                f"export (holding model.safetensors and config.json)")
        if cfg.zero_shot and spec.init and not zero_shot_reason(cfg, spec):
            _check_zero_shot(spec, read_export_meta(spec.init), data.seg_classes)


def _check_zero_shot(spec, meta: ExportMeta, seg_classes: list[str]) -> None:
    """The zero-shot cell of ``spec`` can run: its export has a dense head whose classes map onto the data's."""
    where = f"models.{spec.name}.init: {spec.init}"
    if not meta.heads.has_seg:
        raise SynthvitError(f"{where} was pretrained with objective={meta.heads.objective}: no dense head for its "
                            f"zero-shot cell; pretrain with objective=seg or cls+seg, or remove zero-shot from budgets")
    try:
        class_groups(meta.class_names, seg_classes)
    except SynthvitError as e:
        raise SynthvitError(f"{where}: {e}; or remove zero-shot from budgets") from None


def _doctor(cfg: CompareConfig, folder: Path) -> None:
    """``synthvit doctor`` on the compare's data with its finetune settings and first model, in a child process as
    the cells run (once: a finished one is kept), so the report shows what the data holds; the problems it finds
    are printed and reported, they do not stop the compare."""
    import dataclasses
    import subprocess

    if (folder / DOCTOR_JSON).is_file():
        return
    spec = cfg.models[0]
    folder.mkdir(parents=True, exist_ok=True)
    tree = dataclasses.replace(cfg.finetune, data=cfg.data, model=spec.model, task=spec.task or cfg.finetune.task,
                               init="", weights="", synthetic=[])
    atomic_write_text(folder / "doctor.yaml", dump_yaml(tree))
    argv = [sys.executable, "-m", "synthvit", "doctor", "--config", str(folder / "doctor.yaml"),
            f"report_dir={folder}", *spec.overrides]
    res = subprocess.run(argv, env=child_env(None))
    if res.returncode == 1 and (folder / DOCTOR_JSON).is_file():
        log.warning("compare: the doctor found problems in %s (%s); the compare goes on", cfg.data,
                    folder / DOCTOR_JSON)
    elif res.returncode:
        log.warning("compare: the doctor could not examine %s (exit %d); the report goes without it", cfg.data,
                    res.returncode)


def _data_note(cfg: CompareConfig, data, n_train: int, n_test: int, duplicates: str = "") -> str:
    return (f"Data: `{cfg.data}` ({data.fmt} layout): {n_train} train and {n_test} test images; segmentation classes "
            f"{', '.join(data.seg_classes) or 'none'}; image classes {', '.join(data.cls_classes) or 'none'}."
            + (" Budgets count the train images that hold a defect (nested, stratified by class); every "
               "defect-free train image is in every cell." if cfg.budget_unit == "defective" else "")
            + (f" {duplicates}" if duplicates else ""))


def _near_duplicates(cfg: CompareConfig, data, split: dict[str, str], out: Path) -> str:
    """The report's sentence on train/test pairs of near-identical images (pHash within
    ``finetune.near_duplicate_distance`` bits), all of them listed in ``near_duplicates.json``; warned once."""
    distance = cfg.finetune.near_duplicate_distance
    if not distance:
        (out / NEAR_DUPLICATES_FILE).unlink(missing_ok=True)
        return "Near-duplicates across the split: not checked (finetune.near_duplicate_distance=0)."
    bar = progress_bar(total=len(data.items), desc="near-duplicates", unit="img")
    pairs = near_duplicates(data.items, split, distance, bar)
    bar.close()
    record = pairs_record(pairs, distance, sum(v == "train" for v in split.values()),
                          sum(v == "test" for v in split.values()))
    atomic_write_text(out / NEAR_DUPLICATES_FILE, dumps_json(record, indent=2) + "\n")
    rule = f"pHash, Hamming distance <= {distance} of 64 bits"
    if not pairs:
        return f"Near-duplicates across the split: none found ({rule})."
    log.warning("near-duplicates across the split: %d train/test pair(s) (%s): %s; a cell whose budget takes the "
                "train image of a pair trains on a copy of a test image (all in %s; each cell's own in its run "
                "folder)", len(pairs), rule, pairs_text(pairs), out / NEAR_DUPLICATES_FILE)
    return (f"**Near-duplicates across the split: {len(pairs)} train/test pair(s)** ({rule}; train ~ test): "
            f"{pairs_text(pairs)}. Such copies leak test content into training and flatter every cell's test "
            f"metrics; all are listed in `{NEAR_DUPLICATES_FILE}`.")


def run(cfg: CompareConfig) -> Path:
    if not cfg.data:
        raise ConfigError("data: give the real-data folder, e.g. data=../shared/datasets/magnetic-tile")
    ranks = join()
    with contextlib.ExitStack() as held:  # the folder's lock, from its creation to the end
        return _run(cfg, ranks, Path(cfg.out_dir), held)


def _run(cfg: CompareConfig, ranks: Ranks, out: Path, held: contextlib.ExitStack) -> Path:
    data = load_real_data(cfg.data, cfg.finetune.format, max_pixels=cfg.finetune.max_pixels,
                          split_missing=cfg.finetune.split_missing)
    _check_models(cfg, data)
    split = split_ids(data, cfg.finetune.test_fraction, cfg.finetune.data_seed)
    test_items = [i for i in data.items if split[i.id] == "test"]
    n_train = sum(v == "train" for v in split.values())
    if cfg.budget_unit == "defective":  # budgets count the defective train images; defect-free ones all stay
        n_train = sum(1 for i in data.items if split[i.id] == "train" and has_defect(i))
        if not n_train:
            raise SynthvitError(f"budget_unit=defective: no train image of {cfg.data} holds a defect")
    duplicates = ""
    if ranks.rank == 0:
        held.enter_context(folder_lock(out))  # one compare per folder at a time
        atomic_write_text(out / CONFIG_FILE, dump_yaml(cfg))
        _doctor(cfg, out / DOCTOR_DIR)
        duplicates = _near_duplicates(cfg, data, split, out)
    cells = plan_cells(cfg, n_train, write=ranks.rank == 0, test_ids={i.id for i in test_items})
    train_items = [i for i in data.items if split[i.id] == "train"]
    sets = plan_sets(cfg, data, train_items, effective_budgets(cfg.train_budgets, n_train), n_train,
                     write=ranks.rank == 0)
    ranks.barrier()
    probes = []
    if not cfg.report_only:
        slots = _slots(ranks, cfg.parallel)
        if sets:  # every cell that mixes a set in needs it first
            run_jobs(sets[ranks.rank::ranks.world], slots, "synthetic sets")
            ranks.barrier()
        run_jobs([c.job for c in cells][ranks.rank::ranks.world], slots, "cells")
        ranks.barrier()
        probes = [_probe_job(cfg, c) for c in reference_cells(cells).values()]
        run_jobs(probes[ranks.rank::ranks.world], slots, "probes")
        ranks.barrier()
    if ranks.rank == 0:
        from synthvit.compare.compose import compose

        test_items = _pinned_test_items(cells, test_items)
        report = compose(cfg, cells, test_items, _data_note(cfg, data, n_train, len(test_items), duplicates))
        md, page = report.write(out)
        print(f"synthvit compare: report -> {page} (and {md.name})", file=sys.stderr)
    ranks.finish()
    unfinished = [j for j in sets if not j.done] + [c.job for c in cells if not c.job.done] + [
        p for p in probes if not p.done]
    if cfg.report_only:
        print(f"synthvit compare: report_only: {sum(c.job.done for c in cells)} of {len(cells)} cells finished",
              file=sys.stderr)
    elif unfinished:
        raise SynthvitError(f"{len(unfinished)} job(s) did not finish: " + "; ".join(
            f"{j.name} (log: {j.log})" for j in unfinished) + ". Re-run the same command to retry just those.")
    return out


def _pinned_test_items(cells, test_items: list) -> list:
    """The test images the report's pictures and CKA may use: today's test split, less any image a finished cell's
    own ``split.csv`` does not record as test (a cell keeps the split it ran with; a stale one runs again first)."""
    keep = {i.id for i in test_items}
    for cell in cells:
        if cell.job.done:
            recorded = read_split(cell.folder) or {}
            keep &= {i for i, s in recorded.items() if s == "test"}
    dropped = len(test_items) - len(keep)
    if dropped:
        log.warning("compare: %d test image(s) are not test images of every finished cell: the report's pictures "
                    "leave them out", dropped)
    return [i for i in test_items if i.id in keep]


def _probe_job(cfg: CompareConfig, cell) -> Job:
    argv = [sys.executable, "-m", "synthvit.compare.probe", str(cell.folder), "--size", cfg.probe_size,
            "--repeats", str(cfg.probe_repeats)]
    return Job(f"{cell.spec.name} probe", cell.folder, argv, PROBE_FILE, PROBE_LOG)
