"""Synthetic sets built per budget from a cell's own train images (a model row's ``synthetic: GENERATE_CONFIG``).

For every budget a row with ``synthetic`` runs at, one ``synthvit generate`` job builds a set from exactly that
budget's train images (the ones its cells train on, listed in ``real_ids.txt``: backgrounds and pasted defects are
drawn from them alone, never from test images nor from train images outside the budget), once per (generate config,
budget, data seed) and shared by every seed and every row that names the same config. The cells mix it into their
batches (``finetune.synthetic``, ``finetune.synthetic_share``). A set is finished when its ``_info.json`` exists
(generate writes it last), so re-running compare skips it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

from generate.schema import INFO_FILE
from synthvit.compare.config import CompareConfig
from synthvit.compare.matrix import Job, budget_folder, synthetic_folder
from synthvit.config import ConfigError
from synthvit.data import Item, RealData, budget_subset
from synthvit.io import atomic_write_text

IDS_FILE = "real_ids.txt"
GENERATE_LOG = "generate.log"
# the keys that point each backend at the real-data folder it draws on, and at the split finetune draws there
DATA_KEYS = {"copypaste": ("copypaste.data", "copypaste.test_fraction", "copypaste.data_seed"),
             "procedural": ("procedural.backgrounds", "procedural.backgrounds_test_fraction",
                            "procedural.backgrounds_data_seed")}


# defects.fit (any backend): the procedural defects fitted to the labelled defects of the same train images
FIT_KEYS = ("defects.fit", "defects.fit_test_fraction", "defects.fit_data_seed")


def data_keys(config: str) -> list[tuple[str, str, str]]:
    """The real-data keys (folder, test fraction, data seed) of the generate config ``config``'s backend, and
    ``FIT_KEYS`` when it fits its defects (``defects.fit``)."""
    try:
        tree = yaml.safe_load(Path(config).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"models.synthetic: cannot read the generate config {config} ({e})") from None
    backend = tree.get("backend", "procedural")
    if backend not in DATA_KEYS:
        raise ConfigError(f"models.synthetic: {config} uses backend {backend!r}; a set built from a cell's own "
                          f"images needs one that draws on real data: {', '.join(DATA_KEYS)}")
    defects = tree.get("defects")
    return [DATA_KEYS[backend]] + ([FIT_KEYS] if isinstance(defects, dict) and defects.get("fit") else [])


def plan_sets(cfg: CompareConfig, data: RealData, train: list[Item], budgets: list[int], n_budget: int,
              write: bool = True) -> list[Job]:
    """One generate job per (row config, budget); with ``write``, each set's ``real_ids.txt``: the ids of the
    budget's train images (``n_budget``: the count that means "all", as for the cells)."""
    jobs: dict[Path, Job] = {}
    for spec in cfg.models:
        if not spec.synthetic:
            continue
        keys = data_keys(spec.synthetic)
        for budget in budgets:
            shards = synthetic_folder(cfg, spec.synthetic, budget)
            folder = shards.parent  # real_ids.txt and the log beside the set (generate wants a folder of its own)
            if folder in jobs:
                continue
            limit = 0 if budget >= n_budget else budget
            items = budget_subset(data, train, limit if cfg.budget_unit == "images" else 0,
                                  limit if cfg.budget_unit == "defective" else 0, cfg.finetune.data_seed)
            if write:
                folder.mkdir(parents=True, exist_ok=True)
                atomic_write_text(folder / IDS_FILE, "".join(f"{i.id}\n" for i in items))
            data_args = [f"{key}={value}" for folder_key, fraction_key, seed_key in keys for key, value in (
                (folder_key, cfg.data), (fraction_key, cfg.finetune.test_fraction), (seed_key, cfg.finetune.data_seed))]
            argv = [sys.executable, "-m", "synthvit", "generate", "--config", spec.synthetic, f"out_dir={shards}",
                    *data_args, f"real_ids={folder / IDS_FILE}", f"seed={cfg.finetune.data_seed}"]
            jobs[folder] = Job(f"synthetic {Path(spec.synthetic).stem} {budget_folder(cfg, budget)}", folder, argv,
                               f"{shards.name}/{INFO_FILE}", GENERATE_LOG)
    return list(jobs.values())
