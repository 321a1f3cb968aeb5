"""infer.py's CPU path: the network exported to ONNX Runtime, cached beside its weights, and
only ever used where it gives PyTorch's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

import infer
from core.checkpoint import save_weights
from models import build_model, onnx_export
from models.onnx_export import OnnxNetwork, onnx_network

SIZE = 40


def _example(size: int = SIZE) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def expert() -> nn.Module:
    torch.manual_seed(0)
    return build_model({"name": "mff_expert", "backbone": "test_resnet.r160_in1k", "pretrained": False}).eval()


@pytest.fixture
def weights(tmp_path: Path, expert: nn.Module) -> Path:
    return save_weights(expert.state_dict(), tmp_path / "fold0" / "model.safetensors")


def _exports(monkeypatch) -> list[int]:
    """Count the exports that follow (the real export still runs)."""
    calls: list[int] = []
    real = onnx_export.export_onnx

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(onnx_export, "export_onnx", counting)
    return calls


def test_exported_expert_gives_the_same_outputs_at_any_batch_size(expert, weights):
    network = onnx_network(expert, _example(), weights)
    assert isinstance(network, OnnxNetwork)
    for batch in (1, 3):
        x = torch.randn(batch, 3, SIZE, SIZE)
        with torch.inference_mode():
            expected, got = expert(x), network(x)
        assert set(got) == {"logits", "features"}
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5)


def test_the_export_is_cached_beside_the_weights_and_redone_when_they_change(expert, weights, monkeypatch):
    exports = _exports(monkeypatch)
    onnx_network(expert, _example(), weights)
    cache = weights.with_suffix(".onnx")
    assert cache.is_file() and len(exports) == 1
    onnx_network(expert, _example(), weights)
    assert len(exports) == 1  # read from the cache
    onnx_network(expert, _example(SIZE + 8), weights)
    assert len(exports) == 2  # another input size is another key

    changed = build_model({"name": "mff_expert", "backbone": "test_resnet.r160_in1k", "pretrained": False}).eval()
    save_weights(changed.state_dict(), weights)
    network = onnx_network(changed, _example(), weights)
    assert len(exports) == 3
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.inference_mode():
        torch.testing.assert_close(network(x)["logits"], changed(x)["logits"], rtol=1e-4, atol=1e-5)
    assert not list(weights.parent.glob(".*.tmp"))  # written atomically


def test_a_corrupt_cache_is_exported_again(expert, weights, capsys, monkeypatch):
    weights.with_suffix(".onnx").write_bytes(b"not an onnx model")
    exports = _exports(monkeypatch)
    assert isinstance(onnx_network(expert, _example(), weights), OnnxNetwork)
    assert len(exports) == 1
    err = capsys.readouterr().err
    assert f"{weights.with_suffix('.onnx')}: unreadable cached export" in err


def test_an_unwritable_folder_still_scores_with_the_export(expert, weights, capsys, monkeypatch):
    def refuse(path, writer):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(onnx_export, "write_with", refuse)
    assert isinstance(onnx_network(expert, _example(), weights), OnnxNetwork)
    assert "cannot cache the export" in capsys.readouterr().err
    assert not weights.with_suffix(".onnx").exists()


class _Noisy(nn.Module):
    """Random numbers in the forward pass: ONNX Runtime draws other ones than PyTorch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        y = self.conv(images).mean(dim=(2, 3))
        return y + torch.rand_like(y)


def test_an_export_that_disagrees_with_pytorch_is_not_used(capsys):
    model = _Noisy().eval()
    assert onnx_network(model, _example(16)) is model
    assert "gives different outputs" in capsys.readouterr().err


def test_an_export_that_fails_falls_back_to_pytorch(expert, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("no ONNX form for aten::made_up\nmore detail")

    monkeypatch.setattr(onnx_export, "export_onnx", fail)
    assert onnx_network(expert, _example()) is expert
    assert "ONNX export of MFFExpert failed (no ONNX form for aten::made_up)" in capsys.readouterr().err


def test_prepare_network_falls_back_to_the_folded_pytorch_network(expert, monkeypatch):
    monkeypatch.setattr(infer, "onnx_network", lambda model, example, weights: model)
    network = infer.prepare_network(expert, SIZE, torch.device("cpu"), "onnx")
    assert not isinstance(network, OnnxNetwork)
    assert network.backbone.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_runtime_follows_the_device():
    assert infer.pick_runtime("auto", torch.device("cpu")) == "onnx"
    assert infer.pick_runtime("auto", torch.device("cuda")) == "torch"
    assert infer.pick_runtime("torch", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="CPU only"):
        infer.pick_runtime("onnx", torch.device("cuda"))


def test_infer_scores_alike_with_either_runtime(expert, weights, tmp_path, capsys):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.effect_noise((60 + 10 * i, 50), 40 + 20 * i).convert("RGB").save(images / f"{i}.png")
    model_cfg = {"name": "mff_expert", "backbone": "test_resnet.r160_in1k"}
    meta = {"config": {"name": "m", "model": model_cfg, "data": {"image_size": SIZE}}}
    (weights.parent / "meta.json").write_text(json.dumps(meta))
    scores = {}
    for runtime in ("onnx", "torch"):
        out = tmp_path / f"{runtime}.csv"
        args = [str(images), "--weights", str(weights), "--runtime", runtime, "--device", "cpu", "--out", str(out)]
        assert infer.main(args) == 0
        scores[runtime] = pd.read_csv(out)["y_pred"].tolist()
    assert len(scores["onnx"]) == 3
    assert scores["onnx"] == pytest.approx(scores["torch"], abs=1e-5)
    assert weights.with_suffix(".onnx").is_file()
