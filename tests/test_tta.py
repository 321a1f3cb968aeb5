"""Test-time augmentation: the views are what they claim, both runtimes average them alike, and
train.py's `predict.tta` reaches oof.csv and test.csv without retraining."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import cv_split
import infer
import models
import train
from core.checkpoint import save_weights
from core.config import load_config
from core.data.transforms import build_transform
from core.data.tta import TTA_MODES, TTAError, tta_mode, views
from core.infer.scoring import ArrayScorer, network_probability
from core.train.prediction import predict_arrays, predict_paths
from core.train.trainer import STATE_FILE, config_fingerprint, fingerprint_hash
from models.scoring import NumpyIn
from models.zoo import load_trained

SIZE = 32
SIX = TTA_MODES["6view"]


def softmax1(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits.double(), dim=1)[:, 1].numpy()


class PooledNet(torch.nn.Module):
    """A 1x1 convolution, ReLU, then global average pooling: blind to any permutation of the pixels."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.head(torch.relu(self.conv(images)).mean(dim=(2, 3)))}


class FlatNet(torch.nn.Module):
    """A linear layer over the flattened pixels: every rotation or mirror changes its score."""

    def __init__(self, size: int = 6):
        super().__init__()
        self.head = torch.nn.Linear(3 * size * size, 2)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.head(images.flatten(1))}


def batch(n: int = 4, size: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, size, size)).astype(np.float32)


def identity_transform(array: np.ndarray, _seed: int) -> torch.Tensor:
    return torch.from_numpy(array)


# --------------------------------------------------------------------------- the views


def test_each_view_moves_the_pixels_as_named():
    x = np.array([[1, 2], [3, 4]], np.float32).reshape(1, 1, 2, 2)
    got = {name: v[0, 0].tolist() for name, v in zip(SIX, views(x, "6view"), strict=True)}
    assert got == {
        "identity": [[1, 2], [3, 4]],
        "rot90": [[2, 4], [1, 3]],  # counter-clockwise
        "rot180": [[4, 3], [2, 1]],
        "rot270": [[3, 1], [4, 2]],
        "hflip": [[2, 1], [4, 3]],  # mirrored left to right
        "vflip": [[3, 4], [1, 2]],  # upside down
    }
    assert [v[0, 0].tolist() for v in views(x, "flip")] == [got["identity"], got["hflip"]]
    assert [v[0, 0].tolist() for v in views(x, "none")] == [got["identity"]]


def test_tensors_get_the_same_views_as_arrays():
    x = batch(2, 5)
    for array_view, tensor_view in zip(views(x, "6view"), views(torch.from_numpy(x), "6view"), strict=True):
        assert isinstance(tensor_view, torch.Tensor) and array_view.flags["C_CONTIGUOUS"]
        np.testing.assert_array_equal(array_view, tensor_view.numpy())
    distinct = {v.tobytes() for v in views(x, "6view")}
    assert len(distinct) == 6


def test_rotations_refuse_a_non_square_input_and_mirrors_take_it():
    x = np.zeros((1, 3, 4, 5), np.float32)
    with pytest.raises(TTAError, match="'6view' rotates the input, which must be square, not 4x5"):
        views(x, "6view")
    assert [v.shape for v in views(x, "flip")] == [(1, 3, 4, 5)] * 2


def test_bad_modes_and_keys_are_refused_with_the_choices():
    with pytest.raises(TTAError, match=r"predict.tta must be one of \['none', 'flip', '6view'\], not '8view'"):
        tta_mode({"predict": {"tta": "8view"}})
    with pytest.raises(TTAError, match=r"unknown predict setting\(s\) \['ttta'\]"):
        tta_mode({"predict": {"ttta": "flip"}})
    assert tta_mode({}) == "none"  # a checkpoint trained before the key existed
    with pytest.raises(TTAError, match="tta must be one of"):
        ArrayScorer([], 0, tta="rot")


def test_every_member_config_names_its_tta_with_a_comment():
    for path in sorted(Path("configs/members").glob("*.yaml")):
        assert tta_mode(load_config([path])) == "none", path
        lines = path.read_text().splitlines()
        section = lines.index(next(ln for ln in lines if ln.startswith("predict:")))
        assert "#" in lines[section] and lines[section + 1].strip().startswith("tta:") and "#" in lines[section + 1]


# --------------------------------------------------------------------------- averaging


