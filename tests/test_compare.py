"""synthvit compare: CKA estimator properties, saliency maps, and a tiny 2 models x 2 budgets matrix end to end."""
import csv
import json
import re

import numpy as np
import pytest
import torch
import yaml

from conftest import accelerate_launch, assert_cli_error
from synthvit.compare.cka import MinibatchCKA, gram, hsic1, linear_cka
from synthvit.compare.saliency import attention_rollout, grad_cam
from synthvit.models import ExportMeta, Heads


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
    from finetune.artifacts import build_model
    from finetune.config import FinetuneConfig

    torch.manual_seed(0)
    cfg = FinetuneConfig(model=name, task=task, crop_size=64, in_chans=3, drop_path=0.0)
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
    from synthvit.compare.analysis import Loaded, cka_pairs

    vit, resnet = _model("vit_tiny_patch16_224"), _model("resnet18")
    def meta(model):
        return ExportMeta(model=model, in_chans=3, img_size=32, heads=Heads.parse("seg"), class_names=[],
                          mean=[0.5] * 3, std=[0.5] * 3)
    models = [Loaded("scratch", meta("vit_tiny_patch16_224"), vit, ""),
              Loaded("synthetic", meta("vit_tiny_patch16_224"), vit, "runs/pretrain/export"),
              Loaded("cnn", meta("resnet18"), resnet, "")]
    pairs = [(a.name, b.name, title) for a, b, title in cka_pairs(models)]
    assert pairs == [("scratch", "scratch", "ViT vs ViT"), ("synthetic", "synthetic", "ViT vs ViT"),
                     ("cnn", "cnn", "CNN vs CNN"), ("scratch", "cnn", "ViT vs CNN"),
                     ("synthetic", "scratch", "synthetic-pretrained vs scratch ViT")]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A held-out synthetic target set (another surface family) in the shards layout, as `compare` reads it; one
    defect class (a binary target), so that a pretrain export's classes collapse onto it zero-shot."""
    from generate.config import GenerateConfig
    from generate.run import run
    from synthvit.config import load_config

    out = tmp_path_factory.mktemp("target") / "tgt"
    run(load_config(GenerateConfig, overrides=[
        f"out_dir={out}", "num_samples=20", "samples_per_shard=10", "image_size=64", "num_workers=0", "preview=0",
        "procedural.surfaces=[concrete]", "defects.classes=[crack]"]))
    return out


COMPARE = ["finetune.steps=2", "finetune.crop_size=32", "finetune.batch_size=2", "finetune.num_workers=0",
           "finetune.test_fraction=0.3", "probe_size=96x64", "probe_repeats=1", "report_images=2", "cka_images=8",
           "cka_batch=4"]


def _train_ids(cell):
    with open(cell / "split.csv") as f:
        return {r["id"] for r in csv.DictReader(f) if r["split"] == "train"}


