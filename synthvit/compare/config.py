"""Typed config of ``synthvit compare`` (light: the CLI imports it for --help)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Union

from finetune.config import FinetuneConfig, Task
from synthvit.config import ConfigError, check_min, repeated_overrides

ModelTask = Literal["", Task]  # "": finetune.task
ZERO_SHOT = "zero-shot"  # a budget: the init export evaluated as it is (finetune steps=0), no real training
Budget = Union[int, Literal["zero-shot"]]
BudgetUnit = Literal["images", "defective"]
# finetune keys that compare sets per cell: a model's overrides may not change them
CELL_KEYS = ("data", "out_dir", "model", "init", "task", "seed", "data_seed", "train_limit", "defective_limit")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass(kw_only=True)
class ModelSpec:
    """One row of the matrix: a finetune ``model`` (+ optional ``init`` export) under a report name."""
    name: str = field(default="", metadata={"help": "label in the report and folder name"})
    model: str = field(default="", metadata={"help": "finetune model: a timm name or a segmentation baseline"})
    init: str = field(default="", metadata={"help": "a synthvit pretrain export (synthetic pretraining)"})
    pretrained: bool = field(default=False, metadata={
        "help": "start from the model's public weights (finetune pretrained=true: timm's tag in the model name, "
                "or the CNN baseline's encoder=; the hub, or the Hugging Face cache offline)"})
    task: ModelTask = field(default="", metadata={"help": "empty: finetune.task"})
    overrides: list[str] = field(default_factory=list, metadata={"help": "finetune key=value for this model"})
    synthetic: str = field(default="", metadata={
        "help": "a generate config (backend copypaste or procedural) built once per budget from that budget's own "
                "train images and mixed into this model's batches (finetune.synthetic_share)"})

    def __post_init__(self):
        if not self.model:
            raise ConfigError("models: every entry needs a model (a timm name, deeplabv3plus_resnet50 or "
                              "hrnet_w18_seg)")
        self.name = self.name or self.model + ("-init" if self.init else "") + ("-pretrained" if self.pretrained else "")
        if not _NAME.match(self.name):
            raise ConfigError(f"models: name {self.name!r} must be letters, digits and ._+- (it names a folder)")
        bad = [o for o in self.overrides if "=" not in o]
        if bad:
            raise ConfigError(f"models.{self.name}.overrides: {bad} are not key=value")
        repeated = repeated_overrides(self.overrides)
        if repeated:
            raise ConfigError(f"models.{self.name}.overrides: {repeated[0].rsplit(': ', 1)[0]}; give each key once")
        if self.synthetic and any(o.split("=", 1)[0].strip() == "synthetic" for o in self.overrides):
            raise ConfigError(f"models.{self.name}: give synthetic (a generate config built per budget) or an "
                              f"override synthetic=[...] (fixed sets), not both; finetune.synthetic adds fixed sets "
                              f"to every row")
        owned = [o for o in self.overrides if o.split("=", 1)[0].strip() in CELL_KEYS]
        if owned:
            raise ConfigError(f"models.{self.name}.overrides: {owned} set keys that compare sets per cell "
                              f"({', '.join(CELL_KEYS)}); use the entry's own keys, seeds=[...], budgets=[...] or "
                              f"finetune.data_seed (the same for every model)")


def _default_models() -> list[ModelSpec]:
    return [ModelSpec(name="vit-scratch", model="vit_tiny_patch16_224"),
            ModelSpec(name="cnn-deeplabv3plus-r50", model="deeplabv3plus_resnet50")]


@dataclass(kw_only=True)
class CompareConfig:
    data: str = field(default="", metadata={"help": "real-data folder (any finetune format, or synthvit shards)"})
    out_dir: str = "runs/compare"
    models: list[ModelSpec] = field(default_factory=_default_models,
                                    metadata={"help": "the rows of the matrix; the keys of an entry follow"})
    budgets: list[Budget] = field(default_factory=lambda: [50, 100, 250, 500, 0], metadata={
        "help": "nested train-image budgets (0: all train images); zero-shot: also evaluate each init export as it "
                "is"})
    budget_unit: BudgetUnit = field(default="images", metadata={
        "help": "what budgets count: images (train images, drawn from all of them) or defective (train images "
                "that hold a defect, nested and stratified by class; every defect-free train image stays in)"})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={
        "help": "every cell once per seed (finetune.seed: initialisation, sample order, augmentation); the "
                "train subsets stay those of finetune.data_seed"})
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig,
                                     metadata={"help": "shared by every cell: equal budgets across models"})
    parallel: int = field(default=0, metadata={
        "help": "cells at once (0: one per visible GPU; on a CPU-only machine one per core, one compute thread each, "
                "at most one per 3 GB of available memory)"})
    probe_size: str = field(default="3840x2160", metadata={"help": "frame size of the inference speed probe"})
    probe_repeats: int = 2
    report_images: int = field(default=4, metadata={"help": "test images in the qualitative and saliency grids"})
    cka_images: int = field(default=64, metadata={"help": "test crops for CKA (0: no CKA)"})
    cka_batch: int = field(default=16, metadata={"help": "minibatch of the unbiased CKA estimator (>= 4)"})
    analysis_size: int = field(default=0, metadata={"help": "crop side for grids and CKA (0: finetune.crop_size)"})
    report_only: bool = field(default=False, metadata={
        "help": "write the report from the cells finished so far (and the probes measured so far) and run nothing: "
                "a look at a matrix still running elsewhere, or one whose cells ran on other machines"})

    def __post_init__(self):
        names = [m.name for m in self.models]
        if not self.models:
            raise ConfigError("models: give at least one model")
        if len(set(names)) != len(names):
            raise ConfigError(f"models: names must be unique, got {names}")
        counts = self.train_budgets
        if not counts or any(b < 0 for b in counts) or len(set(self.budgets)) != len(self.budgets):
            raise ConfigError(f"budgets: {self.budgets} not accepted; distinct train-image counts >= 0 (0: all "
                              f"train images), at least one, and optionally {ZERO_SHOT!r}")
        if not self.seeds or any(s < 0 for s in self.seeds) or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: {self.seeds} not accepted; give one or more distinct integers >= 0")
        check_min(self, 0, "parallel", "report_images", "cka_images", "analysis_size")
        check_min(self, 1, "probe_repeats")
        for key in ("data", "init", "weights"):
            if getattr(self.finetune, key):
                raise ConfigError(f"finetune.{key}: set per cell by compare; use data=..., or models[].init / "
                                  f"models[].overrides")
        if self.finetune.train_limit or self.finetune.defective_limit:
            raise ConfigError("finetune.train_limit and finetune.defective_limit: set per cell by compare; use "
                              "budgets=[...] (and budget_unit)")
        if self.finetune.seed:
            raise ConfigError("finetune.seed: set per cell by compare; use seeds=[...]")
        advised = [m.name for m in self.models if any(o.split("=", 1)[0].strip() == "advise" for o in m.overrides)]
        if self.finetune.advise or advised:
            raise ConfigError(f"{'finetune.advise' if self.finetune.advise else 'models.' + advised[0] + '.overrides'}: "
                              f"advise=true is not for compare cells (each cell's config is written whole, so every "
                              f"key is given and no advice would apply; an advised config would make every finished "
                              f"cell look stale). Run `synthvit doctor` on the data and put its advice in the config: "
                              f"the few-defect recipe is a row with `synthetic: "
                              f"configs/generate/copypaste-cell-binary.yaml` (or copypaste-cell.yaml)")
        if not self.finetune.steps:
            raise ConfigError(f"finetune.steps: 0 (zero-shot) is set per cell by compare; add {ZERO_SHOT!r} to "
                              f"budgets")
        if self.cka_images and self.cka_batch < 4:
            raise ConfigError(f"cka_batch: {self.cka_batch} too small; the unbiased estimator needs >= 4")

    @property
    def train_budgets(self) -> list[int]:
        """The train-image counts of ``budgets`` (without zero-shot)."""
        return [b for b in self.budgets if b != ZERO_SHOT]

    @property
    def zero_shot(self) -> bool:
        return ZERO_SHOT in self.budgets
