"""Synthetic sets mixed into fine-tuning batches: ``synthetic=[FOLDER_OR_URL, ...]`` and ``synthetic_share``.

Each synthetic set is a synthvit shard folder (any backend: copy-paste of the user's own defects, procedural
defects in the user's frames, ...), read as real data (format ``shards``). In every batch the first
``round(synthetic_share * batch_size)`` samples come from them (uniformly over all their samples), the rest from
the real train split; both go through the same crop, rotation and flip path. Synthetic classes map into the real
set's by name (a binary real set takes every defect class as ``defect``); a class the real set lacks is one error
naming both lists.

Leakage: a set that drew on real images records their ids in its ``_info.json`` (backgrounds, pasted defects;
:meth:`generate.schema.DatasetInfo.real_ids`). :func:`check_leak` refuses a set that used an image of the current
test split, naming the ids -- whatever the set's folder was called, as long as every id it drew on is an image of
this data (a set built from other data is not this split's business).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from generate.schema import INFO_FILE, read_info
from synthvit.data import Item, RealData, load_real_data
from synthvit.io import SynthvitError, atomic_write_text

log = logging.getLogger("synthvit.finetune")

SHOWN = 10


class LeakError(SynthvitError):
    """A synthetic set or pretraining export that drew on an image of the current test split."""


def check_leak(source: str, used: dict[str, set[str]], data: RealData, test_ids: set[str]) -> int:
    """Refuse ``source`` (a synthetic set or export, for the message) if the real ids it drew on (folder -> ids)
    include a test id of ``data``; returns how many of its ids are images of ``data``."""
    known = {i.id for i in data.items}
    mine = 0
    for folder, ids in used.items():
        if not ids or not ids <= known:
            log.info("%s drew on %d images of %s, not all of them in %s: not checked against this split", source,
                     len(ids), folder, data.root)
            continue
        mine += len(ids)
        leaked = sorted(ids & test_ids)
        if leaked:
            shown = ", ".join(leaked[:SHOWN]) + (f" ... ({len(leaked)} in all)" if len(leaked) > SHOWN else "")
            raise LeakError(f"{source} drew on {len(leaked)} image(s) of the test split of {data.root}: {shown}. "
                            f"Build it from the train split only (the split finetune uses: splits.csv, or the "
                            f"seeded split of test_fraction/data_seed), or train without it")
    return mine


def parse_class_pairs(pairs: list[str], key: str = "synthetic_classes") -> dict[str, str]:
    """``["pit=pin-hole", ...]`` -> ``{"pit": "pin-hole"}``; a malformed or repeated pair is an error naming it."""
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, real = (part.strip() for part in str(pair).partition("="))
        if not sep or not name or not real or name in out:
            raise SynthvitError(f"{key}: {pair!r} is not a SYNTHETIC=REAL pair of class names"
                                + (f" ({name} is given twice)" if name in out else "") + f"; e.g. {key}=[pit=pin-hole]")
        out[name] = real
    return out


def class_lut(names: list[str], real: list[str], folder: str, pairs: dict[str, str] | None = None) -> np.ndarray:
    """Synthetic mask id -> real mask id (uint8 lookup table) from the class names (background first in both):
    ``pairs`` (synthetic name -> real name, ``synthetic_classes``) first, then equal names."""
    pairs = pairs or {}
    lut = np.zeros(256, np.uint8)
    unknown = [f"{n}={r}" for n, r in pairs.items() if r not in real[1:]]
    if unknown:
        raise SynthvitError(f"synthetic_classes: {', '.join(unknown)} name(s) no defect class of the real data "
                            f"({', '.join(real[1:])})")
    if len(real) == 2:  # binary real masks: every synthetic defect class is "the" defect
        lut[1:len(names)] = 1
        return lut
    missing = [n for n in names[1:] if n not in pairs and n not in real[1:]]
    if missing:
        raise SynthvitError(f"synthetic: {folder} has defect classes {', '.join(names[1:])}; the real data's are "
                            f"{', '.join(real[1:])}: {', '.join(missing)} match none of them by name. Generate the "
                            f"set with the real classes (the copypaste backend keeps them), map them "
                            f"(synthetic_classes=[{missing[0]}=<real class>, ...]), or use binary masks")
    for k, name in enumerate(names[1:], start=1):
        lut[k] = real.index(pairs.get(name, name))
    return lut


@dataclass
class SyntheticPool:
    """Every sample of the mixed-in sets, with the lookup table of its set."""
    items: list[Item] = field(default_factory=list)
    luts: list[np.ndarray] = field(default_factory=list)  # per item (shared arrays, one per set)
    records: list[dict] = field(default_factory=list)  # per set: what the run folder records

    def __len__(self) -> int:
        return len(self.items)


def load_synthetic(folders: list[str], data: RealData, test_ids: set[str],
                   class_pairs: list[str] | None = None) -> SyntheticPool:
    """The samples of ``folders`` for mixing into training on ``data``; every set checked for leakage and class
    mapping (by name, after the ``class_pairs`` of ``synthetic_classes``) before training starts."""
    pairs, paired = parse_class_pairs(class_pairs or []), set()
    if not data.has_masks:
        raise SynthvitError(f"synthetic: {data.root} has no masks; mixed batches train the dense head (task=seg)")
    pool = SyntheticPool()
    for folder in folders:
        try:
            info = read_info(folder)
        except SynthvitError as e:
            raise SynthvitError(f"synthetic: {e}; give synthvit shard folders (synthvit generate out_dir=...)") \
                from None
        used = info.real_ids()
        mine = check_leak(f"synthetic set {folder}", used, data, test_ids)
        syn = load_real_data(folder, "shards")
        if not syn.items:
            raise SynthvitError(f"synthetic: {folder} holds no samples")
        own = {n: r for n, r in pairs.items() if n in syn.seg_classes[1:]}  # the pairs naming this set's classes
        paired |= own.keys()
        lut = class_lut(syn.seg_classes, data.seg_classes, folder, own)
        pool.items += syn.items
        pool.luts += [lut] * len(syn.items)
        pool.records.append({"folder": str(folder), "samples": len(syn.items), "classes": syn.seg_classes,
                             "mapped_to": [data.seg_classes[lut[k]] for k in range(len(syn.seg_classes))],
                             "backend": info.generator.get("backend"), "real_ids": mine})
    if pairs.keys() - paired:
        raise SynthvitError(f"synthetic_classes: {', '.join(sorted(pairs.keys() - paired))} name(s) no defect class "
                            f"of the synthetic sets ({', '.join(sorted({c for r in pool.records for c in r['classes'][1:]}))})")
    return pool


IDS_FILE, BUILD_LOG, BUILD_RECORD = "real_ids.txt", "generate.log", "build.json"


def build_copypaste(cfg, train: list[Item], folder: Path, keys: dict) -> Path:
    """The copy-paste set of the few-defect advice (:mod:`finetune.doctor`): ``synthvit generate backend=copypaste``
    on ``cfg.data`` drawing only on ``train`` (the run's train images, listed in ``<set>.real_ids.txt``; its split
    keys are the run's, so no test image can be drawn) into ``folder``, with the generate ``keys`` of the recipe. A
    finished set (its ``_info.json``, written last) built from the same images, data and keys is kept
    (``<set>.build.json`` records them); one built otherwise (another budget, data seed or recipe) is built again.
    The first process of a launched job calls this; the others wait for it. Returns ``folder``."""
    folder = Path(folder)
    ids = folder.parent / f"{folder.name}.{IDS_FILE}"
    record_file = folder.parent / f"{folder.name}.{BUILD_RECORD}"
    record = {"data": str(cfg.data), "format": cfg.format, "test_fraction": cfg.test_fraction,
              "data_seed": cfg.data_seed, "split_missing": cfg.split_missing, "keys": keys,
              "ids": sorted(i.id for i in train)}
    if (folder / INFO_FILE).is_file() and record_file.is_file():
        try:
            if json.loads(record_file.read_text()) == record:
                return folder
        except ValueError:
            pass
    if folder.exists():  # unfinished, or built from other images or keys
        log.info("synthetic: %s was built from other train images or keys (or is unfinished): building it again",
                 folder)
        shutil.rmtree(folder)
    record_file.unlink(missing_ok=True)
    folder.mkdir(parents=True)
    atomic_write_text(ids, "".join(f"{i}\n" for i in record["ids"]))
    argv = [sys.executable, "-m", "synthvit", "generate", "backend=copypaste", f"out_dir={folder}",
            f"copypaste.data={cfg.data}", f"copypaste.format={cfg.format if cfg.format != 'imagefolder' else 'auto'}",
            f"copypaste.test_fraction={cfg.test_fraction}", f"copypaste.data_seed={cfg.data_seed}",
            f"copypaste.split_missing={cfg.split_missing}", f"real_ids={ids}", f"seed={cfg.data_seed}",
            "num_workers=1", "preview=0", "image_format=png", *(f"{k}={v}" for k, v in keys.items())]
    log.info("synthetic: building the advised copy-paste set from %d train images into %s", len(train), folder)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "LOCAL_", "WORLD_", "RANK",
                                                                      "MASTER_", "TORCHELASTIC"))}
    log_file = folder.parent / f"{folder.name}.{BUILD_LOG}"
    with open(log_file, "w") as out:
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    if done.returncode or not (folder / INFO_FILE).is_file():
        tail = log_file.read_text(errors="replace").strip().splitlines()[-3:]
        raise SynthvitError(f"synthetic: building the advised copy-paste set in {folder} failed (exit "
                            f"{done.returncode}): {' | '.join(tail)}; full log: {log_file}")
    atomic_write_text(record_file, json.dumps(record, indent=1) + "\n")
    return folder