@pytest.mark.parametrize("mode", ["flip", "6view"])
def test_an_invariant_network_scores_alike_under_every_mode(mode):
    torch.manual_seed(0)
    net = PooledNet().eval()
    arrays = list(batch(5))
    plain = predict_arrays([net], arrays, identity_transform, torch.device("cpu"), batch_size=2)
    augmented = predict_arrays([net], arrays, identity_transform, torch.device("cpu"), batch_size=2, tta=mode)
    np.testing.assert_allclose(augmented, plain, rtol=0, atol=1e-7)  # fp32 sums in another order
    onnx_side = network_probability(NumpyIn(net), np.stack(arrays), mode)
    np.testing.assert_allclose(onnx_side, plain[:, 0], rtol=0, atol=1e-7)


@pytest.mark.parametrize("mode", ["flip", "6view"])
def test_a_non_invariant_network_scores_the_mean_probability_of_its_views(mode):
    torch.manual_seed(0)
    net = FlatNet().eval()
    x = torch.from_numpy(batch(4))
    by_hand = {
        "identity": x,
        "rot90": torch.rot90(x, 1, (2, 3)),
        "rot180": torch.rot90(x, 2, (2, 3)),
        "rot270": torch.rot90(x, 3, (2, 3)),
        "hflip": torch.flip(x, (3,)),
        "vflip": torch.flip(x, (2,)),
    }
    with torch.no_grad():
        each = {name: softmax1(net(v)["logits"]) for name, v in by_hand.items()}
        of_mean_logits = softmax1(torch.stack([net(by_hand[n])["logits"] for n in TTA_MODES[mode]]).mean(0))
    expected = np.mean([each[n] for n in TTA_MODES[mode]], axis=0)
    plain = predict_arrays([net], list(x.numpy()), identity_transform, torch.device("cpu"), batch_size=3)[:, 0]
    torch_side = predict_arrays([net], list(x.numpy()), identity_transform, torch.device("cpu"), batch_size=3, tta=mode)
    onnx_side = network_probability(NumpyIn(net), x.numpy(), mode)
    np.testing.assert_allclose(torch_side[:, 0], expected, rtol=0, atol=1e-6)  # fp32 at other batch sizes
    np.testing.assert_allclose(onnx_side, expected, rtol=0, atol=1e-6)
    assert np.abs(plain - expected).max() > 1e-3  # the views did change the score
    assert np.abs(of_mean_logits - expected).max() > 1e-4  # probabilities averaged, not logits


# --------------------------------------------------------------------------- infer.py


def tiny_member(root: Path) -> Path:
    cfg = {"name": "m", "model": {"name": "mff_expert", "backbone": "test_resnet"}, "data": {"image_size": SIZE}}
    torch.manual_seed(0)
    weights = save_weights(models.build_model(cfg["model"]).state_dict(), root / "m" / "fold0" / "model.safetensors")
    (weights.parent / "meta.json").write_text(json.dumps({"complete": True, "config": cfg}))
    return weights


def test_infer_tta_is_the_same_on_onnx_and_torch_and_only_the_numbers_change(tmp_path, capsys):
    weights = tiny_member(tmp_path)
    rng = np.random.default_rng(1)
    images = []
    for i, shape in enumerate([(48, 40, 3), (32, 32, 3), (50, 70, 3)]):
        images.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(images[-1])
    rows = {}
    for tta in ("none", "6view"):
        for runtime in ("onnx", "torch"):
            args = [*map(str, images), "--weights", str(weights), "--device", "cpu", "--json"]
            assert infer.main([*args, "--runtime", runtime, "--tta", tta]) == 0
            rows[tta, runtime] = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    prob = {key: np.array([r["probability"] for r in value]) for key, value in rows.items()}
    np.testing.assert_allclose(prob["6view", "onnx"], prob["6view", "torch"], rtol=0, atol=1e-5)
    assert np.abs(prob["6view", "onnx"] - prob["none", "onnx"]).max() > 1e-4
    assert [set(r) for r in rows["6view", "onnx"]] == [set(r) for r in rows["none", "onnx"]]
    assert [r["members"].keys() for r in rows["6view", "onnx"]] == [{"m": 0}.keys()] * 3

    # The 6view probability is the mean of the six views' probabilities, each scored by hand.
    trained = load_trained(weights)
    transform = build_transform(trained.config["data"], train=False)
    x = torch.stack([transform(np.asarray(Image.open(p).convert("RGB")), 0) for p in images])
    with torch.no_grad():
        each = [softmax1(trained.model(torch.from_numpy(v))["logits"]) for v in views(x.numpy(), "6view")]
    np.testing.assert_allclose(prob["6view", "torch"], np.mean(each, axis=0), rtol=0, atol=1e-6)


