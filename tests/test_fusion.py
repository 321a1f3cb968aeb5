"""BatchNorm folding keeps a network's outputs and refuses what it cannot fold exactly."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from models.fusion import fold_batchnorm
from models.scoring import prepare_network


def _randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, as a trained network has."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
    return model.eval()


def _norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("arch", ["test_resnet.r160_in1k", "test_efficientnet.r160_in1k"])
def test_folding_removes_every_norm_and_keeps_outputs(arch):
    torch.manual_seed(0)
    model = _randomise_norms(timm.create_model(arch, num_classes=2))
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        expected = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    folded = fold_batchnorm(model, x[:1])

    assert folded is not model and _norms(model) > 0 and _norms(folded) == 0
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-5)
    # the network it was given is left as it was
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class _SharedConvOutput(nn.Module):
    """The conv output feeds the norm and the residual sum: folding it would change the sum."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_a_conv_output_used_elsewhere_is_not_folded(capsys):
    model = _randomise_norms(_SharedConvOutput())
    assert fold_batchnorm(model, torch.randn(1, 3, 16, 16)) is model
    assert "changed the outputs of _SharedConvOutput" in capsys.readouterr().err


def test_training_mode_is_refused():
    model = timm.create_model("test_resnet.r160_in1k", num_classes=2).train()
    with pytest.raises(ValueError, match="eval-mode"):
        fold_batchnorm(model, torch.randn(1, 3, 32, 32))


def test_prepare_network_is_what_infer_scores_with():
    torch.manual_seed(0)
    model = _randomise_norms(timm.create_model("test_efficientnet.r160_in1k", num_classes=2))
    x = torch.randn(2, 3, 48, 48)
    with torch.inference_mode():
        expected = model(x)
    net = prepare_network(model, 48, torch.device("cpu"), "torch")
    assert not net.training and _norms(net) == 0
    assert net.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.testing.assert_close(net(x.contiguous(memory_format=torch.channels_last)), expected, rtol=1e-4, atol=1e-5)