@pytest.mark.slow
def test_tiny_matrix_report_holds_every_cell_and_rerun_skips(target, pretrain_export, tmp_path, cli, monkeypatch):
    """compare's own process runs in this one (it trains nothing: every cell and probe is a child process; the
    accelerate-launch test below runs it as a process of its own). Two cells at a time, one thread each: on a
    CPU machine a child spends most of its time importing torch, so the matrix takes about half as long. A
    synthetic-pretrained ViT (its zero-shot cell too) against a CNN at 2 budgets, one seed."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the children's: two of them share the cores
    out = tmp_path / "cmp"
    models = (f"models=[{{name: vit, model: vit_tiny_patch16_224, init: {pretrain_export}}}, "
              "{name: cnn, model: resnet18, overrides: [optim.lr=1e-3]}]")
    args = ("compare", f"data={target}", f"out_dir={out}", models, "budgets=[5,0,zero-shot]", *COMPARE, "parallel=2")
    res = cli(*args)
    assert res.returncode == 0 and f"synthvit compare: done -> {out}" in res.stdout, res.stderr[-3000:]
    assert "report ->" in res.stderr and res.stderr.count(" done in ") == 5 + 2  # cells and probes
    cells = sorted(p.parent.relative_to(out / "cells").as_posix() for p in out.glob("cells/**/metrics.json"))
    assert cells == ["cnn/n00005/s0", "cnn/n00014/s0", "vit/n00005/s0", "vit/n00014/s0", "vit/zero-shot"]
    zero = json.loads((out / "cells/vit/zero-shot/metrics.json").read_text())
    assert zero["zero_shot"] is True and zero["train_wall_s"] == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["name"], r["budget"], r["seed"], r["status"]) for r in rows] == [
        ("vit", "zero-shot", "0", "done"), ("vit", "5", "0", "done"), ("vit", "14", "0", "done"),
        ("cnn", "5", "0", "done"), ("cnn", "14", "0", "done")]
    assert {r["decoder"] for r in rows} == {"linear"} and rows[0]["steps"] == "0" and rows[0]["train_s"] == "0"
    assert float(rows[2]["s_per_4k_frame"]) > 0 and rows[1]["s_per_4k_frame"] == rows[2]["s_per_4k_frame"]
    md = (out / "report.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| vit |") or ln.startswith("| cnn |")]
    assert len(table) == 2 + 5  # trade-off table (one per model) + every cell (zero-shot included)
    assert sum(" | 1 of 1 done | " in r for r in table) == 4 and sum("1 (seed-independent)" in r for r in table) == 1
    assert "96x64 s/frame" in md and "optim.lr=1e-3" in md and "**" in md and "saliency AUROC" in md
    assert "no difference can be told from noise" in md and "vit vs cnn (ViT vs CNN), 5 train images" in md
    assert "None for cnn (no init" in md
    assert {r["name"]: r["weights"].split(" ")[0] for r in rows} == {"vit": f"init:{pretrain_export}", "cnn": "random"}
    assert f"Initial weights: vit from init:{pretrain_export} sha256:" in md and "cnn from random" in md
    doctor = json.loads((out / "doctor/doctor.json").read_text())  # the doctor ran once, on the first model
    assert doctor["model"]["name"] == "vit_tiny_patch16_224" and "The data (synthvit doctor)" in md
    assert ("doctor/doctor.png" in md) == (out / "doctor/doctor.png").is_file()
    assert "Near-duplicates across the split" in md
    for name in ("report.html", "data_efficiency.png", "qualitative.png", "saliency.png"):
        assert (out / name).stat().st_size > 1000, name
    assert len(list(out.glob("cka_*.png"))) == 3  # ViT-ViT, CNN-CNN, ViT-CNN (no scratch ViT here)
    html = (out / "report.html").read_text()
    assert "<table>" in html and "Machine and versions" in html and "train_limit: 5" in html
    probe = json.loads((out / "cells/vit/n00014/s0/probe.json").read_text())
    assert probe["frame"] == "96x64" and probe["seconds_per_frame"] > 0 and probe["gflops_per_512_tile"] > 0
    assert len(_train_ids(out / "cells/vit/n00005/s0")) == 5
    assert _train_ids(out / "cells/vit/n00005/s0") < _train_ids(out / "cells/vit/n00014/s0")
    assert _train_ids(out / "cells/vit/n00005/s0") == _train_ids(out / "cells/cnn/n00005/s0")  # same subsets

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("cells/**/metrics.json")}
    (out / "cells/cnn/n00005/s0/metrics.json").unlink()
    again = cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 of 5 already finished, skipped" in again.stderr and "2 of 2 already finished, skipped" in again.stderr
    assert "cnn n=5 seed=0 done" in again.stderr and "vit n=5 seed=0 done" not in again.stderr
    for p, t in stamps.items():
        if "cnn/n00005" not in str(p):
            assert p.stat().st_mtime_ns == t

    (out / "cells/cnn/n00005/s0/metrics.json").unlink()  # report_only: a report of what is finished, nothing run
    (out / "report.md").unlink()
    look = cli(*args, "report_only=true")
    assert look.returncode == 0 and "report_only: 4 of 5 cells finished" in look.stderr, look.stderr[-3000:]
    assert " done in " not in look.stderr and not (out / "cells/cnn/n00005/s0/metrics.json").exists()
    assert (out / "report.md").is_file()


@pytest.mark.slow
def test_a_row_mixes_in_a_set_built_once_per_budget_from_its_own_train_images(target, tmp_path, cli, monkeypatch):
    """A copy-paste row at a budget of 10 train images, two seeds: one generate job builds the set from exactly the
    10 images both seeds train on (never a test image), and both cells mix it in."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    gen = tmp_path / "cp.yaml"
    gen.write_text("backend: copypaste\nnum_samples: 16\nsamples_per_shard: 8\nimage_size: 32\nnum_workers: 0\n"
                   "preview: 0\ncopypaste: {max_instances: 2}\n")
    out = tmp_path / "cmp"
    models = f"models=[{{name: vit-cp, model: vit_tiny_patch16_224, synthetic: {gen}}}]"
    res = cli("compare", f"data={target}", f"out_dir={out}", models, "budgets=[10]", "seeds=[0,1]", *COMPARE,
              "cka_images=0")
    assert res.returncode == 0, res.stderr[-3000:]
    sets = sorted(p.parent for p in out.glob("synthetic/*/*/shards/_info.json"))
    assert [p.relative_to(out).as_posix() for p in sets] == ["synthetic/cp/n00010/shards"]
    train = [_train_ids(out / f"cells/vit-cp/n00010/s{s}") for s in (0, 1)]
    assert train[0] == train[1] and len(train[0]) == 10
    listed = set((sets[0].parent / "real_ids.txt").read_text().split())
    drawn = set(json.loads((sets[0] / "_info.json").read_text())["copypaste"]["real_ids"])
    assert listed == train[0] and drawn <= train[0] and drawn
    for seed in (0, 1):
        mixed = json.loads((out / f"cells/vit-cp/n00010/s{seed}/synthetic.json").read_text())
        assert [s["folder"] for s in mixed["sets"]] == [str(sets[0])]


