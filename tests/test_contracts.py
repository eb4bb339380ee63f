"""The typed contracts read files written by this project's earlier versions (checked-in examples in
tests/data/legacy/), round-trip what they write, and name the file and key of a malformed one."""
import json
from pathlib import Path

import pytest

from finetune.artifacts import MetricsFileError, read_metrics, write_metrics
from synthvit.io import SynthvitError
from synthvit.models import ExportConfigError, ExportMeta, Heads, create_model, read_export_meta, write_export

LEGACY = Path(__file__).parent / "data" / "legacy"


def _legacy(name: str) -> dict:
    return json.loads((LEGACY / name).read_text())


@pytest.mark.parametrize("spelling, cls, seg", [("cls", True, False), ("seg", False, True), ("cls+seg", True, True),
                                                 ("both", True, True)])
def test_heads_reads_either_spelling(spelling, cls, seg):
    heads = Heads.parse(spelling)
    assert (heads.has_cls, heads.has_seg) == (cls, seg)
    assert Heads.parse(heads.objective) == Heads.parse(heads.task) == heads
    with pytest.raises(SynthvitError, match="'cls-seg'"):
        Heads.parse("cls-seg")


def test_legacy_pretrain_export_config():
    meta = ExportMeta.from_json(_legacy("pretrain_export_config.json"), "pretrain_export_config.json")
    assert meta.model == "vit_tiny_patch16_224" and meta.img_size == 32 and meta.in_chans == 3
    assert meta.heads == Heads(has_cls=True, has_seg=True) and meta.num_classes == 8
    assert meta.class_names[:2] == ["good", "crack"] and meta.cls_classes == meta.class_names
    assert meta.decoder == "linear" and meta.decoder_width == 256 and meta.mean == [0.5] * 3
    assert meta.extra["steps"] == 2 and "architecture" not in meta.extra


def test_legacy_finetune_export_configs():
    vit = ExportMeta.from_json(_legacy("finetune_export_config.json"), "finetune_export_config.json")
    assert vit.heads.task == "both" and vit.img_size == 32 and vit.input == "crop"
    assert vit.seg_classes == ["background", "defect"] and vit.cls_classes == ["good", "dark"]
    assert vit.decoder == "linear" and vit.init == "runs/pretrain/export"
    cnn = ExportMeta.from_json(_legacy("finetune_cnn_export_config.json"), "finetune_cnn_export_config.json")
    assert cnn.model == "deeplabv3plus_resnet50" and cnn.heads.task == "seg"
    assert cnn.decoder is None and cnn.cls_classes == [] and cnn.init == ""


@pytest.mark.parametrize("drop, key", [("model", "model"), ("objective", "objective"), ("mean", "mean")])
def test_malformed_export_config_names_file_and_key(drop, key):
    doc = _legacy("pretrain_export_config.json")
    del doc[drop]
    with pytest.raises(ExportConfigError, match=rf"cfg\.json: missing key '{key}'"):
        ExportMeta.from_json(doc, "cfg.json")
    with pytest.raises(ExportConfigError, match=r"cfg\.json: key 'in_chans' is '3', expected int"):
        ExportMeta.from_json(dict(_legacy("pretrain_export_config.json"), in_chans="3"), "cfg.json")
    with pytest.raises(ExportConfigError, match=r"cfg\.json: expected a JSON object"):
        ExportMeta.from_json([], "cfg.json")


def test_written_export_reads_back(tmp_path):
    model = create_model("vit_tiny_patch16_224", "seg", seg_classes=2, img_size=32, decoder="linear")
    doc = {"model": "vit_tiny_patch16_224", "in_chans": 3, "img_size": 32, "objective": "seg",
           "class_names": ["good", "crack"], "mean": [0.5] * 3, "std": [0.5] * 3}
    write_export(model, tmp_path, ExportMeta.from_json(doc, "test"))
    meta = read_export_meta(tmp_path)
    assert meta.heads.objective == "seg" and meta.decoder == "linear" and meta.class_names == ["good", "crack"]
    assert meta.seg_classes == ["good", "crack"] and meta.seg_head == "seg_head.safetensors"
    with pytest.raises(ExportConfigError, match="missing key 'mean'"):
        ExportMeta.from_json({k: v for k, v in doc.items() if k != "mean"}, "test")


ONE_SHAPE = ["model", "img_size", "in_chans", "objective", "num_classes", "class_names", "seg_classes",
             "cls_classes", "mean", "std", "decoder", "decoder_width", "class_groups", "input", "init", "weights",
             "seg_head"]


@pytest.mark.parametrize("name", ["pretrain_export_config.json", "finetune_export_config.json",
                                  "finetune_cnn_export_config.json"])
def test_every_export_is_written_in_one_shape(name):
    """Pretrain and finetune exports (here: the earlier versions' files, read and written anew) have the same keys,
    the choice of heads under one name, and no key written twice (architecture, crop_size, task are gone)."""
    doc = ExportMeta.from_json(_legacy(name), name).to_json()
    assert list(doc)[:len(ONE_SHAPE)] == ONE_SHAPE
    assert not {"architecture", "crop_size", "task"} & set(doc)
    again = ExportMeta.from_json(doc, name)
    assert again == ExportMeta.from_json(_legacy(name), name) and again.to_json() == doc


@pytest.mark.parametrize("name, task, pixel, accuracy", [("finetune_metrics.json", "both", 0.5230749249458313, 0.5),
                                                          ("finetune_cnn_metrics.json", "seg", None, None)])
def test_legacy_run_metrics_read_and_write_back_the_same_bytes(tmp_path, name, task, pixel, accuracy):
    text = (LEGACY / name).read_text()
    (tmp_path / "metrics.json").write_text(text)
    m = read_metrics(tmp_path)
    assert m.task == task and m.heads == Heads.parse(task) and m.accuracy == accuracy and m.steps >= 1
    if pixel is not None:
        assert m.pixel["miou"] == pixel
    assert m.pixel is not None and m.image["auroc"] is not None and m.extra == {}
    (tmp_path / "again").mkdir()
    write_metrics(tmp_path / "again", m)
    assert (tmp_path / "again" / "metrics.json").read_text() == text


def test_malformed_run_metrics_name_file_and_key(tmp_path):
    assert read_metrics(tmp_path) is None  # unfinished run
    doc = _legacy("finetune_metrics.json")
    del doc["task"]
    (tmp_path / "metrics.json").write_text(json.dumps(doc))
    with pytest.raises(MetricsFileError, match=r"metrics\.json: missing key 'task'"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps(dict(doc, task="seg", pixel=[1])))
    with pytest.raises(MetricsFileError, match=r"metrics\.json: key 'pixel' is \[1\], expected an object"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.json").write_text("{broken")
    with pytest.raises(MetricsFileError, match=r"metrics\.json is not valid JSON"):
        read_metrics(tmp_path)
