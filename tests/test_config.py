import dataclasses
import types
from typing import Literal, Union, get_args, get_origin, get_type_hints

import pytest
import yaml

from generate.config import GenerateConfig
from synthvit.cli import STAGES, _load, main
from synthvit.config import ConfigError, describe, dump_yaml, load_config, parse_size


def test_defaults_yaml_diff_and_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("num_samples: 10\nprocedural:\n  gray_prob: 1.0\n  camera:\n    noise: 0\n")
    cfg = load_config(GenerateConfig, cfg_file, ["image_size=3840x2160", "defects.classes=[crack,pit]",
                                                 "procedural.camera.blur_prob=0.5", "seed=7"])
    assert cfg.num_samples == 10 and cfg.seed == 7
    assert cfg.size == (3840, 2160)
    assert cfg.procedural.gray_prob == 1.0 and cfg.procedural.camera.noise == 0.0
    assert cfg.defects.classes == ["crack", "pit"]
    assert cfg.procedural.camera.blur_prob == 0.5
    # untouched keys keep their defaults
    assert cfg.samples_per_shard == GenerateConfig().samples_per_shard
    # the dump round-trips
    again = tmp_path / "again.yaml"
    again.write_text(dump_yaml(cfg))
    assert load_config(GenerateConfig, again) == cfg


def test_renamed_defect_keys_still_read(tmp_path, caplog):
    """procedural.<defect key> (before the defects.* group) is read as defects.<key>, from a file and from the
    command line, with one warning line; both names with different values is an error naming both."""
    old = tmp_path / "old.yaml"
    old.write_text("procedural:\n  gray_prob: 1.0\n  classes: [crack, pit]\n  max_defects: 4\n")
    with caplog.at_level("WARNING", logger="synthvit.config"):
        cfg = load_config(GenerateConfig, old, ["procedural.defect_free_prob=0.5"])
    assert cfg.defects.classes == ["crack", "pit"] and cfg.defects.max_defects == 4
    assert cfg.defects.defect_free_prob == 0.5 and cfg.procedural.gray_prob == 1.0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 2 and "procedural.classes -> defects.classes" in warned[0]
    assert "command line" in warned[1] and "procedural.defect_free_prob -> defects.defect_free_prob" in warned[1]
    assert cfg == load_config(GenerateConfig, overrides=[
        "procedural.gray_prob=1.0", "defects.classes=[crack,pit]", "defects.max_defects=4",
        "defects.defect_free_prob=0.5"])
    # the same value under both names is accepted; the command line still overrides the file
    assert load_config(GenerateConfig, overrides=["procedural.max_defects=2", "defects.max_defects=2"]
                       ).defects.max_defects == 2
    assert load_config(GenerateConfig, old, ["defects.max_defects=5"]).defects.max_defects == 5
    with pytest.raises(ConfigError, match=r"command line: procedural.max_defects \(now defects.max_defects\) is 2 "
                                          r"but defects.max_defects is 3; give only defects.max_defects"):
        load_config(GenerateConfig, overrides=["procedural.max_defects=2", "defects.max_defects=3"])
    both = tmp_path / "both.yaml"
    both.write_text("procedural:\n  classes: [crack]\ndefects:\n  classes: [pit]\n")
    with pytest.raises(ConfigError, match=f"{both}: procedural.classes \\(now defects.classes\\)"):
        load_config(GenerateConfig, both)


def test_comma_list_override():
    assert load_config(GenerateConfig, overrides=["procedural.surfaces=metal,fabric"]).procedural.surfaces == [
        "metal", "fabric"]


