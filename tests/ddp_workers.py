"""What each of two gloo processes runs in tests/test_distributed.py (torch.multiprocessing.spawn
imports this module in every process, so it imports no more than the checks need)."""

from __future__ import annotations

from datetime import timedelta

import timm
import torch
import torch.distributed as dist

import models
from core.data.datasets import ImageDataset
from core.distributed import DistInfo, all_ranks_agree, sync_batchnorm
from core.train.trainer import Trainer, TrainSettings
from models.losses import real_contrastive
from tests.tiny_training import TinyBatchNormNet, to_tensor

WORLD = 2
SPLIT = 3  # rank 0 holds rows [0, 3), rank 1 rows [3, 8): shares of unequal size, as after unreadable files


def join(rank: int, init: str) -> None:
    # A short timeout: a rank left waiting in a collective fails the test instead of hanging it.
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))


def share(x: torch.Tensor, rank: int) -> torch.Tensor:
    return x[:SPLIT] if rank == 0 else x[SPLIT:]


def contrastive_and_batchnorm(rank: int, init: str) -> None:
    torch.manual_seed(0)
    features = torch.randn(8, 5, requires_grad=True)
    target = torch.tensor([0, 1, 0, 0, 1, 0, 1, 0])
    images = torch.randn(8, 3, 32, 32)
    one_loss = real_contrastive(features, target)  # one process, before the group exists
    one_loss.backward()
    networks = {}
    for name in ("test_resnet.r160_in1k", "test_efficientnet.r160_in1k"):  # BatchNorm2d, timm's BatchNormAct2d
        net = timm.create_model(name, pretrained=False, num_classes=2).train()
        reference = timm.create_model(name, pretrained=False, num_classes=2).train()
        reference.load_state_dict(net.state_dict())
        out = reference(images)
        (out.square().sum() / len(images)).backward()
        networks[name] = (net, reference, out.detach())

    join(rank, init)
    try:
        assert all_ranks_agree(True, DistInfo(rank, WORLD), torch.device("cpu"))
        assert not all_ranks_agree(rank == 0, DistInfo(rank, WORLD), torch.device("cpu"))

        mine = share(features.detach(), rank).requires_grad_()
        loss = real_contrastive(mine, share(target, rank))
        loss.backward()
        averaged = loss.detach().clone()
        dist.all_reduce(averaged)
        torch.testing.assert_close(averaged / WORLD, one_loss.detach(), msg="contrastive loss, averaged over ranks")
        # DDP averages gradients over ranks: this rank's share of the one-process gradient
        torch.testing.assert_close(mine.grad / WORLD, share(features.grad, rank), msg="contrastive gradient")

        for name, (net, reference, out_one) in networks.items():
            net = sync_batchnorm(net, torch.device("cpu"))
            out = net(share(images, rank))
            torch.testing.assert_close(out, share(out_one, rank), rtol=1e-4, atol=1e-5, msg=f"{name} output")
            (out.square().sum() / len(images) * WORLD).backward()  # per-rank scaled, as the losses are
            # Tolerance on the scale of the whole gradient: a bias followed by another BatchNorm
            # has a true gradient of 0, so its computed one is float noise on either side.
            scale = max(q.grad.abs().max().item() for q in reference.parameters())
            for (key, p), q in zip(net.named_parameters(), reference.parameters(), strict=True):
                grad = p.grad.clone()
                dist.all_reduce(grad)
                torch.testing.assert_close(grad / WORLD, q.grad, rtol=0, atol=1e-4 * scale, msg=f"{name} {key}")
            for key, value in reference.state_dict().items():
                if key.endswith(("running_mean", "running_var")):
                    torch.testing.assert_close(net.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)
    finally:
        dist.destroy_process_group()


def train_with_an_unreadable_share(rank: int, init: str, paths: list[str], targets: list[int], out: str) -> None:
    join(rank, init)
    try:
        torch.manual_seed(0)
        ds = ImageDataset(paths, targets, to_tensor)
        settings = TrainSettings(epochs=1, batch_size=4, num_workers=0, progress=False, amp=False, warmup_steps=0)
        criterion = models.build_criterion({"loss": {"name": "ce"}})
        trainer = Trainer(
            TinyBatchNormNet(), criterion, ds, ds, settings, out, torch.device("cpu"), DistInfo(rank, WORLD)
        )
        trainer.fit()
        assert trainer.scheduler.last_epoch == 1, "both ranks skip the batch rank 1 cannot read, and step on the other"
        weights = torch.cat([p.detach().flatten() for p in trainer.module.parameters()])
        everyone = [torch.empty_like(weights) for _ in range(WORLD)]
        dist.all_gather(everyone, weights)
        torch.testing.assert_close(everyone[0], everyone[1], msg="ranks hold the same weights")
    finally:
        dist.destroy_process_group()


