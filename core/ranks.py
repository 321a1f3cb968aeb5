"""Which process of a torchrun job this is, read from the environment torchrun sets, without
importing torch (infer.py's CPU path stays torch-free when it runs sharded).

`torchrun --nproc_per_node N ...` sets WORLD_SIZE, RANK and LOCAL_RANK in every process it
starts; without them this is process 0 of 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # processes on this machine

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_info() -> DistInfo:
    """This process's place in the job torchrun describes (process 0 of 1 outside torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local = (int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))
    return DistInfo(int(os.environ["RANK"]), world, *local)


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, as a container or taskset limits it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity call on this platform
        return os.cpu_count() or 1
