"""A catalogue of bad inputs through every CLI verb (issue 33, point 6): config files in other encodings, keys given
twice, numbers out of range, output folders that are files or cannot be written, predict's own outputs inside its
input, Ctrl-C in generate. Each case ends in exit 0 with the right output, or in one error line naming the culprit,
no traceback and nothing half-written. In-process (the ``cli`` fixture) except the Ctrl-C test."""
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import synthvit.io
from conftest import ROOT, _reset_accelerate_state, assert_cli_error, make_real_data, tiny_overrides
from finetune.config import FinetuneConfig
from finetune.predict import SUMMARY
from synthvit.cli import STAGES, _load
from synthvit.config import load_config
from synthvit.io import SynthvitError, WriteError, atomic_open, writable_dir

VERBS = list(STAGES)
# A key of each verb and a value it accepts (for the encoding and duplicate-key cases)
VERB_KEY = {"generate": ("num_samples", 8), "pretrain": ("steps", 2), "doctor": ("steps", 2),
            "finetune": ("steps", 2), "evaluate": ("split", "test"), "calibrate": ("max_images", 4),
            "predict": ("threshold", "auto"), "compare": ("parallel", 1), "export": ("calibration_tiles", 8)}
FT = ["crop_size=32", "batch_size=2", "num_workers=0", "model=vit_tiny_patch16_224"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Every case runs in its own empty folder: default output folders (runs/, shards/) land there."""
    monkeypatch.chdir(tmp_path)


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """8 tiny canonical frames (40x48), odd ones with a defect."""
    return make_real_data(tmp_path_factory.mktemp("bad") / "data", 8, (40, 48), lambda rng: np.s_[10:20, 12:24])


@pytest.fixture(scope="module")
def run_dir(data) -> Path:
    """A finished finetune run (vit_tiny, 32 px, one step), trained in this process."""
    import torch

    from finetune.run import run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = run(load_config(FinetuneConfig, overrides=[f"data={data}", f"out_dir={data.parent / 'run'}", *FT,
                                                         "steps=1", "evaluate=false"]))
    finally:
        torch.set_num_threads(threads)
        _reset_accelerate_state()
    return out


@pytest.fixture(scope="module")
def frames(data) -> Path:
    """Three frames to predict on, one in a subfolder."""
    root = data.parent / "frames"
    for i, rel in enumerate(["a.png", "b.png", "sub/c.png"]):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.random.default_rng(i).random((40, 48)) * 255).astype(np.uint8)).save(root / rel)
    return root


# ---------------------------------------------------------------------------------------------- config files
BAD_FILES = {  # name -> (bytes of a one-key file, what the error must say besides the file name)
    "utf16-without-bom": (lambda k, v: f"{k}: {v}\n".encode("utf-16-le"), ["not UTF-8 text", "NUL byte"]),
    "latin1": (lambda k, v: f"# caf\u00e9\n{k}: {v}\n".encode("latin-1"), ["not UTF-8 text", "#xe9"]),
    "utf32": (lambda k, v: f"{k}: {v}\n".encode("utf-32"), ["not UTF-8 text"]),
    "duplicate-key": (lambda k, v: f"{k}: {v}\nseed: 1\n{k}: {v}\n".encode(),
                      ["is given twice (lines 1 and 3)", "keep one"]),
}


@pytest.mark.parametrize("bad", list(BAD_FILES))
@pytest.mark.parametrize("verb", VERBS)
def test_bad_config_file_is_one_line_naming_the_file(cli, tmp_path, verb, bad):
    key, value = VERB_KEY[verb]
    if bad == "duplicate-key" and verb in ("evaluate", "calibrate", "predict", "export"):  # no seed key: the key twice
        content = f"{key}: {value}\n{key}: {value}\n".encode()
        expected = ["is given twice (lines 1 and 2)"]
    else:
        make, expected = BAD_FILES[bad]
        content = make(key, value)
    path = tmp_path / f"{bad}.yaml"
    path.write_bytes(content)
    before = _listing(tmp_path)
    assert_cli_error(cli(verb, "--config", path), 2, f"config file {path}", *expected)
    assert _listing(tmp_path) == before


def test_nested_duplicate_key_names_both_lines(cli, tmp_path):
    path = tmp_path / "nested.yaml"
    path.write_text("steps: 2\noptim:\n  lr: 0.001\n  warmup_steps: 1\n  lr: 0.01\n")
    assert_cli_error(cli("finetune", "--config", path), 2, str(path), "'lr' is given twice (lines 3 and 5)")


def test_yaml_merge_keys_may_still_be_overridden():
    from synthvit.config import load_yaml

    tree = load_yaml(text="base: &b {lr: 1, warmup_steps: 2}\noptim:\n  <<: *b\n  lr: 3\n")
    assert tree["optim"] == {"lr": 3, "warmup_steps": 2}


@pytest.mark.parametrize("bom", ["utf-16", "utf-8-sig"])
@pytest.mark.parametrize("verb", VERBS)
def test_config_file_with_a_byte_order_mark_is_read(tmp_path, verb, bom):
    """Documented: UTF-16 and UTF-8 files that start with a byte-order mark are decoded (Windows "Unicode")."""
    key, value = VERB_KEY[verb]
    path = tmp_path / "bom.yaml"
    path.write_bytes(f"# caf\u00e9\n{key}: {value}\n".encode(bom))
    cfg = load_config(_load(STAGES[verb].config), path)
    assert getattr(cfg, key) == value


def test_bom_config_reaches_the_stage(cli, tmp_path):
    """Through the CLI: the UTF-16 file is read and the stage runs (and stops at its own, later error)."""
    path = tmp_path / "u16.yaml"
    path.write_bytes("split: all\n".encode("utf-16"))
    assert_cli_error(cli("evaluate", "--config", path, f"checkpoint={tmp_path / 'missing'}"), 1, "checkpoint")


def test_unreadable_config_path_is_one_line(cli, tmp_path):
    assert_cli_error(cli("finetune", "--config", tmp_path), 2, f"config file {tmp_path} is not a file")
    assert_cli_error(cli("finetune", "--config", tmp_path / "none.yaml"), 2, "does not exist")


# ---------------------------------------------------------------------------------------------- command line
@pytest.mark.parametrize("verb", VERBS)
def test_key_given_twice_on_the_command_line_last_wins_with_a_warning(cli, tmp_path, caplog, verb):
    """Documented (docs/configs.md): on the command line the last of a repeated key wins (``$FT steps=5``), with a
    warning naming both; the earlier (bad) value is gone, the later (bad) value is what the error names."""
    key, value = VERB_KEY[verb]
    bad = {"split": "nope", "threshold": "-1"}.get(key, "-7")
    before = _listing(tmp_path)
    assert_cli_error(cli(verb, f"{key}={value}", f"--{key}", bad), 2, key, bad)
    assert f"{key} is given twice ({key}={value}, then {key}={bad}): the last wins" in caplog.text
    assert _listing(tmp_path) == before


def test_last_override_wins_over_a_bad_earlier_one(cli, caplog):
    assert_cli_error(cli("finetune", "steps=-5", "steps=3", "data="), 2, "data: give the real-data folder")
    assert "steps is given twice (steps=-5, then steps=3): the last wins" in caplog.text


@pytest.mark.parametrize("args, culprit", [
    (["optim={lr: -1}", "optim.lr=2", "steps=-1"], "steps: -1"),  # the group, then its key: lr=2 is what is read
    (["optim.lr=2", "optim={lr: -1}"], "optim.lr: -1"),  # the key, then the group: the group replaces it
])
def test_overlapping_overrides_apply_in_order(cli, caplog, args, culprit):
    assert_cli_error(cli("finetune", *args), 2, culprit)
    assert "overlap: applied in this order" in caplog.text


def test_duplicate_key_inside_an_override_value_is_refused(cli):
    assert_cli_error(cli("finetune", "optim={lr: 1, lr: 2}"), 2, "override 'optim={lr: 1, lr: 2}'",
                     "the key 'lr' is given twice")


RANGE_CASES = [  # (verb, overrides, what the error must name: the key the user set and its value)
    ("generate", ["num_samples=-5"], "num_samples: -5"),
    ("generate", ["procedural.camera.noise=-1"], "procedural.camera.noise: -1"),
    ("generate", ["defects.defect_scale=0"], "defects.defect_scale: 0"),
    ("generate", ["defects.scale_exponent=2"], "defects.scale_exponent: 2"),
    ("pretrain", ["steps=-5"], "steps: -5"),
    ("pretrain", ["image_size=8"], "image_size: 8"),
    ("pretrain", ["optim.accum_steps=0"], "optim.accum_steps: 0"),
    ("pretrain", ["mix.cutmix_alpha=-1"], "mix.cutmix_alpha: -1"),
    ("pretrain", ["keep_last=0"], "keep_last: 0"),
    ("pretrain", ["stop_at=9", "steps=3"], "stop_at: 9"),
    ("doctor", ["steps=-5"], "steps: -5"),
    ("finetune", ["steps=-5"], "steps: -5"),
    ("finetune", ["num_workers=-1"], "num_workers: -1"),
    ("finetune", ["crop_size=8"], "crop_size: 8"),
    ("finetune", ["test_fraction=1"], "test_fraction: 1"),
    ("finetune", ["layer_decay=1"], "layer_decay: 1"),
    ("finetune", ["defective_limit=-3"], "defective_limit: -3"),
    ("finetune", ["optim.warmup_steps=-1"], "optim.warmup_steps: -1"),
    ("finetune", ["optim.lr=nan"], "optim.lr: nan"),
    ("finetune", ["tiling.overlap=0.7"], "tiling.overlap: 0.7"),
    ("finetune", ["calibrate.max_images=1"], "calibrate.max_images: 1"),
    ("finetune", ["stop_at=9", "steps=3"], "stop_at: 9"),
    ("calibrate", ["max_images=1"], "max_images: 1"),
    ("calibrate", ["max_pixels=-1"], "max_pixels: -1"),
    ("predict", ["threshold=-1"], "threshold"),
    ("evaluate", ["split=validation"], "split"),
    ("compare", ["parallel=-1"], "parallel: -1"),
    ("compare", ["probe_repeats=0"], "probe_repeats: 0"),
    ("compare", ["analysis_size=-32"], "analysis_size: -32"),
    ("compare", ["finetune.steps=-5"], "finetune.steps: -5"),
    ("compare", ["models=[{model: vit_tiny_patch16_224, overrides: [steps=3, steps=5]}]"],
     "models.vit_tiny_patch16_224.overrides: steps is given twice (steps=3, then steps=5); give each key once"),
]


@pytest.mark.parametrize("verb, args, culprit", RANGE_CASES, ids=[f"{v}-{'-'.join(a)}" for v, a, _ in RANGE_CASES])
def test_out_of_range_value_names_its_key_and_value(cli, tmp_path, verb, args, culprit):
    before = _listing(tmp_path)
    assert_cli_error(cli(verb, *args), 2, culprit)
    assert _listing(tmp_path) == before


def test_range_errors_say_what_is_accepted(cli):
    assert_cli_error(cli("finetune", "steps=-5"), 2, "steps: -5 not accepted; use >= 0")
    assert_cli_error(cli("finetune", "tiling.overlap=0.7"), 2, "use a value in [0, 0.5)")


def test_crop_size_the_model_cannot_take_is_blamed_on_crop_size(cli, data, tmp_path):
    res = cli("finetune", f"data={data}", f"out_dir={tmp_path / 'r'}", *FT[1:], "crop_size=72", "steps=1")
    assert_cli_error(res, 2, "crop_size=72", "multiple of 16", "crop_size=80 or 64")
    assert "tiling.tile" not in res.stderr.splitlines()[-1]
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------- output folders
def _out_cases(data, run_dir, frames, shards, target):
    return {
        "generate": ["generate", *tiny_overrides(target, num_samples=8)],
        "pretrain": ["pretrain", f"data=[{shards}]", f"out_dir={target}", "model=vit_tiny_patch16_224",
                     "image_size=32", "batch_size=4", "steps=1", "num_workers=0"],
        "doctor": ["doctor", f"data={data}", f"report_dir={target}", *FT],
        "finetune": ["finetune", f"data={data}", f"out_dir={target}", *FT, "steps=1"],
        "evaluate": ["evaluate", f"checkpoint={run_dir}", f"out_dir={target}"],
        "predict": ["predict", f"checkpoint={run_dir}", f"input={frames}", f"out={target}"],
        "export": ["export", f"checkpoint={run_dir}", f"out={target}", "exporter=torchscript"],
        "compare": ["compare", f"data={data}", f"out_dir={target}", "budgets=[2]",
                    "models=[{model: vit_tiny_patch16_224}]", "finetune.steps=1", "finetune.crop_size=32"],
    }


OUT_KEY = {"generate": "out_dir", "pretrain": "out_dir", "doctor": "report_dir", "finetune": "out_dir",
           "evaluate": "out_dir", "predict": "out", "compare": "out_dir", "export": "out"}


@pytest.mark.parametrize("under_file", [False, True], ids=["is-a-file", "under-a-file"])
@pytest.mark.parametrize("verb", [v for v in VERBS if v != "calibrate"])  # calibrate writes into the run folder
def test_output_folder_that_is_a_file(cli, data, run_dir, frames, tiny_dataset, tmp_path, verb, under_file):
    blocker = tmp_path / "taken"
    blocker.write_text("mine\n")
    target = blocker / "sub" if under_file else blocker
    before = _listing(tmp_path)
    res = cli(*_out_cases(data, run_dir, frames, tiny_dataset, target)[verb])
    why = f"cannot be created: {blocker} is a file" if under_file else "is a file"
    assert_cli_error(res, 1, f"{OUT_KEY[verb]}: {target} {why}, not a folder")
    assert blocker.read_text() == "mine\n" and _listing(tmp_path) == before


def _read_only_probe(monkeypatch):
    """A read-only file system, as writable_dir's write probe sees it (a chmod does not stop root)."""
    def refuse(**kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), kwargs.get("dir"))
    monkeypatch.setattr(synthvit.io, "tempfile", SimpleNamespace(TemporaryFile=refuse))


