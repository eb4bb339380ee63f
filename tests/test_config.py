import dataclasses
from typing import Literal, get_args, get_origin, get_type_hints

import pytest

from generate.config import GenerateConfig
from synthvit.cli import STAGES, _load, main
from synthvit.config import ConfigError, describe, dump_yaml, load_config, parse_size


def test_defaults_yaml_diff_and_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("num_samples: 10\nprocedural:\n  gray_prob: 1.0\n  camera:\n    noise: 0\n")
    cfg = load_config(GenerateConfig, cfg_file, ["image_size=3840x2160", "procedural.classes=[crack,pit]",
                                                 "procedural.camera.blur_prob=0.5", "seed=7"])
    assert cfg.num_samples == 10 and cfg.seed == 7
    assert cfg.size == (3840, 2160)
    assert cfg.procedural.gray_prob == 1.0 and cfg.procedural.camera.noise == 0.0
    assert cfg.procedural.classes == ["crack", "pit"]
    assert cfg.procedural.camera.blur_prob == 0.5
    # untouched keys keep their defaults
    assert cfg.samples_per_shard == GenerateConfig().samples_per_shard
    # the dump round-trips
    again = tmp_path / "again.yaml"
    again.write_text(dump_yaml(cfg))
    assert load_config(GenerateConfig, again) == cfg


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
    (["backend=stylegan9"], "unknown backend 'stylegan9'; available: diffusion, procedural, stylegan"),
    (["procedural.classes=[crack,rust]"], "procedural.classes"),
    (["procedural.defect_free_prob=1.5"], "defect_free_prob: 1.5 is not a probability"),
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
    from compare.config import CompareConfig

    for stage, cls in (("generate", GenerateConfig), ("pretrain", PretrainConfig), ("finetune", FinetuneConfig),
                       ("compare", CompareConfig)):
        files = sorted((root / stage).glob("*.yaml"))
        assert files
        for f in files:
            load_config(cls, f)
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
