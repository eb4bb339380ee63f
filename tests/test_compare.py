"""synthvit compare: CKA estimator properties, saliency maps, and a tiny 2 models x 2 budgets matrix end to end."""
import csv
import json

import numpy as np
import pytest
import torch

from compare.cka import MinibatchCKA, gram, hsic1, linear_cka
from compare.saliency import attention_rollout, grad_cam
from conftest import accelerate_launch, assert_cli_error


def _biased_cka(x, y):
    """The biased estimator (centred Grams, diagonal kept), for contrast."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, g = h @ (x.double() @ x.double().T) @ h, h @ (y.double() @ y.double().T) @ h
    return float((k * g).sum() / torch.sqrt((k * k).sum() * (g * g).sum()))


def test_cka_of_a_representation_with_itself_is_one():
    x = torch.randn(64, 30, generator=torch.Generator().manual_seed(0))
    assert linear_cka(x, x, batch=16) == pytest.approx(1.0, abs=1e-9)


def test_cka_invariant_to_orthogonal_transform_and_isotropic_scaling():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 40, generator=gen, dtype=torch.float64)
    y = x[:, :20] @ torch.randn(20, 25, generator=gen, dtype=torch.float64) + 0.5 * torch.randn(
        64, 25, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=torch.float64))
    base = linear_cka(x, y, batch=16)
    assert 0.2 < base < 0.99
    assert linear_cka(x @ q, y, batch=16) == pytest.approx(base, abs=1e-9)
    assert linear_cka(7.5 * x, 0.01 * y, batch=16) == pytest.approx(base, abs=1e-9)


def test_unbiased_cka_near_zero_for_independent_features_where_biased_is_not():
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(256, 500, generator=gen), torch.randn(256, 500, generator=gen)
    unbiased = linear_cka(x, y, batch=16)
    biased = np.mean([_biased_cka(x[i:i + 16], y[i:i + 16]) for i in range(0, 256, 16)])
    assert abs(unbiased) < 0.05
    assert biased > 0.5  # the small-n bias the unbiased estimator removes


def test_minibatch_cka_matches_layerwise_pairs_and_checks_batch_size():
    gen = torch.Generator().manual_seed(3)
    a = [torch.randn(8, 4, 3, 3, generator=gen) for _ in range(3)]
    b = [a[1] * 2, torch.randn(8, 6, generator=gen)]
    acc = MinibatchCKA(3, 2)
    acc.update(a, b)
    cka = acc.compute()
    assert cka.shape == (3, 2) and cka[1, 0] == pytest.approx(1.0, abs=1e-9)
    assert cka[0, 1] == pytest.approx(linear_cka(a[0].flatten(1), b[1]), abs=1e-12)
    assert torch.all(torch.diagonal(gram(a[0])) == 0)
    with pytest.raises(ValueError, match=">= 4"):
        hsic1(gram(a[0][:3])[None], gram(a[0][:3])[None])


def _model(name, task="seg"):
    import types

    from finetune.artifacts import build_model

    torch.manual_seed(0)
    cfg = types.SimpleNamespace(model=name, task=task, init="", weights="", crop_size=64, in_chans=3, drop_path=0.0)
    return build_model(cfg, 3, 3).eval()


@pytest.mark.parametrize("name,task", [("resnet18", "seg"), ("resnet18", "cls"), ("deeplabv3plus_resnet50", "seg")])
def test_grad_cam_has_input_size_and_is_not_constant(name, task):
    maps = grad_cam(_model(name, task), torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    assert maps.shape == (2, 64, 64)
    assert torch.all(maps.flatten(1).std(1) > 0)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_tiny_r_s16_p8_224"])
def test_attention_rollout_has_input_size_and_is_not_constant(name):
    model = _model(name)
    maps = attention_rollout(model, torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    assert maps.shape == (2, 64, 64)
    assert torch.all(maps.flatten(1).std(1) > 0)
    names, feats = model.feature_blocks(torch.randn(2, 3, 64, 64))
    assert len(names) == len(feats) == 12


def test_feature_blocks_of_resnet_are_its_residual_blocks():
    names, feats = _model("resnet18").feature_blocks(torch.randn(2, 3, 64, 64))
    assert names[0] == "layer1.0" and names[-1] == "layer4.1" and len(feats) == 8
    assert feats[-1].shape[-1] == 2  # stride 32


def test_cka_pairs_follow_raghu_and_pair_synthetic_with_scratch_vit():
    from compare.analysis import Loaded, cka_pairs

    vit, resnet = _model("vit_tiny_patch16_224"), _model("resnet18")
    models = [Loaded("scratch", {"model": "vit_tiny_patch16_224"}, vit, ""),
              Loaded("synthetic", {"model": "vit_tiny_patch16_224"}, vit, "runs/pretrain/export"),
              Loaded("cnn", {"model": "resnet18"}, resnet, "")]
    pairs = [(a.name, b.name, title) for a, b, title in cka_pairs(models)]
    assert pairs == [("scratch", "scratch", "ViT vs ViT"), ("synthetic", "synthetic", "ViT vs ViT"),
                     ("cnn", "cnn", "CNN vs CNN"), ("scratch", "cnn", "ViT vs CNN"),
                     ("synthetic", "scratch", "synthetic-pretrained vs scratch ViT")]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A held-out synthetic target set (another surface family) in the shards layout, as `compare` reads it."""
    from generate.config import GenerateConfig
    from generate.run import run
    from synthvit.config import load_config

    out = tmp_path_factory.mktemp("target") / "tgt"
    run(load_config(GenerateConfig, overrides=[
        f"out_dir={out}", "num_samples=20", "samples_per_shard=10", "image_size=64", "num_workers=0", "preview=0",
        "procedural.surfaces=[concrete]", "procedural.classes=[crack,stain]"]))
    return out


