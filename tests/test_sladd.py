"""The sladd detector, its loss, and the synthesizer's policy and REINFORCE step, on timm's tiny
test_resnet with random weights and batches made here."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import models
from core.config import ConfigError, load_config
from core.train.trainer import TrainSettings
from data_prep.blending import BLEND_TYPES, SLADD_REGIONS
from data_prep.sladd_online import TYPE_CLASSES, ForgeSettings, RecipeSettings
from models import sladd
from models.sladd import (
    SynthSettings,
    am_softmax,
    build_synthesizer,
    reinforce_loss,
    sample_actions,
    widen_input,
)

BACKBONE = "test_resnet.r160_in1k"
WEIGHTS = {"cls": 1.0, "map": 0.1, "type": 0.05, "mag": 0.1}


def _net(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return models.build_model({"name": "sladd", "backbone": BACKBONE, "map_layer": "layer2", **kw})


def _batch(n: int = 6, size: int = 32, seed: int = 0) -> dict:
    """Two reals, two synthesized images (one fake blended with copy at mag 0.4, one real),
    two training fakes (mask unknown)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(n, 3, size, size, generator=g),
        "target": torch.tensor([0, 0, 1, 0, 1, 1]),
        "type_target": torch.tensor([3, 3, 2, 3, 4, 4]),
        "mag_target": torch.tensor([math.nan, math.nan, 0.4, math.nan, math.nan, math.nan]),
        "mag_valid": torch.tensor([False, False, True, False, False, False]),
        "map_target": torch.rand(n, 1, 16, 16, generator=g) * torch.tensor([0, 0, 1, 0, 0, 0.0]).view(-1, 1, 1, 1),
        "map_valid": torch.tensor([True, True, True, True, False, False]),
    }


# --------------------------------------------------------------------------- the detector


def test_tables_match_the_forgery_space() -> None:
    assert len(SLADD_REGIONS) == sladd.N_REGIONS and len(BLEND_TYPES) == sladd.N_BLENDS
    assert BLEND_TYPES[sladd.NONE_BLEND] == "none" and len(TYPE_CLASSES) == sladd.N_TYPE_CLASSES


def test_detector_heads_in_training_and_only_logits_at_inference() -> None:
    net = _net().train()
    out = net(torch.rand(3, 3, 64, 64))
    assert out["logits"].shape == (3, 2) and out["type_logits"].shape == (3, 5)
    assert out["mag"].shape == (3,) and ((out["mag"] > 0) & (out["mag"] < 1)).all()
    assert out["mask_map"].shape == (3, 1, 16, 16)  # layer2 gives 8 x 8 at 64 px, resized
    assert ((out["mask_map"] >= 0) & (out["mask_map"] <= 1)).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net.eval()(torch.rand(2, 3, 64, 64))
    assert set(out) == {"logits", "features"} and out["logits"].dtype == torch.float32
    assert net._mid is None  # nothing of the forward pass is kept on the module


def test_map_layer_must_exist_and_map_channels_follow_it() -> None:
    assert _net().map_head.depthwise.in_channels == 48  # test_resnet's layer2
    assert _net(map_layer="layer3").map_head.depthwise.in_channels == 192
    with pytest.raises(ConfigError, match="model.map_layer 'block7' is not a layer of the backbone"):
        _net(map_layer="block7")


