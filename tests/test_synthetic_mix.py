"""Mixed batches: synthetic shard sets drawn into every batch of a fine-tune (``synthetic=[...]``,
``synthetic_share``), their classes mapped into the real set's by name, and no set (nor pretraining export) that
drew on a test image let in."""
import json
import shutil

import numpy as np
import pytest

from conftest import assert_cli_error, make_real_data
from finetune.config import FinetuneConfig
from finetune.synthetic import LeakError, check_leak, class_lut, load_synthetic
from finetune.train import CropDataset
from generate.schema import read_info
from synthvit.config import ConfigError
from synthvit.data import load_real_data, split_ids
from synthvit.io import SynthvitError

DEFECT = np.s_[20:28, 24:40]


def test_class_lut_maps_by_name_or_onto_a_binary_defect():
    assert class_lut(["background", "crack", "pit"], ["background", "defect"], "s").tolist()[:4] == [0, 1, 1, 0]
    lut = class_lut(["background", "short", "open"], ["background", "open", "short", "spur"], "s")
    assert lut.tolist()[:3] == [0, 2, 1]
    with pytest.raises(SynthvitError, match=r"s has defect classes crack, open; the real data's are open, short, "
                                            r"spur: crack match none"):
        class_lut(["background", "crack", "open"], ["background", "open", "short", "spur"], "s")



def test_synthetic_classes_pairs_map_what_names_cannot(real, tiny_dataset):
    from finetune.synthetic import parse_class_pairs

    multi = ["background", "open", "short", "spur"]
    lut = class_lut(["background", "crack", "open", "pit"], multi, "s", {"crack": "short", "pit": "spur"})
    assert lut.tolist()[:4] == [0, 2, 1, 3]  # pairs first, then equal names
    # on binary real data a pair's target must be the defect class
    assert class_lut(["background", "crack"], ["background", "defect"], "s", {"crack": "defect"}).tolist()[:2] == [0, 1]
    with pytest.raises(SynthvitError, match=r"crack=bridge name\(s\) no defect class of the real data \(open, "
                                            r"short, spur\)"):
        class_lut(["background", "crack"], multi, "s", {"crack": "bridge"})
    with pytest.raises(SynthvitError, match=r"map them \(synthetic_classes=\[pit=<real class>"):
        class_lut(["background", "pit"], multi, "s", {})
    assert parse_class_pairs(["pit = pin-hole", "crack=open"]) == {"pit": "pin-hole", "crack": "open"}
    for bad in (["pit"], ["=open"], ["pit=a", "pit=b"]):
        with pytest.raises(SynthvitError, match="not a SYNTHETIC=REAL pair"):
            parse_class_pairs(bad)
    data = load_real_data(real)  # binary; the tiny set's classes are procedural ones
    names = read_info(tiny_dataset).class_names
    pool = load_synthetic([str(tiny_dataset)], data, set(), [f"{names[1]}=defect"])
    assert pool.records[0]["mapped_to"][1] == "defect"
    with pytest.raises(SynthvitError, match=r"synthetic_classes: nothing name\(s\) no defect class of the synthetic "
                                            r"sets \(" + ", ".join(sorted(names[1:]))):
        load_synthetic([str(tiny_dataset)], data, set(), ["nothing=defect"])


@pytest.fixture
def real(tmp_path):
    return make_real_data(tmp_path / "real", 12, (48, 64), lambda rng: DEFECT)


def _with_ids(src, dst, folder, ids):
    """A copy of the shard set ``src`` whose _info.json says it drew on ``ids`` of ``folder``."""
    shutil.copytree(src, dst)
    info = json.loads((dst / "_info.json").read_text())
    info["backgrounds"] = {"folder": str(folder), "ids": ids}
    (dst / "_info.json").write_text(json.dumps(info))
    return dst


def test_mixed_batches_take_the_first_share_of_every_batch_from_the_synthetic_sets(real, tiny_dataset):
    data = load_real_data(real)
    pool = load_synthetic([str(tiny_dataset)], data, set())
    assert len(pool) == 40 and pool.records[0]["mapped_to"][:3] == ["background", "defect", "defect"]
    cfg = FinetuneConfig(data=str(real), crop_size=32, batch_size=4, synthetic=[str(tiny_dataset)],
                         synthetic_share=0.5)
    ds = CropDataset(data, data.items, cfg, total=40, synthetic=pool)
    n = len(data.items)
    frames = [ds.draw(i)[2] for i in range(40)]
    assert all((k >= n) == (i % 4 < 2) for i, k in enumerate(frames))  # 2 of every 4 samples synthetic
    assert len({k for k in frames if k >= n}) > 5
    sample = ds[0]
    assert sample["image"].shape == (3, 32, 32) and set(sample["mask"].unique().tolist()) <= {0, 1}
    again = CropDataset(data, data.items, cfg, total=40, synthetic=pool)[0]
    assert (again["image"] == sample["image"]).all() and (again["mask"] == sample["mask"]).all()
    plain = CropDataset(data, data.items, FinetuneConfig(data=str(real), crop_size=32, batch_size=4), total=40)
    assert all(plain.draw(i)[2] < n for i in range(40))


