"""Public weights without a network: a Hugging Face cache built by the test (``hf_cache``, conftest.py) read offline
through the same code as a real download (huggingface_hub's hf_hub_download, then timm's pretrained loading) --
ViTs and their tags' normalisation, another crop, tile and channel count, the CNN baselines' encoders, the
provenance in exports and run configs, synthetic pretraining on top, and every refusal as one line."""
import json

import numpy as np
import pytest
import torch
import yaml
from timm.layers import resample_abs_pos_embed

from conftest import assert_cli_error, hf_repo_folder, make_real_data
from finetune.artifacts import load_run
from finetune.config import FinetuneConfig
from finetune.evaluate import check_input_size
from synthvit.config import ConfigError, load_config
from synthvit.io import sha256_file
from synthvit.models import create_model, read_export_meta, write_export
from synthvit.models.export import ExportMeta
from synthvit.models.heads import Heads

VIT = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
FT = ["crop_size=32", "steps=1", "batch_size=2", "num_workers=0", "log_every=1", "tiling.batch_size=4",
      "near_duplicate_distance=0", "calibrate.rule=argmax", "drop_path=0"]


def cached_file(home, name: str):
    """The model.safetensors of ``name``'s repository in the test's cache, and its snapshot revision."""
    folder = hf_repo_folder(home, name)
    rev = (folder / "refs" / "main").read_text()
    return folder / "snapshots" / rev / "model.safetensors", rev


@pytest.fixture(scope="module")
def real_data(tmp_path_factory):
    def defect(rng):
        y, x = rng.integers(4, 40), rng.integers(4, 50)
        return np.s_[y:y + 10, x:x + 12]

    return make_real_data(tmp_path_factory.mktemp("real") / "frames", 8, (56, 72), defect)


def test_vit_from_the_cache_other_crop_and_one_channel(use_hf_cache):
    """The tensors timm loads are the cache's: position embeddings resampled to the crop (64 px: 4x4 tokens), the
    RGB patch filters summed for in_chans=1, the tag's mean/std (augreg: 0.5), the provenance of the exact file."""
    ref = use_hf_cache.tensors[VIT]
    model = create_model(VIT, "seg", seg_classes=2, img_size=64, in_chans=1, pretrained=True)
    got = model.backbone.state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in got if k.startswith("blocks.")) and "head.weight" not in got
    assert torch.allclose(got["pos_embed"], resample_abs_pos_embed(ref["pos_embed"], (4, 4), num_prefix_tokens=1))
    assert torch.allclose(got["patch_embed.proj.weight"], ref["patch_embed.proj.weight"].sum(1, keepdim=True))
    mean, std = model.input_stats(1)
    assert mean.flatten().tolist() == std.flatten().tolist() == [127.5]
    path, rev = cached_file(use_hf_cache.home, VIT)
    assert model.weights_source == {"source": f"hf-hub:timm/{VIT}", "revision": rev, "file": "model.safetensors",
                                    "sha256": sha256_file(path), "chain": []}
    model.set_input_size(96)  # a tile other than the crop: timm resamples again
    assert model.eval()(torch.zeros(1, 1, 96, 96))["seg"].shape == (1, 2, 96, 96)


