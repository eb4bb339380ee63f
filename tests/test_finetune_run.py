"""Finetune end to end on tiny generated real-style data: train + evaluate + predict, init from a pretrain export,
the CNN baselines, the transfer recipes and the bad inputs."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import accelerate_launch, assert_cli_error, make_real_data, run_cli
from finetune.artifacts import build_model, class_counts
from finetune.config import FinetuneConfig
from synthvit.config import load_config
from synthvit.models import read_export_meta

FT = ["crop_size=32", "steps=6", "batch_size=4", "num_workers=0", "log_every=3", "tiling.batch_size=4"]


def _defect(rng):
    y, x = rng.integers(5, 70), rng.integers(5, 95)
    return np.s_[y:y + 12, x:x + 16]


@pytest.fixture(scope="module")
def real_data(tmp_path_factory):
    """16 grayscale 'high-res' frames in the canonical layout; odd ones hold a dark 0/255-masked defect."""
    return make_real_data(tmp_path_factory.mktemp("real") / "tiles", 16, (90, 120), _defect)


def export_tensors(folder):
    """File name -> tensors of every safetensors file of an export folder."""
    return {p.name: load_file(p) for p in sorted(folder.glob("*.safetensors"))}


def initial_model(run):
    """The model a finetune run started from, rebuilt as ``finetune.run.run`` builds it (same seed, same config)."""
    cfg = load_config(FinetuneConfig, run / "config.yaml")
    meta = read_export_meta(run / "export")
    torch.manual_seed(cfg.seed)
    return build_model(cfg, *class_counts(meta))


@pytest.mark.slow
def test_finetune_evaluate_predict_end_to_end(real_data, tmp_path, cli):
    run = tmp_path / "run"
    res = run_cli("finetune", f"data={real_data}", f"out_dir={run}", "task=both", "precision=bf16", *FT,
                  check=True)
    assert "test:" in res.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["pixel"]["iou"]) == {"background", "defect"} and 0 <= metrics["pixel"]["miou"] <= 1
    assert metrics["image"]["defective"] == metrics["image"]["good"] == 2 and metrics["images"] == 4
    assert len(metrics["classification"]["confusion_matrix"]) == 2
    assert metrics["speed"]["seconds_per_image"] > 0 and metrics["speed"]["peak_rss_mb"] > 0
    assert metrics["attention"] == "math"  # attention=auto on a CPU
    assert metrics["loader"] == "main"  # num_workers=0
    split = (run / "split.csv").read_text().splitlines()
    assert split[0] == "id,split" and len(split) == 17
    assert sorted(p.name for p in (run / "export").iterdir()) == ["config.json", "model.safetensors",
                                                                   "seg_head.safetensors"]
    # evaluate and predict train nothing: they run in this process (the CLI's --key value form included)
    ev = cli("evaluate", "--checkpoint", run, "--split", "all")
    assert ev.returncode == 0 and f"synthvit evaluate: done -> {run}" in ev.stdout, ev.stderr[-2000:]
    assert json.loads((run / "metrics_all.json").read_text())["images"] == 16
    assert cli("evaluate", "--checkpoint", run).returncode == 0  # the test split, from the export alone
    again = json.loads((run / "metrics_test.json").read_text())
    for part in ("pixel", "image", "classification"):  # what the run reported of itself, bf16 training or not
        assert again[part] == metrics[part], part
    out = tmp_path / "pred"
    pred = cli("predict", "--checkpoint", run, "--input", real_data / "images", "--out", out)
    assert pred.returncode == 0, pred.stderr[-2000:]
    rec = json.loads((out / "im01.json").read_text())
    assert {"defect_score", "defects", "areas", "classes", "predicted_class"} <= set(rec)
    with Image.open(out / "im01_mask.png") as m:
        assert m.size == (120, 90)
    with Image.open(out / "im01_overlay.jpg") as o:
        assert o.size == (120, 90)
    summary = json.loads((out / "predictions.json").read_text())
    assert len(summary["predictions"]) == 16 and summary["failed"] == []


@pytest.mark.slow
def test_init_from_a_pretrain_export(real_data, pretrain_export, tmp_path):
    """Finetune at another crop size from a pretrain export with every block frozen: the frozen backbone ships
    bit for bit as pretrained, the parts that train (final norm) and the new ones (class head, the decoder's last
    conv for other classes) do not; the rest of the decoder starts from the export's."""
    import timm.layers

    run = tmp_path / "ft"
    res = run_cli("finetune", f"data={real_data}", f"out_dir={run}", f"init={pretrain_export}", "crop_size=48",
                  "task=both", "freeze_blocks=12", "steps=2", "batch_size=4", "num_workers=0", "evaluate=false",
                  check=True)
    n = len(load_file(pretrain_export / "model.safetensors"))
    assert f"weights: {n - 2} of {n} tensors from {pretrain_export / 'model.safetensors'}; new (other shape): " \
           "head.bias, head.weight" in res.stderr, res.stderr[-3000:]
    assert "Resized position embedding: (2, 2) to (3, 3)" in res.stderr
    assert f"init: decoder linear from {pretrain_export / 'seg_head.safetensors'}; new (other classes or shapes): " \
           "proj.3.weight, proj.3.bias" in res.stderr
    meta = json.loads((run / "export" / "config.json").read_text())
    assert meta["init"] == str(pretrain_export) and meta["img_size"] == 48
    pre, ft = export_tensors(pretrain_export), export_tensors(run / "export")
    assert pre.keys() == ft.keys() == {"model.safetensors", "seg_head.safetensors"}
    pre_w, ft_w = pre["model.safetensors"], ft["model.safetensors"]
    assert pre_w.keys() == ft_w.keys()
    frozen = [k for k in ft_w if k.startswith(("blocks.", "patch_embed.")) or k == "cls_token"]
    assert len(frozen) == 2 + 12 * 12 + 1
    for k in frozen:
        assert torch.equal(ft_w[k], pre_w[k]), k
    # the position embeddings: resampled from the 2x2 grid to 3x3 when loaded, then frozen
    assert ft_w["pos_embed"].shape == (1, 1 + 9, 192)
    torch.testing.assert_close(ft_w["pos_embed"], timm.layers.resample_abs_pos_embed(pre_w["pos_embed"], (3, 3)))
    assert not torch.equal(ft_w["norm.weight"], pre_w["norm.weight"])  # trained
    assert ft_w["head.weight"].shape == (2, 192) and pre_w["head.weight"].shape == (8, 192)  # new classes
    pre_h, ft_h = pre["seg_head.safetensors"], ft["seg_head.safetensors"]
    assert ft_h["proj.3.weight"].shape[0] == 2 and pre_h["proj.3.weight"].shape[0] == 8  # a new last conv
    # the rest of the decoder was loaded, then trained 2 steps in the warm-up (lr <= 1e-5): still the pretrained one
    assert 0 < (ft_h["proj.0.weight"] - pre_h["proj.0.weight"]).abs().max() < 1e-3


