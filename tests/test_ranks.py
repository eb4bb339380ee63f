"""synthvit.ranks: one answer to "which rank am I, wait for the others" (multi-rank runs: test_generate_multirank,
test_compare, test_storage)."""
import subprocess
import sys
from types import SimpleNamespace

from synthvit.ranks import Ranks, join


def test_a_plain_process_is_rank_0_of_1_without_importing_torch(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ranks = join()
    assert (ranks.rank, ranks.world, ranks.local, ranks.is_main) == (0, 1, 0, True)
    ranks.barrier(), ranks.finish()  # no-ops
    code = "import sys, synthvit.ranks as r; r.join(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={"WORLD_SIZE": "1", "PATH": ""})


def test_the_ranks_of_an_accelerator_are_read_from_it():
    calls = []
    acc = SimpleNamespace(process_index=3, num_processes=4, local_process_index=1,
                          wait_for_everyone=lambda: calls.append("wait"), end_training=lambda: calls.append("end"))
    ranks = Ranks.of(acc)
    assert (ranks.rank, ranks.world, ranks.local, ranks.is_main) == (3, 4, 1, False)
    ranks.barrier(), ranks.finish()
    assert calls == ["wait", "end"]