def test_building_leaves_batchnorm_statistics_alone() -> None:
    net = _net()
    assert all(int(m.num_batches_tracked) == 0 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert net.training


def test_cosine_head_scales_its_cosines() -> None:
    net = _net(cls_head="cosine", cosine_scale=30.0).train()
    out = net(torch.rand(2, 3, 64, 64))
    assert out["cosine"].abs().max() <= 1.0
    torch.testing.assert_close(out["logits"], 30.0 * out["cosine"])
    with pytest.raises(ConfigError, match="model.cls_head"):
        _net(cls_head="arc")


# --------------------------------------------------------------------------- the detector's loss


def test_am_softmax_is_ce_of_scaled_cosines_with_the_margin_on_the_true_class() -> None:
    cos = torch.tensor([[0.2, 0.5], [0.9, -0.1]])
    target = torch.tensor([1, 0])
    got = am_softmax(cos, target, margin=0.45, scale=30.0)
    shifted = torch.tensor([[0.2, 0.05], [0.45, -0.1]])
    torch.testing.assert_close(got, F.cross_entropy(30 * shifted, target, reduction="none"))
    assert (got > F.cross_entropy(30 * cos, target, reduction="none")).all()  # the margin costs


def test_criterion_terms_are_the_published_weighted_sum_over_their_images() -> None:
    net = _net(drop_rate=0.0).train()  # BatchNorm on the batch, no dropout: the same forward twice
    batch = _batch()
    loss, logits, logs = models.build_criterion({"loss": {"name": "sladd", **WEIGHTS}})(net, batch)
    out = net(batch["image"])
    assert logits.shape == (6, 2)
    ce = F.cross_entropy(out["logits"], batch["target"], reduction="none")
    map_i = (out["mask_map"] - batch["map_target"]).square().mean((1, 2, 3))
    type_i = F.cross_entropy(out["type_logits"], batch["type_target"], reduction="none")
    mag_i = (out["mag"][2] - 0.4) ** 2
    torch.testing.assert_close(logs["map"], map_i[:4].mean())  # the training fakes' masks are unknown
    torch.testing.assert_close(logs["mag"], mag_i)  # only the copy fake has a ratio
    torch.testing.assert_close(logs["type"], type_i.mean())
    expected = ce.mean() + 0.1 * map_i[:4].mean() + 0.05 * type_i.mean() + 0.1 * mag_i
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    per_image = ce + 0.1 * map_i * batch["map_valid"] + 0.05 * type_i
    per_image[2] += 0.1 * mag_i
    torch.testing.assert_close(logs["sample_loss"], per_image.detach(), rtol=1e-5, atol=1e-6)


def test_a_switched_off_term_still_reaches_its_head_with_a_zero_gradient() -> None:
    net = _net().train()
    criterion = models.build_criterion({"loss": {"name": "sladd", **WEIGHTS, "type": 0.0}})
    loss, _, _ = criterion(net, _batch())
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())
    assert torch.count_nonzero(net.type_head.weight.grad) == 0
    assert torch.count_nonzero(net.mag_head.weight.grad) > 0 and torch.count_nonzero(net.map_head.pointwise.weight.grad)


def test_loss_settings_and_batches_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['typ'\]"):
        models.build_criterion({"loss": {"name": "sladd", "typ": 0.05}})
    with pytest.raises(ConfigError, match="loss.cls_loss must be one of"):
        models.build_criterion({"loss": {"name": "sladd", "cls_loss": "focal"}})
    am = models.build_criterion({"loss": {"name": "sladd", "cls_loss": "am_softmax"}})
    with pytest.raises(ConfigError, match="needs the cosine head"):
        am(_net().train(), _batch())
    loss, _, logs = am(_net(cls_head="cosine").train(), _batch())
    assert torch.isfinite(loss) and logs["cls"] > 0
    plain = {"image": torch.rand(2, 3, 32, 32), "target": torch.tensor([0, 1])}
    with pytest.raises(ConfigError, match="recipe: sladd"):
        models.build_criterion({"loss": {"name": "sladd"}})(_net().train(), plain)


# --------------------------------------------------------------------------- the policy


def _policy(region: torch.Tensor, blend: torch.Tensor, conc: torch.Tensor) -> dict:
    return {"region_logits": region, "blend_logits": blend, "mag_concentration": conc}


