"""`infer.py --explain DIR`: a Grad-CAM overlay per member and for the blend, per image, captioned
with the scored probability; the CAM lies where a network's evidence is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pytorch_grad_cam import GradCAM
from torch import nn

import infer
import models
from core.checkpoint import save_weights
from core.infer.ensemble import Ensemble
from core.preprocess import Preprocessing
from core.trained import read_model_file
from models.explain import CAPTION_PAD, Explainer, FakeMargin, FoldCam, LogitsOnly, _font, _lines, captioned
from models.registry import register_model
from models.zoo import load_trained

SIZE = 32
HEIGHT, WIDTH = 48, 64  # not square: a swapped width and height shows
QUADRANTS = {"top_left": (slice(0, 24), slice(0, 32)), "bottom_right": (slice(24, 48), slice(32, 64))}


class QuadrantNet(nn.Module):
    """Fake logit = mean over the image of ReLU(conv) kept in one quadrant; real logit 0. Its
    evidence is in that quadrant alone, and its layer to explain is the one that keeps it."""

    def __init__(self, quadrant: str):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.keep = KeepQuadrant(quadrant)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[0.0] * 4, [1.0] * 4]))
            self.head.bias.zero_()

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.keep(torch.relu(self.conv(images)))
        return {"logits": self.head(features.mean(dim=(2, 3)))}

    def cam_layer(self) -> nn.Module:
        return self.keep


class KeepQuadrant(nn.Module):
    def __init__(self, quadrant: str):
        super().__init__()
        self.quadrant = quadrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        mask = torch.zeros_like(x)
        if self.quadrant == "top_left":
            mask[..., :h, :w] = 1
        else:
            mask[..., h:, w:] = 1
        return x * mask


class NoCamLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 2)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.head(images.mean(dim=(2, 3)))}


@register_model("quadrant_toy")
def build_quadrant_toy(quadrant: str, pretrained: bool = False) -> QuadrantNet:
    return QuadrantNet(quadrant)


@register_model("no_cam_toy")
def build_no_cam_toy(pretrained: bool = False) -> NoCamLayer:
    return NoCamLayer()


def fold(root: Path, member: str, model: dict, size: int = SIZE) -> Path:
    folder = root / member / "fold0"
    cfg = {"name": member, "model": model, "data": {"image_size": size}}
    weights = save_weights(models.build_model(model).state_dict(), folder / "model.safetensors")
    (folder / "meta.json").write_text(json.dumps({"complete": True, "config": cfg}))
    return weights


def copy_fold(weights: Path, root: Path, member: str, k: int) -> Path:
    folder = root / member / f"fold{k}"
    folder.mkdir(parents=True)
    shutil.copy(weights, folder / "model.safetensors")
    meta = json.loads((weights.parent / "meta.json").read_text())
    meta["config"]["name"] = member
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder / "model.safetensors"


def noise_image(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def toys(tmp_path) -> dict:
    """Two members reading opposite quadrants, blended 3 : 1, and an image."""
    tl = fold(tmp_path, "tl", {"name": "quadrant_toy", "quadrant": "top_left"})
    br = fold(tmp_path, "br", {"name": "quadrant_toy", "quadrant": "bottom_right"})
    config = tmp_path / "ensemble.yaml"
    config.write_text(yaml.safe_dump({"members": ["tl", "br"], "demo_members": [], "weights": {"tl": 3, "br": 1}}))
    return {"root": tmp_path, "tl": tl, "br": br, "config": config, "image": noise_image(tmp_path / "face.png")}


def explain(toys: dict, inputs: list[Path], *extra: str) -> int:
    weights = [a for m in ("tl", "br") for a in ("--weights", str(toys[m]))]
    args = [*map(str, inputs), *weights, "--config", str(toys["config"]), "--explain", str(toys["root"] / "out")]
    return infer.main([*args, *extra])


def green(pixels: np.ndarray, quadrant: str) -> float:
    return float(pixels[QUADRANTS[quadrant]][..., 1].astype(float).mean())


def test_a_captioned_png_per_member_and_the_blend_with_the_scored_probability(toys, capsys):
    assert explain(toys, [toys["image"]], "--runtime", "torch", "--json") == 0
    scored = json.loads(capsys.readouterr().out)
    probabilities = {"blend": scored["probability"], **scored["members"]}
    out = toys["root"] / "out"
    assert sorted(p.name for p in out.iterdir()) == ["face__blend.png", "face__br.png", "face__tl.png"]
    for name, probability in probabilities.items():
        with Image.open(out / f"face__{name}.png") as png:
            png.load()
            assert png.format == "PNG" and png.width == WIDTH and png.height > HEIGHT  # the caption band below
            assert png.text["Caption"] == f"{name}: p(fake) = {probability:.4f}"
            assert float(png.text["Probability"]) == probability
            assert png.text["Source"] == str(toys["image"])
            pixels = np.asarray(png.convert("RGB"))
        band = pixels[HEIGHT:]
        assert (band < 128).any() and (band > 128).any()  # dark text on a light band
    # The JET overlay is dark blue (no green) where the CAM is 0 and has green wherever it is
    # higher: each member's PNG is greener than the other's in the quadrant it reads.
    tl = np.asarray(Image.open(out / "face__tl.png").convert("RGB"))
    br = np.asarray(Image.open(out / "face__br.png").convert("RGB"))
    assert green(tl, "top_left") > green(br, "top_left") + 25
    assert green(br, "bottom_right") > green(tl, "bottom_right") + 25


def test_the_cam_lies_where_the_evidence_is_and_blends_with_the_ensemble_weights(toys):
    mixed = [copy_fold(toys["tl"], toys["root"], "mixed", 0), copy_fold(toys["br"], toys["root"], "mixed", 1)]
    trained = [read_model_file(w) for w in (toys["tl"], toys["br"], *mixed)]
    ensemble = Ensemble(trained, {"tl": 3, "br": 1, "mixed": 2})
    image = np.asarray(Image.open(toys["image"]).convert("RGB"))
    explainer = Explainer(ensemble, "cpu")
    cams = explainer.cams(image)
    explainer.release()
    assert set(cams) == {"tl", "br", "mixed", "blend"}
    assert all(c.shape == (HEIGHT, WIDTH) for c in cams.values())
    for member, quadrant in (("tl", "top_left"), ("br", "bottom_right")):
        assert cams[member][QUADRANTS[quadrant]].sum() / cams[member].sum() > 0.9
    np.testing.assert_allclose(cams["mixed"], (cams["tl"] + cams["br"]) / 2, atol=1e-6)
    # Ensemble.members is sorted: br, mixed, tl.
    np.testing.assert_allclose(cams["blend"], (1 * cams["br"] + 2 * cams["mixed"] + 3 * cams["tl"]) / 6, atol=1e-6)


def test_a_member_scored_on_face_crops_is_left_out_and_the_blend_is_the_others(toys, capsys):
    cropped = copy_fold(toys["br"], toys["root"], "cropped", 0)
    meta = json.loads((cropped.parent / "meta.json").read_text())
    meta["config"]["data"]["face_crop"] = {"kind": "sbi_test", "margin": 0.25, "margin_scale": 0.5}
    (cropped.parent / "meta.json").write_text(json.dumps(meta))
    trained = [read_model_file(w) for w in (toys["tl"], cropped)]
    explainer = Explainer(Ensemble(trained, {"tl": 3, "cropped": 1}), "cpu")
    cams = explainer.cams(np.asarray(Image.open(toys["image"]).convert("RGB")))
    explainer.release()
    assert set(cams) == {"tl", "blend"}
    np.testing.assert_allclose(cams["blend"], cams["tl"], atol=1e-6)
    assert "cropped not explained (scored on face crops)" in capsys.readouterr().err


def test_the_onnx_scoring_path_explains_in_pytorch_with_the_onnx_probability(toys, capsys):
    out = toys["root"] / "out"
    args = [str(toys["image"]), "--weights", str(toys["tl"]), "--device", "cpu", "--explain", str(out)]
    assert infer.main(args) == 0
    printed = capsys.readouterr().out.split("\t")[0]
    assert (toys["tl"].parent / "model.onnx").is_file()  # it did score with ONNX Runtime
    for name in ("tl", "blend"):
        with Image.open(out / f"face__{name}.png") as png:
            assert png.text["Caption"] == f"{name}: p(fake) = {printed}"


def test_duplicate_stems_get_distinct_names_and_unreadable_images_are_reported_once(toys, capsys):
    same = [noise_image(toys["root"] / "a" / "face.png", 1), noise_image(toys["root"] / "b" / "face.png", 2)]
    broken = toys["root"] / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    assert explain(toys, [*same, broken], "--runtime", "torch") == 1
    assert capsys.readouterr().err.count(f"skipped: {broken}") == 1
    written = sorted((toys["root"] / "out").iterdir())
    assert len(written) == 6 and not any(p.name.startswith("broken") for p in written)
    sources = {}
    for path in written:
        stem, member = path.stem.split("__")
        with Image.open(path) as png:
            sources.setdefault(stem, set()).add(png.text["Source"])
        assert member in {"tl", "br", "blend"}
    assert len(sources) == 2 and all(s.startswith("face-") for s in sources)
    assert sorted(s.pop() for s in sources.values()) == sorted(map(str, same))


def test_explain_does_not_combine_with_face_crops(toys, capsys):
    with pytest.raises(SystemExit) as exit_:
        explain(toys, [toys["image"]], "--crop-faces")
    assert exit_.value.code == 2 and "--explain" in capsys.readouterr().err


def test_a_network_without_a_layer_to_explain_is_one_clear_error(toys, capsys):
    weights = fold(toys["root"], "plain", {"name": "no_cam_toy"})
    args = [str(toys["image"]), "--weights", str(weights), "--runtime", "torch", "--explain", str(toys["root"] / "o")]
    assert infer.main(args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {weights}: NoCamLayer does not say which layer to explain (no cam_layer method)"
    )


def test_an_output_folder_that_is_a_file_is_one_clear_error(toys, capsys):
    taken = toys["root"] / "taken"
    taken.write_text("")
    args = [str(toys["image"]), "--weights", str(toys["tl"]), "--runtime", "torch", "--explain", str(taken)]
    assert infer.main(args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {taken}: cannot write explanations")


@pytest.mark.parametrize(
    ("model", "channels"),
    [
        ({"name": "mff_expert", "backbone": "test_resnet"}, 96),
        ({"name": "mff_expert", "backbone": "test_convnext"}, 64),
        ({"name": "sbi_fed", "backbone": "test_efficientnet", "guidance": False}, 64),
    ],
)
def test_members_explain_their_backbones_last_stride_32_stage(model, channels):
    network = models.build_model(model).eval()
    seen = []
    network.cam_layer().register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape)))
    network(torch.zeros(1, 3, 64, 64))
    assert seen == [(1, channels, 2, 2)]


def test_two_timm_members_give_different_cams(tmp_path):
    # At 128 px their stride-32 maps are 4 x 4 (at 32 px, 1 x 1: a constant CAM, scaled to 0).
    # Seeded: a random network may see no fake evidence at all in noise (a CAM of zeros).
    torch.manual_seed(0)
    trained = [
        read_model_file(fold(tmp_path, "res", {"name": "mff_expert", "backbone": "test_resnet"}, 128)),
        read_model_file(fold(tmp_path, "eff", {"name": "sbi_fed", "backbone": "test_efficientnet"}, 128)),
    ]
    image = np.asarray(Image.open(noise_image(tmp_path / "x.png")).convert("RGB"))
    explainer = Explainer(Ensemble(trained), "cpu")
    cams = explainer.cams(image)
    explainer.release()
    assert all(c.shape == (HEIGHT, WIDTH) and c.min() >= 0 and 0.5 < c.max() <= 1 for c in cams.values())
    assert np.abs(cams["res"] - cams["eff"]).mean() > 0.05


def test_the_cam_is_grad_cam_with_a_full_backward_pass(tmp_path):
    """Autograd starting at the explained layer gives the CAM a backward pass through the whole
    network gives (the library's GradCAM on the plain network)."""
    torch.manual_seed(0)
    trained = read_model_file(fold(tmp_path, "eff", {"name": "sbi_fed", "backbone": "test_efficientnet"}, 128))
    image = np.random.default_rng(3).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    fast = FoldCam(trained, torch.device("cpu"))
    ours = fast(image)
    fast.release()
    network = load_trained(trained.weights).model
    x = torch.from_numpy(Preprocessing.from_config(trained.config)(image))[None]
    full = GradCAM(LogitsOnly(network), [network.cam_layer()])(x, [FakeMargin()])[0]
    assert full.max() > 0.5
    np.testing.assert_allclose(ours, full, atol=1e-5)


@pytest.mark.parametrize(("width", "n_lines"), [(64, 3), (512, 1)])
def test_a_caption_wider_than_the_image_is_broken_into_lines_that_fit(width, n_lines):
    text = "blend: p(fake) = 0.4321"
    room = width - 2 * CAPTION_PAD
    font = _font(text, room)
    lines = _lines(text, font, room)
    assert " ".join(lines) == text and len(lines) == n_lines
    assert all(font.getlength(line) <= room for line in lines)
    band = captioned(np.zeros((10, width, 3), np.uint8), text)[10:]
    ink_rows = np.flatnonzero((band < 128).any(axis=(1, 2)))
    assert band.shape[0] >= n_lines * 10 and ink_rows.size and ink_rows[-1] < band.shape[0] - 1
