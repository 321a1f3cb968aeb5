"""Why `sta_demo` stays at chance on the demo: which tiny networks from random weights learn there?

  python -m bench.studies.sta_demo_towers                      # fold 0, 12 epochs
  python -m bench.studies.sta_demo_towers --folds 0 1 --out bench/studies/results/sta_demo_towers.json

Each variant trains on the still images of the other folds and is scored on the held-out fold, all
under one plain loop (stills decoded once through the member's evaluation transform at --size px,
horizontal flips only, Adam, batch 16, no schedule, no EMA), so the networks differ and nothing else:

  cnn                timm's test_resnet, whole network trained (the tiny CNN of the image members' demos)
  vit                sta_demo's open_clip ViT tower with a linear head, whole network trained
  sta                sta_demo's network as the method trains it: tower frozen, adapters and head learn
  sta_tower_trained  the same network with its random tower trained too

The held-out AUC is reported after the last epoch (nothing selected on it) and at its best epoch
(selected on the held-out fold: optimistic, shown only to say that no epoch did better).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.output import run_and_publish
from core.config import load_config
from core.data.folds import read_folds
from core.data.sources import read_train_table, resolve_data
from core.data.transforms import build_transform
from core.imaging import decode_image
from core.metrics import score_report
from models.clip_towers import build_visual
from models.sta import build_sta


@dataclass(frozen=True)
class Variant:
    lr: float
    build: Callable[[dict, int], nn.Module]  # (sta_demo's model section, image size) -> a network giving logits


class Logits(nn.Module):
    """A network whose forward returns `{"logits": ...}` or a tensor, as a tensor."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out["logits"] if isinstance(out, dict) else out


def tower_cfg(model: dict, size: int) -> dict:
    cfg = model["model_cfg"]
    return {**cfg, "vision_cfg": {**cfg["vision_cfg"], "image_size": size}}


def build_cnn(model: dict, size: int) -> nn.Module:
    import timm

    return timm.create_model("test_resnet", num_classes=2)


def build_vit(model: dict, size: int) -> nn.Module:
    cfg = tower_cfg(model, size)
    return nn.Sequential(build_visual(None, cfg, None), nn.Linear(cfg["embed_dim"], 2))


def build_adapted(model: dict, size: int, tower_trained: bool = False) -> nn.Module:
    net = build_sta(1, model_cfg=tower_cfg(model, size), heads=model["heads"], drop_rate=model["drop_rate"])
    return net.requires_grad_(True) if tower_trained else net


VARIANTS = {
    "cnn": Variant(2e-3, build_cnn),
    "vit": Variant(1e-3, build_vit),
    "sta": Variant(1e-2, build_adapted),  # sta_demo.yaml's learning rate
    "sta_tower_trained": Variant(1e-3, lambda model, size: build_adapted(model, size, tower_trained=True)),
}


def load_stills(paths: list[str], data: dict, size: int) -> torch.Tensor:
    """Every still as the member's evaluation transform feeds it, at `size` px."""
    transform = build_transform({**data, "image_size": size}, train=False)
    return torch.stack([transform(decode_image(p), 0) for p in paths])


def scores(net: nn.Module, x: torch.Tensor) -> np.ndarray:
    net.eval()
    with torch.no_grad():
        return torch.cat([net(x[i : i + 64]).softmax(-1)[:, 1] for i in range(0, len(x), 64)]).numpy()


def train_variant(variant: Variant, model: dict, size: int, data: tuple, epochs: int, seed: int) -> dict:
    (xt, yt), (xv, yv) = data
    torch.manual_seed(seed)
    net = Logits(variant.build(model, size))
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=variant.lr, weight_decay=5e-4)
    held_out, start = [], time.process_time()
    for _ in range(epochs):
        net.train()
        for batch in torch.randperm(len(xt)).split(16):
            x = xt[batch].flip(-1) if torch.rand(()) < 0.5 else xt[batch]
            loss = F.cross_entropy(net(x), yt[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        held_out.append(score_report(yv, scores(net, xv))["auc"])
    return {
        "trainable_params": sum(p.numel() for p in params),
        "train_auc_last": score_report(yt.numpy(), scores(net, xt))["auc"],
        "held_out_auc_last": held_out[-1],
        "held_out_auc_best_epoch": max(held_out),
        "cpu_seconds_per_epoch": round((time.process_time() - start) / epochs, 2),
    }


def run(args: argparse.Namespace) -> dict:
    cfg = load_config([args.data_config, args.config], args.overrides)
    table = read_folds(cfg["paths"]["folds"], read_train_table(resolve_data(cfg)))
    x = load_stills(table["path"].tolist(), cfg["data"], args.size)
    y = torch.tensor(table["target"].to_numpy())
    rows = []
    for fold in args.folds:
        held = torch.as_tensor(table["fold"].to_numpy() == fold)
        data = ((x[~held], y[~held]), (x[held], y[held].numpy()))
        for name in args.variants:
            result = train_variant(VARIANTS[name], cfg["model"], args.size, data, args.epochs, args.seed)
            rows.append({"variant": name, "fold": fold, **result})
            print(f"fold {fold} {name}: {result}", file=sys.stderr)
    settings = {"size": args.size, "epochs": args.epochs, "seed": args.seed, "folds": args.folds}
    return {"config": args.config, **settings, "stills": len(table), "runs": rows}


def table(result: dict) -> str:
    lines = [
        "| network | trainable | fold | train AUC | held-out AUC (last epoch) | best epoch | CPU s / epoch |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['variant']} | {r['trainable_params']:,} | {r['fold']} | {r['train_auc_last']:.3f} | "
            f"{r['held_out_auc_last']:.3f} | {r['held_out_auc_best_epoch']:.3f} | {r['cpu_seconds_per_epoch']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/members/sta_demo.yaml", help="the tower and adapters to measure")
    p.add_argument("--data-config", default="configs/data.yaml")
    p.add_argument("--folds", type=int, nargs="+", default=[0], help="held-out folds (default: 0)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--size", type=int, default=64, help="input pixels (the image members' demos learn from 64 up)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    return run_and_publish(lambda: run(args), table, args.out)


if __name__ == "__main__":
    sys.exit(main())