def test_infer_refuses_an_unknown_tta(capsys):
    with pytest.raises(SystemExit) as stop:
        infer.main(["x.png", "--tta", "8view"])
    assert stop.value.code == 2
    assert "argument --tta: invalid choice: '8view'" in capsys.readouterr().err


# --------------------------------------------------------------------------- train.py


def test_the_fingerprint_of_the_training_state_leaves_prediction_keys_out():
    cfg = {"train": {"lr": 0.1}, "predict": {"tta": "none"}}
    flipped = {"train": {"lr": 0.1}, "predict": {"tta": "6view"}}
    assert "predict.tta" not in config_fingerprint(cfg)
    assert fingerprint_hash(config_fingerprint(cfg)) == fingerprint_hash(config_fingerprint(flipped))


def saved_predictions(fold: Path, paths: list[str], tta: str) -> np.ndarray:
    trained = load_trained(fold / "model.safetensors")
    transform = build_transform(trained.config["data"], train=False)
    return predict_paths(
        [trained.model], paths, transform, torch.device("cpu"), batch_size=8, num_workers=0, progress=False, tta=tta
    )[:, 0]


def test_predict_tta_reaches_oof_and_test_and_a_change_rescores_without_training(tiny_project, capsys):
    p = tiny_project
    assert cv_split.main(["--config", str(p["data_cfg"])]) == 0
    args = ["--config", str(p["member_cfg"]), "--data-config", str(p["data_cfg"]), "--fold", "0", "train.epochs=1"]
    assert train.main([*args, "predict.tta=6view"]) == 0
    fold = p["outputs"] / "tiny" / "fold0"
    meta = json.loads((fold / "meta.json").read_text())
    oof, test = pd.read_csv(fold / "oof.csv"), pd.read_csv(fold / "test.csv")
    val_paths = [str(Path(p["train_root"]) / n) for n in oof["img_name"]]
    test_paths = [str(Path(p["test_root"]) / n) for n in test["img_name"]]
    # 1e-6: float32 logits of the same image in batches of other sizes differ in their last bits on
    # CPUs whose matrix kernels block by batch (AVX-512, AMX); TTA itself moves them by > 1e-4.
    np.testing.assert_allclose(oof["y_pred"], saved_predictions(fold, val_paths, "6view"), rtol=0, atol=1e-6)
    np.testing.assert_allclose(test["y_pred"], saved_predictions(fold, test_paths, "6view"), rtol=0, atol=1e-6)
    plain = saved_predictions(fold, val_paths, "none")
    assert np.abs(oof["y_pred"] - plain).max() > 1e-4
    assert meta["oof"]["tta"] == "6view" and meta["config"]["predict"] == {"tta": "6view"}

    # Back to none: the finished fold is scored again from its training state, not trained again.
    weights, state = (fold / "model.safetensors").read_bytes(), (fold / STATE_FILE).read_bytes()
    capsys.readouterr()
    assert train.main([*args, "predict.tta=none"]) == 0
    assert (fold / "model.safetensors").read_bytes() == weights and (fold / STATE_FILE).read_bytes() == state
    again = json.loads((fold / "meta.json").read_text())
    assert again["history"] == meta["history"] and again["oof"]["tta"] == "none"
    assert again["oof"]["auc"] == pytest.approx(again["val"]["auc"])  # the selection's own scores
    np.testing.assert_allclose(pd.read_csv(fold / "oof.csv")["y_pred"], plain, rtol=0, atol=1e-6)
    # Unchanged settings: skipped.
    before = (fold / "oof.csv").stat().st_mtime_ns
    assert train.main([*args, "predict.tta=none"]) == 0
    assert (fold / "oof.csv").stat().st_mtime_ns == before


def test_a_bad_predict_tta_stops_train_before_training(tiny_project, capsys):
    p = tiny_project
    assert cv_split.main(["--config", str(p["data_cfg"])]) == 0
    args = ["--config", str(p["member_cfg"]), "--data-config", str(p["data_cfg"]), "--fold", "0", "predict.tta=8view"]
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: predict.tta must be one of ['none', 'flip', '6view'], not '8view'"
    assert not (p["outputs"] / "tiny" / "fold0").exists()


def test_a_clip_batch_turns_each_frame_as_an_image_batch_turns():
    clips = np.random.default_rng(0).random((2, 3, 3, 4, 4)).astype(np.float32)  # (N, T, C, H, W)
    for clip_view, *frame_views in zip(
        views(clips, "6view"), *(views(clips[:, t], "6view") for t in range(3)), strict=True
    ):
        assert np.array_equal(clip_view, np.stack(frame_views, axis=1))
    as_tensor = views(torch.from_numpy(clips), "6view")
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(views(clips, "6view"), as_tensor, strict=True))
