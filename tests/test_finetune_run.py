"""Finetune end to end on tiny generated real-style data: train + evaluate + predict, init from a pretrain export,
the CNN baselines, the transfer recipes and the bad inputs."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from finetune.config import FinetuneConfig
from finetune.models import build_model, freeze_early

FT = ["crop_size=32", "steps=6", "batch_size=4", "num_workers=0", "log_every=3", "tiling.batch_size=4"]


@pytest.fixture(scope="module")
def real_data(tmp_path_factory):
    """16 grayscale 'high-res' frames in the canonical layout; odd ones hold a dark 0/255-masked defect."""
    root = tmp_path_factory.mktemp("real") / "tiles"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    lines = ["id,label"]
    for i in range(16):
        img = (rng.random((90, 120)) * 40 + 100).astype(np.uint8)
        m = np.zeros((90, 120), np.uint8)
        if i % 2:
            y, x = rng.integers(5, 70), rng.integers(5, 95)
            m[y:y + 12, x:x + 16] = 255
            img[m > 0] = 30
        Image.fromarray(img).save(root / "images" / f"im{i:02d}.png")
        Image.fromarray(m).save(root / "masks" / f"im{i:02d}.png")
        lines.append(f"im{i:02d},{'dark' if i % 2 else 'good'}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def test_finetune_evaluate_predict_end_to_end(real_data, tmp_path):
    run = tmp_path / "run"
    res = run_cli("finetune", f"data={real_data}", f"out_dir={run}", "task=both", *FT, check=True)
    assert "test:" in res.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["pixel"]["iou"]) == {"background", "defect"} and 0 <= metrics["pixel"]["miou"] <= 1
    assert metrics["image"]["defective"] == metrics["image"]["good"] == 2 and metrics["images"] == 4
    assert len(metrics["classification"]["confusion_matrix"]) == 2
    assert metrics["speed"]["seconds_per_image"] > 0 and metrics["speed"]["peak_rss_mb"] > 0
    split = (run / "split.csv").read_text().splitlines()
    assert split[0] == "id,split" and len(split) == 17
    assert sorted(p.name for p in (run / "export").iterdir()) == ["config.json", "model.safetensors",
                                                                   "seg_head.safetensors"]
    ev = run_cli("evaluate", "--checkpoint", run, "--split", "all", check=True)
    assert json.loads((run / "metrics_all.json").read_text())["images"] == 16, ev.stderr
    out = tmp_path / "pred"
    run_cli("predict", "--checkpoint", run, "--input", real_data / "images", "--out", out, check=True)
    rec = json.loads((out / "im01.json").read_text())
    assert {"defect_score", "defects", "areas", "classes", "predicted_class"} <= set(rec)
    with Image.open(out / "im01_mask.png") as m:
        assert m.size == (120, 90)
    with Image.open(out / "im01_overlay.jpg") as o:
        assert o.size == (120, 90)
    assert len(json.loads((out / "predictions.json").read_text())) == 16


def test_init_from_a_pretrain_export(real_data, tiny_dataset, tmp_path):
    pre = tmp_path / "pre"
    run_cli("pretrain", f"data=[{tiny_dataset}]", f"out_dir={pre}", "model=vit_tiny_patch16_224", "image_size=32",
            "batch_size=8", "steps=2", "num_workers=0", "objective=cls+seg", check=True)
    run = tmp_path / "ft"
    res = run_cli("finetune", f"data={real_data}", f"out_dir={run}", f"init={pre / 'export'}", "crop_size=48",
                  "steps=2", "batch_size=4", "num_workers=0", "evaluate=false", check=True)
    assert (run / "export" / "model.safetensors").is_file(), res.stderr
    bad = run_cli("finetune", f"data={real_data}", f"out_dir={tmp_path / 'x'}", f"init={pre / 'export'}",
                  "model=vit_small_patch16_224", *FT)
    assert bad.returncode == 1 and "holds vit_tiny_patch16_224, but model=vit_small_patch16_224" in bad.stderr


def test_loading_a_pretrain_export_resizes_position_embeddings(tiny_dataset, tmp_path):
    from safetensors.torch import load_file

    pre = tmp_path / "pre"
    run_cli("pretrain", f"data=[{tiny_dataset}]", f"out_dir={pre}", "model=vit_tiny_patch16_224", "image_size=32",
            "batch_size=8", "steps=1", "num_workers=0", check=True)
    cfg = FinetuneConfig(model="vit_tiny_patch16_224", init=str(pre / "export"), crop_size=64, task="seg")
    model = build_model(cfg, seg_classes=3, cls_classes=1)
    saved = load_file(pre / "export" / "model.safetensors")
    assert model.backbone.pos_embed.shape[1] == 1 + 16 and saved["pos_embed"].shape[1] == 1 + 4
    assert torch.equal(model.backbone.blocks[1].mlp.fc1.weight, saved["blocks.1.mlp.fc1.weight"])


@pytest.mark.parametrize("name, task, out", [("deeplabv3plus_resnet50", "seg", "seg"), ("hrnet_w18_seg", "seg", "seg"),
                                             ("resnet50", "cls", "cls"), ("vit_small_r26_s32_224", "both", "seg")])
def test_models_build_and_map_to_task_outputs(name, task, out):
    model = build_model(FinetuneConfig(model=name, task=task, crop_size=64), seg_classes=3, cls_classes=4).eval()
    with torch.no_grad():
        y = model(torch.randn(2, 3, 64, 64))
    assert y[out].shape == ((2, 3, 64, 64) if out == "seg" else (2, 4))


def test_freeze_stem_and_first_blocks():
    vit = build_model(FinetuneConfig(model="vit_tiny_patch16_224", crop_size=32), 2, 1)
    n = freeze_early(vit, 3)
    b = vit.backbone
    assert n > 0 and not b.patch_embed.proj.weight.requires_grad and not b.pos_embed.requires_grad
    assert not b.blocks[2].attn.qkv.weight.requires_grad and b.blocks[3].attn.qkv.weight.requires_grad
    dl = build_model(FinetuneConfig(model="deeplabv3plus_resnet50", crop_size=32), 2, 1)
    freeze_early(dl, 2)
    enc = dl.net.encoder
    assert not enc.layer2[0].conv1.weight.requires_grad and enc.layer3[0].conv1.weight.requires_grad


def test_layer_decay_and_frozen_blocks_train(real_data, tmp_path):
    run = tmp_path / "ld"
    run_cli("finetune", f"data={real_data}", f"out_dir={run}", "layer_decay=0.75", "freeze_blocks=2",
            "evaluate=false", *FT, check=True)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("extra, rc, message", [
    ([], 2, "data: give the real-data folder"),
    (["data=/nonexistent/real"], 1, "data folder /nonexistent/real does not exist"),
    (["data=REAL", "model=deeplabv3plus_resnet50", "init=/x"], 1, "synthvit exports hold timm models"),
    (["data=REAL", "task=detect"], 2, "task: 'detect' not accepted"),
    (["data=REAL", "init=/nonexistent"], 1, "/nonexistent is not a synthvit export"),
])
def test_finetune_bad_input(real_data, tmp_path, extra, rc, message):
    extra = [e.replace("REAL", str(real_data)) for e in extra]
    res = run_cli("finetune", f"out_dir={tmp_path / 'r'}", *FT, *extra)
    assert res.returncode == rc and message in res.stderr, res.stderr[-1500:]
    assert "Traceback" not in res.stderr


def test_cls_only_data_refuses_seg(tmp_path):
    for cls in ("good", "bad"):
        for i in range(3):
            p = tmp_path / "f" / cls / f"{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((20, 20), 10 * i, np.uint8)).save(p)
    res = run_cli("finetune", f"data={tmp_path / 'f'}", f"out_dir={tmp_path / 'r'}", "task=seg", *FT)
    assert res.returncode == 1 and "task=seg needs masks" in res.stderr


def test_predict_bad_input(real_data, tmp_path):
    res = run_cli("predict", "--checkpoint", tmp_path / "none", "--input", real_data / "images")
    assert res.returncode == 1 and "is not a finished finetune run" in res.stderr


def test_two_process_finetune_under_accelerate(real_data, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    run = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29544",
           "-m", "synthvit", "finetune", f"data={real_data}", f"out_dir={run}", "train_limit=8", *FT]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_images"] == 8 and metrics["images"] == 4
    assert (run / "export" / "model.safetensors").is_file()


@pytest.mark.parametrize("mode", ["crop", "resize"])
def test_training_samples_keep_masks_aligned(real_data, mode):
    from finetune.datasets import load_real_data
    from finetune.train import CropDataset

    data = load_real_data(real_data)
    cfg = FinetuneConfig(data=str(real_data), crop_size=32, input=mode, defect_crop_prob=1.0, task="seg")
    ds = CropDataset(data, data.items, cfg, total=40)
    seen_defect = 0
    for i in range(40):
        s = ds[i]
        assert s["image"].shape == (3, 32, 32) and s["mask"].shape == (32, 32)
        dark = s["image"][0] < 65  # defects were painted at grey 30 on a 100..140 background
        if mode == "crop":
            assert torch.equal(dark, s["mask"] > 0)
        else:  # bilinear image vs nearest mask: agree away from the edges
            assert (dark == (s["mask"] > 0)).float().mean() > 0.97
        seen_defect += int(s["mask"].any())
    assert seen_defect >= 15  # defect_crop_prob=1 centres crops of defective frames on their defects


def test_dice_loss_is_zero_for_perfect_and_high_for_missed_defects():
    from finetune.train import dice_loss

    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[:, 2:4, 2:4] = 1
    perfect = torch.nn.functional.one_hot(target, 2).permute(0, 3, 1, 2).float() * 50
    assert dice_loss(perfect, target) < 1e-3
    all_background = torch.zeros(2, 2, 8, 8)
    all_background[:, 0] = 50
    assert dice_loss(all_background, target) > 0.85  # 1 - eps / (8 defect pixels + eps)
