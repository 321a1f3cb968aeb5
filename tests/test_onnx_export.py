"""infer.py's CPU path: the network exported to ONNX Runtime once, checked against PyTorch
then, cached beside its weights with the verdict, and only ever used where it gave PyTorch's
outputs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import infer
from core.checkpoint import save_weights
from core.infer import onnx_cache
from core.infer.onnx_cache import OrtNetwork, lookup, tag_path
from models import build_model, onnx_export
from models.onnx_export import onnx_network
from models.scoring import prepare_network

SIZE = 40


@pytest.fixture(scope="module")
def expert() -> nn.Module:
    torch.manual_seed(0)
    return build_model({"name": "mff_expert", "backbone": "test_resnet.r160_in1k", "pretrained": False}).eval()


@pytest.fixture
def weights(tmp_path: Path, expert: nn.Module) -> Path:
    return save_weights(expert.state_dict(), tmp_path / "fold0" / "model.safetensors")


@pytest.fixture(scope="module")
def exported_once(tmp_path_factory, expert: nn.Module) -> Path:
    weights = save_weights(expert.state_dict(), tmp_path_factory.mktemp("exported") / "model.safetensors")
    assert isinstance(onnx_network(expert, SIZE, weights), OrtNetwork)
    return weights


@pytest.fixture
def cached(tmp_path: Path, exported_once: Path) -> Path:
    """`weights` with its verified export already cached (copied with their times, as a tag expects)."""
    folder = tmp_path / "fold0"
    shutil.copytree(exported_once.parent, folder, copy_function=shutil.copy2)
    return folder / exported_once.name


def _count(monkeypatch, name: str, fail: bool = False) -> list[int]:
    """Count the calls of onnx_export.`name` that follow (the real one still runs, unless `fail`)."""
    calls: list[int] = []
    real = getattr(onnx_export, name)

    def counting(*args, **kwargs):
        calls.append(1)
        if fail:
            raise RuntimeError("no ONNX form for aten::made_up\nmore detail")
        return real(*args, **kwargs)

    monkeypatch.setattr(onnx_export, name, counting)
    return calls


def test_exported_expert_gives_the_same_outputs_at_any_batch_size(expert, cached, monkeypatch):
    exports = _count(monkeypatch, "export_onnx")
    network = onnx_network(expert, SIZE, cached)
    assert not exports
    assert isinstance(network, OrtNetwork)
    for batch in (1, 3):
        x = torch.randn(batch, 3, SIZE, SIZE)
        with torch.inference_mode():
            expected = expert(x)
        got = network(x.numpy())
        assert set(got) == {"logits", "features"}
        for key in expected:
            torch.testing.assert_close(torch.from_numpy(got[key]), expected[key], rtol=1e-4, atol=1e-5)


def test_the_export_is_checked_once_and_the_verdict_recorded(expert, weights, monkeypatch):
    exports, checks = _count(monkeypatch, "export_onnx"), _count(monkeypatch, "compare")
    onnx_network(expert, SIZE, weights)
    assert (len(exports), len(checks)) == (1, 1)
    tag = json.loads(tag_path(weights).read_text())
    assert tag["verdict"] == "verified" and tag["input_size"] == SIZE and tag["keys"] == ["logits", "features"]
    assert tag["weights"]["sha256"] and 0 <= tag["max_abs_diff"] < 1e-4
    cached = lookup(weights, SIZE)  # what infer.py asks, without torch
    assert cached.state == "verified" and isinstance(cached.network, OrtNetwork)
    assert isinstance(onnx_network(expert, SIZE, weights), OrtNetwork)
    assert (len(exports), len(checks)) == (1, 1)  # neither redone
    assert lookup(weights, SIZE + 8).state == "stale"  # another input size is another key


def test_changed_weights_are_exported_again_and_touched_ones_are_not(cached, monkeypatch):
    weights = cached
    exports = _count(monkeypatch, "export_onnx")
    hashes = []
    real_hash = onnx_cache.file_sha256
    monkeypatch.setattr(onnx_cache, "file_sha256", lambda path: hashes.append(path) or real_hash(path))
    assert lookup(weights, SIZE).state == "verified" and not hashes  # file stamps match: no hash taken

    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same bytes, new time
    assert lookup(weights, SIZE).state == "verified" and len(hashes) == 1
    assert lookup(weights, SIZE).state == "verified" and len(hashes) == 1  # the new time was recorded

    changed = build_model({"name": "mff_expert", "backbone": "test_resnet.r160_in1k", "pretrained": False}).eval()
    save_weights(changed.state_dict(), weights)
    assert lookup(weights, SIZE).state == "stale"
    network = onnx_network(changed, SIZE, weights)
    assert len(exports) == 1
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.inference_mode():
        torch.testing.assert_close(torch.from_numpy(network(x.numpy())["logits"]), changed(x)["logits"])
    assert not list(weights.parent.glob(".*.tmp"))  # written atomically


def test_the_optimised_graph_is_saved_at_the_first_load_and_scores_alike(cached, monkeypatch):
    x = np.random.default_rng(0).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    first = lookup(cached, SIZE)  # builds the session from the export, saving the optimised graph
    optimised = onnx_cache.optimized_path(cached)
    assert optimised.is_file() and json.loads(tag_path(cached).read_text())["optimized_for"] == onnx_cache.machine_id()
    sessions = []
    real = onnx_cache.make_session
    monkeypatch.setattr(onnx_cache, "make_session", lambda *a, **k: sessions.append(k) or real(*a, **k))
    second = lookup(cached, SIZE)
    assert sessions == [{"optimized": True}]  # read as optimised, not optimised again
    np.testing.assert_allclose(second.network(x)["logits"], first.network(x)["logits"], rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(onnx_cache, "machine_id", lambda: "another-processor")
    assert lookup(cached, SIZE).state == "verified" and "save_to" in sessions[-1]  # optimised anew here
    assert json.loads(tag_path(cached).read_text())["optimized_for"] == "another-processor"


def test_sessions_do_not_spin_between_runs(cached):
    # infer.py runs a session per network one after the other: an idle pool must not poll the cores
    options = lookup(cached, SIZE).network.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_a_corrupt_cache_is_exported_again(expert, cached, capsys, monkeypatch):
    weights = cached
    weights.with_suffix(".onnx").write_bytes(b"not an onnx model")
    exports = _count(monkeypatch, "export_onnx")
    assert isinstance(onnx_network(expert, SIZE, weights), OrtNetwork)
    assert len(exports) == 1
    assert f"{weights.with_suffix('.onnx')}: unreadable cached export" in capsys.readouterr().err


def test_an_unwritable_folder_still_scores_with_the_export(expert, weights, capsys, monkeypatch):
    def refuse(path, writer):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(onnx_export, "write_with", refuse)
    assert isinstance(onnx_network(expert, SIZE, weights), OrtNetwork)
    assert "cannot cache the export" in capsys.readouterr().err
    assert not weights.with_suffix(".onnx").exists() and not tag_path(weights).exists()


class _Noisy(nn.Module):
    """Random numbers in the forward pass: ONNX Runtime draws other ones than PyTorch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        y = self.conv(images).mean(dim=(2, 3))
        return y + torch.rand_like(y)


