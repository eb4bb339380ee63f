import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image

import generate.schema  # noqa: F401  (registers format=shards with synthvit.data, as every stage does)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]


def tiny_overrides(out_dir, **extra) -> list[str]:
    """key=value overrides for a tiny, fast dataset."""
    base = dict(out_dir=str(out_dir), num_samples=40, samples_per_shard=8, image_size=48, num_workers=0, preview=4)
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def run_cli(*args, check=False, env=None, **kwargs) -> subprocess.CompletedProcess:
    """``python -m synthvit ...`` in a subprocess (as users and accelerate run it); ``env``: extra variables."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    proc = subprocess.run([sys.executable, "-m", "synthvit", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=kwargs.pop("cwd", ROOT), timeout=kwargs.pop("timeout", 300), **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"synthvit {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def start_cli(*args, log: Path, env=None) -> subprocess.Popen:
    """``python -m synthvit ...`` started in the background, stdout and stderr into the file ``log``; wait for it
    with ``finish``. For an independent run that can overlap the test's other runs (two share two cores)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "synthvit", *map(str, args)], stdout=f,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def finish(proc: subprocess.Popen, log: Path, timeout: int = 300) -> str:
    """Wait for a ``start_cli`` process; check that it succeeded; its output."""
    proc.wait(timeout=timeout)
    text = log.read_text()
    assert proc.returncode == 0, f"{proc.args[3:]} failed ({proc.returncode}):\n{text[-3000:]}"
    return text


# ---------------------------------------------------------------------------------------------- accelerate launch
def free_port() -> int:
    """A TCP port that nothing listens on right now (the OS picks it), for one torchrun rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(*args, num_processes: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes N -m synthvit ARGS`` on CPUs, on a free port; checked.

    ``--multi_gpu`` makes accelerate start the processes through torchrun; with no GPU present synthvit uses gloo
    on CPU (``--cpu --num_processes 2`` starts a single process in accelerate, see accelerate#2741). Every launch
    gets a port of its own, so launches of concurrent test sessions (or a port left in TIME_WAIT) cannot collide;
    should another process grab the port between the pick and torchrun's bind, the launch is retried once.
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for attempt in range(2):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "synthvit", *map(str, args)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
        if proc.returncode == 0 or "address already in use" not in proc.stderr.lower() or attempt:
            break
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# ---------------------------------------------------------------------------------------------- in-process CLI
@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def _reset_accelerate_state() -> None:
    """Forget the Accelerate singletons a stage created in this process (as accelerate's own tests do)."""
    if "accelerate.state" not in sys.modules:
        return
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def cli(capsys):
    """``synthvit.cli.main([...])`` in this process: a CliResult with main's exit code and what it printed.

    For the error paths (config error: 2, user error: 1): no interpreter start-up per call. Whatever main sets up
    for a process (a logging handler, the SIGINT handler, environment variables, Accelerate singletons) is undone
    after each call.
    """
    from synthvit.cli import main

    def call(*args) -> CliResult:
        root = logging.getLogger()
        handlers, level = list(root.handlers), root.level
        sigint, environ = signal.getsignal(signal.SIGINT), dict(os.environ)
        capsys.readouterr()
        try:
            rc = main([str(a) for a in args])
        finally:
            for h in root.handlers[:]:
                if h not in handlers:
                    root.removeHandler(h)
            root.setLevel(level)
            signal.signal(signal.SIGINT, sigint)
            if os.environ != environ:
                os.environ.clear()
                os.environ.update(environ)
            _reset_accelerate_state()
        out = capsys.readouterr()
        return CliResult(rc, out.out, out.err)

    return call


def assert_cli_error(res, rc: int, *messages: str) -> None:
    """An error exit of ``synthvit <stage>``: the exit code, no traceback, and the error printed last, once, as
    ``synthvit <stage>: config error: ...`` (2) or ``synthvit <stage>: error: ...`` (1), holding every one of
    ``messages`` (an error may go on over a few lines, e.g. a list of problems)."""
    lines = res.stderr.splitlines()
    starts = [i for i, ln in enumerate(lines) if ln.startswith("synthvit ")]
    assert res.returncode == rc, f"exit {res.returncode}, expected {rc}:\n{res.stderr[-2000:]}"
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    assert len(starts) == 1, res.stderr[-2000:]
    error = "\n".join(lines[starts[0]:])
    kind = "config error: " if rc == 2 else "error: "
    assert error.split(": ", 1)[1].startswith(kind), error
    for message in messages:
        assert message in error, f"{message!r} not in {error!r}"


# ---------------------------------------------------------------------------------------------- shared data
@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A 40-sample, 48 px dataset in 5 shards, generated in-process."""
    from generate.config import GenerateConfig
    from generate.run import run
    from synthvit.config import load_config

    out = tmp_path_factory.mktemp("tiny") / "ds"
    run(load_config(GenerateConfig, overrides=tiny_overrides(out)))
    return out


def make_real_data(root: Path, n: int, size: tuple[int, int], defect, name: str = "im{:02d}") -> Path:
    """``n`` grayscale frames of ``size`` (h, w) in the canonical layout under ``root``; odd ones ('dark') hold a
    0/255-masked defect at grey 30 where ``defect(rng)`` indexes, even ones are 'good'; ids are ``name.format(i)``."""
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = ["id,label"]
    for i in range(n):
        img = (rng.random(size) * 40 + 100).astype(np.uint8)
        m = np.zeros(size, np.uint8)
        if i % 2:
            m[defect(rng)] = 255
            img[m > 0] = 30
        Image.fromarray(img).save(root / "images" / f"{name.format(i)}.png")
        Image.fromarray(m).save(root / "masks" / f"{name.format(i)}.png")
        lines.append(f"{name.format(i)},{'dark' if i % 2 else 'good'}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


# The tiny pretrain run behind `pretrain_export` (tests/test_pretrain_run.py reuses the settings).
TINY_PRETRAIN = ["model=vit_tiny_patch16_224", "image_size=32", "batch_size=8", "optim.warmup_steps=2",
                 "optim.lr=4e-3", "log_every=2", "shuffle_buffer=20", "drop_path=0.0"]
EXPORT_STEPS = 2


@pytest.fixture(scope="session")
def pretrain_export(tiny_dataset, tmp_path_factory) -> Path:
    """The export folder of one tiny pretrain run (vit_tiny_patch16_224, 32 px, cls+seg, 2 steps, a log record per
    step), in a subprocess as users run it; shared by the pretrain and finetune tests."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    tiny = [a for a in TINY_PRETRAIN if not a.startswith("log_every=")]
    run_cli("pretrain", f"data=[{tiny_dataset}]", f"out_dir={out}", *tiny, f"steps={EXPORT_STEPS}", "log_every=1",
            "num_workers=0", "objective=cls+seg", check=True)
    return out / "export"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one thread is as fast, and stays fast when other jobs share the cores (no OpenMP spinning)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rle_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE of a (H, W) 0/1 mask: column-major runs, zeros first."""
    counts, run, cur = [], 0, 0
    for v in mask.T.reshape(-1):
        if v != cur:
            counts.append(run)
            run, cur = 0, v
        run += 1
    counts.append(run)
    return counts


def rle_string(counts: list[int]) -> str:
    """pycocotools' rleToString."""
    out = []
    for i, x in enumerate(counts):
        x = x - counts[i - 2] if i > 2 else x
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr((c | (0x20 if more else 0)) + 48))
    return "".join(out)


