"""Non-finite numbers never pass for results (issue 33, point 3): a NaN loss stops training with one error naming
the step, its LR and the checkpoint kept, and nothing that looks finished; weights holding NaN/inf are refused when
loaded; a model output that is not finite fails the frame (predict) or the command (evaluate, calibrate) instead of
scoring; no JSON file synthvit writes holds NaN or Infinity. Plus the weights-file errors of issue 33's point 6."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, TINY_PRETRAIN, _reset_accelerate_state, assert_cli_error, free_port, make_real_data
from synthvit.io import INVALID_SUFFIX, NOT_FINITE, dumps_json
from synthvit.training import NonFiniteGuard, first_nonfinite

DEFECT = np.s_[12:20, 16:30]
FT = ["model=vit_tiny_patch16_224", "crop_size=32", "batch_size=2", "num_workers=0", "near_duplicate_distance=0"]
NAN, INF = float("nan"), float("inf")


def strict_json(text: str):
    """``json.loads`` that refuses NaN and Infinity (Python's parser accepts them by default)."""
    def refuse(name):
        raise AssertionError(f"{name} in a JSON file synthvit wrote")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_real_data(tmp_path_factory.mktemp("nonfinite") / "data", 10, (40, 48), lambda rng: DEFECT)


@pytest.fixture(scope="module")
def run(data, one_torch_thread) -> Path:
    """A finished tiny finetune run (vit_tiny, seg, 2 steps, calibrated, evaluated), trained in this process."""
    from finetune.config import FinetuneConfig
    from finetune.run import run as finetune
    from synthvit.config import load_config

    out = data.parent / "run"
    try:
        finetune(load_config(FinetuneConfig, overrides=[f"data={data}", f"out_dir={out}", "steps=2", *FT]))
    finally:
        _reset_accelerate_state()
    assert (out / "metrics.json").is_file()
    return out


def poisoned_copy(run: Path, dst: Path, how: str) -> Path:
    """A copy of ``run`` whose export backbone holds a NaN (``nan``), or finite weights so large that every
    activation overflows (``overflow``)."""
    shutil.copytree(run, dst)
    path = dst / "export" / "model.safetensors"
    tensors = load_file(path)
    if how == "nan":
        tensors["blocks.0.attn.qkv.weight"][0, 0] = NAN
    else:
        tensors["patch_embed.proj.weight"] *= 1e37
        assert first_nonfinite(tensors.items()) is None
    save_file(tensors, path)
    return dst


def nothing_finished(folder: Path) -> None:
    assert not (folder / "export").exists() and not (folder / "metrics.json").exists()


# ---------------------------------------------------------------------------------------------- training stops
@pytest.mark.parametrize("rule", ["threshold", "argmax"])  # argmax skipped calibration: it exited 0, AUROC 1.0
def test_nan_loss_stops_finetune_with_nothing_finished(data, tmp_path, cli, one_torch_thread, rule):
    out = tmp_path / "run"
    res = cli("finetune", f"data={data}", f"out_dir={out}", "steps=3", "optim.lr=1e30", "optim.clip_grad=0",
              f"calibrate.rule={rule}", *FT)
    assert_cli_error(res, 1, "loss is not finite at step 2 (NaN or infinity; learning rate 1e+29)",
                     "no checkpoint was written before it", "Lower optim.lr", "optim.clip_grad")
    nothing_finished(out)


def test_first_bad_step_is_named_and_the_last_good_checkpoint_kept(data, tmp_path, cli, monkeypatch,
                                                                   one_torch_thread):
    """A NaN from step 3 on, seen at the step-4 checkpoint (log_every=10: no log step before): the error names step 3
    and the step-2 checkpoint, which holds finite weights; no step-4 checkpoint, no export. Resuming from a checkpoint
    whose weights hold a NaN is refused too."""
    import finetune.train

    real, calls = finetune.train.losses, []

    def nan_from_step_3(*args, **kwargs):
        parts = real(*args, **kwargs)
        calls.append(1)
        return {k: v * NAN if len(calls) >= 3 else v for k, v in parts.items()}

    monkeypatch.setattr(finetune.train, "losses", nan_from_step_3)
    out = tmp_path / "run"
    args = ("finetune", f"data={data}", f"out_dir={out}", "steps=6", "save_every=2", "log_every=10", *FT)
    res = cli(*args)
    kept = out / "checkpoints" / "step_00000002"
    assert_cli_error(res, 1, "loss is not finite at step 3 (NaN or infinity", f"the last good checkpoint {kept}")
    assert [p.name for p in (out / "checkpoints").iterdir()] == [kept.name]
    weights = load_file(kept / "model.safetensors")
    assert first_nonfinite(weights.items()) is None
    nothing_finished(out)

    monkeypatch.setattr(finetune.train, "losses", real)
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name].view(-1)[0] = INF
    save_file(weights, kept / "model.safetensors")
    res = cli(*args)
    assert_cli_error(res, 1, f"resume: {kept} holds weights that are not finite", f"first: {name})")
    nothing_finished(out)