def test_add_mode_keeps_the_real_crops_of_the_run_without_synthetic_sets(real, tiny_dataset):
    """synthetic_mode=add (equal real exposure): every batch holds batch_size real samples -- the very crops, flips
    and turns of the same run without synthetic sets -- and round(share / (1 - share) * batch_size) synthetic ones."""
    data = load_real_data(real)
    pool = load_synthetic([str(tiny_dataset)], data, set())
    base = dict(data=str(real), crop_size=32, batch_size=4)
    added = CropDataset(data, data.items, FinetuneConfig(**base, synthetic=[str(tiny_dataset)], synthetic_share=0.6,
                                                         synthetic_mode="add"), total=60, synthetic=pool)
    plain = CropDataset(data, data.items, FinetuneConfig(**base), total=60)
    assert (added.n_real, added.n_synthetic, added.step_batch) == (4, 6, 10)  # 6 / 10 = share 0.6
    n, real_samples = len(data.items), []
    for i in range(50):  # five steps of 10
        k = added.draw(i)[2]
        assert (k >= n) == (i % 10 < 6)
        if k < n:
            real_samples.append(added[i])
    assert len(real_samples) == 20
    for j, got in enumerate(real_samples):  # sample j of the plain run: step j // 4, slot j % 4
        want = plain[j]
        assert (got["image"] == want["image"]).all() and (got["mask"] == want["mask"]).all()
    shared = CropDataset(data, data.items, FinetuneConfig(**base, synthetic=[str(tiny_dataset)], synthetic_share=0.5),
                         total=40, synthetic=pool)
    assert (shared.n_real, shared.n_synthetic) == (2, 2)  # share: the synthetic half displaces real samples


def test_a_set_or_export_that_drew_on_a_test_image_is_refused(real, tiny_dataset, tmp_path):
    data = load_real_data(real)
    split = split_ids(data, 0.3, 0)
    test_ids = {i for i, s in split.items() if s == "test"}
    train_ids = sorted(set(split) - test_ids)
    leaky = _with_ids(tiny_dataset, tmp_path / "leaky", real, train_ids[:2] + sorted(test_ids)[:1])
    assert read_info(leaky).real_ids() == {str(real): set(train_ids[:2]) | set(sorted(test_ids)[:1])}
    with pytest.raises(LeakError, match=sorted(test_ids)[0]):
        load_synthetic([str(leaky)], data, test_ids)
    clean = _with_ids(tiny_dataset, tmp_path / "clean", real, train_ids[:3])
    assert len(load_synthetic([str(clean)], data, test_ids)) == 40
    # ids of other data (not all images of this set) are not this split's business
    assert check_leak("x", {"elsewhere": {"im01", "other"}}, data, {"im01"}) == 0


def test_finetune_mixes_records_and_refuses(real, tiny_dataset, tmp_path, cli, one_torch_thread):
    run = tmp_path / "run"
    common = [f"data={real}", "task=seg", "crop_size=32", "steps=2", "batch_size=4", "num_workers=0"]
    res = cli("finetune", *common, f"out_dir={run}", f"synthetic=[{tiny_dataset}]", "synthetic_share=0.5",
              "evaluate=false")
    assert res.returncode == 0, res.stderr[-2000:]
    record = json.loads((run / "synthetic.json").read_text())
    assert record["share"] == 0.5 and record["mode"] == "share" and record["sets"][0]["samples"] == 40
    assert (run / "export" / "model.safetensors").is_file()
    res = cli("finetune", *common, f"out_dir={tmp_path / 'add'}", f"synthetic=[{tiny_dataset}]",
              "synthetic_mode=add", "evaluate=false")  # batches of 4 real + 4 synthetic samples
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((tmp_path / "add" / "synthetic.json").read_text())["mode"] == "add"
    data = load_real_data(real)
    test_id = next(i for i, s in split_ids(data, 0.3, 0).items() if s == "test")
    leaky = _with_ids(tiny_dataset, tmp_path / "leaky", real, [test_id])
    assert_cli_error(cli("finetune", *common, f"out_dir={tmp_path / 'no'}", f"synthetic=[{leaky}]"), 1,
                     "drew on 1 image(s) of the test split", test_id)
    assert not (tmp_path / "no" / "export").exists()
    assert_cli_error(cli("finetune", *common, f"out_dir={tmp_path / 'no'}", f"synthetic=[{tiny_dataset}]",
                         "task=both"), 2, "mixed batches train the dense head")