def test_actions_take_credit_only_for_the_choices_that_shaped_the_image() -> None:
    n = 4000
    torch.manual_seed(0)
    region = torch.randn(n, 10)
    blend = torch.randn(n, 4)
    conc = 0.5 + torch.rand(n, 2) * 3
    takes_mag = torch.tensor([False, False, True, False])  # copy only
    a = sample_actions(_policy(region, blend, conc), 0.1, takes_mag)
    assert ((a.mag >= 0.1) & (a.mag <= 1.0)).all() and set(a.blend.unique().tolist()) == {0, 1, 2, 3}
    log_region = torch.log_softmax(region, 1).gather(1, a.region[:, None])[:, 0]
    log_blend = torch.log_softmax(blend, 1).gather(1, a.blend[:, None])[:, 0]
    u = (a.mag - 0.1) / 0.9
    log_beta = torch.distributions.Beta(conc[:, 0], conc[:, 1]).log_prob(u)
    expected = log_blend + (a.blend != 3) * log_region + (a.blend == 2) * log_beta
    torch.testing.assert_close(a.log_prob, expected, rtol=1e-4, atol=1e-4)
    # The sampled frequencies follow the distributions.
    probs = torch.softmax(blend, 1).mean(0)
    freq = torch.bincount(a.blend, minlength=4) / n
    assert (freq - probs).abs().max() < 0.03