def test_deeplab_and_hrnet_encoders_take_imagenet_weights(use_hf_cache, tmp_path):
    """DeepLabV3+'s smp ResNet encoder gets timm's resnet18.a1_in1k tensor for tensor (fc dropped), ImageNet
    mean/std; HRNet's body is timm's features_only model; exports record the encoder and the provenance."""
    ref = use_hf_cache.tensors["resnet18.a1_in1k"]
    dl = create_model("deeplabv3plus_resnet50", "seg", seg_classes=2, encoder="resnet18.a1_in1k", pretrained=True)
    enc = dl.net.encoder.state_dict()
    assert len(enc) == len(ref) - 2 and all(torch.equal(v, ref[k]) for k, v in enc.items())
    assert [round(v, 3) for v in (dl.input_stats(3)[0].flatten() / 255).tolist()] == [0.485, 0.456, 0.406]
    meta = ExportMeta(model="deeplabv3plus_resnet50", in_chans=3, img_size=32, heads=Heads.parse("seg"),
                      class_names=["bg", "d"], mean=[0.5] * 3, std=[0.5] * 3)
    back = read_export_meta(write_export(dl, tmp_path / "export", meta))
    assert back.encoder == "resnet18.a1_in1k" and back.weights_source == dl.weights_source
    assert back.weights_source["source"] == "hf-hub:timm/resnet18.a1_in1k"
    assert ExportMeta.from_json({k: v for k, v in back.to_json().items() if k not in ("encoder", "weights_source")},
                                "old").weights_source is None  # exports written before the field still read
    name = "hrnet_w18_small.gluon_in1k"
    hr = create_model("hrnet_w18_seg", "seg", seg_classes=2, encoder=name, pretrained=True)
    body, ref = hr.body.state_dict(), use_hf_cache.tensors[name]
    assert all(torch.equal(v, ref[k]) for k, v in body.items()) and hr.weights_source["source"] == f"hf-hub:timm/{name}"


def test_finetune_pretrained_records_provenance_and_tiles(use_hf_cache, real_data, tmp_path, cli):
    """finetune pretrained=true at a 32 px crop, 48 px tiles, one channel: the export's config.json holds the
    provenance (sha256 of the cached file), config.yaml a trailing comment with it and still loads, evaluate
    rebuilds the run (pretrained is never asked for again)."""
    run = tmp_path / "run"
    res = cli("finetune", f"data={real_data}", f"out_dir={run}", f"model={VIT}", "pretrained=true", "in_chans=1",
              "tiling.tile=48", *FT)
    assert res.returncode == 0, res.stderr[-3000:]
    path, rev = cached_file(use_hf_cache.home, VIT)
    meta = read_export_meta(run / "export")
    assert meta.weights_source == {"source": f"hf-hub:timm/{VIT}", "revision": rev, "file": "model.safetensors",
                                   "sha256": sha256_file(path), "chain": []}
    assert meta.mean == meta.std == [0.5]
    text = (run / "config.yaml").read_text()
    comment = yaml.safe_load("\n".join(ln[2:] for ln in text.splitlines() if ln.startswith("# ")))
    assert comment == {"weights_source": meta.weights_source}
    assert load_config(FinetuneConfig, run / "config.yaml").pretrained is True
    assert load_run(run).meta.weights_source == meta.weights_source
    assert json.loads((run / "metrics.json").read_text())["images"] > 0


def test_deeplab_encoder_run_rebuilds_from_its_export(use_hf_cache, real_data, tmp_path, cli):
    run = tmp_path / "dl"
    res = cli("finetune", f"data={real_data}", f"out_dir={run}", "model=deeplabv3plus_resnet50",
              "encoder=resnet18.a1_in1k", "pretrained=true", "evaluate=false", *FT)
    assert res.returncode == 0, res.stderr[-3000:]
    loaded = load_run(run)
    assert loaded.meta.encoder == "resnet18.a1_in1k" and loaded.meta.mean[0] == pytest.approx(0.485, abs=1e-3)
    assert len(loaded.model.net.encoder.layer1) == 2  # ResNet-18's, not the default ResNet-50's 3 blocks