def test_compare_config_errors_name_the_key(tmp_path, target, cli):
    for i, (override, key) in enumerate([
            ("budgets=[-1]", "budgets"), ("budgets=[5,zeroshot]", "budgets[1]"), ("budgets=[zero-shot]", "budgets"),
            ("seeds=[]", "seeds"), ("seeds=[1,1]", "seeds"), ("finetune.train_limit=5", "finetune.train_limit"),
            ("finetune.seed=3", "finetune.seed"), ("finetune.steps=0", "finetune.steps"),
            ("models=[{name: a, model: resnet18, overrides: [seed=1]}]", "models.a.overrides"),
            ("models=[{name: a, model: vit_tiny_patch16_2244}]", "models.a.model")]):
        assert_cli_error(cli("compare", f"data={target}", f"out_dir={tmp_path / str(i)}", override), 2, key)
    res = cli("compare", f"data={target}", f"out_dir={tmp_path / 'c'}", "models=[{name: a, model: resnet18, "
              "task: cls, init: nowhere}]")
    assert_cli_error(res, 1, "models.a.init")
    res = cli("compare", f"data={tmp_path / 'missing'}", f"out_dir={tmp_path / 'e'}")
    assert_cli_error(res, 1, "missing")
    export = tmp_path / "export"  # a classification-only pretrain export: no dense head to run zero-shot
    export.mkdir()
    (export / "model.safetensors").write_bytes(b"")
    (export / "config.json").write_text(json.dumps({"model": "vit_tiny_patch16_224", "in_chans": 3, "img_size": 32,
                                                    "objective": "cls", "class_names": ["good", "crack"],
                                                    "mean": [0.5] * 3, "std": [0.5] * 3}))
    res = cli("compare", f"data={target}", f"out_dir={tmp_path / 'f'}", "budgets=[5,zero-shot]",
              f"models=[{{name: a, model: vit_tiny_patch16_224, init: {export}}}]")
    assert_cli_error(res, 1, "models.a.init", "objective=cls", "remove zero-shot from budgets")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no run folder for a refused matrix


@pytest.mark.slow
def test_compare_under_accelerate_launch_splits_cells_across_ranks(target, tmp_path):
    """Two seeds of one cell, one per rank: distinct folders and seeds, the same train images."""
    out = tmp_path / "ranks"
    proc = accelerate_launch("compare", f"data={target}", f"out_dir={out}", "budgets=[5]", "seeds=[0,1]",
                             "models=[{name: vit, model: vit_tiny_patch16_224}]", *COMPARE, "cka_images=0")
    logs = {p.parent.name: p.read_text().splitlines()[1] for p in out.glob("cells/vit/n00005/*/log.txt")}
    assert sorted(logs) == ["s0", "s1"]
    assert {line.split(",")[0] for line in logs.values()} == {"# rank 0", "# rank 1"}  # one cell per rank
    assert proc.stderr.count("report ->") == 1  # rank 0 alone writes the report, after both cells
    rows = [ln for ln in (out / "report.md").read_text().splitlines() if ln.startswith("| vit |")]
    assert len(rows) == 1 + 1 and " | 2 of 2 done | " in rows[1] and " ± " in rows[1]
    cell = out / "cells/vit/n00005"
    assert [yaml.safe_load((cell / s / "cell.yaml").read_text())["seed"] for s in ("s0", "s1")] == [0, 1]
    assert len(_train_ids(cell / "s0")) == 5 and _train_ids(cell / "s0") == _train_ids(cell / "s1")
    probe = json.loads((cell / "s0/probe.json").read_text())  # the first seed's, on one rank
    assert probe["frame"] == "96x64" and probe["seconds_per_frame"] > 0
    assert not (cell / "s1/probe.json").exists()


def test_pick_crops_reuses_few_test_images_and_centres_defects():
    from PIL import Image

    from synthvit.compare.analysis import pick_crops
    from synthvit.data import Item

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


def _matrix(tmp_path, seeds=(0, 1)):
    """A planned matrix (cell folders and cell.yaml, nothing run): scratch ViT, synthetic ViT, CNN; 2 budgets and
    zero-shot; 14 train images."""
    from synthvit.compare.config import CompareConfig, ModelSpec
    from synthvit.compare.matrix import plan_cells

    cfg = CompareConfig(data="data", out_dir=str(tmp_path), budgets=[5, 0, "zero-shot"], seeds=list(seeds),
                        models=[ModelSpec(name="vit", model="vit_tiny_patch16_224"),
                                ModelSpec(name="syn", model="vit_tiny_patch16_224", init="runs/export"),
                                ModelSpec(name="cnn", model="deeplabv3plus_resnet50")])
    return plan_cells(cfg, n_train=14)


