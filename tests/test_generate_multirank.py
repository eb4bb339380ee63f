"""`accelerate launch -m synthvit generate` across 2 ranks: shards split by index, rank 0 writes _info.json,
the same bytes as one process, resume per shard."""
import os
import subprocess
import sys

from conftest import ROOT, tiny_overrides
from generate.schema import INFO_FILE, verify_dataset


def launch_generate(out, port):
    """2 CPU processes through torchrun (`--multi_gpu`: `--cpu --num_processes 2` starts one, accelerate#2741)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), "-m", "synthvit", "generate", *tiny_overrides(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def tree(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".tar", ".json")}


def test_two_ranks_write_the_single_process_bytes_and_resume(tiny_dataset, tmp_path):
    out = tmp_path / "ranks"
    proc = launch_generate(out, 29541)
    assert "rank 1: 16 new samples" in proc.stderr  # shards 1 and 3 of 5 (8 samples each) belong to rank 1
    assert tree(out) == tree(tiny_dataset)  # shards and _info.json (sha256 of every shard)
    assert verify_dataset(out) == []

    for name in ("synthvit-000002.tar", "synthvit-000003.tar", INFO_FILE):  # one shard of each rank
        (out / name).unlink()
    (out / ".synthvit-000003.tar.4242.tmp").write_bytes(b"half a shard")
    proc = launch_generate(out, 29542)
    assert "rank 1: 8 new samples" in proc.stderr and "removed 1 partial file" in proc.stderr
    assert tree(out) == tree(tiny_dataset)
    assert not list(out.glob(".*"))
