"""The sbi_fed network and losses, on timm's tiny test_efficientnet with random weights."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import models
from core.config import ConfigError, load_config
from models.sbi_fed import distill_loss, pair_discrepancy, recon_loss, residual_ce

BACKBONE = "test_efficientnet.r160_in1k"
WEIGHTS = {"ce": 1.0, "distill": 0.4, "recon": 0.01, "artifact_ce": 0.5, "residual_ce": 0.25}


def _net(guidance: bool = True, embedding_dim: int = 16, head: str = "sbi") -> torch.nn.Module:
    torch.manual_seed(0)
    return models.build_model(
        {
            "name": "sbi_fed",
            "backbone": BACKBONE,
            "guidance": guidance,
            "identity_dim": 8,
            "embedding_dim": embedding_dim,
            "head": head,
        }
    )


def _batch(pairs: int = 3, dim: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    real_emb = torch.randn(pairs, dim, generator=g)
    return {
        "image": torch.rand(2 * pairs, 3, 32, 32, generator=g),
        "target": torch.tensor([0] * pairs + [1] * pairs),
        "guided": torch.ones(2 * pairs, dtype=torch.bool),
        "embedding": torch.cat([real_emb, real_emb + 0.3 * torch.randn(pairs, dim, generator=g)]),
    }


def test_inference_path_is_the_published_network_and_returns_fp32_logits() -> None:
    """EfficientNet's own head (conv to the feature width, BatchNorm, pooling), then dropout
    and FC(2) and nothing else: SBI's released weights must map key by key."""
    net = _net().eval()
    dropout, fc = list(net.head)
    assert isinstance(dropout, torch.nn.Dropout) and isinstance(fc, torch.nn.Linear)
    assert (fc.in_features, fc.out_features) == (net.backbone.num_features, 2)
    assert isinstance(net.backbone.bn2, torch.nn.BatchNorm2d)  # the BatchNorm after the head convolution
    assert net.backbone.bn2.num_features == net.backbone.num_features
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.rand(2, 3, 32, 32))
    assert set(out) == {"logits", "features"}  # nothing training-only at inference
    assert out["logits"].dtype == torch.float32 and out["logits"].shape == (2, 2)
    assert out["features"].shape == (2, net.backbone.num_features)


def test_training_outputs_and_published_network_without_guidance() -> None:
    out = _net().train()(torch.rand(4, 3, 32, 32))
    width = out["features"].shape[1]
    assert out["artifact"].shape == (4, width) and out["reconstruction"].shape == (4, 16)
    assert out["discrepancy"].shape == out["residual_score"].shape == (4,)
    assert out["artifact_logits"].shape == (4, 2)
    plain = _net(guidance=False).train()
    assert set(plain(torch.rand(4, 3, 32, 32))) == {"logits", "features"}
    guided_only = {n.split(".")[0] for n, _ in _net().named_parameters()} - {
        n.split(".")[0] for n, _ in plain.named_parameters()
    }
    assert guided_only == {"project", "discrepancy", "artifact_head", "residual_head", "reconstruct"}


def test_pair_discrepancy_is_zero_for_reals_and_one_minus_cosine_for_fakes() -> None:
    real = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    fake = torch.tensor([[1.0, 1.0], [0.0, 5.0]])
    d = pair_discrepancy(torch.cat([real, fake]))
    torch.testing.assert_close(d, torch.tensor([0.0, 0.0, 1 - 1 / math.sqrt(2), 0.0]))


def test_distill_loss_formula_and_guided_mask() -> None:
    predicted = torch.tensor([0.0, 1.0, 2.0, 3.0])
    d = torch.tensor([0.0, 0.0, 0.02, 0.04])
    guided = torch.tensor([True, True, True, False])
    # targets d / 0.02 = [0, 0, 1, 2]; the unguided image is left out
    torch.testing.assert_close(distill_loss(predicted, d, guided, 0.02), torch.tensor((0 + 1 + 1) / 3))
    assert distill_loss(d / 0.02, d, torch.ones(4, dtype=torch.bool), 0.02) == 0
    none = distill_loss(predicted.requires_grad_(), d, torch.zeros(4, dtype=torch.bool), 0.02)
    none.backward()
    assert none == 0 and torch.equal(predicted.grad, torch.zeros(4))  # in the graph, no push


def test_recon_loss_is_one_minus_cosine() -> None:
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    guided = torch.ones(2, dtype=torch.bool)
    assert recon_loss(3 * emb, emb, guided) == 0  # scale-free
    torch.testing.assert_close(recon_loss(torch.tensor([[0.0, 1.0], [0.0, 1.0]]), emb, guided), torch.tensor(0.5))