def test_cells_repeat_per_seed_with_one_data_seed_and_zero_shot_only_with_init(tmp_path):
    cells = _matrix(tmp_path)
    folders = [c.folder.relative_to(tmp_path / "cells").as_posix() for c in cells]
    assert folders[0] == "syn/zero-shot" and "vit/zero-shot" not in folders and "cnn/zero-shot" not in folders
    assert len(folders) == len(set(folders)) == 1 + 3 * 2 * 2 and "cnn/n00014/s1" in folders
    trees = {f: yaml.safe_load((c.folder / "cell.yaml").read_text()) for f, c in zip(folders, cells)}
    assert [trees[f"vit/n00005/s{s}"]["seed"] for s in (0, 1)] == [0, 1]
    assert {t["data_seed"] for t in trees.values()} == {0} and trees["vit/n00005/s1"]["train_limit"] == 5
    assert trees["syn/zero-shot"]["steps"] == 0 and trees["syn/zero-shot"]["init"] == "runs/export"
    assert trees["syn/n00014/s0"]["steps"] == 500 and trees["syn/n00014/s0"]["train_limit"] == 0


def test_defective_budgets_set_defective_limit_in_their_own_folders(tmp_path):
    from synthvit.compare.config import CompareConfig, ModelSpec
    from synthvit.compare.matrix import plan_cells

    cfg = CompareConfig(data="data", out_dir=str(tmp_path), budgets=[5, 0], budget_unit="defective",
                        models=[ModelSpec(name="vit", model="vit_tiny_patch16_224")])
    cells = plan_cells(cfg, n_train=9)
    trees = {c.folder.relative_to(tmp_path / "cells").as_posix(): yaml.safe_load((c.folder / "cell.yaml").read_text())
             for c in cells}
    assert sorted(trees) == ["vit/d00005/s0", "vit/d00009/s0"]
    assert trees["vit/d00005/s0"]["defective_limit"] == 5 and trees["vit/d00005/s0"]["train_limit"] == 0
    assert trees["vit/d00009/s0"]["defective_limit"] == 0  # all of them


def _finish(cell, defect: float, auroc: float, ap: float = 0.4) -> None:
    """Fake a finished cell: metrics.json and the export's config.json."""
    iou = {"background": 0.9, "crack": defect, "pit": defect / 2}
    metrics = {"images": 4, "model_name": cell.spec.model, "task": "seg", "steps": 0 if cell.zero_shot else 500, "train_images": cell.budget,
               "train_wall_s": 0.0 if cell.zero_shot else 10.0 + cell.seed, "parameters": 5_000_000,
               "pixel": {"iou": iou, "miou": sum(iou.values()) / 3, "mdice": 0.5, "defect_ap": ap},
               "image": {"auroc": auroc, "ap": 0.7}}
    (cell.folder / "metrics.json").write_text(json.dumps(metrics))
    (cell.folder / "export").mkdir()
    (cell.folder / "export/model.safetensors").write_bytes(b"")  # reference_cells looks for the weights' file
    decoder = None if cell.spec.name == "cnn" else "linear"
    (cell.folder / "export/config.json").write_text(json.dumps({
        "model": cell.spec.model, "in_chans": 3, "img_size": 32, "task": "seg", "class_names": [], "mean": [0.5] * 3,
        "std": [0.5] * 3, "decoder": decoder}))


def test_a_stale_cell_keeps_its_results_aside_and_a_new_default_key_is_no_change(tmp_path, capsys):
    from synthvit.compare.matrix import plan_cells

    cells = _matrix(tmp_path, seeds=(0,))
    cell = next(c for c in cells if c.folder.relative_to(tmp_path).as_posix() == "cells/vit/n00005/s0")
    ran = yaml.safe_load((cell.folder / "cell.yaml").read_text())
    del ran["split_missing"]  # the config.yaml of a run written before that key existed
    (cell.folder / "config.yaml").write_text(yaml.safe_dump(ran, sort_keys=False))
    (cell.folder / "split.csv").write_text("id,split\na,train\nb,test\nc,test\n")
    _finish(cell, 0.3, 0.8)
    replanned = _matrix(tmp_path, seeds=(0,))  # planned again by today's synthvit, which has that key
    assert next(c for c in replanned if c.folder == cell.folder).job.done
    assert not list(cell.folder.glob("previous-*")) and "stale" not in capsys.readouterr().err

    from synthvit.compare.config import CompareConfig, ModelSpec
    cfg = CompareConfig(data="data", out_dir=str(tmp_path), budgets=[5, 0], seeds=[0],
                        models=[ModelSpec(name="vit", model="vit_tiny_patch16_224")])
    plan_cells(cfg, n_train=14, test_ids={"b", "c"})
    assert (cell.folder / "metrics.json").is_file()  # same config, same test split: still finished
    plan_cells(cfg, n_train=14, test_ids={"b", "d"})
    err = capsys.readouterr().err
    assert f"{cell.folder} is stale" in err and "1 images left it, 1 joined" in err
    assert not (cell.folder / "metrics.json").exists() and (cell.folder / "cell.yaml").is_file()
    kept = cell.folder / "previous-1"
    assert {p.name for p in kept.iterdir()} == {"metrics.json", "config.yaml", "split.csv", "export"}
    assert json.loads((kept / "metrics.json").read_text())["pixel"]["iou"]["crack"] == 0.3

    (cell.folder / "config.yaml").write_text((kept / "config.yaml").read_text())
    (cell.folder / "split.csv").write_text((kept / "split.csv").read_text())
    _finish(cell, 0.4, 0.8)
    cfg.finetune.steps = 600
    plan_cells(cfg, n_train=14, test_ids={"b", "c"})
    assert "steps: 500 -> 600" in capsys.readouterr().err and (cell.folder / "previous-2/metrics.json").is_file()
    assert json.loads((kept / "metrics.json").read_text())["pixel"]["iou"]["crack"] == 0.3