ONE_RANK_NAN = """
import os, sys
import finetune.train
from synthvit.cli import main
real, calls = finetune.train.losses, []
def nan_on_rank_1(*args, **kwargs):
    parts = real(*args, **kwargs)
    calls.append(1)
    bad = os.environ.get("RANK") == "1" and len(calls) >= 3
    return {k: v * float("nan") for k, v in parts.items()} if bad else parts
finetune.train.losses = nan_on_rank_1
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_both_ranks_together(data, tmp_path):
    """accelerate launch, 2 CPU ranks (gloo): rank 1's losses turn NaN at step 3, rank 0's stay finite. Both ranks
    raise the same error at the next check (the step-4 checkpoint), none waits in a collective (the timeout would
    fire), the step-2 checkpoint is kept and nothing looks finished."""
    script = tmp_path / "one_rank_nan.py"
    script.write_text(ONE_RANK_NAN)
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), str(script), "finetune", f"data={data}", f"out_dir={out}", "steps=8", "save_every=2",
           "log_every=5", *FT]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    errors = [ln[ln.index("synthvit finetune:"):] for ln in (proc.stdout + proc.stderr).splitlines()
              if "synthvit finetune: error:" in ln]
    assert proc.returncode != 0 and len(errors) == 2 and errors[0] == errors[1], proc.stderr[-3000:]
    assert "loss is not finite at step 3 (NaN or infinity" in errors[0]
    assert f"the last good checkpoint {out / 'checkpoints' / 'step_00000002'} is kept" in errors[0]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000002"]
    nothing_finished(out)


def test_nan_loss_stops_pretrain(tiny_dataset, tmp_path, cli, one_torch_thread):
    out = tmp_path / "pre"
    tiny = [a for a in TINY_PRETRAIN if not a.startswith("optim.lr=")]
    res = cli("pretrain", f"data=[{tiny_dataset}]", f"out_dir={out}", *tiny, "steps=4", "num_workers=0", "optim.lr=1e30", "optim.clip_grad=0", "mix.prob=0", "save_every=100")
    assert_cli_error(res, 1, "loss is not finite at step", "learning rate",
                     "no checkpoint was written before it", "resume=auto")
    assert not (out / "export").exists() and not (out / "summary.json").exists()
    for line in (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []:
        strict_json(line)


class FakeRanks:
    """An accelerator for :class:`NonFiniteGuard` whose ``gather`` adds the other ranks' first bad steps."""

    def __init__(self, others: list[int]):
        self.device, self.others = torch.device("cpu"), others

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, torch.tensor(self.others, dtype=t.dtype)]) if t.dtype == torch.long else t


@pytest.mark.parametrize("mine, others, named", [
    ([], [-1], None),  # every loss finite everywhere: no error
    ([(5, NAN)], [-1], "at step 5"),  # this rank's first NaN
    ([(2, INF), (3, NAN)], [-1], "at step 2"),  # the first of several
    ([], [4], "at step 4"),  # another rank's NaN stops this one at the same check: no rank waits in a collective
    ([(6, NAN)], [4, -1], "at step 4"),  # the earliest over the ranks
])
def test_guard_stops_every_rank_at_the_first_bad_step(tmp_path, mine, others, named):
    guard = NonFiniteGuard(FakeRanks(others), tmp_path, lambda s: 0.1 * (s + 1), "HINT")
    for step in range(1, 8):
        guard.observe(step, torch.tensor(dict(mine).get(step, 1.0)))
    if named is None:
        guard.check(7)
        return
    with pytest.raises(Exception, match=named) as e:
        guard.check(7)
    step = int(named.split()[-1])
    assert f"learning rate {0.1 * step:.3g}" in str(e.value) and str(e.value).endswith("HINT")


