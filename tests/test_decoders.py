"""Dense decoders (models/decoders.py): shapes for ViTs and hybrids, what CNNs refuse, the export round trip, and
the reason they exist: thin defects that a stride-16 linear head cannot see."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from finetune.train import losses
from synthvit.io import SynthvitError
from synthvit.models import ExportMeta, TaskModel, class_groups, create_model, write_export


@pytest.mark.parametrize("decoder", ["linear", "dpt", "dpt-skip"])
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_tiny_r_s16_p8_224"])
def test_decoders_give_full_size_logits_beside_the_classifier(name, decoder):
    torch.manual_seed(0)
    model = create_model(name, "cls+seg", seg_classes=3, cls_classes=4, img_size=64, decoder=decoder,
                         decoder_width=16).eval()
    out = model(torch.randn(2, 3, 64, 64))
    assert out["seg"].shape == (2, 3, 64, 64) and out["cls"].shape == (2, 4)
    assert model.export_meta()["decoder"] == decoder
    assert model.export_meta()["decoder_width"] == 16


def test_dpt_needs_transformer_blocks():
    with pytest.raises(SynthvitError, match="decoder=dpt reads the blocks of a ViT"):
        create_model("resnet18", "seg", seg_classes=2, img_size=64, decoder="dpt")


def test_init_loads_backbone_and_decoder_with_a_new_last_conv(tmp_path, caplog):
    torch.manual_seed(0)
    pre = create_model("vit_tiny_patch16_224", "seg", seg_classes=8, img_size=32, decoder="dpt-skip",
                       decoder_width=16)
    write_export(pre, tmp_path, ExportMeta.from_json({
        "model": "vit_tiny_patch16_224", "in_chans": 3, "img_size": 32, "objective": "seg",
        "class_names": [f"c{i}" for i in range(8)], "mean": [0.5] * 3, "std": [0.5] * 3}, "test"))
    torch.manual_seed(1)
    caplog.set_level(logging.INFO, logger="synthvit.models")
    ft = create_model("vit_tiny_patch16_224", "seg", seg_classes=2, img_size=64, init=str(tmp_path), decoder="auto")
    assert isinstance(ft, TaskModel) and ft.decoder == "dpt-skip" and ft.seg_head.width == 16
    own, theirs = ft.seg_head.state_dict(), pre.seg_head.state_dict()
    new = [k for k in own if own[k].shape != theirs[k].shape or not torch.equal(own[k], theirs[k])]
    assert new == ["head.head.4.weight", "head.head.4.bias"]  # the last conv: 2 classes instead of 8
    assert torch.equal(ft.backbone.blocks[3].mlp.fc1.weight, pre.backbone.blocks[3].mlp.fc1.weight)
    assert "init: decoder dpt-skip from" in caplog.text and "head.head.4.weight" in caplog.text
    other = create_model("vit_tiny_patch16_224", "seg", seg_classes=2, img_size=64, init=str(tmp_path),
                         decoder="linear")
    assert other.decoder == "linear" and "decoder linear is new (the export's is dpt-skip)" in caplog.text


def test_zero_shot_class_groups_sum_probabilities():
    assert class_groups(["good", "crack", "pit"], ["background", "defect"]) == [0, 1, 1]
    assert class_groups(["good", "crack", "pit"], ["background", "pit", "crack"]) == [0, 2, 1]
    with pytest.raises(SynthvitError, match="pretrain class 'crack' has no counterpart"):
        class_groups(["good", "crack"], ["background", "pit", "dent"])
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", "seg", seg_classes=3, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    probs = model(x)["seg"].softmax(1)
    model.class_groups = [0, 1, 1]
    grouped = model(x)["seg"].softmax(1)
    assert grouped.shape == (2, 2, 32, 32)
    assert torch.allclose(grouped[:, 1], probs[:, 1] + probs[:, 2], atol=1e-6)


def thin_lines(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """64 px textured frames with 1-2 straight lines 1-2 px wide (mask 1), darker than the surface."""
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for _ in range(n):
        image = Image.fromarray((rng.random((64, 64)) * 60 + 100).astype(np.uint8))
        mask = Image.new("L", (64, 64), 0)
        for _ in range(rng.integers(1, 3)):
            ends, width = [tuple(rng.integers(0, 64, 2).tolist()) for _ in range(2)], int(rng.integers(1, 3))
            ImageDraw.Draw(image).line(ends, fill=40, width=width)
            ImageDraw.Draw(mask).line(ends, fill=1, width=width)
        images.append(np.asarray(image))
        masks.append(np.asarray(mask))
    x = torch.from_numpy(np.stack(images)).float()[:, None].expand(-1, 3, -1, -1)
    return (x - 127.5) / 60, torch.from_numpy(np.stack(masks)).long()


def line_iou(decoder: str, steps: int = 60, batch: int = 8) -> float:
    """Train ViT-Tiny + ``decoder`` for a fixed number of CPU steps on thin lines; IoU of the line class."""
    train_x, train_m = thin_lines(256, 0)
    test_x, test_m = thin_lines(64, 1)
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", "seg", seg_classes=2, img_size=64, decoder=decoder,
                         decoder_width=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    order = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(train_x), (batch,), generator=order)
        loss = losses(model(train_x[idx]), {"mask": train_m[idx]}, 0.0, "ce+dice")["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        pred = model.eval()(test_x)["seg"].argmax(1) == 1
    truth = test_m == 1
    return float((pred & truth).sum() / (pred | truth).sum().clamp(min=1))


@pytest.mark.slow
def test_the_skip_decoder_sees_thin_lines_the_linear_head_cannot(one_torch_thread):
    linear, skip = line_iou("linear"), line_iou("dpt-skip")
    assert linear < 0.15 and skip > linear + 0.25, (linear, skip)


def test_a_corrupt_export_is_named_in_a_clear_error(tmp_path):
    model = create_model("vit_tiny_patch16_224", "seg", seg_classes=2, img_size=32, decoder="dpt", decoder_width=16)
    write_export(model, tmp_path, ExportMeta.from_json({
        "model": "vit_tiny_patch16_224", "in_chans": 3, "img_size": 32, "objective": "seg",
        "class_names": ["good", "crack"], "mean": [0.5] * 3, "std": [0.5] * 3}, "test"))
    (tmp_path / "seg_head.safetensors").write_bytes(b"garbage")
    with pytest.raises(SynthvitError, match="seg_head.safetensors is not a readable safetensors file"):
        create_model("vit_tiny_patch16_224", "seg", seg_classes=2, img_size=32, init=str(tmp_path), decoder="auto")
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(SynthvitError, match="config.json is not valid JSON"):
        create_model("vit_tiny_patch16_224", "seg", seg_classes=2, img_size=32, init=str(tmp_path))


def test_attention_kernel_choice_keeps_the_function(one_torch_thread):
    from finetune.config import TilingConfig
    from finetune.evaluate import Predictor
    from synthvit.models import Heads
    from synthvit.training import set_attention

    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", "seg", seg_classes=2, img_size=32, decoder="dpt-skip").eval()
    flags = lambda: {m.fused_attn for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)}  # noqa: E731
    x = torch.randn(2, 3, 32, 32)
    assert set_attention(model, "sdpa", "cpu") == "sdpa" and flags() == {True}
    with torch.no_grad():
        fused = model(x)["seg"]
    assert set_attention(model, "auto", "cpu") == "math" and flags() == {False}  # auto: timm's math path on a CPU
    with torch.no_grad():
        math = model(x)["seg"]
    assert torch.allclose(fused, math, atol=1e-5) and not torch.equal(fused, torch.zeros_like(fused))
    assert set_attention(model, "auto", torch.device("cuda", 0)) == "sdpa" and flags() == {True}  # no GPU needed
    cnn = create_model("deeplabv3plus_resnet50", "seg", seg_classes=2)
    assert set_attention(cnn, "auto", "cpu") == "math"  # nothing to switch: left as it is
    names = ["background", "defect"]
    meta = ExportMeta(model="vit_tiny_patch16_224", in_chans=3, img_size=32, heads=Heads.parse("seg"),
                      class_names=names, seg_classes=names, mean=[0.5] * 3, std=[0.5] * 3)
    predictor = Predictor(model, meta, torch.device("cpu"), TilingConfig(attention="sdpa"))
    assert predictor.attention == "sdpa" and flags() == {True}
    assert Predictor(model, meta, torch.device("cpu"), TilingConfig()).attention == "math" and flags() == {False}
