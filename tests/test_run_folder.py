"""A run folder belongs to one run: its split is pinned (evaluate and calibrate read split.csv, never a split drawn
again), a finished run is never written over, a second process into the folder fails at once, the export appears
whole or not at all, and a run stopped while evaluating continues by evaluating its export."""
import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import assert_cli_error, make_real_data
from synthvit.lock import folder_lock

TINY = dict(crop_size=32, steps=2, batch_size=2, num_workers=0, log_every=1, near_duplicate_distance=0, task="seg")
TINY.update({"tiling.batch_size": 4, "calibrate.max_images": 4})
FT = [f"{k}={v}" for k, v in TINY.items()]


def ft(**changes) -> list[str]:
    """The tiny finetune's overrides with some keys changed (a key is given once on a command line)."""
    return [f"{k}={v}" for k, v in (TINY | changes).items()]


def _defect(rng):
    y, x = rng.integers(4, 30), rng.integers(4, 40)
    return np.s_[y:y + 8, x:x + 10]


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    return make_real_data(tmp_path_factory.mktemp("frames") / "ds", 12, (48, 64), _defect)


@pytest.fixture(scope="module")
def finished(frames, tmp_path_factory):
    """A finished run (evaluated) on a copy of ``frames``; tests copy both before changing them."""
    root = tmp_path_factory.mktemp("finished")
    data = shutil.copytree(frames, root / "ds")
    run = root / "run"
    from synthvit.cli import main

    assert main(["finetune", f"data={data}", f"out_dir={run}", *FT]) == 0
    return data, run


def _copy(finished, tmp_path):
    data, run = finished
    return shutil.copytree(data, tmp_path / "ds"), shutil.copytree(run, tmp_path / "run")


def _relocate(run, data):
    """Point the copied run's config at the copied data (as if the run had been made on it)."""
    cfg = run / "config.yaml"
    lines = [f"data: {data}" if ln.startswith("data:") else ln for ln in cfg.read_text().splitlines()]
    cfg.write_text("\n".join(lines) + "\n")


def _split(run) -> dict[str, str]:
    with open(run / "split.csv", newline="") as f:
        return {row["id"]: row["split"] for row in csv.DictReader(f)}


def _add_frame(data, name):
    Image.fromarray(np.full((48, 64), 120, np.uint8)).save(data / "images" / f"{name}.png")
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(data / "masks" / f"{name}.png")
    with open(data / "labels.csv", "a") as f:
        f.write(f"{name},good\n")


def _remove_frame(data, name):
    (data / "images" / f"{name}.png").unlink()
    (data / "masks" / f"{name}.png").unlink()
    rows = (data / "labels.csv").read_text().splitlines()
    (data / "labels.csv").write_text("".join(r + "\n" for r in rows if not r.startswith(f"{name},")))


@pytest.fixture
def seen(monkeypatch):
    """The ids each evaluation and each calibration of this process scores."""
    import finetune.run as ft

    record = {"evaluate": [], "calibrate": []}
    evaluate, fit = ft.evaluate, ft.fit_decision

    def spy_evaluate(predictor, data, items, *a, **k):
        record["evaluate"].append({i.id for i in items})
        return evaluate(predictor, data, items, *a, **k)

    def spy_fit(predictor, data, items, *a, **k):
        record["calibrate"].append({i.id for i in items})
        return fit(predictor, data, items, *a, **k)

    monkeypatch.setattr(ft, "evaluate", spy_evaluate)
    monkeypatch.setattr(ft, "fit_decision", spy_fit)
    return record


def test_the_split_is_pinned_to_the_run(finished, tmp_path, cli, seen, caplog):
    data, run = _copy(finished, tmp_path)
    _relocate(run, data)
    split = _split(run)
    test_ids = {i for i, s in split.items() if s == "test"}
    train_ids = {i for i, s in split.items() if s == "train"}
    # images added since: not evaluated, not calibrated on, and counted
    for k in range(3):
        _add_frame(data, f"new{k}")
    res = cli("evaluate", f"checkpoint={run}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "3 image(s)" in caplog.text and "added since the run): not used" in caplog.text
    assert seen["evaluate"][-1] == test_ids
    assert json.loads((run / "metrics_test.json").read_text())["images"] == len(test_ids)
    assert cli("evaluate", f"checkpoint={run}", "split=all").returncode == 0
    assert seen["evaluate"][-1] == set(split)  # every recorded image, none of the new ones
    assert cli("calibrate", f"checkpoint={run}").returncode == 0
    assert seen["calibrate"][-1] == train_ids  # no test id (nor a new one) reaches a calibration
    # a recorded image removed, or renamed: an error naming it, nothing written
    before = (run / "metrics_test.json").read_bytes()
    gone = sorted(test_ids)[0]
    (data / "images" / f"{gone}.png").rename(data / "images" / "renamed.png")
    (data / "masks" / f"{gone}.png").rename(data / "masks" / "renamed.png")
    labels = (data / "labels.csv").read_text().replace(f"{gone},", "renamed,")
    (data / "labels.csv").write_text(labels)
    for verb in ("evaluate", "calibrate"):
        assert_cli_error(cli(verb, f"checkpoint={run}"), 1, repr(gone), "split.csv", "restore them")
    assert (run / "metrics_test.json").read_bytes() == before


