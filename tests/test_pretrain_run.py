"""End-to-end pretraining runs in subprocesses, as users launch them (python -m / accelerate launch); the error
paths in-process."""
import json
import shutil

import pytest
import timm
import torch
from safetensors.torch import load_file

from conftest import EXPORT_STEPS, TINY_PRETRAIN, accelerate_launch, assert_cli_error, finish, run_cli, start_cli

TINY = TINY_PRETRAIN


def pretrain_args(data, out, *extra):
    return ["pretrain", f"data=[{data}]", f"out_dir={out}", *TINY, *extra]


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_process_accelerate_launch(tiny_dataset, tmp_path):
    """accelerate launch with 2 CPU processes: disjoint data, identical parameters, one export, loss goes down."""
    out = tmp_path / "ddp"
    accelerate_launch(*pretrain_args(tiny_dataset, out, "steps=40", "num_workers=1", "record_keys=true",
                                     "save_every=20"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ranks_in_sync"] is True and summary["steps"] == 40
    assert summary["images_seen"] == 40 * 8 * 2
    keys = [{k for ln in (out / f"keys_rank{r}.txt").read_text().splitlines() for k in ln.split(" ")[1:]}
            for r in (0, 1)]
    shards = [{k.split("/")[0] for k in ks} for ks in keys]
    assert keys[0] and keys[1] and not shards[0] & shards[1], "ranks must read disjoint shards"
    assert sorted(p.name for p in (out / "export").iterdir()) == ["config.json", "model.safetensors"]
    losses = [m["loss"] for m in metrics(out)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses


@pytest.mark.slow
def test_resume_equals_uninterrupted(tiny_dataset, tmp_path):
    common = ("steps=12", "num_workers=2", "save_every=3", "objective=cls+seg", "ema_decay=0.9")
    a, b = tmp_path / "a", tmp_path / "b"
    one_thread = {"OMP_NUM_THREADS": "1"}  # every run alike; the uninterrupted one runs beside the other two
    # where the two loader roles decode (worker processes or this one), and whether they keep samples in memory, is
    # not part of what is learnt: the uninterrupted run and the first leg use worker processes and the sample cache,
    # the resumed leg decodes in its own process and every sample afresh
    uninterrupted = start_cli(*pretrain_args(tiny_dataset, b, *common, "loader=workers"), log=tmp_path / "b.log",
                              env=one_thread)
    first = run_cli(*pretrain_args(tiny_dataset, a, *common, "stop_at=5", "loader=workers"), env=one_thread,
                    check=True)
    assert "stopped at step 5 of 12" in first.stderr and not (a / "export").exists()
    assert sorted(p.name for p in (a / "checkpoints").iterdir()) == ["step_00000003", "step_00000005"]
    second = run_cli(*pretrain_args(tiny_dataset, a, *common, "loader=main", "cache_mb=0"), env=one_thread,
                     check=True)
    assert "resumed from" in second.stderr and "step_00000005" in second.stderr
    summary_a = json.loads((a / "summary.json").read_text())
    assert summary_a["loader"] == "main" and summary_a["cache_mb_per_role"] == 0
    assert "resumed from" not in finish(uninterrupted, tmp_path / "b.log")
    summary_b = json.loads((b / "summary.json").read_text())
    assert summary_b["loader"] == "workers" and summary_b["cache_mb_per_role"] > 0
    wa, wb = load_file(a / "export" / "model.safetensors"), load_file(b / "export" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)
    ha, hb = load_file(a / "export" / "seg_head.safetensors"), load_file(b / "export" / "seg_head.safetensors")
    for k in ha:
        torch.testing.assert_close(ha[k], hb[k], rtol=1e-5, atol=1e-6, msg=k)
    logged_a = {m["step"]: m for m in metrics(a)}
    assert [m["step"] for m in metrics(a)] == [2, 4, 5, 6, 8, 10, 12]  # the stopped run logged its last step
    for m in metrics(b)[3:]:  # windows wholly after the resume point
        assert logged_a[m["step"]]["loss"] == pytest.approx(m["loss"], rel=1e-5)
    assert len(list((a / "checkpoints").iterdir())) == 2  # keep_last


@pytest.fixture(scope="module")
def exported(pretrain_export):
    """The shared tiny pretrain run (tests/conftest.py): cls+seg, TINY settings, a log record per step."""
    return pretrain_export


def test_export_loads_in_timm_with_new_size_and_head(exported):
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["model"] == "vit_tiny_patch16_224" and cfg["img_size"] == 32 and cfg["num_classes"] == 8
    assert cfg["class_names"][0] == "good" and cfg["objective"] == "cls+seg" and cfg["in_chans"] == 3
    model = timm.create_model(cfg["model"], pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(exported / "model.safetensors")),
                              num_classes=3, img_size=64)
    saved = load_file(exported / "model.safetensors")
    assert model.pos_embed.shape == (1, 1 + 16, 192) and saved["pos_embed"].shape == (1, 1 + 4, 192)
    assert torch.equal(model.blocks[0].attn.qkv.weight, saved["blocks.0.attn.qkv.weight"])
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


@pytest.mark.parametrize("extra, rc, message", [
    (["data=[/nonexistent/ds]"], 1, "dataset folder /nonexistent/ds does not exist"),
    (["model=vit_tinyy_patch16_224"], 1, "unknown timm model 'vit_tinyy_patch16_224'; similar names: "
                                         "vit_tiny_patch16_224"),
    (["batch_size=7"], 2, "batch_size: 7 is odd"),
    (["class_names=[good,rust]"], 1, "differ from the data's"),
    (["objective=detect"], 2, "objective: 'detect'"),
    (["weights=/nonexistent.safetensors"], 1, "weights: /nonexistent.safetensors is not a file"),
    (["resume=/nonexistent"], 1, "resume: /nonexistent is not a complete checkpoint folder"),
])
def test_bad_input(tiny_dataset, tmp_path, cli, extra, rc, message):
    res = cli(*pretrain_args(tiny_dataset, tmp_path / "run", "steps=2", "num_workers=0"), *extra)
    assert_cli_error(res, rc, message)
    if "objective=detect" in extra:  # the choices are named (wording: see tests/test_config.py)
        assert all(c in res.stderr for c in ("cls", "seg", "cls+seg"))
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_missing_info_json(tiny_dataset, tmp_path, cli):
    ds = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds)
    (ds / "_info.json").unlink()
    res = cli(*pretrain_args(ds, tmp_path / "run", "steps=2"))
    assert_cli_error(res, 1, "_info.json is missing")


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_dataset, tmp_path):
    out = tmp_path / "nan"
    run_cli(*pretrain_args(tiny_dataset, out, "steps=30", "num_workers=0", "save_every=2", "stop_at=2"),
            check=True)
    res = run_cli(*pretrain_args(tiny_dataset, out, "steps=30", "num_workers=0", "save_every=2",
                                 "optim.lr=1e30", "optim.clip_grad=0", "mix.prob=0"))
    assert res.returncode == 1, res.stderr[-2000:]
    assert "loss is not finite at step" in res.stderr and "the last good checkpoint" in res.stderr
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts and not (out / "export").exists()
    state = json.loads((out / "checkpoints" / ckpts[-1] / "trainer_state.json").read_text())
    assert state["step"] >= 2