# ---------------------------------------------------------------------------------------------- public weights
# Models whose timm hub repository `hf_cache` holds (random weights, the tag's own pretrained_cfg), and one whose
# repository holds pickled weights only (pytorch_model.bin): what synthvit must refuse.
HF_CACHE_MODELS = ("vit_tiny_patch16_224.augreg_in21k_ft_in1k", "resnet18.a1_in1k", "hrnet_w18_small.gluon_in1k")
HF_PICKLE_ONLY = "resnet18.tv_in1k"


class HfCache(NamedTuple):
    home: Path  # HF_HOME: its hub/ holds models--timm--<name.tag>/{refs/main, snapshots/<rev>/}
    tensors: dict  # model name with tag (HF_CACHE_MODELS) -> the state dict its model.safetensors holds


def hf_repo_folder(home: Path, name: str) -> Path:
    """``<home>/hub/models--timm--<name.tag>``: the cache folder of the hub repository of a timm name's tag."""
    from huggingface_hub.file_download import repo_folder_name
    from timm.models import get_pretrained_cfg

    return home / "hub" / repo_folder_name(repo_id=get_pretrained_cfg(name).hf_hub_id, repo_type="model")


def _cache_repo(home: Path, name: str, model, safe: bool) -> None:
    """One repository as ``huggingface_hub`` leaves it after a download: ``refs/main`` naming a snapshot that holds
    what timm's hub repositories hold (timm's own ``save_for_hf``: the weights and ``config.json``)."""
    import hashlib

    from timm.models import save_for_hf

    folder = hf_repo_folder(home, name)
    rev = hashlib.sha1(folder.name.encode()).hexdigest()
    save_for_hf(model, str(folder / "snapshots" / rev), safe_serialization=safe)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(rev)


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory) -> HfCache:
    """A Hugging Face cache built here (the hub is never asked): for each of ``HF_CACHE_MODELS`` a random timm model
    saved as its tag's hub repository (model.safetensors + config.json), and ``HF_PICKLE_ONLY``'s repository with
    pytorch_model.bin only. Returns ``(HF_HOME folder, {name: tensors})``; ``use_hf_cache`` points a test at it."""
    import timm
    import torch

    home = tmp_path_factory.mktemp("hf_home")
    tensors = {}
    for name in HF_CACHE_MODELS:
        torch.manual_seed(0)
        model = timm.create_model(name)
        _cache_repo(home, name, model, safe=True)
        tensors[name] = {k: v.clone() for k, v in model.state_dict().items()}
    _cache_repo(home, HF_PICKLE_ONLY, timm.create_model(HF_PICKLE_ONLY), safe=False)
    return HfCache(home, tensors)


@pytest.fixture
def use_hf_cache(hf_cache, monkeypatch) -> HfCache:
    """``hf_cache`` as this process's Hugging Face cache, offline: HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE=1 in the
    environment (for the subprocesses a test starts) and in ``huggingface_hub.constants`` (read when it was
    imported, and by every download call since)."""
    import huggingface_hub.constants as hf_constants

    hub = str(hf_cache.home / "hub")
    for key, value in (("HF_HOME", str(hf_cache.home)), ("HF_HUB_CACHE", hub), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(hf_constants, "HF_HOME", str(hf_cache.home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", hub)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return hf_cache


# ---------------------------------------------------------------------------------------------- object storage
@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 server (SeaweedFS) on 127.0.0.1 for the session, its endpoint and key in this process's
    environment (so subprocesses inherit them, as on a cluster node). Skipped, with the reason, only if the
    `weed` binary is missing or cannot start."""
    from s3server import SeaweedS3, ServerUnavailable

    server = SeaweedS3(tmp_path_factory.mktemp("s3"))
    try:
        server.start()
    except ServerUnavailable as e:
        pytest.skip(f"no S3 server for the object-storage tests: {e}")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in server.env.items():
            mp.setenv(k, v)
        yield server
    server.stop()