def test_residual_ce_ranks_each_fake_above_its_own_real() -> None:
    assert residual_ce(torch.zeros(4)) == pytest.approx(math.log(2))
    right = residual_ce(torch.tensor([0.0, 0.0, 5.0, 5.0]))
    wrong = residual_ce(torch.tensor([5.0, 5.0, 0.0, 0.0]))
    assert right < 0.01 < 3 < wrong
    # pairs are (i, i + B): a fake scored above another pair's real but below its own still costs
    crossed = residual_ce(torch.tensor([0.0, 4.0, 3.0, 5.0]))
    assert crossed == pytest.approx((F.softplus(torch.tensor(-3.0)) + F.softplus(torch.tensor(-1.0))) / 2)


def test_criterion_is_the_weighted_sum_and_every_head_takes_part() -> None:
    net = _net().train()
    criterion = models.build_criterion({"loss": {"name": "sbi_fed", **WEIGHTS, "recon": 0.0}})
    loss, logits, logs = criterion(net, _batch())
    assert set(logs) == set(WEIGHTS) and logits.shape == (6, 2)
    expected = sum(w * logs[k] for k, w in WEIGHTS.items() if k != "recon")
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    # recon at weight 0 still reaches its head (DDP needs every parameter used), with a zero gradient
    assert all(p.grad is not None for p in net.parameters())
    assert all(torch.count_nonzero(p.grad) == 0 for p in net.reconstruct.parameters())
    assert torch.count_nonzero(net.discrepancy.weight.grad) > 0


def test_guidance_reaches_the_backbone_through_the_projection() -> None:
    net = _net().train()
    criterion = models.build_criterion(
        {"loss": {"name": "sbi_fed", "ce": 0.0, "distill": 1.0, "recon": 0.0, "artifact_ce": 0.0, "residual_ce": 0.0}}
    )
    loss, _, _ = criterion(net, _batch())
    loss.backward()
    assert torch.count_nonzero(net.backbone.conv_stem.weight.grad) > 0
    assert torch.count_nonzero(net.head[1].weight.grad) == 0


def test_guidance_off_trains_ce_alone_and_says_so(capsys: pytest.CaptureFixture) -> None:
    criterion = models.build_criterion({"loss": {"name": "sbi_fed", **WEIGHTS}})
    loss, _, logs = criterion(_net(guidance=False).train(), _batch())
    assert set(logs) == {"ce"} and torch.equal(loss.detach(), logs["ce"])
    assert "no guidance heads" in capsys.readouterr().err


def test_unguided_images_leave_distill_and_recon() -> None:
    net = _net().train()
    criterion = models.build_criterion({"loss": {"name": "sbi_fed", **WEIGHTS}})
    batch = _batch()
    batch["guided"][[2, 5]] = False  # pair 2: a real and a fake without embeddings
    _, _, logs = criterion(net, batch)
    batch["embedding"][[2, 5]] = torch.randn(2, 16) * 100
    _, _, changed = criterion(net, batch)
    torch.testing.assert_close(logs["distill"], changed["distill"])
    torch.testing.assert_close(logs["recon"], changed["recon"])
    batch["guided"][:] = True
    _, _, used = criterion(net, batch)
    assert used["distill"] != logs["distill"] and used["recon"] != logs["recon"]


def test_embedding_size_must_match_the_reconstruction() -> None:
    criterion = models.build_criterion({"loss": {"name": "sbi_fed", **WEIGHTS}})
    with pytest.raises(ConfigError, match="12-d embeddings but model.embedding_dim is 16"):
        criterion(_net().train(), _batch(dim=12))


def test_torch_embedder_runs_on_the_face_crops(tmp_path: Path) -> None:
    torch.manual_seed(0)
    embedder = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 16)
    )
    batch_dim = torch.export.Dim("batch", min=1)
    program = torch.export.export(embedder, (torch.zeros(2, 3, 24, 24),), dynamic_shapes=({0: batch_dim},))
    path = tmp_path / "embedder.pt2"
    torch.export.save(program, path)
    spec = {"kind": "torch", "file": str(path), "size": 24, "mean": [0.5] * 3, "std": [0.25] * 3}
    criterion = models.build_criterion({"loss": {"name": "sbi_fed", **WEIGHTS, "embedder": spec}})
    batch = _batch()
    del batch["embedding"]
    batch["face"] = torch.randint(0, 256, (6, 3, 24, 24), dtype=torch.uint8)
    _, _, logs = criterion(_net().train(), batch)
    expected = embedder((batch["face"].float() / 255 - 0.5) / 0.25).detach()
    reference = dict(_batch())
    reference["embedding"] = expected
    _, _, direct = criterion(_net().train(), reference)
    torch.testing.assert_close(logs["distill"], direct["distill"])
    torch.testing.assert_close(logs["recon"], direct["recon"])
    (tmp_path / "bad.pt2").write_bytes(b"not an archive")
    with pytest.raises(ConfigError, match="bad.pt2: cannot load the face embedder"):
        models.build_criterion({"loss": {"name": "sbi_fed", "embedder": {**spec, "file": str(tmp_path / "bad.pt2")}}})


