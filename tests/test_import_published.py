"""Published checkpoints imported and scored: replicas of the two released layouts (the same timm
and efficientnet_pytorch networks under the same attribute names, random weights, saved the same
way) are converted by `models.import_published`, and the converted networks, and infer.py with
each checkpoint's recorded preprocessing, must give the replicas' own outputs to 1e-4."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from efficientnet_pytorch import EfficientNet
from PIL import Image
from skimage import data as skdata
from torch import nn
from torch_ema import ExponentialMovingAverage
from torchvision import transforms as T

import infer
from core.blend.predictions import member_predictions
from core.config import ConfigError
from core.data.transforms import build_transform
from core.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from core.trained import CheckpointError, SubmissionError, member_folds, weights_files
from data_prep.blending import load_sbi_config, sbi_test_crop
from data_prep.faces import FaceAnalyzer
from models.import_published import main as import_main
from models.zoo import load_trained

TOL = 1e-4


class WinnerExpert(nn.Module):
    """The released expert's layout: its timm model under `baseline_extractor`."""

    def __init__(self, arch: str):
        super().__init__()
        self.baseline_extractor = timm.create_model(arch, pretrained=False, num_classes=2)


class SBIDetector(nn.Module):
    """The released SBI module's layout: efficientnet_pytorch's EfficientNet under `net`."""

    def __init__(self, name: str, image_size: int):
        super().__init__()
        self.net = EfficientNet.from_name(name, num_classes=2, image_size=image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ExtensionDetector(nn.Module):
    """The extension's public inference layout: efficientnet_pytorch's EfficientNet under `net`
    (features pooled to its width, its own `_fc` unused and left out), then BatchNorm and FC(2)."""

    def __init__(self, name: str, image_size: int):
        super().__init__()
        self.net = EfficientNet.from_name(name, image_size=image_size)
        del self.net._fc
        width = self.net._bn1.num_features
        self.bn = nn.BatchNorm1d(width)
        self.fc = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.net._avg_pooling(self.net.extract_features(x)).flatten(1)
        return self.fc(self.bn(pooled))


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Random BatchNorm statistics and affine weights, and a classifier large enough that the two
    logits differ by O(1), so a wrongly mapped key moves the outputs far beyond the tolerance."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.4 - 0.2)
            elif isinstance(m, nn.Linear) and m.out_features == 2:
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 2.0 / m.in_features**0.5)
    return module.eval()


# --------------------------------------------------------------------------- replicas on disk


def winner_replica(folder: Path, archs: list[str]) -> tuple[nn.ModuleList, list[ExponentialMovingAverage]]:
    """`weight.pth` (the ModuleList's state dict) and `ema.state` ({i: torch-ema state}) as the
    released code saves them; the EMA weights differ from the trained ones."""
    experts = nn.ModuleList([randomize(WinnerExpert(a), seed=i) for i, a in enumerate(archs)])
    emas = []
    for i, expert in enumerate(experts):
        ema = ExponentialMovingAverage(expert.parameters(), decay=0.995)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        ema.update()
        emas.append(ema)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(experts.state_dict(), folder / "weight.pth")
    torch.save({i: ema.state_dict() for i, ema in enumerate(emas)}, folder / "ema.state")
    return experts, emas


@torch.no_grad()
def winner_logits(expert: WinnerExpert, ema: ExponentialMovingAverage, x: torch.Tensor) -> torch.Tensor:
    """What the released inference computes for one expert: the EMA weights swapped in."""
    with ema.average_parameters(expert.parameters()):
        return expert.baseline_extractor(x)


def published_transform(size: int) -> T.Compose:
    """The released inference's preprocessing: normalise, then resize (antialiased)."""
    return T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD), T.Resize((size, size), antialias=True)])


def member_yaml(tmp_path: Path, archs: list[str]) -> Path:
    cfg = {
        "name": "mff",
        "experts": [{"backbone": a} for a in archs],
        "model": {"name": "mff_expert", "backbone": archs[0]},
    }
    path = tmp_path / "member.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


