"""Pretrained weights from a local file: loaded loudly, never half-loaded in silence."""

import pytest
import timm
import torch

import models
from core.checkpoint import CheckpointError, save_weights


@pytest.fixture
def donor(tmp_path):
    """A timm checkpoint as users have them: with its classifier and a wrapper prefix."""
    net = timm.create_model("test_efficientnet", num_classes=10)
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    return net, save_weights(state, tmp_path / "donor.safetensors")


def build(path, **kw):
    return models.build_model({"name": "mff_expert", "backbone": "test_efficientnet", "weights": str(path), **kw})


def test_local_weights_load_and_are_logged(donor, capfd):
    net, path = donor
    model = build(path)
    assert torch.equal(model.backbone.conv_stem.weight, net.conv_stem.weight)
    assert "loaded 86/86 backbone tensors from" in capfd.readouterr().err


def test_shape_mismatch_fails_unless_allowed(donor, tmp_path):
    net, _ = donor
    state = dict(net.state_dict())
    state["conv_stem.weight"] = torch.zeros(1, 1, 1, 1)
    bad = save_weights(state, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="bad.safetensors: does not fit the backbone .*shape mismatch"):
        build(bad)
    model = build(bad, allow_mismatch=True)  # loads the rest, logs the skipped key
    assert torch.equal(model.backbone.bn1.weight, net.bn1.weight)


def test_missing_keys_fail(donor, tmp_path):
    net, _ = donor
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("blocks.0")}
    with pytest.raises(CheckpointError, match="missing"):
        build(save_weights(state, tmp_path / "partial.safetensors"))


def test_offline_hub_download_says_what_to_do(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(timm, "create_model", no_network)
    with pytest.raises(RuntimeError, match="model.weights=<path>"):
        models.build_model({"name": "mff_expert", "backbone": "tf_efficientnet_b4", "pretrained": True})


def test_convnextv2_local_file_keeps_its_final_norm(tmp_path):
    """timm keeps `head.norm` with num_classes=0: a local ConvNeXtV2 file must load it, not drop it."""
    trained = timm.create_model("convnextv2_atto", num_classes=1000)
    with torch.no_grad():
        trained.head.norm.weight.uniform_(0.5, 1.5)
        trained.head.norm.bias.uniform_(-0.5, 0.5)
    path = save_weights(trained.state_dict(), tmp_path / "convnextv2_atto.safetensors")
    model = models.build_model({"name": "mff_expert", "backbone": "convnextv2_atto", "weights": str(path)})
    assert torch.equal(model.backbone.head.norm.weight, trained.head.norm.weight)
    assert torch.equal(model.backbone.head.norm.bias, trained.head.norm.bias)
    images = torch.randn(2, 3, 64, 64)
    trained.eval(), model.eval()
    with torch.no_grad():
        assert torch.allclose(
            model.backbone(images), trained.forward_head(trained.forward_features(images), pre_logits=True)
        )


def test_a_missing_final_norm_is_refused(tmp_path):
    trained = timm.create_model("convnextv2_atto", num_classes=0)
    state = {k: v for k, v in trained.state_dict().items() if not k.startswith("head.norm")}
    with pytest.raises(CheckpointError, match="missing: 2 e.g. \\['head.norm.weight'"):
        models.build_model(
            {
                "name": "mff_expert",
                "backbone": "convnextv2_atto",
                "weights": str(save_weights(state, tmp_path / "c.st")),
            }
        )
