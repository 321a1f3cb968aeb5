"""What each of two gloo processes runs in tests/test_prep_stage.py: the data stage's command as
torchrun starts it (torch.multiprocessing.spawn imports this module in every process, so it
imports no more than the stage needs)."""

from __future__ import annotations

import os

import torch

from data_prep import __main__ as cli
from data_prep import stage_edits

WORLD = 2


def run_stage(rank: int, port: int, config: str, die_after: int | None = None) -> None:
    """`python -m data_prep --config config` as process `rank` of two, as torchrun would start it
    (its environment variables); with `die_after`, process 1 exits abruptly when about to make
    its edit:swap image number `die_after + 1`, leaving the images it made."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    # As the one-process run in the test: tiny random networks, one thread, denormals flushed.
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    if die_after is not None and rank == 1:
        edit = stage_edits.run_edit
        made = []

        def dying_edit(job, out):
            if job.method == "edit:swap":
                if len(made) == die_after:
                    os._exit(3)
                made.append(job.name)
            return edit(job, out)

        stage_edits.run_edit = dying_edit
    assert cli.main(["--config", config, "--no-progress"]) == 0