WINNER_ARCHS = ["test_efficientnet", "test_convnext", "test_efficientnet"]


@pytest.fixture(scope="module")
def winner(tmp_path_factory):
    """A small replica of the winning solution's release (three tiny timm experts), imported at 48 px."""
    root = tmp_path_factory.mktemp("winner")
    experts, emas = winner_replica(root / "weights", WINNER_ARCHS)
    out = root / "outputs" / "mff_published"
    cmd = ["deepfakedefenders", str(root / "weights"), "--config", str(member_yaml(root, WINNER_ARCHS))]
    assert import_main([*cmd, "--out", str(out), "data.image_size=48"]) == 0
    return {"root": root, "experts": experts, "emas": emas, "out": out}


@pytest.fixture(scope="module")
def sbi(tmp_path_factory):
    """A replica of SBI's release with efficientnet-b0 (the B4 is the slow test), imported at 64 px."""
    root = tmp_path_factory.mktemp("sbi")
    replica = randomize(SBIDetector("efficientnet-b0", image_size=64), seed=7)
    optimizer = torch.optim.SGD(replica.parameters(), lr=1e-3, momentum=0.9)
    torch.save({"model": replica.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 99}, root / "FFc23.tar")
    out = root / "outputs" / "sbi_published"
    overrides = ["model.backbone=tf_efficientnet_b0.ap_in1k", "data.image_size=64"]
    assert import_main(["sbi", str(root / "FFc23.tar"), "--out", str(out), *overrides]) == 0
    return {"root": root, "replica": replica, "out": out}


def scored(args: list[str], capsys) -> tuple[int, list[dict], str]:
    code = infer.main([*args, "--json"])
    out = capsys.readouterr()
    return code, [json.loads(line) for line in out.out.splitlines()], out.err


# --------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize(
    ("shape", "size"), [((90, 70, 3), 32), ((40, 50, 3), 64), ((600, 513, 3), 512), ((48, 48, 3), 48)]
)
def test_normalise_then_antialiased_resize_matches_torchvision(shape, size):
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    expected = published_transform(size)(Image.fromarray(image)).numpy()
    recipe = {"image_size": size, "resize": "bilinear_antialias", "normalize_first": True}
    got = Preprocessing.from_config({"data": recipe})(image)
    assert got.shape == expected.shape and got.dtype == np.float32
    assert np.abs(got - expected).max() < 1e-5
    # The torch path (core.data.transforms) computes the same recorded recipe, so ONNX and torch agree.
    np.testing.assert_array_equal(build_transform(recipe, train=False)(image, 0).numpy(), got)


def test_a_recorded_recipe_is_for_evaluation_only_and_unknown_ones_are_refused():
    with pytest.raises(ConfigError, match="evaluation only"):
        build_transform({"image_size": 32, "resize": "bilinear_antialias"}, train=True)
    with pytest.raises(ConfigError, match="data.resize 'cubic'"):
        Preprocessing.from_config({"data": {"image_size": 32, "resize": "cubic"}})
    with pytest.raises(ConfigError, match="data.face_crop"):
        Preprocessing.from_config({"data": {"image_size": 32, "face_crop": {"kind": "retina"}}})
    assert Preprocessing.from_config({"data": {"image_size": 32}}).is_default


def test_sbi_value_range_is_pixels_over_255():
    image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    recipe = {"image_size": 64, "mean": [0, 0, 0], "std": [1, 1, 1], "resize": "linear"}
    got = Preprocessing.from_config({"data": recipe})(image)
    np.testing.assert_array_equal(got, image.transpose(2, 0, 1).astype(np.float32) / np.float32(255))


# --------------------------------------------------------------------------- the winning solution


