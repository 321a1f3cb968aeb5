"""Each loss against a value computed by hand on a small batch."""

import math

import pytest
import torch

from models.losses import add_noise, cross_entropy, noise_consistency, real_contrastive


def test_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([0, 1])
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / 2
    assert cross_entropy(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_real_contrastive_by_hand():
    # Three samples on the unit circle: reals at 0 and 90 degrees, a fake at 180.
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    y = torch.tensor([0, 0, 1])
    t = 0.5
    # anchor 0: s01 = 0, s02 = -1/t; anchor 1: s10 = 0, s12 = 0
    l0 = -(0 - math.log(math.exp(0) + math.exp(-1 / t)))
    l1 = -(0 - math.log(math.exp(0) + math.exp(0)))
    assert real_contrastive(f, y, t).item() == pytest.approx((l0 + l1) / 2, rel=1e-6)


def test_real_contrastive_scale_free_and_zero_without_pairs():
    f = torch.randn(6, 8)
    y = torch.tensor([0, 0, 1, 1, 0, 1])
    assert real_contrastive(3 * f, y).item() == pytest.approx(real_contrastive(f, y).item(), rel=1e-5)
    assert real_contrastive(f, torch.tensor([0, 1, 1, 1, 1, 1])).item() == 0.0


def test_real_contrastive_rewards_tight_reals():
    y = torch.tensor([0, 0, 1])
    tight = torch.tensor([[1.0, 0.0], [0.99, 0.1], [-1.0, 0.0]])
    loose = torch.tensor([[1.0, 0.0], [-0.9, 0.1], [0.0, 1.0]])
    assert real_contrastive(tight, y) < real_contrastive(loose, y)


def test_noise_consistency_by_hand():
    clean = torch.tensor([[math.log(0.8), math.log(0.2)]])
    noisy = torch.tensor([[math.log(0.5), math.log(0.5)]])
    expected = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    assert noise_consistency(clean, noisy).item() == pytest.approx(expected, rel=1e-6)
    assert noise_consistency(clean, clean).item() == pytest.approx(0.0, abs=1e-7)


def test_noise_kinds():
    x = torch.zeros(1000)
    torch.manual_seed(0)
    assert add_noise(x, "gaussian", 0.1).std().item() == pytest.approx(0.1, rel=0.1)
    assert add_noise(x, "uniform", 0.1).abs().max().item() <= 0.1
    with pytest.raises(ValueError, match="noise kind"):
        add_noise(x, "salt", 0.1)