@pytest.mark.parametrize("verb", ["doctor", "evaluate", "predict", "calibrate"])
def test_output_folder_that_cannot_be_written(cli, data, run_dir, frames, tmp_path, monkeypatch, verb):
    target = tmp_path / "ro"
    args = {"calibrate": ["calibrate", f"checkpoint={run_dir}"],
            **_out_cases(data, run_dir, frames, None, target)}[verb]
    export = {p.name: p.read_bytes() for p in (run_dir / "export").iterdir()}
    _read_only_probe(monkeypatch)
    res = cli(*args)
    key, folder = ("checkpoint", run_dir / "export") if verb == "calibrate" else (OUT_KEY[verb], target)
    assert_cli_error(res, 1, f"{key}: the folder {folder} is not writable (Read-only file system)")
    assert {p.name: p.read_bytes() for p in (run_dir / "export").iterdir()} == export
    assert not target.exists() or not any(target.iterdir())


@pytest.fixture
def read_only_folder(tmp_path):
    """A real folder nobody may write into: a chmod'ed one, or as root (whom a chmod does not stop) sysfs's
    /sys/kernel where the kernel refuses new files; skipped where neither holds."""
    if os.geteuid() != 0:
        target = tmp_path / "ro"
        target.mkdir()
        target.chmod(0o555)
        yield target
        target.chmod(0o755)
        return
    target = Path("/sys/kernel")
    try:
        (target / "synthvit-probe").open("w").close()
    except OSError:
        yield target
        return
    pytest.skip("root, and /sys/kernel accepts new files here: no folder that refuses root")