def test_winner_experts_match_the_replica_with_ema_applied(winner):
    x = torch.rand(3, 3, 48, 48, generator=torch.Generator().manual_seed(0)) * 4 - 2
    worst = 0.0
    for k, (expert, ema) in enumerate(zip(winner["experts"], winner["emas"], strict=True)):
        network = load_trained(winner["out"] / f"fold{k}" / "model.safetensors").model
        with torch.no_grad():
            got = network(x)["logits"]
            raw = expert.baseline_extractor(x)
        expected = winner_logits(expert, ema, x)
        worst = max(worst, (got - expected).abs().max().item())
        assert (got - raw).abs().max().item() > 1e-3  # the EMA weights, not the trained ones, were taken
    assert worst < TOL


def test_winner_meta_records_source_licence_and_preprocessing(winner):
    meta = json.loads((winner["out"] / "fold1" / "meta.json").read_text())
    assert meta["complete"] and meta["member"] == "mff_published" and meta["fold"] == 1
    assert meta["config"]["model"]["backbone"] == "test_convnext" and meta["config"]["expert"] == 1
    assert meta["config"]["data"]["resize"] == "bilinear_antialias" and meta["config"]["data"]["normalize_first"]
    files = meta["imported"]["files"]
    assert set(files) == {"weight.pth", "ema.state"} and len(files["weight.pth"]["sha256"]) == 64
    assert "non-commercial" in meta["imported"]["licence"] and "replicas" in meta["imported"]["verified"]


@pytest.mark.parametrize("runtime", ["torch", pytest.param("onnx", marks=pytest.mark.slow)])
def test_infer_scores_the_winner_like_the_released_inference(winner, runtime, capsys, tmp_path):
    image = np.random.default_rng(3).integers(0, 256, (90, 77, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "img.png")
    x = published_transform(48)(Image.open(tmp_path / "img.png").convert("RGB")).unsqueeze(0)
    probs = [
        winner_logits(e, m, x).softmax(1)[0, 1].item() for e, m in zip(winner["experts"], winner["emas"], strict=True)
    ]
    code, rows, err = scored([str(tmp_path / "img.png"), "--weights", str(winner["out"]), "--runtime", runtime], capsys)
    assert code == 0, err
    assert abs(rows[0]["probability"] - np.mean(probs)) < TOL


# --------------------------------------------------------------------------- SBI


def test_sbi_network_matches_the_efficientnet_pytorch_replica(sbi):
    network = load_trained(sbi["out"] / "fold0" / "model.safetensors").model
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (network(x)["logits"] - sbi["replica"](x)).abs().max().item()
    assert diff < TOL
    meta = json.loads((sbi["out"] / "fold0" / "meta.json").read_text())
    assert meta["config"]["model"]["guidance"] is False and meta["config"]["data"]["face_crop"]["kind"] == "sbi_test"


@pytest.mark.parametrize("runtime", ["torch", pytest.param("onnx", marks=pytest.mark.slow)])
def test_infer_scores_sbi_on_its_face_crop(sbi, runtime, capsys, tmp_path):
    image = np.ascontiguousarray(skdata.astronaut())
    Image.fromarray(image).save(tmp_path / "astronaut.png")
    cfg = load_sbi_config(output_size=64)
    crops = [sbi_test_crop(image, face.box, cfg) for face in FaceAnalyzer(embed=False).detect(image)]
    assert crops
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        expected = sbi["replica"](x).softmax(1)[:, 1].max().item()
    code, rows, err = scored(
        [str(tmp_path / "astronaut.png"), "--weights", str(sbi["out"]), "--runtime", runtime], capsys
    )
    assert code == 0, err
    assert abs(rows[0]["probability"] - expected) < TOL


def test_an_image_without_a_face_is_scored_by_the_other_members_only(winner, sbi, capsys, tmp_path):
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "flat.png")
    args = [
        str(tmp_path / "flat.png"),
        "--weights",
        str(winner["out"]),
        "--weights",
        str(sbi["out"]),
        "--runtime",
        "torch",
    ]
    code, rows, err = scored(args, capsys)
    assert code == 1
    assert "no face found; not scored by sbi_published" in err
    assert rows[0]["members"]["sbi_published"] is None and rows[0]["members"]["mff_published"] is not None
    assert rows[0]["probability"] == pytest.approx(rows[0]["members"]["mff_published"])