def _toy_steps(reward_fn, steps: int, baseline: float, entropy_weight: float, logits=None) -> torch.Tensor:
    """Adam on free region logits (one pair, blend fixed to alpha) for `steps` REINFORCE updates."""
    torch.manual_seed(0)
    region = torch.zeros(1, 10) if logits is None else logits.clone()
    region.requires_grad_(True)
    opt = torch.optim.Adam([region], lr=0.05)
    blend = torch.tensor([[20.0, 0.0, 0.0, 0.0]])  # alpha, almost surely
    for _ in range(steps):
        a = sample_actions(_policy(region, blend, torch.ones(1, 2)), 0.1, torch.zeros(4, dtype=torch.bool))
        loss = reinforce_loss(a.log_prob, a.entropy, reward_fn(a.region), baseline, entropy_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return region.detach()


def test_policy_gradient_moves_probability_towards_the_rewarded_region() -> None:
    rewarded = 3
    logits = _toy_steps(lambda r: (r == rewarded).float(), steps=300, baseline=0.1, entropy_weight=0.0)
    probs = torch.softmax(logits, 1)[0]
    assert probs[rewarded] > 0.5 and probs.argmax() == rewarded


def test_the_baseline_sets_the_sign_of_the_update() -> None:
    region = torch.zeros(1, 10, requires_grad=True)
    blend = torch.tensor([[20.0, 0.0, 0.0, 0.0]])
    torch.manual_seed(1)
    a = sample_actions(_policy(region, blend, torch.ones(1, 2)), 0.1, torch.zeros(4, dtype=torch.bool))
    chosen = int(a.region)

    def step(reward: float, baseline: float) -> float:
        region.grad = None
        loss = reinforce_loss(a.log_prob, a.entropy, torch.tensor([reward]), baseline, 0.0)
        loss.backward(retain_graph=True)
        moved = torch.softmax(region.detach() - 0.1 * region.grad, 1)[0, chosen]
        return float(moved - 0.1)

    assert step(reward=2.0, baseline=1.0) > 0  # better than usual: the choice gains probability
    assert step(reward=0.5, baseline=1.0) < 0  # worse than usual: it loses probability
    assert step(reward=1.0, baseline=1.0) == pytest.approx(0.0, abs=1e-7)  # as usual: nothing moves
    assert step(reward=2.0, baseline=0.0) > step(reward=2.0, baseline=1.5) > 0


def test_the_entropy_bonus_raises_entropy() -> None:
    peaked = torch.tensor([[4.0, 0, 0, 0, 0, 0, 0, 0, 0, -2.0]])

    def entropy(logits: torch.Tensor) -> float:
        return float(torch.distributions.Categorical(logits=logits).entropy())

    after = _toy_steps(lambda r: torch.zeros(1), steps=50, baseline=0.0, entropy_weight=1.0, logits=peaked)
    assert entropy(after) > entropy(peaked) + 0.3
    unchanged = _toy_steps(lambda r: torch.zeros(1), steps=50, baseline=0.0, entropy_weight=0.0, logits=peaked)
    assert entropy(unchanged) == pytest.approx(entropy(peaked))


# --------------------------------------------------------------------------- the synthesizer


def _synth_settings(**kw) -> SynthSettings:
    cfg = yaml.safe_load(Path("configs/members/sladd_demo.yaml").read_text())
    return SynthSettings.from_cfg({"synthesizer": {**cfg["synthesizer"], **kw}})


def test_the_synthesizer_starts_as_the_uniform_policy() -> None:
    torch.manual_seed(0)
    net = build_synthesizer(_synth_settings())
    assert net.backbone.conv1[0].in_channels == 6
    out = net(torch.randn(3, 6, 64, 64))
    torch.testing.assert_close(torch.softmax(out["region_logits"], 1), torch.full((3, 10), 0.1))
    torch.testing.assert_close(torch.softmax(out["blend_logits"], 1), torch.full((3, 4), 0.25))
    torch.testing.assert_close(out["mag_concentration"], torch.ones(3, 2))  # Beta(1, 1): uniform


def test_widened_first_convolution_keeps_the_pretrained_filters() -> None:
    import timm

    torch.manual_seed(0)
    net = timm.create_model(BACKBONE, pretrained=False, num_classes=0)
    before = net.conv1[0].weight.detach().clone()
    x = torch.randn(2, 3, 32, 32)
    expected = net(x)
    widen_input(net, 6)
    assert net.conv1[0].weight.shape[1] == 6
    torch.testing.assert_close(net.conv1[0].weight[:, :3] * 2, before)  # repeated and rescaled by 3/6
    # The same picture on both halves of the pair gives the 3-channel network's output.
    torch.testing.assert_close(net(torch.cat([x, x], 1)), expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- the shipped configs


@pytest.mark.parametrize("member", ["sladd", "sladd_demo"])
def test_shipped_configs_build(member: str) -> None:
    cfg = load_config(["configs/data.yaml", f"configs/members/{member}.yaml"])
    assert TrainSettings.from_cfg(cfg["train"]).optimizer == "adam"
    forge, recipe, synth = ForgeSettings.from_cfg(cfg), RecipeSettings.from_cfg(cfg), SynthSettings.from_cfg(cfg)
    assert forge.map_size == cfg["model"]["map_size"] == 16 and recipe.name == "sladd" and synth.mode == "learned"
    assert (cfg["loss"]["cls"], cfg["loss"]["map"], cfg["loss"]["type"], cfg["loss"]["mag"]) == (1.0, 0.1, 0.05, 0.1)
    assert cfg["synthesizer"]["entropy_weight"] == 1e-5 and cfg["model"]["cosine_scale"] == cfg["loss"]["am_scale"]
    net = models.build_model(cfg["model"], pretrained=False).train()
    size = 64 if member == "sladd" else cfg["data"]["image_size"]
    batch = {**_batch(), "image": torch.rand(6, 3, size, size)}
    loss, _, logs = models.build_criterion(cfg)(net, batch)
    assert torch.isfinite(loss) and set(logs) == {*WEIGHTS, "loss", "sample_loss"}
    if member == "sladd":
        assert cfg["model"]["backbone"] == cfg["synthesizer"]["backbone"] == "legacy_xception"
        assert net(torch.rand(1, 3, 256, 256))["mask_map"].shape == (1, 1, 16, 16)
        assert net._mid is None and net.map_head.depthwise.in_channels == 728  # block7, the middle flow


@pytest.mark.parametrize("member", ["sladd", "sladd_demo"])
def test_every_sladd_setting_has_its_reason(member: str) -> None:
    """Every key of the member's sections is in the yaml with a comment (no constant without a reason)."""
    text = Path(f"configs/members/{member}.yaml").read_text().splitlines()
    lines = [ln for ln in text if ln.startswith("  ") and ":" in ln]
    uncommented = [ln for ln in lines if "#" not in ln and not ln.rstrip().endswith(":")]
    assert not uncommented, f"settings without a reason: {uncommented}"
    cfg = yaml.safe_load("\n".join(text))
    assert set(cfg) == {"name", "model", "loss", "synthesizer", "forge", "recipe", "data", "train", "predict", "device"}