@pytest.mark.slow
@pytest.mark.parametrize("model, extra", [
    ("resnet18", ["objective=cls", "in_chans=1", "optim.accum_steps=2"]),  # a CNN baseline, grayscale
    ("vit_small_r26_s32_224", ["objective=seg", "image_size=64", "precision=bf16", "decoder=dpt-skip",
                               "decoder_width=16"]),  # conv-stem hybrid with the DPT decoder
])
def test_other_models_objectives_and_options(tiny_dataset, tmp_path, model, extra):
    out = tmp_path / "run"
    run_cli(*pretrain_args(tiny_dataset, out, "steps=2", "num_workers=0", f"model={model}", *extra), check=True)
    cfg = json.loads((out / "export" / "config.json").read_text())
    assert cfg["model"] == model
    summary = json.loads((out / "summary.json").read_text())
    accum = 2 if "optim.accum_steps=2" in extra else 1
    assert summary["images_seen"] == 2 * 8 * accum
    if "objective=seg" in extra:
        assert cfg["seg_head"] == "seg_head.safetensors" and cfg["num_classes"] == 0
        assert (cfg["decoder"], cfg["decoder_width"]) == ("dpt-skip", 16)
        head = load_file(str(out / "export" / "seg_head.safetensors"))
        assert any(k.startswith("decoder.fusion_blocks.") for k in head) and "stem.0.0.weight" in head
    else:
        assert cfg["in_chans"] == 1
        m = timm.create_model(model, pretrained=True, in_chans=1, num_classes=8,
                              pretrained_cfg_overlay=dict(file=str(out / "export" / "model.safetensors")))
        assert m(torch.randn(2, 1, 32, 32)).shape == (2, 8)


def test_tensorboard_logs_when_installed(exported):
    """The TensorBoard scalars are the metrics.jsonl records: the same tags, steps and values."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = exported.parent
    records = metrics(run_dir)
    assert [m["step"] for m in records] == list(range(1, EXPORT_STEPS + 1))
    scalars = {}
    for events in sorted((run_dir / "tb").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(acc.Scalars(tag))
    assert set(scalars) == set(records[0]) - {"step"}, scalars.keys()
    assert {"loss", "cls", "seg", "lr", "images_per_s", "skipped"} <= set(scalars)
    for tag, events in scalars.items():  # (metrics.jsonl rounds to 6 significant digits, TensorBoard to float32)
        assert [e.step for e in events] == [m["step"] for m in records], tag
        assert [e.value for e in events] == pytest.approx([m[tag] for m in records], rel=1e-5, abs=1e-6), tag
    # optim.lr=4e-3 for a global batch of 256, scaled linearly to 8; the first of 2 warm-up steps: half of it
    assert scalars["lr"][0].value == pytest.approx(4e-3 * 8 / 256 / 2)


def test_half_written_checkpoints_are_ignored(tmp_path):
    from synthvit.checkpoint import CKPT_DIR, STATE_FILE, complete_checkpoints, resolve_resume

    root = tmp_path / CKPT_DIR
    (root / "step_00000004").mkdir(parents=True)
    (root / "step_00000004" / STATE_FILE).write_text("{}")
    (root / ".step_00000006.tmp").mkdir()  # a crash mid-save
    (root / "step_00000008").mkdir()  # no trainer state: not complete
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000004"]
    assert resolve_resume("auto", tmp_path).name == "step_00000004"
    assert resolve_resume("none", tmp_path) is None