def test_pretrain_on_top_of_public_weights_and_the_chain_into_init(use_hf_cache, tiny_dataset, tmp_path, cli):
    """pretrain pretrained=true: LR x pretrained_lr_scale (summary and metrics), the export's provenance; a
    finetune init= of that export records the export and, in its chain, the public weights it started from."""
    run = tmp_path / "pre"
    res = cli("pretrain", f"data=[{tiny_dataset}]", f"out_dir={run}", f"model={VIT}", "pretrained=true",
              "image_size=32", "batch_size=4", "steps=1", "optim.warmup_steps=0", "optim.lr=1e-3",
              "optim.lr_scale=none", "pretrained_lr_scale=0.5", "num_workers=0", "shuffle_buffer=8",
              "objective=seg", "drop_path=0")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert summary["base_lr"] == logged["lr"] == pytest.approx(1e-3 * 0.5)
    public = summary["weights_source"]
    assert public["source"] == f"hf-hub:timm/{VIT}" and read_export_meta(run / "export").weights_source == public
    assert "# weights_source:" in (run / "config.yaml").read_text()
    model = create_model(VIT, "seg", seg_classes=2, img_size=32, init=str(run / "export"))
    assert model.weights_source == {"source": f"init:{run / 'export'}", "revision": None, "file": "model.safetensors",
                                    "sha256": sha256_file(run / "export" / "model.safetensors"), "chain": [public]}


def test_a_local_weights_file_wins_over_the_hub(use_hf_cache, tmp_path):
    """weights=FILE with pretrained=true loads the file (the hub is not asked: this tag is not cached) and records
    the file's path and sha256."""
    from safetensors.torch import save_file

    file = tmp_path / "mine.safetensors"
    save_file(use_hf_cache.tensors[VIT], str(file))
    model = create_model("vit_tiny_patch16_224.augreg_in21k", "cls", cls_classes=3, img_size=32, weights=str(file),
                         pretrained=True)
    assert torch.equal(model.backbone.blocks[0].mlp.fc1.weight, use_hf_cache.tensors[VIT]["blocks.0.mlp.fc1.weight"])
    assert model.weights_source == {"source": str(file.resolve()), "revision": None, "file": "mine.safetensors",
                                    "sha256": sha256_file(file), "chain": []}


def test_check_input_size_names_dinov2_patch_14_sides():
    model = create_model("vit_small_patch14_dinov2", "seg", seg_classes=2, img_size=56)
    check_input_size(model, 70)
    with pytest.raises(ConfigError, match="multiple of 14 .*use tiling.tile=70 or 56"):
        check_input_size(model, 64)


@pytest.mark.parametrize("extra, rc, messages", [
    (["model=resnet18.tv_in1k"], 1, ["pickled weights only", "pytorch_model.bin", "safetensors only"]),
    (["model=vit_small_patch16_224.augreg_in21k_ft_in1k"], 1,
     ["vit_small_patch16_224.augreg_in21k_ft_in1k", "not in the Hugging Face cache",
      "download timm/vit_small_patch16_224.augreg_in21k_ft_in1k"]),
    (["model=resnet18.nope"], 2, ["timm has no tag 'nope' for resnet18", "a1_in1k"]),
    (["model=legacy_seresnet18.in1k"], 1, ["has no weights on the Hugging Face hub", "give weights=FILE"]),
    ([f"model={VIT}", "init=somewhere"], 2, ["pretrained=true, not both"]),
    ([f"model={VIT}", "encoder=resnet50"], 2, ["encoder: resnet50 is for the CNN baselines"]),
    (["model=deeplabv3plus_resnet50", "encoder=convnext_tiny"], 2, ["resnet18, resnet34, resnet50"]),
    (["model=hrnet_w18_seg", "encoder=resnet50"], 2, ["hrnet_w18, hrnet_w18_small"]),
])
def test_refusals_are_one_line(use_hf_cache, real_data, tmp_path, cli, extra, rc, messages):
    res = cli("finetune", f"data={real_data}", f"out_dir={tmp_path / 'r'}", "pretrained=true", *FT, *extra)
    assert_cli_error(res, rc, *messages)


def test_pretrain_missing_model_offline_is_one_line(use_hf_cache, tiny_dataset, tmp_path, cli):
    res = cli("pretrain", f"data=[{tiny_dataset}]", f"out_dir={tmp_path / 'p'}", "pretrained=true",
              "model=resnet50.a1_in1k", "num_workers=0")
    assert_cli_error(res, 1, "resnet50.a1_in1k", "HF_HUB_OFFLINE=1", "download timm/resnet50.a1_in1k")