@pytest.mark.parametrize("override, expected", [
    (["num_sampels=3"], "unknown key num_sampels; accepted keys: backend, out_dir"),
    (["procedural.colour=1"], "unknown key procedural.colour; accepted keys under procedural: surfaces"),
    (["num_samples=many"], "num_samples: expected an integer, got 'many'"),
    (["procedural.gray_prob=yes"], "procedural.gray_prob: expected a number"),
    (["verify=1"], "verify: expected true or false"),
    (["image_size=4kx2k"], "image_size"),
    (["image_size=16"], "image_size: 16x16 is impossible"),
    (["backend=stylegan9"], "unknown backend 'stylegan9'; available: contours, copypaste, diffusion, procedural, stylegan"),
    (["defects.classes=[crack,rust]"], "defects.classes"),
    (["defects.defect_free_prob=1.5"], "defect_free_prob: 1.5 is not a probability"),
    (["image_format=webp"], "image_format: 'webp' is not accepted; choose one of 'jpg' | 'png'"),
    (["seed"], "is not of the form key=value"),
])
def test_config_errors_name_the_key(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(GenerateConfig, overrides=override)
    assert expected in str(e.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(GenerateConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(GenerateConfig, bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("num_sample: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key num_sample.*\(config file .*typo.yaml\)"):
        load_config(GenerateConfig, typo)


@pytest.mark.parametrize("value, size", [(64, (64, 64)), ("512", (512, 512)), ("3840x2160", (3840, 2160)),
                                         ("33X47", (33, 47))])
def test_parse_size(value, size):
    assert parse_size(value) == size


def test_help_lists_every_key_with_default(capsys):
    assert main(["generate", "--help"]) == 0
    out = capsys.readouterr().out
    keys = describe(GenerateConfig)
    assert len(keys) > 20
    for line in keys:
        assert line in out
    assert "num_samples: int = 1024" in out and "procedural.camera.noise: float = 4.0" in out
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "generate" in out and "compare" in out
    assert "models: list[group] = [{name: vit-scratch, model: vit_tiny_patch16_224" in out


def test_cli_errors_exit_codes(capsys, tmp_path):
    assert main(["generate", "nope=1"]) == 2
    assert "config error: unknown key nope" in capsys.readouterr().err
    assert main(["pretrainx"]) == 2
    assert "unknown stage 'pretrainx'" in capsys.readouterr().err
    assert main(["generate", "--bogus", "1"]) == 2
    assert "unknown key bogus" in capsys.readouterr().err
    assert main(["generate", "-x"]) == 2
    assert "unknown option -x" in capsys.readouterr().err


def test_every_config_is_a_kw_only_dataclass():
    assert dataclasses.is_dataclass(GenerateConfig)
    with pytest.raises(TypeError):
        GenerateConfig(1)  # kw_only: no positional construction


def test_every_shipped_config_loads():
    from pathlib import Path

    import yaml

    from finetune.config import FinetuneConfig
    from pretrain.config import PretrainConfig

    root = Path(__file__).resolve().parents[1] / "configs"
    from synthvit.compare.config import CompareConfig

    # generate configs that compare completes per budget (a model row's `synthetic:`) load with their data given
    templates = {Path(m["synthetic"]).name for f in (root / "compare").glob("*.yaml")
                 for m in (yaml.safe_load(f.read_text()) or {}).get("models", []) if m.get("synthetic")}
    for stage, cls in (("generate", GenerateConfig), ("pretrain", PretrainConfig), ("finetune", FinetuneConfig),
                       ("compare", CompareConfig)):
        files = sorted((root / stage).glob("*.yaml"))
        assert files
        for f in files:
            load_config(cls, f, ["copypaste.data=data"] if f.name in templates else [])
    assert {"copypaste-cell.yaml", "copypaste-demo.yaml"} <= templates
    for f in sorted((root / "accelerate").glob("*.yaml")):
        assert "distributed_type" in yaml.safe_load(f.read_text())


def _literal_keys(cls: type, prefix: str = ""):
    """(dotted key, choices) of every Literal field, through nested groups and list entries (``models[].task``)."""
    for name, tp in get_type_hints(cls).items():
        if get_origin(tp) is Literal:
            yield prefix + name, get_args(tp)
        elif dataclasses.is_dataclass(tp):
            yield from _literal_keys(tp, f"{prefix}{name}.")
        elif get_origin(tp) in (list, tuple) and get_args(tp) and dataclasses.is_dataclass(get_args(tp)[0]):
            yield from _literal_keys(get_args(tp)[0], f"{prefix}{name}[].")


LITERAL_KEYS = [(stage, key, choices) for stage in STAGES
                for key, choices in _literal_keys(_load(STAGES[stage].config))]


def test_literal_keys_cover_every_choice_field():
    found = {(stage, key) for stage, key, _ in LITERAL_KEYS}
    assert {("generate", "image_format"), ("generate", "stylegan.mode"), ("generate", "stylegan.dtype"),
            ("generate", "diffusion.mode"), ("generate", "diffusion.dtype"),
            ("pretrain", "objective"), ("pretrain", "in_chans"), ("pretrain", "precision"),
            ("pretrain", "optim.lr_scale"),
            ("finetune", "task"), ("finetune", "format"), ("finetune", "input"), ("finetune", "seg_loss"),
            ("finetune", "in_chans"), ("finetune", "precision"), ("evaluate", "split"),
            ("compare", "models[].task"), ("compare", "finetune.task")} <= found


@pytest.mark.parametrize("stage, key, choices", LITERAL_KEYS, ids=[f"{s}:{k}" for s, k, _ in LITERAL_KEYS])
def test_choice_keys_name_their_choices(stage, key, choices, capsys):
    cls = _load(STAGES[stage].config)
    if "[]." in key:  # a key of a list entry: give one entry, errors name it by index
        list_key, item_key = key.split("[].")
        override, named = f"{list_key}=[{{{item_key}: not-a-choice}}]", f"{list_key}[0].{item_key}"
    else:
        override, named = f"{key}=not-a-choice", key
    with pytest.raises(ConfigError) as e:
        load_config(cls, overrides=[override])
    message = str(e.value)
    assert message.startswith(f"{named}: 'not-a-choice' is not accepted; choose one of "), message
    assert all(repr(c) in message for c in choices), message
    for c in choices:  # and every choice is accepted (other keys may still need a value, as mode=checkpoint does)
        value = f"'{c}'" if isinstance(c, str) else c
        item = f"{list_key}=[{{model: m, {item_key}: {value}}}]" if "[]." in key else f"{key}={value}"
        try:
            cfg = load_config(cls, overrides=[item])
        except ConfigError as e:
            assert "is not accepted; choose one of" not in str(e), str(e)
            continue
        for part in (f"{list_key}.0.{item_key}" if "[]." in key else key).split("."):
            cfg = cfg[int(part)] if part.isdigit() else getattr(cfg, part)
        assert cfg == c and type(cfg) is type(c)

    assert main([stage, "--help"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"  {key}: ")]
    assert len(lines) == 1 and all(repr(c) in lines[0].split(" = ")[0] for c in choices), lines


def test_yaml_booleans_read_as_their_choice(tmp_path):
    from pretrain.config import PretrainConfig

    assert load_config(PretrainConfig, overrides=["precision=no"]).precision == "no"  # YAML 1.1: no -> False
    f = tmp_path / "p.yaml"
    f.write_text("precision: no\n")
    assert load_config(PretrainConfig, f).precision == "no"
    with pytest.raises(ConfigError, match="precision: True is not accepted"):
        load_config(PretrainConfig, overrides=["precision=yes"])
    with pytest.raises(ConfigError, match="in_chans: True is not accepted; choose one of 1 | 3"):
        load_config(PretrainConfig, overrides=["in_chans=true"])  # True == 1, but not a channel count


def test_finetune_has_its_own_optimiser_keys(capsys):
    from finetune.config import FinetuneConfig, FinetuneOptimConfig

    dropped = ("optim.accum_steps", "optim.lr_scale", "optim.lr_base_batch")
    assert main(["finetune", "--help"]) == 0
    out = capsys.readouterr().out
    assert "optim.lr: float = 0.0001" in out and "optim.warmup_steps: int = 20" in out
    assert not any(key in out for key in dropped)
    assert main(["pretrain", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(key in out for key in dropped)

    optim = FinetuneConfig().optim
    assert isinstance(optim, FinetuneOptimConfig)
    assert (optim.lr, optim.weight_decay, optim.betas, optim.warmup_steps, optim.min_lr_ratio, optim.clip_grad) == (
        1e-4, 0.05, [0.9, 0.999], 20, 0.01, 1.0)
    with pytest.raises(ConfigError, match="unknown key optim.accum_steps; accepted keys under optim: lr, "):
        load_config(FinetuneConfig, overrides=["optim.accum_steps=2"])
    for bad, message in (("optim.lr=0", "optim.lr"), ("optim.betas=[0.9]", "optim.betas"),
                         ("optim.warmup_steps=-1", "optim.warmup_steps"), ("optim.clip_grad=-1", "optim.clip_grad")):
        with pytest.raises(ConfigError, match=message):
            load_config(FinetuneConfig, overrides=[bad])


def test_retired_keys_of_old_run_folders_are_dropped(tmp_path):
    from finetune.artifacts import RETIRED_KEYS
    from finetune.config import FinetuneConfig

    old = tmp_path / "config.yaml"  # a finetune run folder written before finetune had its own optim group
    old.write_text("data: x\noptim:\n  lr: 0.001\n  accum_steps: 1\n  lr_scale: none\n  lr_base_batch: 256\n")
    assert load_config(FinetuneConfig, old, retired=RETIRED_KEYS).optim.lr == 0.001
    with pytest.raises(ConfigError, match="unknown keys optim.accum_steps, optim.lr_base_batch, optim.lr_scale"):
        load_config(FinetuneConfig, old)


def _list_keys(cls: type, prefix: str = ""):
    """(dotted key, type) of every list-typed field, through nested groups and list entries (``models[].overrides``)."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name, tp in get_type_hints(cls).items():
        if name not in fields:
            continue
        members = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)  # list[X] | None too
        for member in members:
            if get_origin(member) in (list, tuple):
                yield prefix + name, member, fields[name]
                item = (get_args(member) or (None,))[0]
                if dataclasses.is_dataclass(item):
                    yield from _list_keys(item, f"{prefix}{name}[].")
            elif dataclasses.is_dataclass(member):
                yield from _list_keys(member, f"{prefix}{name}.")


def _sample(item_tp, field):
    """One valid entry of a list: a string, 1, 0.5, a Literal's first choice, a Union's first member; an entry of a
    list of groups is the first entry of the field's default (as its mapping)."""
    if get_origin(item_tp) is Literal:
        return get_args(item_tp)[0]
    if get_origin(item_tp) in (Union, types.UnionType):
        return _sample(get_args(item_tp)[0], field)
    if dataclasses.is_dataclass(item_tp):
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        assert default and dataclasses.is_dataclass(default[0]), f"{field.name}: no default entry to sample"
        return dataclasses.asdict(default[0])
    return {str: "demo", int: 1, float: 0.5, bool: True}[item_tp]


def _flow(value) -> str:
    """``value`` as the text of ``key=...`` (YAML flow style; strings quoted only where YAML needs it)."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip().removesuffix("...").strip()


def _at(tree: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return tree


LIST_KEYS = [(stage, key, tp, field) for stage in STAGES for key, tp, field in _list_keys(_load(STAGES[stage].config))]


def test_list_keys_discovered():
    found = {(stage, key) for stage, key, _, _ in LIST_KEYS}
    assert {("generate", "defects.classes"), ("pretrain", "data"), ("pretrain", "data_weights"),
            ("pretrain", "optim.betas"), ("finetune", "optim.betas"), ("compare", "models"),
            ("compare", "models[].overrides"), ("compare", "budgets"), ("compare", "seeds"),
            ("compare", "finetune.optim.betas")} <= found


@pytest.mark.parametrize("stage, key, tp, field", LIST_KEYS, ids=[f"{s}:{k}" for s, k, _, _ in LIST_KEYS])
def test_every_list_key_takes_a_single_value(stage, key, tp, field, tmp_path):
    """``key=X`` is ``key=[X]`` for every list-typed key of every stage, on the command line and in a YAML file."""
    from synthvit.config import _coerce, _parse_override

    cls = _load(STAGES[stage].config)
    item_tp = get_args(tp)[0]
    sample = _sample(item_tp, field)
    single, bracketed = f"{key}={_flow(sample)}", f"{key}=[{_flow(sample)}]"
    # the coercion a config value goes through (whatever a stage's own checks then say about a one-entry list)
    as_list = _coerce(_parse_override(bracketed)[1], tp, key)
    assert len(as_list) == 1
    assert _coerce(_parse_override(single)[1], tp, key) == as_list
    assert _coerce(sample, tp, key) == as_list  # a YAML file's scalar (or mapping) goes the same way
    if "[]." in key:  # a key inside a list entry: the coercion is all there is to it
        return

    def outcome(**kwargs):
        try:
            return load_config(cls, **kwargs)
        except ConfigError as e:  # a stage's own check (scale needs two numbers): the same for both spellings
            assert " or a single " not in str(e) and "expected list" not in str(e), str(e)
            return str(e)

    end_to_end = outcome(overrides=[bracketed])
    assert outcome(overrides=[single]) == end_to_end
    in_file = tmp_path / "c.yaml"
    in_file.write_text(yaml.safe_dump(_at({}, key, sample)))
    from_file = outcome(path=in_file)
    assert (from_file.removesuffix(f" (config file {in_file})") if isinstance(from_file, str) else from_file) == \
        end_to_end
    if not isinstance(end_to_end, str):
        value = end_to_end
        for part in key.split("."):
            value = getattr(value, part)
        assert value == as_list


def test_single_value_lists_through_the_cli(tmp_path):
    from pretrain.config import PretrainConfig
    from synthvit.cli import _parse
    from synthvit.compare.config import CompareConfig

    for argv in (["pretrain", "data=shards/demo"], ["pretrain", "--data", "shards/demo"]):
        path, overrides = _parse(argv)
        cfg = load_config(PretrainConfig, path, overrides)
        assert cfg.data == ["shards/demo"] and cfg == load_config(PretrainConfig, overrides=["data=[shards/demo]"])
    assert load_config(PretrainConfig, overrides=["data=[a,b]"]).data == ["a", "b"]
    assert load_config(PretrainConfig, overrides=["data=a,b", "data_weights=1,3"]).data_weights == [1.0, 3.0]
    assert load_config(PretrainConfig, overrides=["data=7"]).data == ["7"]  # a str entry takes a number, as str keys
    cfg = load_config(CompareConfig, overrides=["budgets=100", "seeds=0"])
    assert (cfg.budgets, cfg.seeds) == ([100], [0])
    assert load_config(CompareConfig, overrides=["seeds=0,1", "budgets=zero-shot,100"]).seeds == [0, 1]
    assert load_config(CompareConfig, overrides=["budgets=zero-shot,100"]).budgets == ["zero-shot", 100]
    # a single mapping is one entry of a list of groups
    models = load_config(CompareConfig, overrides=["models={model: resnet50, overrides: optim.lr=0.001}"]).models
    assert [(m.name, m.model, m.overrides) for m in models] == [("resnet50", "resnet50", ["optim.lr=0.001"])]
    f = tmp_path / "c.yaml"
    f.write_text("data: d\nseeds: 3\nbudgets: zero-shot\nmodels:\n  model: m\n  task: seg\n")
    with pytest.raises(ConfigError, match=r"budgets: \['zero-shot'\] not accepted"):  # compare's own check
        load_config(CompareConfig, f)
    cfg = load_config(CompareConfig, f, ["budgets=50"])
    assert (cfg.seeds, cfg.budgets, [(m.model, m.task) for m in cfg.models]) == ([3], [50], [("m", "seg")])
    # entries are still checked, and the error names the key and what it takes
    for override, message in (
            ("seeds=abc", "seeds: expected list[int] or a single int, got 'abc' (str)"),
            ("seeds=1.5", "seeds: expected list[int] or a single int, got 1.5 (float)"),
            ("seeds=0,abc", "seeds[1]: expected an integer, got 'abc' (str)"),
            ("seeds=[0, abc]", "seeds[1]: expected an integer, got 'abc' (str)"),
            ("budgets=lots", "budgets: expected list[int | 'zero-shot'] or a single int | 'zero-shot', got 'lots'"),
            ("seeds=", "seeds: expected list[int] or a single int, got ''; use seeds=[] for an empty list"),
            ("models=3", "models: expected list[group] or a single group, got 3 (int)"),
            ("models={model: m, task: bad}", "models[0].task: 'bad' is not accepted; choose one of"),
    ):
        with pytest.raises(ConfigError) as e:
            load_config(CompareConfig, overrides=["data=d", override])
        assert str(e.value).startswith(message), str(e.value)
    with pytest.raises(ConfigError, match=r"defects.classes: \['rust'\] not accepted"):
        load_config(GenerateConfig, overrides=["defects.classes=rust"])
    # only list keys take a single value: a str key stays the string, with or without a comma
    assert load_config(PretrainConfig, overrides=["out_dir=runs/a,b"]).out_dir == "runs/a,b"


def test_speed_keys_out_of_range_are_named_with_their_values():
    """The CPU speed keys (pretrain's sample cache, tiled inference's batch and streams) refuse negatives by name."""
    from finetune.config import FinetuneConfig
    from pretrain.config import PretrainConfig

    with pytest.raises(ConfigError, match=r"^cache_mb: -5 not accepted; use >= 0"):
        load_config(PretrainConfig, overrides=["cache_mb=-5"])
    for key, value in (("streams", -1), ("batch_size", -2)):
        with pytest.raises(ConfigError, match=rf"^tiling.{key}: {value} not accepted; use >= 0"):
            load_config(FinetuneConfig, overrides=[f"tiling.{key}={value}"])