def test_a_pretraining_export_that_saw_a_test_image_is_refused(real, pretrain_export, tmp_path, cli):
    data = load_real_data(real)
    test_id = next(i for i, s in split_ids(data, 0.3, 0).items() if s == "test")
    export = tmp_path / "export"
    shutil.copytree(pretrain_export, export)
    meta = json.loads((export / "config.json").read_text())
    (export / "config.json").write_text(json.dumps(dict(meta, real_ids={str(real): [test_id]})))
    assert_cli_error(cli("finetune", f"data={real}", f"init={export}", f"out_dir={tmp_path / 'run'}", "task=seg",
                         "crop_size=32", "steps=1"), 1, f"init export {export} drew on 1 image(s)", test_id)


def test_defective_budgets_are_nested_stratified_and_keep_every_free_frame(tmp_path, cli, one_torch_thread):
    from synthvit.data import defective_order

    root = make_real_data(tmp_path / "real", 40, (32, 32), lambda rng: np.s_[4:12, 4:12])
    labels = (root / "labels.csv").read_text().splitlines()  # odd frames 'dark'; make every 4th one 'bright'
    labels = [line.replace("dark", "bright") if k and (k - 1) % 4 == 1 else line for k, line in enumerate(labels)]
    (root / "labels.csv").write_text("\n".join(labels) + "\n")
    data = load_real_data(root)
    order = defective_order(data, data.items, 0)
    assert len(order) == 20 and order == defective_order(data, data.items, 0)
    label = {i.id: i.label for i in data.items}
    assert sorted(label[i] for i in order[:4]) == ["bright", "bright", "dark", "dark"]  # both classes at 4
    assert order[:5] == defective_order(data, data.items, 0)[:5] and order != defective_order(data, data.items, 1)
    run = tmp_path / "run"
    res = cli("finetune", f"data={root}", f"out_dir={run}", "task=seg", "crop_size=32", "steps=1", "batch_size=2",
              "num_workers=0", "defective_limit=3", "evaluate=false")
    assert res.returncode == 0, res.stderr[-2000:]
    used = {r.split(",")[0] for r in (run / "split.csv").read_text().splitlines()[1:] if r.endswith(",train")}
    split = split_ids(data, 0.3, 0)
    train = [i for i in data.items if split[i.id] == "train"]
    assert {i.id for i in train if i.label == "good"} <= used  # every defect-free train frame
    assert sorted(used - {i.id for i in train if i.label == "good"}) == sorted(defective_order(data, train, 0)[:3])


def test_a_checkpoint_from_before_a_new_key_still_resumes(tmp_path):
    """A checkpoint written before synthetic_mode existed records no such key: it reads as its default (share), as a
    run folder's config.yaml does, so the run resumes; a real change is still refused."""
    from finetune.train import check_resumable, training_config
    from synthvit.checkpoint import STATE_FILE

    cfg = FinetuneConfig(data="d", crop_size=32)
    old = {k: v for k, v in training_config(cfg).items() if k != "synthetic_mode"}
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / STATE_FILE).write_text(json.dumps({"config": old, "step": 2, "num_processes": 1}))
    assert check_resumable(cfg, ckpt, 1)["step"] == 2
    with pytest.raises(SynthvitError, match="synthetic_mode: 'share' -> 'add'"):
        check_resumable(FinetuneConfig(data="d", crop_size=32, synthetic_mode="add"), ckpt, 1)
    with pytest.raises(ConfigError, match="batch_size: 1 cannot hold a synthetic and a real sample"):
        FinetuneConfig(data="d", batch_size=1, synthetic=["s"])


def test_the_advised_set_is_kept_for_the_same_images_and_rebuilt_for_others(real, tmp_path):
    from finetune.synthetic import build_copypaste

    data = load_real_data(real)
    split = split_ids(data, 0.3, 0)
    train = [i for i in data.items if split[i.id] == "train"]
    cfg = FinetuneConfig(data=str(real), crop_size=32)
    keys = {"num_samples": 6, "image_size": 32}
    folder = tmp_path / "run" / "copypaste-set"
    build_copypaste(cfg, train, folder, keys)
    first = (folder / "_info.json").stat().st_mtime_ns
    assert set(read_info(folder).real_ids()[str(real)]) <= {i.id for i in train}
    build_copypaste(cfg, train, folder, keys)  # same images and keys: kept as it is
    assert (folder / "_info.json").stat().st_mtime_ns == first
    fewer = [i for i in train if i.id != next(t.id for t in train if t.defect)]  # another budget
    build_copypaste(cfg, fewer, folder, keys)
    assert (folder / "_info.json").stat().st_mtime_ns != first
    ids = (tmp_path / "run" / "copypaste-set.real_ids.txt").read_text().split()
    assert ids == sorted(i.id for i in fewer)
