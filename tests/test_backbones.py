"""Pretrained weights from a local file: loaded loudly, never half-loaded in silence."""

from pathlib import Path

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
    err = capfd.readouterr().err
    assert "loaded 86/86 tensors of the backbone from" in err
    assert f"timm test_efficientnet from {path} (sha256 " in err and "hub" not in err


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
    with pytest.raises(CheckpointError, match="model.weights=<path>.*python -m models.fetch_pretrained"):
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


# --------------------------------------------------------------------------- formats users download


def randomized(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every tensor random (BatchNorm statistics included), so a wrongly placed one shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) * 0.2 + (0.9 if t.ndim == 1 else -0.1))
    return net.eval()


def hub_cache(root, repo: str, filename: str, state: dict, commit: str = "c0ffee" * 6 + "cafe") -> str:
    """A Hugging Face cache holding one file of `repo` at `commit`, as `hf_hub_download` leaves it."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_weights(state, snapshot / filename)
    return commit


def test_a_timm_hub_name_loads_from_the_local_hub_cache_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from models.provenance import recording

    trained = randomized(timm.create_model("test_resnet.r160_in1k"), seed=1)
    commit = hub_cache(tmp_path, "timm/test_resnet.r160_in1k", "model.safetensors", trained.state_dict())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    sources = []
    with recording("model", sources):
        model = models.build_model({"name": "mff_expert", "backbone": "test_resnet.r160_in1k", "pretrained": True})
    head = {"fc.weight", "fc.bias"}
    own = model.backbone.state_dict()
    assert all(torch.equal(own[k], v) for k, v in trained.state_dict().items() if k not in head)
    (source,) = sources
    assert (source.origin, source.revision) == ("hub", commit)
    assert source.location == "timm/test_resnet.r160_in1k/model.safetensors"


def pretrainedmodels_xception(path, seed: int = 0) -> torch.nn.Module:
    """`xception-b5690688.pth` as pretrainedmodels publishes it: timm's legacy_xception names (its
    port of the same network) with the classifier as `fc`, but every pointwise convolution a 2-D
    matrix and no BatchNorm batch counters (saved before PyTorch 0.4). Returns the network it holds."""
    reference = randomized(timm.create_model("legacy_xception", num_classes=1000), seed)
    state = {
        k: v[:, :, 0, 0] if "pointwise" in k else v
        for k, v in reference.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    assert sum(v.ndim == 2 for k, v in state.items() if "pointwise" in k) == 34
    torch.save(state, path)
    return reference


@pytest.mark.slow
def test_pretrainedmodels_xception_loads_into_sladd_detector_and_synthesizer(tmp_path):
    import yaml

    from models.provenance import recording
    from models.sladd import SynthSettings, build_synthesizer

    path = tmp_path / "xception-b5690688.pth"
    reference = pretrainedmodels_xception(path)
    sources = []
    with recording("model", sources):
        detector = models.build_model(
            {"name": "sladd", "backbone": "legacy_xception", "map_layer": "block7", "weights": str(path)}
        ).eval()
    own = detector.backbone.state_dict()
    expected = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert own.keys() == expected.keys()
    assert all(torch.equal(own[k], v) for k, v in expected.items() if not k.endswith("num_batches_tracked"))
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(detector.backbone(x), reference.forward_head(reference.forward_features(x), True))
    assert "34 2-D pointwise weights" in sources[0].layout

    section = yaml.safe_load(Path("configs/members/sladd.yaml").read_text())["synthesizer"]
    synth = build_synthesizer(SynthSettings.from_cfg({"synthesizer": {**section, "weights": str(path)}}))
    assert synth.backbone.conv1.in_channels == 6  # widened after the load
    assert torch.equal(synth.backbone.block7.rep[1].pointwise.weight, reference.block7.rep[1].pointwise.weight)


def test_two_d_pointwise_weights_load_as_1x1_convolutions(donor, tmp_path):
    """pretrainedmodels' layout on a tiny network: every 1x1 convolution stored as a 2-D matrix."""
    net, _ = donor
    state = {k: v[:, :, 0, 0] if v.ndim == 4 and v.shape[2:] == (1, 1) else v for k, v in net.state_dict().items()}
    assert sum(v.ndim == 2 for v in state.values()) > 10
    model = build(save_weights(state, tmp_path / "pointwise_2d.safetensors"))
    own = model.backbone.state_dict()
    assert all(torch.equal(own[k], v) for k, v in net.state_dict().items() if k in own)


def test_a_partial_load_is_refused_even_with_allow_mismatch(donor, tmp_path):
    """A file that would leave more than a handful of tensors random (as xception-b5690688.pth
    did before its layout was converted: 34 pointwise convolutions mis-shaped) is an error naming
    them, whatever allow_mismatch says."""
    net, _ = donor
    state = {k: v.flatten() if "conv_pw" in k and v.ndim == 4 else v for k, v in net.state_dict().items()}
    bad = save_weights(state, tmp_path / "mostly_mismatched.safetensors")
    pattern = r"would leave \d+ tensors of the backbone at random initialisation, e.g. \['blocks"
    with pytest.raises(CheckpointError, match=pattern):
        build(bad, allow_mismatch=True)


def test_efficientnet_pytorch_advprop_file_loads_into_sbi_fed(tmp_path):
    """SBI starts from efficientnet_pytorch's advprop weights (`adv-efficientnet-b4-44fb3a87.pth`, a
    plain state dict with its 1000-class `_fc`); the same layout at B0 loads into timm's
    tf_efficientnet_b0.ap_in1k and gives efficientnet_pytorch's pooled features."""
    from efficientnet_pytorch import EfficientNet

    reference = randomized(EfficientNet.from_name("efficientnet-b0", image_size=64), seed=2)
    path = tmp_path / "adv-efficientnet-b0-b64d5a18.pth"
    torch.save(reference.state_dict(), path)
    net = models.build_model(
        {"name": "sbi_fed", "backbone": "tf_efficientnet_b0.ap_in1k", "weights": str(path), "guidance": False}
    ).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference.extract_features(x).mean((2, 3))
        assert (net.backbone(x) - expected).abs().max().item() < 1e-4