@pytest.mark.parametrize("verb", ["doctor", "evaluate", "predict"])
def test_read_only_output_folder(cli, data, run_dir, frames, read_only_folder, verb):
    before = sorted(os.listdir(read_only_folder))
    res = cli(*_out_cases(data, run_dir, frames, None, read_only_folder)[verb])
    assert_cli_error(res, 1, f"{OUT_KEY[verb]}: the folder {read_only_folder} is not writable")
    assert sorted(os.listdir(read_only_folder)) == before


def test_writable_dir_creates_and_names_the_key(tmp_path):
    assert writable_dir(tmp_path / "a" / "b", "out") == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()
    assert not any((tmp_path / "a" / "b").iterdir())  # the probe leaves nothing
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    with pytest.raises(SynthvitError, match=r"^report_dir: .*link is a broken link, not a folder"):
        writable_dir(tmp_path / "link", "report_dir")


def test_folder_gone_mid_run_names_the_file(tmp_path):
    """atomic_open into a folder that went away: one error naming the file (an OSError too), nothing left."""
    folder = tmp_path / "out"
    target = folder / "x.json"
    with pytest.raises(WriteError, match=rf"^cannot write {target}: No such file or directory") as e:
        with atomic_open(target) as f:
            f.write(b"{}")
    assert isinstance(e.value, OSError) and e.value.filename == str(target) and e.value.errno == errno.ENOENT
    assert not tmp_path.joinpath("out").exists()


