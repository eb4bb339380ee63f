"""One run per folder: what ``synthvit finetune`` may do with the ``out_dir`` it is given, decided before anything
is written (the files are :mod:`finetune.artifacts`'; the lock is :mod:`synthvit.lock`'s).

=====================  ============================================================================================
the folder holds        finetune
=====================  ============================================================================================
nothing of a run        trains
a finished run          refuses (metrics.json, or an export): ``overwrite=true`` removes it first, or another out_dir
an export of this       evaluates that export (the run stopped while evaluating: re-running continues)
config, no metrics
an unfinished run of    resumes from its newest checkpoint (``resume=auto``), or starts over (``resume=none``)
this config
an unfinished run of    refuses, naming what differs: ``resume=none`` or ``overwrite=true`` starts over there
another config
=====================  ============================================================================================
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from finetune.artifacts import (
    EXPORT_DIR,
    METRICS_FILE,
    TRAIN_SUMMARY_FILE,
    clear_run,
    config_changes,
    pinned_split,
    run_status,
)
from finetune.config import FinetuneConfig
from finetune.train import training_config
from synthvit.io import SynthvitError, atomic_write_text, dumps_json

log = logging.getLogger("synthvit.finetune")


def claim(cfg: FinetuneConfig, run_dir: Path, main: bool = True) -> str:
    """``train`` or ``evaluate`` (the folder holds this config's export without test metrics), after clearing an
    earlier run's files where ``overwrite=true`` or ``resume=none`` asks for it (``main``: the process that writes);
    a folder that holds another run is an error naming it and the ways out, nothing touched."""
    status = run_status(run_dir)
    if status == "empty":
        return "train"
    if cfg.overwrite:
        _clear(run_dir, main, "overwrite=true")
        return "train"
    changes = config_changes(run_dir, cfg, training_config)
    if status == "finished" or (status == "exported" and (changes or not cfg.evaluate or not cfg.steps)):
        what = METRICS_FILE if status == "finished" else f"{EXPORT_DIR}/"
        raise SynthvitError(f"out_dir: {run_dir} holds a finished run ({what}); a finished run is never written "
                            f"over: give overwrite=true to replace it, or another out_dir")
    if status == "exported":
        log.info("%s holds this run's export without test metrics (stopped while evaluating): evaluating it",
                 run_dir)
        return "evaluate"
    if changes and cfg.resume != "none":
        raise SynthvitError(f"out_dir: {run_dir} holds an unfinished run of another config ({'; '.join(changes)}); "
                            f"resume=none or overwrite=true starts over there, or give another out_dir")
    if cfg.resume == "none":
        _clear(run_dir, main, "resume=none")
    return "train"


def _clear(run_dir: Path, main: bool, why: str) -> None:
    if main:
        gone = clear_run(run_dir)
        log.info("%s: removed the earlier run's files from %s (%s)", why, run_dir, ", ".join(gone) or "none")


def run_split(run_dir: Path, data, recorded_data: str, data_root: str | None = None) -> dict[str, str] | None:
    """id -> train, test or unused of a run's images as its ``split.csv`` records them (:func:`pinned_split`),
    saying how many images of the data it ignores; None for a folder without ``split.csv``. ``data_root``: the
    folder read now when it is not ``recorded_data``, the one the run trained on (other data: images the run never
    saw by id are test images)."""
    own = data_root is None or _same_folder(data_root, recorded_data)
    pinned = pinned_split(run_dir, [i.id for i in data.items], str(data_root or recorded_data), own_data=own)
    if pinned is None:
        return None
    split, new = pinned
    if new and own:
        log.warning("%d image(s) of %s are not in %s/split.csv (added since the run): not used (%s); the run's split "
                    "is pinned, a new run takes them in", len(new), recorded_data, run_dir,
                    ", ".join(repr(i) for i in new[:5]) + (" ..." if len(new) > 5 else ""))
    elif new:
        log.info("%d image(s) of %s are not in the run's split: test images for it", len(new), data_root)
    return split


def _same_folder(a: str, b: str) -> bool:
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def write_train_summary(run_dir: Path, summary: dict) -> None:
    """Training's figures (steps, wall time, peak memory...) beside the export, so that a run stopped while
    evaluating still reports them when re-running evaluates its export."""
    atomic_write_text(run_dir / TRAIN_SUMMARY_FILE,
                      dumps_json({k: v for k, v in summary.items() if k != "model"}, indent=2) + "\n")


def read_train_summary(run_dir: Path) -> dict:
    path = run_dir / TRAIN_SUMMARY_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SynthvitError(f"{path}: unreadable ({e}); give overwrite=true to train the run again") from None