def test_evaluate_on_other_data_keeps_the_recorded_sides(finished, tmp_path, cli, seen):
    data, run = _copy(finished, tmp_path)
    other = tmp_path / "other"
    shutil.copytree(data, other)
    split = _split(run)
    train_id = next(i for i, s in split.items() if s == "train")
    _remove_frame(other, next(i for i, s in split.items() if s == "test"))  # other data may lack some
    _add_frame(other, "fresh")
    res = cli("evaluate", f"checkpoint={run}", f"data={other}", f"out_dir={tmp_path / 'ev'}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "fresh" in seen["evaluate"][-1] and train_id not in seen["evaluate"][-1]


def test_a_finished_run_is_never_written_over(finished, tmp_path, cli):
    data, run = _copy(finished, tmp_path)
    _relocate(run, data)
    files = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for extra in ({}, {"optim.lr": 0.5}, {"evaluate": "false"}):
        assert_cli_error(cli("finetune", f"data={data}", f"out_dir={run}", *ft(**extra)), 1,
                         "holds a finished run", "overwrite=true")
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == files
    # overwrite=true, stopped early: the earlier run is gone whole, not mixed with the new config
    res = cli("finetune", f"data={data}", f"out_dir={run}", *ft(crop_size=48, steps=4), "stop_at=1", "overwrite=true")
    assert res.returncode == 0, res.stderr[-2000:]
    assert not (run / "export").exists() and not (run / "metrics.json").exists()
    assert not list(run.glob("metrics_*.json")) and "crop_size: 48" in (run / "config.yaml").read_text()
    assert_cli_error(cli("evaluate", f"checkpoint={run}"), 1, "not a finished finetune run")
    assert_cli_error(cli("predict", f"checkpoint={run}", f"input={data / 'images'}", f"out={tmp_path / 'p'}"), 1,
                     "not a finished finetune run")
    # the unfinished run resumes; one of another config is refused, naming the change and the ways out
    assert_cli_error(cli("finetune", f"data={data}", f"out_dir={run}", *ft(steps=4)), 1,
                     "unfinished run of another config", "crop_size: 48 -> 32", "resume=none")
    res = cli("finetune", f"data={data}", f"out_dir={run}", *ft(crop_size=48, steps=4))
    assert res.returncode == 0 and (run / "metrics.json").is_file(), res.stderr[-2000:]


def test_a_second_process_into_the_folder_fails_at_once(frames, tmp_path, cli):
    run = tmp_path / "run"
    run.mkdir()
    with folder_lock(run):  # another process holding the folder, as a concurrent finetune would
        res = cli("finetune", f"data={frames}", f"out_dir={run}", *FT)
        assert_cli_error(res, 1, f"{run} is in use by another synthvit process", "another out_dir")
        assert sorted(p.name for p in run.iterdir()) == [".lock"]
    assert cli("finetune", f"data={frames}", f"out_dir={run}", *ft(evaluate="false")).returncode == 0  # released


def test_the_lock_is_released_by_an_error(frames, tmp_path, cli):
    run = tmp_path / "run"
    assert cli("finetune", f"data={frames}", f"out_dir={run}", *FT, "model=no_such_model").returncode != 0
    with folder_lock(run):
        pass


def test_an_interrupted_export_leaves_no_export_and_the_run_starts_again(frames, tmp_path, cli, monkeypatch):
    import finetune.run as ft

    run = tmp_path / "run"
    write = ft.write_export

    def crash(model, folder, meta):
        write(model, folder, meta)
        (folder / "config.json").unlink()  # as if killed before the export's last file
        raise KeyboardInterrupt

    monkeypatch.setattr(ft, "write_export", crash)
    assert cli("finetune", f"data={frames}", f"out_dir={run}", *FT).returncode == 130
    assert not (run / "export").exists() and not (run / "metrics.json").exists()
    monkeypatch.setattr(ft, "write_export", write)
    res = cli("finetune", f"data={frames}", f"out_dir={run}", *FT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (run / "export" / "config.json").is_file() and not (run / ".export.tmp").exists()


def test_a_run_stopped_while_evaluating_evaluates_its_export(finished, tmp_path, cli, seen, caplog):
    caplog.set_level("INFO")
    data, run = _copy(finished, tmp_path)
    _relocate(run, data)
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").unlink()
    weights = (run / "export" / "model.safetensors").read_bytes()
    res = cli("finetune", f"data={data}", f"out_dir={run}", *FT)
    assert res.returncode == 0 and "evaluating it" in caplog.text, res.stderr[-2000:]
    assert seen["calibrate"] == []  # nothing trained or fitted again
    again = json.loads((run / "metrics.json").read_text())
    assert again["pixel"] == metrics["pixel"] and again["train_wall_s"] == metrics["train_wall_s"]
    assert (run / "export" / "model.safetensors").read_bytes() == weights


@pytest.mark.parametrize("verb", ["pretrain", "compare", "evaluate", "calibrate"])
def test_every_run_folder_writer_takes_the_lock(verb, finished, tiny_dataset, tmp_path, cli):
    data, run = _copy(finished, tmp_path)
    _relocate(run, data)
    folder = run if verb in ("evaluate", "calibrate") else tmp_path / "out"
    args = {"pretrain": [f"data=[{tiny_dataset}]", f"out_dir={folder}", "model=vit_tiny_patch16_224", "image_size=32",
                         "steps=1", "batch_size=4", "num_workers=0"],
            "compare": [f"data={data}", f"out_dir={folder}", "models=[{name: a, model: vit_tiny_patch16_224}]",
                        "budgets=[4]", "finetune.steps=1", "finetune.crop_size=32"],
            "evaluate": [f"checkpoint={run}"], "calibrate": [f"checkpoint={run}"]}[verb]
    folder.mkdir(exist_ok=True)
    with folder_lock(folder):
        assert_cli_error(cli(verb, *args), 1, "is in use by another synthvit process")
    assert not (folder / "config.yaml").exists() or verb in ("evaluate", "calibrate")