def test_an_oserror_on_a_file_is_one_line(cli, run_dir, tmp_path, monkeypatch):
    """The CLI's last net: an OSError about a file that no stage turned into a SynthvitError (a folder made
    read-only mid-run) is one line naming the file; one about no file is a bug and keeps its traceback."""
    import finetune.run

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "metrics_test.json"))
    monkeypatch.setattr(finetune.run, "evaluate", denied)
    res = cli("evaluate", f"checkpoint={run_dir}", f"out_dir={tmp_path / 'e'}")
    assert_cli_error(res, 1, f"Permission denied: {tmp_path / 'metrics_test.json'}")

    def bug(*args, **kwargs):
        raise OSError(errno.EBADF, "Bad file descriptor")
    monkeypatch.setattr(finetune.run, "evaluate", bug)
    with pytest.raises(OSError, match="Bad file descriptor"):
        cli("evaluate", f"checkpoint={run_dir}", f"out_dir={tmp_path / 'e'}")


# ---------------------------------------------------------------------------------------------- predict's outputs
def _predicted(out: Path) -> list[str]:
    return sorted(Path(p["image"]).name for p in json.loads((out / SUMMARY).read_text())["predictions"])


def test_predict_never_reads_folders_it_wrote(cli, run_dir, frames, tmp_path, one_torch_thread, caplog):
    base = tmp_path / "frames"
    base.mkdir()
    for p in frames.rglob("*.png"):
        (base / p.relative_to(frames)).parent.mkdir(parents=True, exist_ok=True)
        (base / p.relative_to(frames)).write_bytes(p.read_bytes())
    (base / "mine").mkdir()  # a user's folder with a config.yaml of its own stays input
    (base / "mine" / "config.yaml").write_text("camera: line3\n")
    (base / "mine" / "d.png").write_bytes((frames / "a.png").read_bytes())
    caplog.set_level(logging.INFO, logger="synthvit.predict")
    first = cli("predict", f"checkpoint={run_dir}", f"input={base}", f"out={base / 'pred'}")
    assert first.returncode == 0, first.stderr
    assert _predicted(base / "pred") == ["a.png", "b.png", "c.png", "d.png"]
    assert "that predict wrote" not in caplog.text
    second = cli("predict", f"checkpoint={run_dir}", f"input={base}", f"out={base / 'pred2'}")
    assert second.returncode == 0, second.stderr
    assert _predicted(base / "pred2") == ["a.png", "b.png", "c.png", "d.png"]  # not pred's masks and overlays
    assert f"left out 8 image(s) in 1 folder(s) that predict wrote ({base / 'pred'})" in caplog.text
    caplog.clear()
    elsewhere = tmp_path / "elsewhere"
    third = cli("predict", f"checkpoint={run_dir}", f"input={base}/**/*.png", f"out={elsewhere}")
    assert third.returncode == 0, third.stderr
    assert _predicted(elsewhere) == ["a.png", "b.png", "c.png", "d.png"]
    assert "left out 8 image(s) in 2 folder(s) that predict wrote" in caplog.text  # their masks (.png)


