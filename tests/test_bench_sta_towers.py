"""bench/sta_demo_towers.py: its loop learns what is learnable, and `sta` trains what the method trains."""

import torch
import yaml

from bench.sta_demo_towers import VARIANTS, train_variant

with open("configs/members/sta_demo.yaml") as fh:
    MODEL = yaml.safe_load(fh)["model"]
SIZE = 32


def separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images whose class shows as a brighter red channel."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 3, SIZE, SIZE, generator=g)
    x[:, 0] += 1.5 * y[:, None, None]
    return x, y


def test_the_loop_learns_a_separable_task_so_chance_on_the_demo_is_the_networks():
    (xt, yt), (xv, yv) = separable(64, 0), separable(32, 1)
    result = train_variant(VARIANTS["cnn"], MODEL, SIZE, ((xt, yt), (xv, yv.numpy())), epochs=3, seed=0)
    assert result["held_out_auc_last"] > 0.9
    assert result["held_out_auc_best_epoch"] >= result["held_out_auc_last"]


def test_sta_trains_only_adapters_and_head_unless_its_tower_is_trained_too():
    data = (separable(16, 0), (separable(16, 1)[0], separable(16, 1)[1].numpy()))
    frozen = train_variant(VARIANTS["sta"], MODEL, SIZE, data, epochs=1, seed=0)
    whole = train_variant(VARIANTS["sta_tower_trained"], MODEL, SIZE, data, epochs=1, seed=0)
    tower = VARIANTS["vit"].build(MODEL, SIZE)
    tower_params = sum(p.numel() for p in tower[0].parameters())
    assert whole["trainable_params"] - frozen["trainable_params"] == tower_params