COMPARE = ["budgets=[5,0]", "finetune.steps=2", "finetune.crop_size=32", "finetune.batch_size=2",
           "finetune.num_workers=0", "finetune.test_fraction=0.3", "probe_size=96x64", "probe_repeats=1",
           "report_images=2", "cka_images=8", "cka_batch=4"]
MODELS = ("models=[{name: vit, model: vit_tiny_patch16_224}, "
          "{name: cnn, model: resnet18, overrides: [optim.lr=1e-3]}]")


@pytest.mark.slow
def test_tiny_matrix_report_holds_every_cell_and_rerun_skips(target, tmp_path, cli, monkeypatch):
    """compare's own process runs in this one (it trains nothing: every cell and probe is a child process; the
    accelerate-launch test below runs it as a process of its own). Two cells at a time, one thread each: on a
    CPU machine a child spends most of its time importing torch, so the matrix takes about half as long."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the children's: two of them share the cores
    out = tmp_path / "cmp"
    res = cli("compare", f"data={target}", f"out_dir={out}", MODELS, *COMPARE, "parallel=2")
    assert res.returncode == 0 and f"synthvit compare: done -> {out}" in res.stdout, res.stderr[-3000:]
    assert "report ->" in res.stderr and res.stderr.count(" done in ") == 4 + 2  # cells and probes
    cells = sorted(p.relative_to(out / "cells").as_posix() for p in (out / "cells").glob("*/n*"))
    assert cells == ["cnn/n00005", "cnn/n00014", "vit/n00005", "vit/n00014"]
    md = (out / "report.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| vit |") or ln.startswith("| cnn |")]
    assert len(rows) == 2 + 4  # trade-off table (one per model) + every cell
    assert sum(" | done | " in r for r in rows) == 4
    assert "96x64 s/frame" in md and "optim.lr=1e-3" in md and "**" in md
    for name in ("report.html", "data_efficiency.png", "qualitative.png", "saliency.png"):
        assert (out / name).stat().st_size > 1000, name
    assert len(list(out.glob("cka_*.png"))) == 3  # ViT-ViT, CNN-CNN, ViT-CNN (no synthetic ViT here)
    html = (out / "report.html").read_text()
    assert "<table>" in html and "Machine and versions" in html and "train_limit: 5" in html
    probe = json.loads((out / "cells/vit/n00014/probe.json").read_text())
    assert probe["frame"] == "96x64" and probe["seconds_per_frame"] > 0 and probe["gflops_per_512_tile"] > 0

    def used(cell):
        with open(out / "cells" / cell / "split.csv") as f:
            return {r["id"] for r in csv.DictReader(f) if r["split"] == "train"}
    assert len(used("vit/n00005")) == 5 and used("vit/n00005") < used("vit/n00014")
    assert used("vit/n00005") == used("cnn/n00005")  # the same subsets for every model

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/*/metrics.json")}
    (out / "cells/cnn/n00005/metrics.json").unlink()
    again = cli("compare", f"data={target}", f"out_dir={out}", MODELS, *COMPARE, "parallel=2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "3 of 4 already finished, skipped" in again.stderr and "2 of 2 already finished, skipped" in again.stderr
    assert "cnn n=5 done" in again.stderr and "vit n=5 done" not in again.stderr
    for p, t in stamps.items():
        if "cnn/n00005" not in str(p):
            assert p.stat().st_mtime_ns == t


def test_compare_config_errors_name_the_key(tmp_path, target, cli):
    res = cli("compare", f"data={target}", f"out_dir={tmp_path / 'a'}", "budgets=[-1]")
    assert_cli_error(res, 2, "budgets")
    res = cli("compare", f"data={target}", f"out_dir={tmp_path / 'b'}", "finetune.train_limit=5")
    assert_cli_error(res, 2, "finetune.train_limit")
    res = cli("compare", f"data={target}", f"out_dir={tmp_path / 'c'}", "models=[{name: a, model: resnet18, "
              "task: cls, init: nowhere}]")
    assert_cli_error(res, 1, "models.a.init")
    res = cli("compare", f"data={target}", f"out_dir={tmp_path / 'd'}",
              "models=[{name: a, model: vit_tiny_patch16_2244}]")
    assert_cli_error(res, 2, "models.a.model")
    res = cli("compare", f"data={tmp_path / 'missing'}", f"out_dir={tmp_path / 'e'}")
    assert_cli_error(res, 1, "missing")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run folder for a refused matrix


@pytest.mark.slow
def test_compare_under_accelerate_launch_splits_cells_across_ranks(target, tmp_path):
    out = tmp_path / "ranks"
    proc = accelerate_launch("compare", f"data={target}", f"out_dir={out}",
                             "models=[{name: vit, model: vit_tiny_patch16_224}]", *COMPARE, "cka_images=0")
    logs = {p.parent.name: p.read_text().splitlines()[1] for p in out.glob("cells/vit/*/log.txt")}
    assert sorted(logs) == ["n00005", "n00014"]
    assert {line.split(",")[0] for line in logs.values()} == {"# rank 0", "# rank 1"}  # one cell per rank
    assert proc.stderr.count("report ->") == 1  # rank 0 alone writes the report, after both cells
    rows = [ln for ln in (out / "report.md").read_text().splitlines() if ln.startswith("| vit |")]
    assert len(rows) == 1 + 2 and sum(" | done | " in r for r in rows) == 2
    assert sorted(p.parent.name for p in out.glob("cells/vit/*/metrics.json")) == ["n00005", "n00014"]
    probe = json.loads((out / "cells/vit/n00014/probe.json").read_text())  # the largest cell's, on one rank
    assert probe["frame"] == "96x64" and probe["seconds_per_frame"] > 0
    assert not (out / "cells/vit/n00005/probe.json").exists()


def test_pick_crops_reuses_few_test_images_and_centres_defects():
    from PIL import Image

    from compare.analysis import pick_crops
    from finetune.datasets import Item

    def item(i, defect):
        mask = np.zeros((90, 120), np.uint8)
        if defect:
            mask[40:50, 60:70] = 1
        image = Image.fromarray(np.full((90, 120), 100 + i, np.uint8))
        return Item(f"im{i}", f"im{i}", lambda: image.copy(), None, lambda size: mask)

    crops = pick_crops([item(0, True), item(1, False)], 3, 32, 8, seed=0, defect_share=0.5)
    assert len(crops) == 8 and len({c.source for c in crops}) > 2
    assert [bool(c.mask.any()) for c in crops] == [True] * 4 + [False] * 4
    assert all(c.image.shape == (32, 32, 3) for c in crops)
