"""Each loss against a value computed by hand on a small batch, and `loss.add` on any criterion."""

import math

import pytest
import torch

import models
from core.config import ConfigError
from models.losses import add_noise, cross_entropy, noise_consistency, real_contrastive
from tests.tiny_training import TinyBatchNormNet


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


# --- loss.add: the NCE and KL terms on any member's criterion --------------------------------


class _Counting(torch.nn.Module):
    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, images):
        self.calls += 1
        return self.net(images)


def _batch(n: int = 8) -> dict:
    g = torch.Generator().manual_seed(3)
    return {"image": torch.randn(n, 3, 12, 12, generator=g), "target": torch.arange(n) % 2}


def test_mff_is_ce_with_nce_and_kl_added_in_one_forward():
    weights = {"nce": 0.3, "kl": 0.7, "temperature": 0.2, "noise_scale": 0.05}
    mff = models.build_criterion({"loss": {"name": "mff", "ce": 1.0, **weights}})
    added = models.build_criterion({"loss": {"name": "ce", "add": weights}})
    net = _Counting(TinyBatchNormNet().eval())
    torch.manual_seed(0)
    loss_a, logits_a, logs_a = mff(net, _batch())
    assert net.calls == 1  # clean and noisy views in one batch: DDP sees one forward per backward
    torch.manual_seed(0)
    loss_b, logits_b, logs_b = added(net, _batch())
    assert torch.equal(loss_a, loss_b) and torch.equal(logits_a, logits_b)
    assert set(logs_b) == {"ce", "nce", "kl"} and logs_b["kl"] > 0
    expected = logs_b["ce"] + 0.3 * logs_b["nce"] + 0.7 * logs_b["kl"]
    assert loss_b.item() == pytest.approx(expected.item(), rel=1e-6)


def test_added_terms_change_the_gradient_only_by_their_own():
    net = TinyBatchNormNet().eval()
    plain = models.build_criterion({"loss": {"name": "ce"}})
    with_nce = models.build_criterion({"loss": {"name": "ce", "add": {"nce": 1.0}}})
    l_plain = plain(net, _batch())[0]
    l_nce, _, logs = with_nce(net, _batch())
    direct = real_contrastive(net(_batch()["image"])["features"], _batch()["target"], 0.1)
    assert l_nce.item() == pytest.approx(l_plain.item() + direct.item(), rel=1e-6)
    assert logs["nce"].item() == pytest.approx(direct.item(), rel=1e-6)


def test_loss_add_refuses_unknown_keys_and_networks_without_features():
    with pytest.raises(ConfigError, match=r"loss.add: unknown key\(s\) \['nec'\]"):
        models.build_criterion({"loss": {"name": "ce", "add": {"nec": 0.1}}})

    class LogitsOnly(torch.nn.Module):
        def forward(self, images):
            return {"logits": images.mean((2, 3))[:, :2]}

    criterion = models.build_criterion({"loss": {"name": "ce", "add": {"nce": 0.1}}})
    with pytest.raises(ConfigError, match="needs a network that returns `features`"):
        criterion(LogitsOnly(), _batch())
