"""`accelerate launch -m synthvit generate` across 2 ranks: shards split by index, rank 0 writes _info.json,
the same bytes as one process, resume per shard."""
import pytest

from conftest import accelerate_launch, tiny_overrides
from generate.schema import INFO_FILE, verify_dataset


def tree(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".tar", ".json")}


@pytest.mark.slow
def test_two_ranks_write_the_single_process_bytes_and_resume(tiny_dataset, tmp_path):
    out = tmp_path / "ranks"
    proc = accelerate_launch("generate", *tiny_overrides(out))
    assert "rank 1: 16 new samples" in proc.stderr  # shards 1 and 3 of 5 (8 samples each) belong to rank 1
    assert tree(out) == tree(tiny_dataset)  # shards and _info.json (sha256 of every shard)
    assert verify_dataset(out) == []

    for name in ("synthvit-000002.tar", "synthvit-000003.tar", INFO_FILE):  # one shard of each rank
        (out / name).unlink()
    (out / ".synthvit-000003.tar.4242.tmp").write_bytes(b"half a shard")
    proc = accelerate_launch("generate", *tiny_overrides(out))
    assert "rank 1: 8 new samples" in proc.stderr and "removed 1 partial file" in proc.stderr
    assert tree(out) == tree(tiny_dataset)
    assert not list(out.glob(".*"))