def synthesizer_over_two_processes(rank: int, init: str) -> None:
    """Each rank builds the synthesizer from its own seed and forges its own pairs with its own
    rewards; after joining, `to` makes every rank start from rank 0's weights, `step` averages
    the gradients, and the baseline follows the mean reward over both ranks."""
    import numpy as np
    import yaml

    from core.distributed import average_gradients
    from data_prep.sladd_online import ForgeSettings, RecipeSettings
    from models.sladd import SynthesizerPart, SynthSettings, build_synthesizer

    with open("configs/members/sladd_demo.yaml") as fh:
        cfg = yaml.safe_load(fh)
    s = SynthSettings.from_cfg(cfg)
    torch.manual_seed(rank)
    part = SynthesizerPart(build_synthesizer(s), s, ForgeSettings.from_cfg(cfg), RecipeSettings.from_cfg(cfg),
                           [0.5] * 3, [0.5] * 3, amp=False)  # fmt: skip
    rng = np.random.default_rng(rank)
    b, size = 3, 32
    lm = np.stack([rng.uniform(8, 24, (68, 2)) for _ in range(b)])
    batch = {
        "real": torch.from_numpy(rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)),
        "source": torch.from_numpy(rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)),
        "real_lm": torch.from_numpy(lm), "source_lm": torch.from_numpy(lm),
        "seed": torch.arange(b), "other": torch.zeros((0, size, size, 3), dtype=torch.uint8),
        "other_target": torch.zeros(0, dtype=torch.long), "errors": [],
    }  # fmt: skip

    def everyone(x: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(x) for _ in range(WORLD)]
        dist.all_gather(out, x)
        return out

    def flat() -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in part.net.parameters()])

    join(rank, init)
    try:
        part.to(torch.device("cpu"))
        a, c = everyone(flat())
        torch.testing.assert_close(a, c, rtol=0, atol=0, msg="ranks start from rank 0's synthesizer")
        out = part.prepare(batch, learn=True)
        reward = torch.full((len(out["image"]),), float(rank + 1))  # rank 0: 1, rank 1: 2
        part.backward(out, {"sample_loss": reward}, scale=1.0)
        assert part.baseline == 1.5, "the baseline starts at the mean reward over both ranks"
        local = torch.cat([p.grad.flatten() for p in part.net.parameters()])
        grads = everyone(local)
        assert not torch.equal(grads[0], grads[1]), "the ranks' own gradients differ"
        average_gradients(list(part.net.parameters()))
        averaged = torch.cat([p.grad.flatten() for p in part.net.parameters()])
        torch.testing.assert_close(averaged, (grads[0] + grads[1]) / 2)
        params = list(part.net.parameters())
        for p, g in zip(params, torch.split(local, [p.numel() for p in params]), strict=True):
            p.grad.copy_(g.view_as(p))  # back to the rank's own: step() averages them itself
        part.step()
        a, c = everyone(flat())
        torch.testing.assert_close(a, c, rtol=0, atol=0, msg="ranks hold the same synthesizer after a step")
    finally:
        dist.destroy_process_group()


def clip_scores_over_two_processes(rank: int, init: str, cfg: dict, paths: list[str], out: str) -> None:
    """A clip member's scores of `paths` as train.py makes them under torchrun (`score_selected`:
    each rank its shard, gathered), saved by rank 0 to `out`."""
    import numpy as np

    from core.data.clips import eval_dataset
    from core.data.datasets import make_loader
    from core.data.transforms import build_transform
    from core.distributed import gather_rows, shard
    from core.train.prediction import predict_loader

    join(rank, init)
    try:
        info = DistInfo(rank, WORLD)
        idx = shard(len(paths), info)
        dataset = eval_dataset(cfg, [paths[i] for i in idx], None, build_transform(cfg["data"], train=False))
        model = clip_member(cfg)
        local = predict_loader([model], make_loader(dataset, 2, 0), torch.device("cpu"), amp=False, progress=False)
        scores = gather_rows(local[:, 0], idx, len(paths), info)
        if rank == 0:
            np.save(out, scores)
    finally:
        dist.destroy_process_group()


def clip_member(cfg: dict) -> torch.nn.Module:
    """`cfg`'s network with seeded random weights (its zero-initialised adapters and head nudged, so
    that clips are not all scored 0.5), the same in every process."""
    torch.manual_seed(0)
    model = models.build_model(cfg["model"]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model
