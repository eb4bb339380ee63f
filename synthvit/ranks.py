"""Which rank am I, how many are we, wait for the others: one answer for generate, pretrain, finetune and compare.

Under ``accelerate launch`` / torchrun (``WORLD_SIZE`` > 1), :func:`join` starts a gloo process group with a long
timeout (ranks only wait for each other here; no tensors move), so ranks that finish early wait in a barrier for the
others (a resumed run may leave one rank most of the work) far longer than torch's 30-minute default. A rank that
fails still ends the job (the launcher stops all). A plain single process imports neither torch nor accelerate.

Training loops keep Accelerate as their distribution layer: :meth:`Ranks.of` reads the same answers from their
``Accelerator``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable

__all__ = ["Ranks", "join", "usable_cores", "local_processes", "WAIT_HOURS"]

WAIT_HOURS = 7 * 24  # how long ranks that finished wait in a barrier for the others (cells can run for days)


def _nothing() -> None:
    return None


@dataclass(frozen=True)
class Ranks:
    """This process's place in a launched job: ``rank`` of ``world`` (``local`` on its machine)."""

    rank: int = 0
    world: int = 1
    local: int = 0
    barrier: Callable[[], None] = field(default=_nothing, repr=False)  # wait for every rank
    finish: Callable[[], None] = field(default=_nothing, repr=False)  # leave the job (after the last barrier)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def of(cls, accelerator) -> "Ranks":
        """The ranks of an ``accelerate.Accelerator`` (its barrier; ``finish`` ends its trackers and group)."""
        return cls(accelerator.process_index, accelerator.num_processes, accelerator.local_process_index,
                   accelerator.wait_for_everyone, accelerator.end_training)


def join() -> Ranks:
    """This process's :class:`Ranks` from the launcher's RANK / WORLD_SIZE / LOCAL_RANK (one rank when unset)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(hours=WAIT_HOURS))

    def finish() -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), dist.barrier,
                 finish)


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform
        return os.cpu_count() or 1


def available_memory_gb() -> float | None:
    """MemAvailable from /proc/meminfo (Linux); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def local_processes(world: int) -> int:
    """Processes of this job on this machine: the launcher's LOCAL_WORLD_SIZE (torchrun, ``accelerate launch``),
    else all ``world`` of them."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world))
