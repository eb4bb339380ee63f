"""``synthvit doctor``: the findings on a known folder, problems and the exit code, and finetune's advise=true."""
import json

import numpy as np
import pytest
from PIL import Image

from conftest import assert_cli_error, make_real_data, run_cli

DOCTOR = ["model=vit_tiny_patch16_224", "crop_size=32", "defect_crop_prob=0.8", "batch_size=4", "steps=20"]


def _square(rng):  # a 6 x 6 defect: thinner than the 16 px patch
    y, x = rng.integers(4, 40, 2)
    return slice(y, y + 6), slice(x, x + 6)


@pytest.fixture()
def folder(tmp_path):
    return make_real_data(tmp_path / "data", 24, (48, 64), _square)


def test_doctor_measures_the_train_defects_and_advises(folder, tmp_path):
    out = tmp_path / "doc"
    res = run_cli("doctor", f"data={folder}", f"report_dir={out}", *DOCTOR)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((out / "doctor.json").read_text())
    assert (out / "doctor.png").stat().st_size > 10_000
    assert report["format"] == "canonical" and report["images"] == 24 and report["sizes"]["distinct"] == 1
    train, test = report["split"]["train"], report["split"]["test"]
    assert train["images"] + test["images"] == 24 and train["defective"] + test["defective"] == 12
    assert report["split"]["source"].startswith("seeded")
    defect = report["classes"]["defect"]
    assert defect["train_instances"] == train["defective"] and defect["side"]["median"] == 6
    assert defect["thickness"]["median"] == pytest.approx(6, abs=1) and defect["below_stride"] == 1.0
    assert 0.7 <= report["crop_hit_share"] <= 1.0  # 0.8 defect-centred crops, and a few random hits
    advice = {a["key"]: a for a in report["advice"]}
    assert advice["decoder"]["value"] == "dpt-skip" and "thickness 6.0 px < patch 16" in advice["decoder"]["reason"]
    assert advice["steps"]["value"] > 20 and advice["model"]["apply"] is False
    assert report["problems"] == [] and "verdict   fit" in res.stdout


def test_doctor_lists_every_problem_and_exits_1_without_a_traceback(folder, tmp_path):
    masks = folder / "masks"
    Image.fromarray(np.full((48, 64), 255, np.uint8)).save(masks / "im01.png")  # defect everywhere
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(masks / "im03.png")  # labelled dark, mask empty
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(masks / "im05.png")  # another size
    (folder / "images" / "im07.png").write_bytes(b"not a png")
    (folder / "images" / "im02.png").write_bytes((folder / "images" / "im00.png").read_bytes())  # a copy...
    test = {"im02", "im09", "im10", "im11", "im12", "im13"}  # ...on the other side of the split
    (folder / "splits.csv").write_text("id,split\n" + "".join(f"im{i:02d},{'test' if f'im{i:02d}' in test else 'train'}\n"
                                                             for i in range(24)))
    out = tmp_path / "doc"
    res = run_cli("doctor", f"data={folder}", f"report_dir={out}", *DOCTOR)
    assert_cli_error(res, 1, "problem(s) found", "finetune would refuse", str(out / "doctor.json"))
    report = json.loads((out / "doctor.json").read_text())
    text = "\n".join(report["problems"])  # what finetune refuses: the exit code
    assert "im07.png: unreadable image" in text and "im05.png: mask is 10x10, image is 64x48" in text
    warned = "\n".join(report["warnings"])  # what it trains through
    assert "im01.png: the mask is defect everywhere" in warned
    assert "im03.png: labelled dark but its mask is empty" in warned
    assert "1 train/test near-duplicate pair(s)" in warned and "im00 ~ im02 (0 bits)" in warned
    assert "PROBLEM" in res.stdout and "WARNING" in res.stdout


def test_doctor_warnings_exit_0_unless_strict(folder, tmp_path, cli):
    Image.fromarray(np.full((48, 64), 255, np.uint8)).save(folder / "masks" / "im01.png")  # defect everywhere
    res = cli("doctor", f"data={folder}", f"report_dir={tmp_path / 'a'}", *DOCTOR)
    assert res.returncode == 0 and "WARNING" in res.stdout and "warning(s)" in res.stdout, res.stderr[-2000:]
    assert json.loads((tmp_path / "a" / "doctor.json").read_text())["problems"] == []
    assert_cli_error(cli("doctor", f"data={folder}", f"report_dir={tmp_path / 'b'}", *DOCTOR, "strict=true"), 1,
                     "warning(s)", "strict=true")