def test_predict_input_holding_only_predict_outputs(cli, run_dir, frames, tmp_path, one_torch_thread):
    assert cli("predict", f"checkpoint={run_dir}", f"input={frames / 'a.png'}",
               f"out={tmp_path / 'in' / 'pred'}").returncode == 0
    res = cli("predict", f"checkpoint={run_dir}", f"input={tmp_path / 'in'}", f"out={tmp_path / 'out'}")
    assert_cli_error(res, 1, f"input: {tmp_path / 'in'} holds no images outside")


# ---------------------------------------------------------------------------------------------- fuzz
KEYS = ["steps", "optim.lr", "optim", "tiling.tile", "crop_size", "data", "data.x", "models", "task", "seeds",
        "synthetic", "precision", "decoder", "", " ", ".", "a..b", "--config", "calibrate.rule"]
VALUES = ["-5", "nan", "inf", "1e400", "[1,2]", "{a: 1, a: 2}", "null", "", "{", "[", "!!python/object:os.system",
          "&a [*a]", "*x", "0x10", "yes", "3840x2160", "'", '"', "a,b,", "\x00", "\ud7ff", "{data: x}"]
OVERRIDE = st.one_of(
    st.text(max_size=24),
    st.builds(lambda k, v: f"{k}={v}", st.one_of(st.sampled_from(KEYS), st.text(max_size=10)),
              st.one_of(st.sampled_from(VALUES), st.text(max_size=16))))