def test_reference_cell_is_one_that_kept_its_weights(tmp_path):
    from synthvit.compare.matrix import reference_cells

    cells = _matrix(tmp_path)
    for c in cells:
        _finish(c, 0.3, 0.8)
    rel = lambda c: c.folder.relative_to(tmp_path).as_posix()  # noqa: E731
    assert rel(reference_cells(cells)["syn"]) == "cells/syn/n00014/s0"
    (tmp_path / "cells/syn/n00014/s0/export/model.safetensors").unlink()  # results copied back without weights
    assert rel(reference_cells(cells)["syn"]) == "cells/syn/n00014/s1"
    for c in cells:
        if c.spec.name == "syn":
            (c.folder / "export/model.safetensors").unlink(missing_ok=True)
    assert "syn" not in reference_cells(cells) and "vit" in reference_cells(cells)


def test_results_csv_has_a_row_per_cell_and_seed_and_tables_read_rows(tmp_path):
    from synthvit.compare.matrix import PROBE_FILE, reference_cells
    from synthvit.compare.report import Report
    from synthvit.compare.results import RESULTS_FILE, load_rows, write_results
    from synthvit.compare.tables import cells_table, difference_lines, series, tradeoff_table

    cells = _matrix(tmp_path)
    noise = {0: 0.0, 1: 0.01}
    for c in cells:
        if c.folder.name != "s1" or c.spec.name != "cnn" or c.budget != 5:  # cnn n=5 seed 1 failed
            base = {"vit": 0.30, "syn": 0.50, "cnn": 0.32}[c.spec.name]
            _finish(c, base + noise[c.seed] + c.budget / 1000, 0.8 + noise[c.seed])
    refs = reference_cells(cells)
    assert {n: c.folder.relative_to(tmp_path).as_posix() for n, c in refs.items()}["syn"] == "cells/syn/n00014/s0"
    (refs["vit"].folder / PROBE_FILE).write_text(json.dumps({"seconds_per_frame": 1.25, "parameters": 5_700_000}))
    write_results(load_rows(cells, refs), tmp_path / RESULTS_FILE)
    with open(tmp_path / RESULTS_FILE) as f:
        rows = list(csv.DictReader(f))
    assert {"name", "model", "init", "decoder", "budget", "seed", "steps", "miou", "defect_iou", "pixel_ap",
            "image_auroc", "image_ap", "train_s", "s_per_4k_frame"} <= set(rows[0])
    assert len(rows) == len(cells) == 13 and rows[0]["budget"] == "zero-shot" and rows[0]["init"] == "runs/export"
    vit = [r for r in rows if r["name"] == "vit"]
    assert {r["s_per_4k_frame"] for r in vit} == {"1.25"} and {r["family"] for r in vit} == {"vit"}
    assert float(vit[0]["defect_iou"]) == pytest.approx((0.305 + 0.1525) / 2)
    failed = next(r for r in rows if r["status"] == "failed")
    assert (failed["name"], failed["budget"], failed["seed"], failed["miou"], failed["decoder"]) == (
        "cnn", "5", "1", "", "")
    assert next(r for r in rows if r["name"] == "cnn" and r["status"] == "done")["decoder"] == ""

    loaded = load_rows(cells, refs)
    report = Report("t")
    report.add("table", tradeoff_table(loaded, {}, "96x64"))
    report.add("table", cells_table(loaded))
    md = report.markdown()
    assert "| syn | synthetic | seg | linear | 14 | 2 | **0.5595 ± 0.0035** |" in md  # mean ± sample std, best bold
    assert "| cnn | scratch | seg | — | 14 | 2 |" in md and "| **0.8050 ± 0.0071** |" in md
    assert "| cnn | 5 | 1 of 2 done; FAILED: seed 1 (see log.txt) |" in md
    assert "| syn | zero-shot | 1 (seed-independent) |" in md
    assert series(loaded)["defect IoU"]["syn"][0][0] == "zero-shot"
    lines = difference_lines(loaded)
    assert [ln.split(",")[0] for ln in lines] == [
        "syn vs vit (synthetic-pretrained vs scratch)", "syn: the share of vit's gap to cnn it closes"] * 2 + [
        "vit vs cnn (ViT vs CNN)"] * 2 + ["syn vs cnn (ViT vs CNN)"] * 2
    assert "**syn higher**" in lines[0] and "image AUROC 0.8050 vs 0.8050: within noise" in lines[0]
    assert "2 vs 1 seeds" in lines[4] and "cannot be told from noise (one seed)" in lines[4]
    # budget 5, defect IoU 0.75 x (base + seed noise + 0.005): vit 0.2325, syn 0.3825, cnn 0.24375 (seed 0 only)
    assert lines[1].endswith("5 train images (seed means): defect IoU +1333 % of 0.0113 (past the CNN), pixel AP no gap "
                             "(0.4000 vs 0.4000)")