def test_guard_refuses_non_finite_weights_although_every_loss_was(tmp_path):
    (tmp_path / "checkpoints" / "step_00000004").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_00000004" / "trainer_state.json").write_text("{}")
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    guard = NonFiniteGuard(FakeRanks([]), tmp_path, lambda s: 0.1, "HINT")
    guard.observe(1, torch.tensor(0.5))
    guard.check(5, model)
    with torch.no_grad():
        model[1].bias[1] = INF
    with pytest.raises(Exception, match=r"weights are not finite .* after step 5 \(first: 1.bias\)") as e:
        guard.check(5, model)
    assert "the last good checkpoint" in str(e.value) and "step_00000004 is kept" in str(e.value)


# ---------------------------------------------------------------------------------------------- weights loading
@pytest.mark.parametrize("verb", ["evaluate", "calibrate", "predict", "finetune"])
def test_nan_weights_are_refused_by_every_reader(run, data, tmp_path, cli, verb, one_torch_thread):
    bad = poisoned_copy(run, tmp_path / "run", "nan")
    out = tmp_path / "out"
    args = {"evaluate": ["evaluate", f"checkpoint={bad}", f"out_dir={out}"],
            "calibrate": ["calibrate", f"checkpoint={bad}"],
            "predict": ["predict", f"checkpoint={bad}", f"input={data / 'images'}", f"out={out}"],
            "finetune": ["finetune", f"data={data}", f"out_dir={out}", f"init={bad / 'export'}", "steps=1", *FT]}[verb]
    before = (bad / "export" / "config.json").read_bytes()
    res = cli(*args)
    assert_cli_error(res, 1, f"{bad / 'export' / 'model.safetensors'}: tensor 'blocks.0.attn.qkv.weight' holds NaN "
                             f"or infinity")
    assert (bad / "export" / "config.json").read_bytes() == before  # calibrate wrote no decision
    assert not list(out.glob("*.json")) and not (out / "export").exists()


@pytest.mark.parametrize("verb, culprit", [
    ("evaluate", "test frame "),
    ("calibrate", "calibrate: training frame "),
])
def test_overflowing_model_output_is_an_error_not_a_score(run, tmp_path, cli, verb, culprit, one_torch_thread):
    """Finite weights whose output overflows: evaluate stops (NaN scores gave image AUROC 1.0 before) and writes no
    metrics; calibrate fits no decision (a raw bincount traceback before)."""
    bad = poisoned_copy(run, tmp_path / "run", "overflow")
    before = (bad / "export" / "config.json").read_bytes()
    res = cli(verb, f"checkpoint={bad}", *([f"out_dir={tmp_path / 'out'}"] if verb == "evaluate" else []))
    assert_cli_error(res, 1, culprit, "the model's output is not finite (NaN or infinity)", "optim.lr")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("metrics_*.json"))
    assert (bad / "export" / "config.json").read_bytes() == before


def test_predict_lists_a_frame_with_non_finite_output_as_failed(run, data, tmp_path, cli, one_torch_thread):
    bad = poisoned_copy(run, tmp_path / "run", "overflow")
    out = tmp_path / "pred"
    res = cli("predict", f"checkpoint={bad}", f"input={data / 'images'}", f"out={out}")
    n = len(list((data / "images").iterdir()))
    assert_cli_error(res, 1, f"{n} of {n} frames could not be read or predicted",
                     "non-finite model output (NaN or infinity): no defect score")
    summary = strict_json((out / "predictions.json").read_text())
    assert summary["predictions"] == [] and len(summary["failed"]) == n
    assert not list(out.glob("im*.json"))  # no per-frame record that says "no defect"