def test_loss_add_puts_nce_and_kl_on_the_guided_criterion() -> None:
    net = _net().train()
    cfg = {"name": "sbi_fed", **WEIGHTS, "add": {"nce": 0.1, "kl": 1.0, "noise_scale": 0.05}}
    loss, logits, logs = models.build_criterion({"loss": cfg})(net, _batch())
    assert set(logs) == {*WEIGHTS, "nce", "kl"} and logits.shape == (6, 2)
    expected = sum(w * logs[k] for k, w in WEIGHTS.items()) + 0.1 * logs["nce"] + 1.0 * logs["kl"]
    torch.testing.assert_close(loss.detach(), expected)
    assert logs["kl"] > 0 and logs["nce"] > 0


@pytest.mark.parametrize("member", ["sbi_fed", "sbi_fed_demo"])
def test_shipped_configs_build(member: str) -> None:
    from core.config import load_config
    from core.train.trainer import TrainSettings
    from data_prep.sbi_online import EmbedderSpec, sbi_config

    cfg = load_config(["configs/data.yaml", f"configs/members/{member}.yaml"])
    assert sbi_config(cfg).output_size == cfg["data"]["image_size"]
    assert EmbedderSpec.from_cfg(cfg["loss"]["embedder"]).kind == "dlib"
    assert TrainSettings.from_cfg(cfg["train"]).epochs > 0
    assert cfg["recipe"]["name"] == "sbi" and cfg["data"]["mean"] == [0.0, 0.0, 0.0]
    net = models.build_model(cfg["model"], pretrained=False).train()
    size = 64 if member == "sbi_fed" else cfg["data"]["image_size"]
    batch = {**_batch(2, dim=cfg["model"]["embedding_dim"]), "image": torch.rand(4, 3, size, size)}
    loss, _, logs = models.build_criterion(cfg)(net, batch)
    assert torch.isfinite(loss) and set(logs) == set(WEIGHTS)


def test_every_guidance_output_is_fp32_under_autocast() -> None:
    """residual_ce subtracts two scores of nearly equal value: in bf16 the difference is noise."""
    net = _net().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.rand(4, 3, 32, 32))
    assert {k: v.dtype for k, v in out.items() if k != "features"} == {k: torch.float32 for k in out if k != "features"}


@pytest.mark.parametrize("term", ["distill", "recon", "artifact_ce", "residual_ce"])
def test_each_guidance_term_trains_its_head_and_the_backbone(term: str) -> None:
    """Fails when a guidance head reads detached features: the term would then leave the backbone
    untouched."""
    net = _net().train()
    weights = {k: float(k == term) for k in WEIGHTS}
    criterion = models.build_criterion({"loss": {"name": "sbi_fed", **weights}})
    loss, _, _ = criterion(net, _batch())
    loss.backward()
    head = {"distill": net.discrepancy, "recon": net.reconstruct, "artifact_ce": net.artifact_head}
    head["residual_ce"] = net.residual_head
    assert all(torch.count_nonzero(p.grad) > 0 for p in head[term].parameters())
    assert torch.count_nonzero(net.project.weight.grad) > 0
    assert torch.count_nonzero(net.backbone.conv_stem.weight.grad) > 0


def test_the_backbone_trains_with_efficientnet_pytorchs_drop_connect_and_batchnorm_momentum() -> None:
    """sbi_fed.yaml's B4 against efficientnet_pytorch's (which SBI trains): drop-connect rising
    linearly to 0.2 over the blocks, BatchNorm momentum 1 - 0.99 in PyTorch's convention."""
    from efficientnet_pytorch import EfficientNet

    reference = EfficientNet.from_name("efficientnet-b4", num_classes=2)
    n = len(reference._blocks)
    rate = reference._global_params.drop_connect_rate
    model_cfg = load_config(["configs/members/sbi_fed.yaml"])["model"]
    net = models.build_model(model_cfg, pretrained=False)
    blocks = [b for stage in net.backbone.blocks for b in stage]
    assert len(blocks) == n
    for i, block in enumerate(blocks):
        expected = rate * i / n
        assert getattr(block.drop_path, "drop_prob", 0.0) == pytest.approx(expected)
    ours = {m.momentum for m in net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    theirs = {m.momentum for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert len(ours) == len(theirs) == 1 and ours.pop() == pytest.approx(theirs.pop())


def test_the_head_is_sbis_or_the_extensions() -> None:
    assert [type(m) for m in _net(head="bn_fc").head] == [torch.nn.BatchNorm1d, torch.nn.Linear]
    with pytest.raises(ConfigError, match="model.head"):
        _net(head="mlp")