def test_mixed_rows_are_compared_with_the_same_model_without_sets_and_say_how_much_gap_they_close(tmp_path):
    """A row mixing synthetic sets is tested against its own model without them (never across models), its
    backend named in results.csv and the trade-off table, and its share of the scratch ViT's gap to the scratch
    CNN stated on the seed means."""
    from synthvit.compare.config import CompareConfig, ModelSpec
    from synthvit.compare.matrix import plan_cells, reference_cells
    from synthvit.compare.report import Report
    from synthvit.compare.results import load_rows
    from synthvit.compare.tables import budget_unit_text, difference_lines, gap_closed, tradeoff_table
    from synthvit.io import SynthvitError

    cfg = CompareConfig(data="data", out_dir=str(tmp_path), budgets=[5], seeds=[0, 1, 2], models=[
        ModelSpec(name="vit", model="vit_tiny_patch16_224"),
        ModelSpec(name="vit-cp", model="vit_tiny_patch16_224", synthetic="configs/generate/copypaste-cell.yaml"),
        ModelSpec(name="cnn", model="deeplabv3plus_resnet50"),
        ModelSpec(name="cnn-cp", model="deeplabv3plus_resnet50", synthetic="configs/generate/copypaste-cell.yaml")])
    cells = plan_cells(cfg, n_train=14)
    iou = {"vit": 0.30, "vit-cp": 0.32, "cnn": 0.34, "cnn-cp": 0.30}  # defect IoU: 0.75 x these
    ap = {"vit": 0.10, "vit-cp": 0.20, "cnn": 0.50, "cnn-cp": 0.55}
    for c in cells:
        if c.spec.name == "cnn-cp" and c.seed == 2:
            continue  # never ran: named from its row's generate config
        _finish(c, iou[c.spec.name] + 0.01 * c.seed, 0.8, ap[c.spec.name] + 0.01 * c.seed)
        if c.spec.synthetic:
            (c.folder / "synthetic.json").write_text(json.dumps({"share": 0.5, "sets": [
                {"folder": "runs/x/synthetic/copypaste-cell/n00005/shards", "backend": "copypaste"}]}))
    rows = load_rows(cells, reference_cells(cells))
    assert {(r.name, r.seed): r.synthetic for r in rows if r.synthetic} == {
        ("vit-cp", 0): "copypaste", ("vit-cp", 1): "copypaste", ("vit-cp", 2): "copypaste",
        ("cnn-cp", 0): "copypaste", ("cnn-cp", 1): "copypaste", ("cnn-cp", 2): "copypaste-cell"}
    lines = difference_lines(rows)
    heads = [ln.split(":")[0] for ln in lines]
    assert heads[:3] == ["vit-cp vs vit (mixed synthetic vs real only), 5 train images, 3 vs 3 seeds", "vit-cp",
                         "cnn-cp vs cnn (mixed synthetic vs real only), 5 train images, 2 vs 3 seeds"]
    assert "vit-cp vs cnn-cp (mixed" not in " ".join(lines) and "cnn-cp:" not in " ".join(heads)
    assert "defect IoU 0.2475 vs 0.2325: within noise" in lines[0] and "**vit-cp higher** by 0.1000" in lines[0]
    # against the scratch CNN: half the IoU gap (0.015 of 0.030), a quarter of the AP gap (0.10 of 0.40); the
    # mixed CNN is no scratch CNN to close a gap to: its own line says what the CNN row is behind or ahead of
    assert lines[1].endswith("the share of vit's gap to cnn it closes, 5 train images (seed means): "
                             "defect IoU +50 % of 0.0300, pixel AP +25 % of 0.4000")
    assert "the share of vit's gap to cnn-cp" not in " ".join(lines)
    of = {n: [r for r in rows if r.name == n] for n in ("vit", "vit-cp", "cnn")}  # a ViT that widens the gap
    assert gap_closed(of["vit"], of["vit-cp"], of["cnn"]) == ("defect IoU -100 % of 0.0150 (wider), "
                                                              "pixel AP -33 % of 0.3000 (wider)")
    for bad, says in (("{\"sets\": [", "not a readable JSON record"), ('{"sets": 3}', "key 'sets' is 3")):
        cell = next(c for c in cells if c.spec.name == "vit-cp")  # a damaged record names itself and what to do
        record = cell.folder / "synthetic.json"
        kept, _ = record.read_text(), record.write_text(bad)
        with pytest.raises(SynthvitError, match=f"{re.escape(str(record))}: {re.escape(says)}.*remove "
                                                f"{re.escape(str(cell.folder))}"):
            load_rows(cells, reference_cells(cells))
        record.write_text(kept)
    md = Report("t")
    md.add("table", tradeoff_table(rows, {}, "96x64"))
    assert "| vit-cp | scratch + mixed copypaste | seg |" in md.markdown()
    assert "| vit | scratch | seg |" in md.markdown()
    unit = budget_unit_text("defective")  # budgets that count defective train images say so
    assert difference_lines(rows, unit)[1].startswith("vit-cp: the share of vit's gap to cnn it closes, 5 defective "
                                                      "train images (seed means)")
    md = Report("t")
    md.add("table", tradeoff_table(rows, {}, "96x64", unit))
    assert "| model | init | task | decoder | defective train images | seeds |" in md.markdown()