def test_an_export_that_disagrees_with_pytorch_is_recorded_and_not_retried(tmp_path, capsys, monkeypatch):
    model = _Noisy().eval()
    weights = save_weights(model.state_dict(), tmp_path / "model.safetensors")
    assert onnx_network(model, 16, weights) is None
    assert "no ONNX export (its outputs differ from PyTorch's); scoring with PyTorch" in capsys.readouterr().err
    assert json.loads(tag_path(weights).read_text())["verdict"] == "failed"
    exports = _count(monkeypatch, "export_onnx")
    assert onnx_network(model, 16, weights) is None and not exports


def test_a_failed_export_is_recorded_and_not_retried(expert, weights, capsys, monkeypatch):
    exports = _count(monkeypatch, "export_onnx", fail=True)
    assert onnx_network(expert, SIZE, weights) is None
    tag = json.loads(tag_path(weights).read_text())
    assert tag["verdict"] == "failed" and tag["reason"] == "export failed: no ONNX form for aten::made_up"
    assert not weights.with_suffix(".onnx").exists()
    capsys.readouterr()
    assert onnx_network(expert, SIZE, weights) is None
    assert len(exports) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no ONNX export (export failed: no ONNX form for aten::made_up, recorded" in err[0]


def test_a_convnextv2_network_exports_with_a_free_batch_size():
    """ConvNeXtV2 (GRN) blocks: traced with one image, torch.export fixed the batch size at 1."""
    from timm.models.convnext import ConvNeXt

    from models.mff import MFFExpert

    torch.manual_seed(0)
    backbone = ConvNeXt(num_classes=0, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), use_grn=True, ls_init_value=None)
    model = MFFExpert(backbone).eval()
    network = onnx_network(model, 32)
    assert isinstance(network, OrtNetwork)
    x = torch.randn(5, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(torch.from_numpy(network(x.numpy())["logits"]), model(x)["logits"])


@pytest.mark.slow  # about 20 s on 2 cores
@pytest.mark.parametrize("arch", ["test_convnext", "convnextv2_tiny"])
def test_timm_convnexts_export(arch):
    model = build_model({"name": "mff_expert", "backbone": arch, "pretrained": False}).eval()
    assert isinstance(onnx_network(model, 64), OrtNetwork)


def test_prepare_network_falls_back_to_the_folded_pytorch_network(expert, weights, monkeypatch):
    _count(monkeypatch, "export_onnx", fail=True)
    network = prepare_network(expert, SIZE, torch.device("cpu"), "onnx", weights)
    assert isinstance(network, nn.Module) and not isinstance(network, onnx_export.OnnxNetwork)
    assert network.backbone.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_runtime_follows_the_device():
    assert infer.pick_runtime("auto", torch.device("cpu")) == "onnx"
    assert infer.pick_runtime("auto", "cpu") == "onnx"
    assert infer.pick_runtime("auto", torch.device("cuda")) == "torch"
    assert infer.pick_runtime("torch", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="CPU only"):
        infer.pick_runtime("onnx", torch.device("cuda"))


def test_infer_scores_alike_with_either_runtime(cached, tmp_path):
    weights = cached
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.effect_noise((60 + 10 * i, 50), 40 + 20 * i).convert("RGB").save(images / f"{i}.png")
    model_cfg = {"name": "mff_expert", "backbone": "test_resnet.r160_in1k"}
    meta = {"config": {"name": "m", "model": model_cfg, "data": {"image_size": SIZE}}}
    (weights.parent / "meta.json").write_text(json.dumps(meta))
    scores = {}
    for runtime in ("onnx", "onnx", "torch"):  # the second onnx run reads the cached export
        out = tmp_path / f"{runtime}.csv"
        args = [str(images), "--weights", str(weights), "--runtime", runtime, "--device", "cpu", "--out", str(out)]
        assert infer.main(args) == 0
        scores.setdefault(runtime, []).append(pd.read_csv(out)["y_pred"].tolist())
    assert len(scores["onnx"][0]) == 3 and scores["onnx"][0] == scores["onnx"][1]
    np.testing.assert_allclose(scores["onnx"][0], scores["torch"][0], atol=1e-5)
    assert tag_path(weights).is_file()


def test_a_part_that_does_not_depend_on_the_input_is_exported_as_a_constant():
    import contextlib

    import onnx

    from tests.test_sjedd import TINY_CLIP, tiny_net

    net = tiny_net().eval()
    size = TINY_CLIP["vision_cfg"]["image_size"]
    keys = onnx_export._output_keys(net, size, None)
    text_tower = tuple(net.clip.token_embedding.weight.shape)

    def exported() -> tuple[bytes, set[tuple[int, ...]]]:
        model_bytes = onnx_export.export_onnx(net, size, keys, "key")
        return model_bytes, {tuple(t.dims) for t in onnx.load_from_string(model_bytes).graph.initializer}

    model_bytes, shapes = exported()
    assert text_tower not in shapes  # the prompts' embeddings, not the tower that makes them
    network = OrtNetwork(onnx_cache.make_session(model_bytes), keys)
    assert onnx_export.compare(net, network, size) is not None  # and it scores as PyTorch does
    net.export_constants = contextlib.nullcontext  # without the hook the tower is traced in
    assert text_tower in exported()[1]
