import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]


def tiny_overrides(out_dir, **extra) -> list[str]:
    """key=value overrides for a tiny, fast dataset."""
    base = dict(out_dir=str(out_dir), num_samples=40, samples_per_shard=8, image_size=48, num_workers=0, preview=4)
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def run_cli(*args, check=False, **kwargs) -> subprocess.CompletedProcess:
    """``python -m synthvit ...`` in a subprocess (as users and accelerate run it)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "synthvit", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=kwargs.pop("cwd", ROOT), timeout=kwargs.pop("timeout", 300), **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"synthvit {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A 40-sample, 48 px dataset in 5 shards, generated in-process."""
    from generate.config import GenerateConfig
    from generate.run import run
    from synthvit.config import load_config

    out = tmp_path_factory.mktemp("tiny") / "ds"
    run(load_config(GenerateConfig, overrides=tiny_overrides(out)))
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one thread is as fast, and stays fast when other jobs share the cores (no OpenMP spinning)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