@pytest.mark.parametrize("name, content, message", [
    ("notes.txt", b"this is not a model\n", "is neither a safetensors file nor a torch checkpoint"),  # IndexError
    ("w.pth", b"hello\n", "is neither a safetensors file nor a torch checkpoint"),  # KeyError: 101
    ("w.pth", b"", "is neither a safetensors file nor a torch checkpoint"),
    ("w.safetensors", b"not safetensors", "is not a readable safetensors file"),
    ("w.pth", "tensor", "holds a Tensor, not a state dict of tensors"),
    ("w.pth", "nan", "tensor 'pos_embed' holds NaN or infinity"),
    ("w.safetensors", "nan", "tensor 'pos_embed' holds NaN or infinity"),
])
def test_weights_file_errors_name_the_file_and_what_is_accepted(data, tmp_path, cli, name, content, message):
    path = tmp_path / name
    if content == "tensor":
        torch.save(torch.zeros(3), path)
    elif content == "nan":
        state = {"pos_embed": torch.full((1, 5, 192), NAN)}
        torch.save(state, path) if name.endswith(".pth") else save_file(state, path)
    else:
        path.write_bytes(content)
    out = tmp_path / "out"
    res = cli("finetune", f"data={data}", f"out_dir={out}", f"weights={path}", "steps=1", *FT)
    assert_cli_error(res, 1, str(path), message)
    if "neither" in message or "state dict" in message:
        assert "weights= takes a .safetensors file, or a torch checkpoint" in res.stderr
    if "readable" in message:
        assert "re-export" not in res.stderr and "run again the synthvit pretrain or finetune" in res.stderr
    nothing_finished(out)


def test_init_run_folder_suggests_its_export(run, data, tmp_path, cli):
    res = cli("finetune", f"data={data}", f"out_dir={tmp_path / 'out'}", f"init={run}", "steps=1", *FT)
    assert_cli_error(res, 1, f"init: {run} is not a synthvit export", f"its export is {run / 'export'}")


# ---------------------------------------------------------------------------------------------- strict JSON
@pytest.mark.parametrize("value, expected", [
    ({"score": NAN}, {"score": None, "score_invalid": NOT_FINITE}),
    ({"score": -INF, "n": 3, "ok": True}, {"score": None, "score_invalid": NOT_FINITE, "n": 3, "ok": True}),
    ({"ap": [0.5, INF]}, {"ap": [0.5, None], "ap_invalid": NOT_FINITE}),
    ({"pixel": {"miou": np.float32("nan"), "miou_invalid": "no pixel"}},
     {"pixel": {"miou": None, "miou_invalid": "no pixel"}}),  # a reason the writer gave is kept
    ({"a": 1.5, "b": None, "c": "nan"}, {"a": 1.5, "b": None, "c": "nan"}),  # untouched
    ([NAN, 1], [None, 1]),
])
def test_json_writers_write_null_and_a_reason_for_non_finite_numbers(value, expected):
    assert strict_json(dumps_json(value)) == expected


def test_metrics_json_holds_no_nan(tmp_path):
    from finetune.artifacts import RunMetrics, read_metrics, write_metrics

    metrics = RunMetrics(images=2, steps=1, model_name="m", task="seg", pixel={"miou": 0.5, "defect_ap": NAN},
                         image={"auroc": NAN, "ap": 0.5})
    path = write_metrics(tmp_path, metrics)
    doc = strict_json(path.read_text())
    assert doc["pixel"]["defect_ap"] is None and doc["pixel"][f"defect_ap{INVALID_SUFFIX}"] == NOT_FINITE
    assert doc["image"]["auroc"] is None and read_metrics(tmp_path).pixel["miou"] == 0.5


def test_predict_record_of_a_nan_score_is_null_with_a_reason(tmp_path):
    from finetune.predict import write_prediction

    meta = SimpleNamespace(seg_classes=[], cls_classes=["good", "bad"])
    record = write_prediction(Path("x.png"), tmp_path, np.zeros((4, 4), np.uint8),
                              {"score": NAN, "cls_probs": torch.tensor([NAN, NAN])}, meta, 0.5)
    doc = strict_json((tmp_path / "x.json").read_text())
    assert doc["defect_score"] is None and doc["defect_score_invalid"] == NOT_FINITE
    assert doc["classes"] == {"good": None, "bad": None, "good_invalid": NOT_FINITE, "bad_invalid": NOT_FINITE}
    assert record["image"] == "x.png"
