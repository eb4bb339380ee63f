"""``synthvit predict`` as a batch job: folder / glob / list inputs, unreadable frames listed and skipped, re-runs
that skip finished frames, records streamed to predictions.jsonl, output names mirrored from the input folders."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import assert_cli_error, make_real_data, run_cli
from finetune.artifacts import FinetuneRun
from finetune.config import PredictConfig
from finetune.predict import RECORDS, SUMMARY, output_keys
from finetune.run import run_predict
from synthvit.config import load_config
from synthvit.io import SynthvitError

OLD = 1_000_000_000 * 10**9  # an mtime (ns) no write of this test can leave behind


def _frame(path: Path, seed: int, size=(40, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(seed).random(size) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finetune run folder (vit_tiny, 32 px, seg + cls, one step) trained on 8 tiny canonical frames."""
    root = make_real_data(tmp_path_factory.mktemp("predict") / "data", 8, (40, 48), lambda rng: np.s_[10:20, 12:24],
                          name="im{}")
    out = root.parent / "run"
    run_cli("finetune", f"data={root}", f"out_dir={out}", "task=both", "crop_size=32", "steps=1", "batch_size=2",
            "num_workers=0", "evaluate=false", "log_every=1", check=True)
    return out


@pytest.fixture
def frames(tmp_path):
    """a.png, sub/a.png (the same stem one folder down), sub/deeper/b.png, c.jpg and a hidden .h.png (not a frame)."""
    root = tmp_path / "frames"
    for i, rel in enumerate(["a.png", "sub/a.png", "sub/deeper/b.png", ".h.png"]):
        _frame(root / rel, 100 + i)
    Image.fromarray(np.full((36, 44, 3), 90, np.uint8)).save(root / "c.jpg")
    return root


class Calls:
    """Counts predictor calls; ``before(k)`` runs before the k-th call (0-based)."""

    def __init__(self):
        self.count, self.before = 0, None


@pytest.fixture
def calls(monkeypatch, one_torch_thread):
    seen = Calls()
    original = FinetuneRun.predictor

    def predictor(self, device):
        inner = original(self, device)

        def call(image):
            if seen.before:
                seen.before(seen.count)
            seen.count += 1
            return inner(image)
        return call

    monkeypatch.setattr(FinetuneRun, "predictor", predictor)
    return seen


def predict(run, input, out, **extra):
    keys = dict(checkpoint=run, input=input, out=out, **extra)
    return run_predict(load_config(PredictConfig, overrides=[f"{k}={v}" for k, v in keys.items()]))


def summary(out: Path) -> dict:
    return json.loads((out / SUMMARY).read_text())


def mtimes(out: Path) -> dict[str, int]:
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in sorted(out.rglob("*.json"))
            if p.name != SUMMARY}


def age(out: Path) -> None:
    for p in out.rglob("*.json"):
        os.utime(p, ns=(OLD, OLD))


