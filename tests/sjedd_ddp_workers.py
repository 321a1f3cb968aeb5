"""What each of two gloo processes runs in tests/test_sjedd.py's DDP check of the level weights
(torch.multiprocessing.spawn imports this module in every process)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from models.sjedd import AutoLambda, auto_lambda_step, collate_attributes
from tests.ddp_workers import WORLD, join
from tests.test_sjedd import batch_of, demo_tree, member_cfg, tiny_net

INIT = 0.1


def nearly_unreadable(batch: dict, keep: int) -> dict:
    """`batch` as the loader gives it when all but item `keep` could not be decoded."""
    items = [{"index": i, "error": f"{i}.jpg: not an image"} for i in range(len(batch["image"])) if i != keep]
    items.append({k: batch[k][keep] for k in ("image", "target", "nodes", "known")} | {"index": keep})
    return collate_attributes(items)


def fresh_net() -> torch.nn.Module:
    net = tiny_net(seed=0).train()
    net.level_weights.value.fill_(INIT)
    return net


def level_weights_with_a_nearly_unreadable_share(rank: int, init: str) -> None:
    """Rank 0 has six images, rank 1 one readable image of six (no held-out pair): both reach the
    all-reduce, and both step lambda on rank 0's hypergradient alone, as one process on rank 0's
    batch does. Then no rank has a pair: every rank returns, lambda unchanged."""
    settings = AutoLambda.from_cfg(member_cfg()["loss"]["weighting"])
    full = batch_of(demo_tree(), n=6, seed=0)
    alone = fresh_net()
    auto_lambda_step(alone, full, settings)  # one process, before the group exists
    expected = alone.level_weights.value.clone()
    assert not torch.equal(expected, torch.full_like(expected, INIT)), "the reference step moves lambda"

    join(rank, init)
    try:
        net = fresh_net()
        auto_lambda_step(net, full if rank == 0 else nearly_unreadable(full, keep=3), settings)
        everyone = [torch.empty_like(expected) for _ in range(WORLD)]
        dist.all_gather(everyone, net.level_weights.value)
        torch.testing.assert_close(everyone[0], everyone[1], rtol=0, atol=0, msg="ranks hold the same lambda")
        torch.testing.assert_close(everyone[0], expected, msg="the average over the ranks that had a pair")
        assert int(net.level_weights.steps) == 1

        auto_lambda_step(net, nearly_unreadable(full, keep=rank), settings)
        torch.testing.assert_close(net.level_weights.value, expected, rtol=0, atol=0, msg="no pair anywhere: no step")
        assert int(net.level_weights.steps) == 1
    finally:
        dist.destroy_process_group()