def test_init_from_an_export_of_another_model_is_refused(real_data, pretrain_export, tmp_path, cli):
    bad = cli("finetune", f"data={real_data}", f"out_dir={tmp_path / 'x'}", f"init={pretrain_export}",
              "model=vit_small_patch16_224", *FT)
    assert_cli_error(bad, 1, "holds vit_tiny_patch16_224, but model=vit_small_patch16_224")
    assert not (tmp_path / "x").exists()


def test_zero_shot_evaluates_the_export_as_it_is(real_data, pretrain_export, tmp_path, cli):
    from finetune.artifacts import load_run
    from synthvit.models import create_model

    run = tmp_path / "zs"
    res = cli("finetune", f"data={real_data}", f"out_dir={run}", f"init={pretrain_export}", "steps=0",
              "crop_size=32", "num_workers=0", "tiling.batch_size=4")
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["zero_shot"] is True and metrics["steps"] == 0 and metrics["train_wall_s"] == 0
    assert set(metrics["pixel"]["iou"]) == {"background", "defect"}
    meta = json.loads((run / "export" / "config.json").read_text())
    assert meta["class_groups"] == [0] + [1] * 7 and meta["decoder"] == "linear"  # 8 pretrain classes -> 2
    # the run's model is the pretrain export's, its 7 defect classes summed into "defect"
    pre = create_model("vit_tiny_patch16_224", "cls+seg", seg_classes=8, cls_classes=8, img_size=32,
                       init=str(pretrain_export)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want, got = pre(x)["seg"].softmax(1), load_run(run).model(x)["seg"].softmax(1)
    assert got.shape == (2, 2, 32, 32) and torch.allclose(got[:, 1], want[:, 1:].sum(1), atol=1e-5)
    for extra, message in ((["init="], "give init=EXPORT_FOLDER"), (["task=both"], "and task=seg")):
        assert_cli_error(cli("finetune", f"data={real_data}", f"out_dir={tmp_path / 'bad'}", f"init={pretrain_export}",
                             "steps=0", "crop_size=32", *extra), 2, message)


def test_loading_a_pretrain_export_resizes_position_embeddings(pretrain_export):
    cfg = FinetuneConfig(model="vit_tiny_patch16_224", init=str(pretrain_export), crop_size=64, task="seg")
    model = build_model(cfg, seg_classes=3, cls_classes=1)
    saved = load_file(pretrain_export / "model.safetensors")
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
    n = vit.freeze_early(3)
    b = vit.backbone
    assert n > 0 and not b.patch_embed.proj.weight.requires_grad and not b.pos_embed.requires_grad
    assert not b.blocks[2].attn.qkv.weight.requires_grad and b.blocks[3].attn.qkv.weight.requires_grad
    dl = build_model(FinetuneConfig(model="deeplabv3plus_resnet50", crop_size=32), 2, 1)
    dl.freeze_early(2)
    enc = dl.net.encoder
    assert not enc.layer2[0].conv1.weight.requires_grad and enc.layer3[0].conv1.weight.requires_grad


@pytest.mark.slow
def test_layer_decay_and_frozen_blocks_train(real_data, tmp_path):
    from synthvit.training import build_adamw

    run = tmp_path / "ld"
    run_cli("finetune", f"data={real_data}", f"out_dir={run}", "task=both", "layer_decay=0.75", "freeze_blocks=2",
            "evaluate=false", *FT, check=True)
    assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [3, 6]
    # against the same seeded initial model: the stem and the first 2 blocks did not move, everything else did
    start = initial_model(run)
    before = {f: {k: v.detach().clone() for k, v in t.items()} for f, t in start.export_tensors().items()}
    after = export_tensors(run / "export")
    assert before.keys() == after.keys() == {"model.safetensors", "seg_head.safetensors"}
    frozen = ("patch_embed.", "blocks.0.", "blocks.1.", "cls_token", "pos_embed")
    for f in before:
        assert before[f].keys() == after[f].keys()
        for k, v in before[f].items():
            if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
                continue  # batch-norm statistics of the dense head: buffers, updated by any forward pass
            moved = not torch.equal(v, after[f][k])
            assert moved != (f == "model.safetensors" and k.startswith(frozen)), f"{f}: {k} moved={moved}"
    # layer-wise LR decay: deeper blocks learn faster, the heads at the full LR, frozen tensors not optimised
    assert start.freeze_early(2) > 0
    optimizer = build_adamw(start, 1e-3, 0.05, (0.9, 0.999), layer_decay=0.75)
    names = {id(p): n for n, p in start.named_parameters()}
    scale = {names[id(p)]: g.get("lr_scale", 1.0) for g in optimizer.param_groups for p in g["params"]}
    assert not any(n.removeprefix("backbone.").startswith(frozen) for n in scale)
    assert len(scale) == sum(p.requires_grad for p in start.parameters())
    blocks = [scale[f"backbone.blocks.{i}.attn.qkv.weight"] for i in range(2, 12)]
    assert all(a < b for a, b in zip(blocks, blocks[1:])), blocks
    assert blocks[-1] / blocks[-2] == pytest.approx(1 / 0.75)
    assert scale["backbone.head.weight"] == scale["seg_head.proj.0.weight"] == 1.0 > blocks[-1]


@pytest.mark.parametrize("extra, rc, message", [
    ([], 2, "data: give the real-data folder"),
    (["data=/nonexistent/real"], 1, "data folder /nonexistent/real does not exist"),
    (["data=REAL", "model=deeplabv3plus_resnet50", "init=/x"], 1, "synthvit exports hold timm models"),
    (["data=REAL", "task=detect"], 2, "task: 'detect'"),
    (["data=REAL", "init=/nonexistent"], 1, "/nonexistent is not a synthvit export"),
])
def test_finetune_bad_input(real_data, tmp_path, cli, extra, rc, message):
    extra = [e.replace("REAL", str(real_data)) for e in extra]
    res = cli("finetune", f"out_dir={tmp_path / 'r'}", *FT, *extra)
    assert_cli_error(res, rc, message)
    if "task=detect" in extra:  # the choices are named (wording: see tests/test_config.py)
        assert "seg" in res.stderr and "cls" in res.stderr and "both" in res.stderr
    assert not (tmp_path / "r").exists()


def test_cls_only_data_refuses_seg(tmp_path, cli):
    for cls in ("good", "bad"):
        for i in range(3):
            p = tmp_path / "f" / cls / f"{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((20, 20), 10 * i, np.uint8)).save(p)
    res = cli("finetune", f"data={tmp_path / 'f'}", f"out_dir={tmp_path / 'r'}", "task=seg", *FT)
    assert_cli_error(res, 1, "task=seg needs masks")


def test_predict_bad_input(real_data, tmp_path, cli):
    res = cli("predict", "--checkpoint", tmp_path / "none", "--input", real_data / "images")
    assert_cli_error(res, 1, "is not a finished finetune run")
    res = cli("predict", "--checkpoint", tmp_path / "none")
    assert_cli_error(res, 2, "input: give an image file or a folder")


@pytest.mark.slow
def test_two_process_finetune_under_accelerate(real_data, tmp_path):
    run = tmp_path / "ddp"
    accelerate_launch("finetune", f"data={real_data}", f"out_dir={run}", "train_limit=8", *FT)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_images"] == 8 and metrics["images"] == 4
    # 2 ranks x batch 4 per step; the main process alone logs (one record per logged step) and exports
    assert metrics["train_images_per_s"] > 0 and metrics["steps"] == 6
    assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [3, 6]
    assert sorted(p.name for p in (run / "export").iterdir()) == ["config.json", "model.safetensors",
                                                                   "seg_head.safetensors"]
    with open(run / "split.csv") as f:
        assert sum(ln.endswith(",train") for ln in f.read().splitlines()) == 8


@pytest.mark.parametrize("mode", ["crop", "resize"])
def test_training_samples_keep_masks_aligned(real_data, mode):
    from finetune.train import CropDataset
    from synthvit.data import load_real_data

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


def test_defect_crop_prob_is_the_share_of_defect_crops_however_few_frames_hold_defects(tmp_path):
    """defect_crop_prob counts crops, not frames: with 1 defective frame in 10 it still sets the share of crops that
    show a defect (drawing the frame first made 0.8 mean ~8 % here, and ViTs learnt "all background")."""
    from finetune.train import CropDataset
    from synthvit.data import load_real_data

    root = make_real_data(tmp_path / "few", 20, (64, 64), lambda rng: (slice(30, 34), slice(30, 34)))
    for i in range(5, 20, 2):  # im01 and im03 keep their defect; the other odd frames become defect-free
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(root / "masks" / f"im{i:02d}.png")
    data = load_real_data(root)
    for prob, lo, hi in ((0.8, 0.7, 0.9), (0.0, 0.0, 0.15)):
        cfg = FinetuneConfig(data=str(root), crop_size=16, defect_crop_prob=prob, task="seg")
        ds = CropDataset(data, data.items, cfg, total=200)
        share = np.mean([bool(ds[i]["mask"].any()) for i in range(200)])
        assert lo <= share <= hi, (prob, share)


def test_a_stopped_finetune_resumes_to_the_same_export_and_log(real_data, tmp_path, cli):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    common = [f"data={real_data}", "task=seg", *FT, "optim.warmup_steps=2", "evaluate=false"]
    assert cli("finetune", *common, f"out_dir={whole}").returncode == 0
    assert cli("finetune", *common, f"out_dir={parts}", "stop_at=3").returncode == 0
    assert not (parts / "export").exists()
    assert (parts / "checkpoints" / "step_00000003" / "trainer_state.json").is_file()
    config = (parts / "config.yaml").read_text()
    # a checkpoint of another training config is refused, naming the key, before anything is written
    bad = cli("finetune", *common, f"out_dir={parts}", "optim.lr=0.5")
    assert bad.returncode != 0 and "optim.lr: 0.0001 -> 0.5" in bad.stderr and "resume=none" in bad.stderr
    assert (parts / "config.yaml").read_text() == config
    # the loader's worker processes do not matter (loader=workers: auto would cut crops in process on 2 cores)
    res = cli("finetune", *common, f"out_dir={parts}", "num_workers=1", "loader=workers")
    assert res.returncode == 0 and " 3/6 [" in res.stderr, res.stderr[-2000:]  # its bar starts at step 3
    assert not (parts / "checkpoints").exists()  # removed once the export is written
    a, b = export_tensors(whole / "export"), export_tensors(parts / "export")
    assert a.keys() == b.keys() and all(torch.equal(a[f][k], b[f][k]) for f in a for k in a[f])
    assert (whole / "metrics.jsonl").read_text() == (parts / "metrics.jsonl").read_text()
    # starting over in a folder with a later checkpoint: that one goes, this run's own are the ones kept
    assert cli("finetune", *common, f"out_dir={whole}", "stop_at=5", "overwrite=true").returncode == 0
    assert cli("finetune", *common, f"out_dir={whole}", "stop_at=3", "save_every=2", "resume=none").returncode == 0
    assert [p.name for p in (whole / "checkpoints").iterdir()] == ["step_00000003"]
    # damaged checkpoints are named, not a traceback
    (whole / "checkpoints" / "step_00000003" / "trainer_state.json").write_text("{broken")
    bad = cli("finetune", *common, f"out_dir={whole}")
    assert bad.returncode == 1 and "step_00000003/trainer_state.json is unreadable" in bad.stderr
    assert cli("finetune", *common, f"out_dir={whole}", "stop_at=3", "resume=none").returncode == 0
    (whole / "checkpoints" / "step_00000003" / "model.safetensors").write_bytes(b"\0" * 100)
    bad = cli("finetune", *common, f"out_dir={whole}")
    assert bad.returncode == 1 and "cannot load" in bad.stderr and "step_00000003" in bad.stderr


def test_dice_loss_is_zero_for_perfect_and_high_for_missed_defects():
    from finetune.train import dice_loss

    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[:, 2:4, 2:4] = 1
    perfect = torch.nn.functional.one_hot(target, 2).permute(0, 3, 1, 2).float() * 50
    assert dice_loss(perfect, target) < 1e-3
    all_background = torch.zeros(2, 2, 8, 8)
    all_background[:, 0] = 50
    assert dice_loss(all_background, target) > 0.85  # 1 - eps / (8 defect pixels + eps)