def test_folder_with_subfolders_and_a_corrupt_frame(run, frames, tmp_path, cli, one_torch_thread, caplog):
    """Every readable frame is predicted, the corrupt one is skipped with a warning, listed under failed, and the
    exit status says how many failed; outputs mirror the subfolders, so sub/a.png does not overwrite a.png's."""
    good = (frames / "sub" / "a.png").read_bytes()
    bad = frames / "sub" / "bad.png"
    bad.write_bytes(good[:len(good) // 2])  # a truncated PNG: its header opens, its pixels do not decode
    out = tmp_path / "out"
    res = cli("predict", "--checkpoint", run, "--input", frames, "--out", out)
    assert_cli_error(res, 1, "1 of 5 frames could not be read", f"{bad}: ", f"under \"failed\" in {out / SUMMARY}")
    assert f"cannot read {bad} (image file is truncated)" in caplog.text  # the warning (logged as it happens)
    assert "frame/s" in res.stderr  # the progress bar's rate
    assert set(mtimes(out)) == {"a.json", "c.json", "sub/a.json", "sub/deeper/b.json"}
    assert json.loads((out / "sub" / "a.json").read_text())["image"] == str(frames / "sub" / "a.png")
    assert json.loads((out / "a.json").read_text())["image"] == str(frames / "a.png")
    with Image.open(out / "sub" / "deeper" / "b_mask.png") as m:
        assert m.size == (48, 40)
    done = summary(out)
    assert sorted(r["image"] for r in done["predictions"]) == sorted(
        str(frames / p) for p in ["a.png", "c.jpg", "sub/a.png", "sub/deeper/b.png"])
    rec = next(r for r in done["predictions"] if r["image"] == str(frames / "sub" / "a.png"))
    assert rec["mask"] == "sub/a_mask.png" and rec["overlay"] == "sub/a_overlay.jpg"
    assert {"defect_score", "defects", "areas", "classes", "predicted_class"} <= set(rec)
    assert [f["image"] for f in done["failed"]] == [str(bad)] and done["failed"][0]["error"]
    assert not list(out.rglob("*.tmp"))  # no temporary file left


def test_glob(run, frames, tmp_path, cli, one_torch_thread):
    out = tmp_path / "out"
    res = cli("predict", "--checkpoint", run, "--input", f"{frames}/**/*.png", "--out", out)
    assert res.returncode == 0, res.stderr[-2000:]
    # names relative to the folder before the first wildcard; c.jpg is not a *.png, .h.png is hidden
    assert set(mtimes(out)) == {"a.json", "sub/a.json", "sub/deeper/b.json"}
    assert len(summary(out)["predictions"]) == 3 and summary(out)["failed"] == []
    res = cli("predict", "--checkpoint", run, "--input", f"{frames}/**/*.tif", "--out", out)
    assert_cli_error(res, 1, f"the pattern '{frames}/**/*.tif' matches no images")


def test_list_file_with_a_missing_frame(run, frames, tmp_path, cli, one_torch_thread, caplog):
    lists = tmp_path / "lists"
    lists.mkdir()
    b = frames / "sub" / "deeper" / "b.png"
    (lists / "line1.txt").write_text(f"# frames of line 1\n\n../frames/a.png\n  {b}  \nmissing/nope.png\n"
                                     "../frames/a.png\n")
    out = tmp_path / "out"
    res = cli("predict", "--checkpoint", run, "--input", lists / "line1.txt", "--out", out)
    missing = lists / "missing" / "nope.png"
    assert_cli_error(res, 1, "1 of 3 frames could not be read", f"{missing}: ")
    assert f"cannot read {missing} (" in caplog.text
    done = summary(out)
    # relative lines relative to the list, each frame once; names relative to the listed paths' common folder
    assert [r["image"] for r in done["predictions"]] == [str(frames / "a.png"), str(b)]
    assert set(mtimes(out)) == {"frames/a.json", "frames/sub/deeper/b.json"}
    assert done["failed"] == [{"image": str(missing), "error": done["failed"][0]["error"]}]
    assert "No such file" in done["failed"][0]["error"]
    (lists / "empty.lst").write_text("# nothing yet\n\n")
    res = cli("predict", "--checkpoint", run, "--input", lists / "empty.lst", "--out", out)
    assert_cli_error(res, 1, f"the list {lists / 'empty.lst'} names no frames")


def test_rerun_skips_finished_frames_and_overwrite_redoes_them(run, frames, calls):
    out = frames / "predictions"  # inside the input folder: its files must not become frames of the re-run
    predict(run, frames, out)
    assert calls.count == 4
    first = summary(out)["predictions"]
    age(out)
    predict(run, frames, out)
    assert calls.count == 4, "a re-run predicted frames again"
    assert set(mtimes(out).values()) == {OLD}
    assert summary(out)["predictions"] == first  # the skipped frames' records, read back from their JSON
    assert len((out / RECORDS).read_text().splitlines()) == 4
    # a frame whose JSON is missing (a run stopped after its mask) is done again, alone
    (out / "sub" / "a.json").unlink()
    predict(run, frames, out)
    assert calls.count == 5
    assert {k for k, t in mtimes(out).items() if t != OLD} == {"sub/a.json"}
    assert [r["image"] for r in summary(out)["predictions"]] == [r["image"] for r in first]
    age(out)
    predict(run, frames, out, overwrite="true")
    assert calls.count == 9
    assert OLD not in set(mtimes(out).values())


def test_records_stream_to_jsonl_one_per_frame(run, frames, tmp_path, calls):
    """Nothing accumulates until the end: each frame's record is on disk before the next frame is predicted, and
    predictions.json (of an earlier run) is gone until this run is complete."""
    out = tmp_path / "out"
    lines = []

    def before(k):
        lines.append(len((out / RECORDS).read_text().splitlines()))
        assert not (out / SUMMARY).exists()

    calls.before = before
    predict(run, frames, out)
    assert lines == [0, 1, 2, 3] and (out / SUMMARY).is_file()
    lines.clear()
    predict(run, frames, out, overwrite="true")
    assert lines == [0, 1, 2, 3]
    records = [json.loads(ln) for ln in (out / RECORDS).read_text().splitlines()]
    assert records == summary(out)["predictions"] and len(records) == 4


def test_rerun_with_another_threshold_other_frames_or_into_a_run(run, frames, tmp_path, calls, caplog):
    out = tmp_path / "out"
    predict(run, frames, out)
    with pytest.raises(SynthvitError, match=r"holds predictions made with threshold=auto .*give overwrite=true"):
        predict(run, frames, out, threshold=0.7)
    assert calls.count == 4
    # other frames mapped to the same names are predicted, not taken for done
    other = _frame(tmp_path / "other" / "a.png", 7)
    predict(run, other.parent, out)
    assert calls.count == 5
    assert json.loads((out / "a.json").read_text())["image"] == str(other)
    assert f"holds the outputs of {frames / 'a.png'}, not of {other}" in caplog.text
    # a folder another stage wrote (its config.yaml) is never written into, overwrite or not
    config = (run / "config.yaml").read_bytes()
    with pytest.raises(SynthvitError, match="holds a config.yaml that synthvit predict did not write"):
        predict(run, frames, run, overwrite="true")
    assert (run / "config.yaml").read_bytes() == config and calls.count == 5


def test_output_names_never_collide(tmp_path):
    files = [tmp_path / p for p in ["x.png", "x.jpg", "sub/x.png", "predictions.png", "sub/predictions.png"]]
    keys = output_keys(files, tmp_path)
    assert [k.as_posix() for k in keys] == ["x.png", "x.jpg", "sub/x", "predictions.png", "sub/predictions"]
    with pytest.raises(SynthvitError, match="would write the same outputs"):
        output_keys([tmp_path / "x.png", tmp_path / "x.jpg", tmp_path / "x.png.png"], tmp_path)