@settings(max_examples=150, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(OVERRIDE, max_size=4))
def test_fuzzed_overrides_are_one_config_error_line(cli, overrides):
    """Whatever the overrides, finetune (its data emptied last) stops with exit 2 and one line: never a traceback."""
    overrides = [o for o in overrides if o not in ("-h", "--help", "help")]
    res = cli("finetune", *overrides, "data=")
    assert_cli_error(res, 2)


@settings(max_examples=100, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=64), st.text(max_size=64).map(lambda t: t.encode("utf-8")),
                 st.sampled_from(["a: 1\na: 2\n", "steps: 2\n", "- 1\n", "{", "steps: [\n", "x: !!binary AA==\n"])
                 .flatmap(lambda t: st.sampled_from([t.encode(c) for c in ("utf-8", "utf-16", "utf-16-le",
                                                                            "utf-32", "latin-1")]))))
def test_fuzzed_config_files_are_one_config_error_line(cli, tmp_path, content):
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(content)
    assert_cli_error(cli("finetune", "--config", path, "data="), 2)


# ---------------------------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_in_generate_is_the_clean_message_alone(tmp_path):
    """SIGINT once a few shards exist (in-process rendering): exit 130 and the one "interrupted" line, without
    tarfile's "Exception ignored ... write to closed file" from a shard stream left open."""
    out = tmp_path / "ds"
    args = [sys.executable, "-m", "synthvit", "generate",
            *tiny_overrides(out, num_samples=2000, samples_per_shard=10, image_size=64, preview=0)]
    proc = subprocess.Popen(args, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while len(list(out.glob("*.tar"))) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    err = err.decode()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted; finished work is kept" in err.splitlines()[-1], err[-2000:]
    assert "Exception ignored" not in err and "Traceback" not in err, err[-2000:]
    assert not list(out.glob(".*.tmp"))  # the shard being written when Ctrl-C came was removed
    assert 2 <= len(list(out.glob("*.tar"))) < 200