def test_mean_std_and_the_two_std_noise_rule():
    from synthvit.compare.report import fmt
    from synthvit.compare.stats import Difference, MeanStd, mean_std

    s = mean_std([0.5, 0.6, None, float("nan"), 0.7])
    assert (s.mean, s.n) == pytest.approx((0.6, 3)) and s.std == pytest.approx(0.1)
    assert mean_std([0.5]) == MeanStd(0.5, None, 1) and mean_std([None]) is None
    assert fmt(MeanStd(0.61234, 0.01234, 3)) == "0.6123 ± 0.0123" and fmt(MeanStd(0.5, None, 1)) == "0.5000"
    assert fmt(MeanStd(45.31, 2.14, 3)) == "45.3 ± 2.1" and fmt(MeanStd(1234.0, 56.7, 2)) == "1,234 ± 57"
    apart = Difference(mean_std([0.50, 0.52, 0.51]), mean_std([0.40, 0.41, 0.39]))
    assert apart.noise == pytest.approx(2 ** 0.5 * 0.01) and apart.verdict == "a"
    assert apart.text("mIoU", "A", "B") == "mIoU 0.5100 vs 0.4000: **A higher** by 0.1100 (> 2 x 0.0141)"
    assert Difference(apart.b, apart.a).verdict == "b"
    close = Difference(mean_std([0.50, 0.54, 0.52]), mean_std([0.49, 0.53, 0.51]))  # 0.01 apart, noise 0.028
    assert close.verdict == "noise" and "within noise (0.0100 <= 2 x 0.0283)" in close.text("mIoU", "A", "B")
    edge = Difference(MeanStd(0.6, 0.03, 3), MeanStd(0.5, 0.04, 3))  # |0.1| = 2 x 0.05: not beyond
    assert edge.verdict == "noise"
    assert Difference(MeanStd(0.9, None, 1), MeanStd(0.1, None, 1)).verdict == "unknown"


def test_saliency_agreement_of_hand_made_maps():
    from synthvit.compare.analysis import Crop, saliency_agreement
    from synthvit.compare.saliency import mass_share, pixel_auroc

    mask = np.zeros((8, 8), np.uint8)
    mask[2:4, 3:6] = 1
    assert pixel_auroc(mask.astype(float), mask) == 1.0 and mass_share(mask.astype(float), mask) == 1.0
    assert pixel_auroc(1.0 - mask, mask) == 0.0 and mass_share(1.0 - mask, mask) == 0.0
    assert pixel_auroc(np.full((8, 8), 0.3), mask) == 0.5 and mass_share(np.full((8, 8), 0.3), mask) == 6 / 64
    noisy = mask + np.random.default_rng(0).uniform(0, 0.5, mask.shape)
    assert 0.99 < pixel_auroc(noisy, mask) <= 1.0 and 0.1 < mass_share(noisy, mask) < 1.0
    assert np.isnan(pixel_auroc(noisy, np.zeros_like(mask))) and np.isnan(mass_share(np.zeros((8, 8)), mask))
    crops = [Crop(np.zeros((8, 8), np.uint8), m, "x") for m in (mask, np.zeros_like(mask), mask * 2)]
    agree = saliency_agreement(np.stack([mask, mask, 1.0 - mask]).astype(float), crops)
    assert (agree.auroc, agree.mass, agree.crops) == (0.5, 0.5, 2)  # the defect-free crop left out


