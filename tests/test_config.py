import dataclasses

import pytest

from generate.config import GenerateConfig
from synthvit.cli import main
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
    (["image_format=webp"], "image_format: 'webp' not accepted; use jpg or png"),
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
    for stage, cls in (("generate", GenerateConfig), ("pretrain", PretrainConfig), ("finetune", FinetuneConfig)):
        files = sorted((root / stage).glob("*.yaml"))
        assert files
        for f in files:
            load_config(cls, f)
    for f in sorted((root / "accelerate").glob("*.yaml")):
        assert "distributed_type" in yaml.safe_load(f.read_text())
