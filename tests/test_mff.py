"""The `mff` expert against the winning solution's published network (its `network.py`): a timm
classifier created with `num_classes=2` and timm's default dropout, whose contrastive feature is
the pooled feature map (for ConvNeXt, `head.global_pool`'s output, before `head.norm`)."""

from __future__ import annotations

import pytest
import timm
import torch

import models
from core.config import load_config
from models.published import timm_to_member


def published_expert(arch: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The released expert's forward: (logits, feat)."""
    torch.manual_seed(0)
    net = timm.create_model(arch, pretrained=False, num_classes=2).train()
    fmap = net.forward_features(x)
    if hasattr(net, "head"):  # MFF_Expert_Convnext
        return net.head(fmap), net.head.global_pool(fmap)[:, :, 0, 0]
    feat = net.global_pool(fmap)  # MFF_Expert_EffB*: timm's dropout (its default rate 0) before the feature
    return net.classifier(feat), feat


def member_expert(arch: str) -> torch.nn.Module:
    """`mff.yaml`'s expert network on `arch`, holding the published expert's weights (seed 0)."""
    torch.manual_seed(0)
    published = timm.create_model(arch, pretrained=False, num_classes=2)
    model_cfg = {**load_config(["configs/members/mff.yaml"])["model"], "backbone": arch}
    network = models.build_model(model_cfg, pretrained=False)
    keys = timm_to_member(list(published.state_dict()), network, arch)
    network.load_state_dict({keys[k]: v for k, v in published.state_dict().items()}, strict=True)
    return network.train()


@pytest.mark.parametrize("arch", ["test_convnext", "test_efficientnet"])
def test_the_configured_expert_is_the_published_one_in_training_too(arch):
    """Training mode: any dropout the config adds in front of the classifier moves the logits."""
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    logits, feat = published_expert(arch, x)
    out = member_expert(arch)(x)
    assert torch.allclose(out["logits"], logits, atol=1e-5)
    assert torch.allclose(out["features"], feat, atol=1e-5)


def test_the_convnext_feature_is_taken_before_the_head_norm():
    net = member_expert("test_convnext")
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    normed = net.backbone(x)  # the headless timm model's output: pooled, then head.norm
    assert not torch.allclose(net(x)["features"], normed, atol=1e-3)


def test_the_expert_config_adds_no_dropout():
    assert load_config(["configs/members/mff.yaml"])["model"]["drop_rate"] == 0.0