def test_cpu_compare_runs_one_cell_per_core_within_memory_and_says_so(monkeypatch, capsys):
    from synthvit.compare import run as compare_run
    from synthvit.compare.matrix import cpu_cells
    from synthvit.ranks import Ranks

    assert cpu_cells(2, 24.0) == 2 and cpu_cells(16, 20.0) == 6 and cpu_cells(4, 1.0) == 1 and cpu_cells(3, None) == 3
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(compare_run, "usable_cores", lambda: 8)
    monkeypatch.setattr(compare_run, "available_memory_gb", lambda: 12.5)
    single = Ranks(rank=0, world=1, local=0)
    assert compare_run._slots(single, 0) == [None] * 4  # memory, not cores, bounds it here
    assert "4 cell(s) at once on 8 CPU core(s), 2 compute thread(s) each (parallel=0" in capsys.readouterr().err
    assert compare_run._slots(single, 3) == [None] * 3
    assert "3 cell(s) at once on 8 CPU core(s), 2 compute thread(s) each (parallel=3)" in capsys.readouterr().err


def test_cpu_jobs_at_once_are_pinned_to_their_own_cores(tmp_path, monkeypatch):
    """Cells x threads x loader processes never exceed the cores: each CPU job run at once gets its own cores."""
    import os
    import sys

    from synthvit.compare.matrix import Job, core_shares, run_jobs

    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no process affinity on this platform")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(7)))
    assert core_shares(3) == [{0, 1, 2}, {3, 4}, {5, 6}] and core_shares(1) == [] and core_shares(8) == []
    monkeypatch.undo()
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("one core: nothing to share")
    jobs = []
    for k in range(2):
        folder = tmp_path / f"job{k}"
        folder.mkdir()
        # reads its cores after a moment (it is pinned right after it starts), then marks itself done
        code = (f"import json, os, time; time.sleep(0.5); open({str(folder / 'cores.json')!r}, 'w').write("
                f"json.dumps(sorted(os.sched_getaffinity(0)))); open({str(folder / 'done')!r}, 'w').close()")
        jobs.append(Job(f"job{k}", folder, [sys.executable, "-c", code], "done"))
    assert run_jobs(jobs, [None, None], "test") == []
    seen = [json.loads((job.folder / "cores.json").read_text()) for job in jobs]
    assert sorted(c for s in seen for c in s) == cores and not set(seen[0]) & set(seen[1])


def test_cpu_jobs_at_once_share_the_cores_unless_the_user_set_threads(monkeypatch):
    from synthvit.compare.matrix import child_env

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr("synthvit.compare.matrix.usable_cores", lambda: 8)
    assert child_env(None, 2)["OMP_NUM_THREADS"] == "4"
    assert child_env(None, 16)["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in child_env(None, 1) and "OMP_NUM_THREADS" not in child_env(0, 2)
    assert child_env(0, 2)["CUDA_VISIBLE_DEVICES"] == "0" and "RANK" not in child_env(None, 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert child_env(None, 2)["OMP_NUM_THREADS"] == "3"


def test_weights_column_names_where_a_cell_started():
    from synthvit.compare.results import weights_text

    hub = {"source": "hf-hub:timm/resnet50.a1_in1k", "revision": "0123456789abcdef", "file": "model.safetensors",
           "sha256": "ab" * 32}
    assert weights_text(None) == "random"
    assert weights_text(hub) == "timm/resnet50.a1_in1k@01234567 sha256:abababababab"
    assert weights_text({"source": "/w/my weights.safetensors", "sha256": "cd" * 32}) == \
        "my weights.safetensors sha256:cdcdcdcdcdcd"
    chained = {"source": "init:runs/p/export", "sha256": "ef" * 32, "chain": [hub]}
    assert weights_text(chained) == ("init:runs/p/export sha256:efefefefefef <- timm/resnet50.a1_in1k@01234567 "
                                     "sha256:abababababab")


@pytest.mark.slow
def test_a_public_weights_row_records_where_it_started(target, use_hf_cache, tmp_path, cli, monkeypatch):
    """A compare row with pretrained: true loads its model from the Hugging Face cache in its cell's child process
    (offline, as a user with a filled cache), and results.csv and the report name the hub repository and sha256."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "cmp"
    name = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    res = cli("compare", f"data={target}", f"out_dir={out}", f"models=[{{name: pub, model: {name}, pretrained: true}}]",
              "budgets=[5]", *COMPARE, "cka_images=0", "report_images=0")
    assert res.returncode == 0, res.stderr[-3000:]
    cell = yaml.safe_load((out / "cells/pub/n00005/s0/cell.yaml").read_text())
    assert cell["pretrained"] is True and cell["model"] == name
    with open(out / "results.csv") as f:
        (row,) = list(csv.DictReader(f))
    source = ExportMeta.from_json(json.loads((out / "cells/pub/n00005/s0/export/config.json").read_text()),
                                  "config.json").weights_source
    assert source["source"] == f"hf-hub:timm/{name}" and len(source["sha256"]) == 64
    assert row["weights"].startswith(f"timm/{name}@") and source["sha256"][:12] in row["weights"]
    assert f"pub from timm/{name}@" in (out / "report.md").read_text()