def test_finetune_advise_applies_the_advice_and_records_it(folder, tmp_path):
    run = tmp_path / "run"
    res = run_cli("finetune", f"data={folder}", f"out_dir={run}", *DOCTOR, "advise=true", "evaluate=false",
                  "num_workers=0", "calibrate.rule=argmax", "drop_path=0.0")
    assert res.returncode == 0, res.stderr[-3000:]
    applied = {a["key"]: a for a in json.loads((run / "advice.json").read_text())["applied"]}
    assert applied["decoder"]["value"] == "dpt-skip" and "model" not in applied
    resolved = (run / "config.yaml").read_text()
    assert "decoder: dpt-skip" in resolved and "steps: 20" in resolved  # steps=20 given: the user's key wins
    assert "advise: true" in resolved and "advise: decoder=dpt-skip" in res.stderr
    # the few-defect recipe: <= 10 defective train frames and a ViT -> copy-paste of the run's own train defects,
    # built into the run folder from its train split alone, mixed into every batch
    record = json.loads((run / "advice.json").read_text())
    n_def = record["defective_train_frames"]
    assert 0 < n_def <= 10 and [a["key"] for a in record["overridden"]] == ["steps"]
    assert record["overridden"][0]["yours"] == 20 and record["overridden"][0]["value"] > 20
    advised = applied["synthetic"]
    assert advised["value"] == [str(run / "copypaste-set")] and advised["build"]["image_size"] == 48
    assert advised["build"]["copypaste.match"] is True  # textured frames: margins matched to where they land
    assert f"{n_def} defective train frame(s)" in advised["reason"]
    mixed = json.loads((run / "synthetic.json").read_text())
    assert mixed["mode"] == "share" and mixed["sets"][0]["backend"] == "copypaste"
    split = dict(line.split(",") for line in (run / "split.csv").read_text().split()[1:])
    info = json.loads((run / "copypaste-set" / "_info.json").read_text())
    drawn = set(info["copypaste"]["real_ids"])
    assert drawn and all(split[i] == "train" for i in drawn)  # never a test image
    assert f"synthetic:\n- {run / 'copypaste-set'}" in resolved


def test_explicit_keys_win_over_advice_and_cnns_get_no_copypaste(folder, tmp_path):
    run = tmp_path / "run"
    res = run_cli("finetune", f"data={folder}", f"out_dir={run}", *DOCTOR, "advise=true", "evaluate=false",
                  "num_workers=0", "calibrate.rule=argmax", "synthetic=[]", "decoder=linear", "steps=2")
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads((run / "advice.json").read_text())
    yours = {a["key"]: a for a in record["overridden"]}
    assert set(yours) == {"synthetic", "decoder", "steps"}
    assert yours["synthetic"]["yours"] == [] and yours["decoder"]["yours"] == "linear" and yours["steps"]["yours"] == 2
    assert not (run / "copypaste-set").exists() and not (run / "synthetic.json").exists()
    assert "decoder: linear" in (run / "config.yaml").read_text()
    assert "advise (yours kept): synthetic=[]" in res.stderr
    out = tmp_path / "doc"  # a CNN baseline: the evidence shows no consistent gain from the mixing -> no advice
    res = run_cli("doctor", f"data={folder}", f"report_dir={out}", "model=deeplabv3plus_resnet50", "crop_size=32",
                  "defect_crop_prob=0.8", "batch_size=4", "steps=20")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "synthetic" not in {a["key"] for a in json.loads((out / "doctor.json").read_text())["advice"]}


def test_binarised_frames_are_told_from_textured_ones(tmp_path):
    """Copy-paste pastes a binarised frame's defects as they are (a matched margin greys them): frames nearly all
    black or white, even JPEG-saved (values ring a few levels off), count as binarised; textured ones do not."""
    from finetune.doctor import bilevel
    from synthvit.data import load_real_data

    rng = np.random.default_rng(0)
    for k in range(3):
        board = np.where(rng.random((64, 64)) < 0.3, 255, 0).astype(np.uint8)
        Image.fromarray(board).save(tmp_path / f"b{k}.jpg", quality=90)
    binary = make_real_data(tmp_path / "binary", 4, (64, 64), _square)
    for k, f in enumerate(sorted((binary / "images").glob("*.png"))[:3]):
        Image.open(tmp_path / f"b{k}.jpg").save(f)
    assert bilevel(load_real_data(binary).items[:3], 3)
    assert not bilevel(load_real_data(make_real_data(tmp_path / "textured", 4, (64, 64), _square)).items, 3)