def test_an_imported_member_keeps_all_its_folds_whatever_the_split(winner):
    outputs = winner["out"].parent
    assert member_folds(outputs, "mff_published", expected=[0, 1], allow_partial=False) == [0, 1, 2]


# --------------------------------------------------------------------------- bad input


class NotAllowed:
    """A class weights_only refuses to rebuild."""


def test_a_missing_file_is_one_line(tmp_path, capsys):
    assert import_main(["deepfakedefenders", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'weight.pth'}: no such file (the weight.pth)"


def test_a_pickle_that_weights_only_refuses_is_one_line(tmp_path, capsys):
    torch.save({"model": NotAllowed()}, tmp_path / "evil.tar")
    assert import_main(["sbi", str(tmp_path / "evil.tar"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refused by torch.load(weights_only=True)" in err and "NotAllowed" in err
    assert not (tmp_path / "o").exists()


def test_a_wrong_layout_is_one_line(winner, tmp_path, capsys):
    state = torch.load(winner["root"] / "weights" / "weight.pth", weights_only=True)
    cases = {
        "renamed": (
            {k.replace("baseline_extractor", "backbone"): v for k, v in state.items()},
            "is not <expert>.baseline",
        ),
        "missing": ({k: v for k, v in state.items() if k != "1.baseline_extractor.stem.0.weight"}, "missing 1"),
        "unexpected": ({**state, "0.baseline_extractor.extra.weight": torch.zeros(1)}, "unexpected 1"),
    }
    config = str(member_yaml(tmp_path, WINNER_ARCHS))
    for name, (broken, message) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        torch.save(broken, folder / "weight.pth")
        (folder / "ema.state").write_bytes((winner["root"] / "weights" / "ema.state").read_bytes())
        assert import_main(["deepfakedefenders", str(folder), "--config", config, "--out", str(folder / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and str(folder / "weight.pth") in err, (name, err)


def test_an_sbi_file_without_its_model_entry_is_refused(tmp_path, capsys):
    torch.save({"state_dict": {"net._fc.weight": torch.zeros(2, 4)}}, tmp_path / "x.tar")
    assert import_main(["sbi", str(tmp_path / "x.tar"), "--out", str(tmp_path / "o")]) == 2
    assert "expected a dict with a 'model' entry" in capsys.readouterr().err


def test_existing_outputs_are_kept_unless_forced(winner, capsys):
    cmd = [
        "deepfakedefenders",
        str(winner["root"] / "weights"),
        "--config",
        str(member_yaml(winner["root"], WINNER_ARCHS)),
    ]
    before = (winner["out"] / "fold0" / "model.safetensors").stat().st_mtime_ns
    assert import_main([*cmd, "--out", str(winner["out"]), "data.image_size=48"]) == 2
    err = capsys.readouterr().err
    assert "fold0/model.safetensors: exists" in err and "--force" in err
    assert (winner["out"] / "fold0" / "model.safetensors").stat().st_mtime_ns == before
    assert import_main([*cmd, "--out", str(winner["out"]), "data.image_size=48", "--force"]) == 0


def test_help_says_where_to_download(capsys):
    with pytest.raises(SystemExit) as done:
        import_main(["--help"])
    text = capsys.readouterr().out
    assert done.value.code == 0
    assert "weight.pth" in text and "ema.state" in text and "FFraw.tar" in text and "FFc23.tar" in text


# --------------------------------------------------------------------------- the real architectures


@pytest.mark.slow
def test_the_seven_published_experts_convert(tmp_path):
    archs = ["convnextv2_tiny", "convnextv2_tiny", "tf_efficientnet_b4", "tf_efficientnet_b4"]
    archs += ["tf_efficientnet_b5", "tf_efficientnet_b5", "tf_efficientnet_b6"]
    experts, emas = winner_replica(tmp_path / "weights", archs)
    out = tmp_path / "mff_published"
    assert import_main(["deepfakedefenders", str(tmp_path / "weights"), "--out", str(out), "data.image_size=64"]) == 0
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 4 - 2
    for k, (expert, ema) in enumerate(zip(experts, emas, strict=True)):
        network = load_trained(out / f"fold{k}" / "model.safetensors").model
        with torch.no_grad():
            assert (network(x)["logits"] - winner_logits(expert, ema, x)).abs().max().item() < TOL


@pytest.mark.slow
def test_sbi_b4_at_380_converts(tmp_path):
    replica = randomize(SBIDetector("efficientnet-b4", image_size=380), seed=3)
    torch.save({"model": replica.state_dict(), "epoch": 99}, tmp_path / "FFraw.tar")
    assert import_main(["sbi", str(tmp_path / "FFraw.tar"), "--out", str(tmp_path / "sbi")]) == 0
    network = load_trained(tmp_path / "sbi" / "fold0" / "model.safetensors").model
    x = torch.rand(2, 3, 380, 380, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (network(x)["logits"] - replica(x)).abs().max().item() < TOL


def test_the_extension_release_loads_into_the_bn_fc_head(tmp_path, capsys):
    replica = randomize(ExtensionDetector("efficientnet-b0", image_size=64), seed=5)
    torch.save({"model": replica.state_dict()}, tmp_path / "extension.tar")
    overrides = ["model.backbone=tf_efficientnet_b0.ap_in1k", "data.image_size=64"]
    cmd = ["sbi", str(tmp_path / "extension.tar"), *overrides]
    assert import_main([*cmd, "--out", str(tmp_path / "sbi"), "model.head=sbi"]) == 2
    assert "model.head=bn_fc" in capsys.readouterr().err
    assert import_main([*cmd, "--out", str(tmp_path / "ext"), "model.head=bn_fc"]) == 0
    network = load_trained(tmp_path / "ext" / "fold0" / "model.safetensors").model
    assert [type(m) for m in network.head] == [nn.BatchNorm1d, nn.Linear]
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (network(x)["logits"] - replica(x)).abs().max().item() < TOL


def test_an_extension_head_of_another_shape_is_refused(tmp_path, capsys):
    replica = ExtensionDetector("efficientnet-b0", image_size=64)
    replica.extra = nn.Linear(4, 2)  # a second FC(2): which one classifies is not known
    torch.save({"model": replica.state_dict()}, tmp_path / "extension.tar")
    cmd = ["sbi", str(tmp_path / "extension.tar"), "--out", str(tmp_path / "o"), "model.head=bn_fc"]
    assert import_main([*cmd, "model.backbone=tf_efficientnet_b0.ap_in1k", "data.image_size=64"]) == 2
    assert "expected one BatchNorm and one FC(2)" in capsys.readouterr().err


def test_ensemble_says_why_it_cannot_blend_an_imported_member(winner):
    with pytest.raises(SubmissionError, match="mff_published: imported from a published release"):
        member_predictions(winner["out"].parent, "mff_published", [0, 1, 2])


def test_weights_names_a_member_folder_or_a_fold_folder(winner, tmp_path):
    folds = [winner["out"] / f"fold{k}" / "model.safetensors" for k in range(3)]
    assert weights_files(winner["out"]) == folds
    assert weights_files(winner["out"] / "fold1") == [folds[1]]
    with pytest.raises(CheckpointError, match="neither model.safetensors nor a finished fold"):
        weights_files(tmp_path)


def test_a_file_that_is_not_a_pytorch_file_is_one_line(tmp_path, capsys):
    (tmp_path / "FFc23.tar").write_bytes(b"not a checkpoint at all")
    assert import_main(["sbi", str(tmp_path / "FFc23.tar"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {tmp_path / 'FFc23.tar'}: torch.load(weights_only")
    assert "not a PyTorch checkpoint" in err
