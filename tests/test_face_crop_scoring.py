"""A member whose config records `data.face_crop` (sbi_fed: SBI's test crop) is scored on its face
crops everywhere: validation, the oof.csv and test.csv that train.py writes, and infer.py, which
agree; `data.video_frames` sets how many frames of a video infer.py takes."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

import cv_split
import data_prep.face_crop
import infer
import train
from core.config import load_config
from core.data.transforms import build_transform
from core.imaging import decode_image
from core.preprocess import Preprocessing
from models.zoo import load_trained

FACE_CROP = {"kind": "sbi_test", "margin": 0.25, "margin_scale": 0.5}


def halves(image: np.ndarray) -> list[np.ndarray]:
    """A stand-in for the face detector: two 'faces' per image, none in a black one."""
    if image.max() == 0:
        return []
    h, w = image.shape[:2]
    return [image[: h // 2, : w // 2], image[h // 2 :, w // 2 :]]


def test_sbi_fed_records_sbis_test_crop_and_32_frames():
    for name in ("sbi_fed", "sbi_fed_demo"):
        cfg = load_config([f"configs/members/{name}.yaml"])
        recorded = Preprocessing.from_config(cfg)
        assert recorded.face_crop is not None and recorded.video_frames == 32
        assert (recorded.face_crop.margin, recorded.face_crop.margin_scale) == (
            cfg["sbi"]["crop_margin"],
            cfg["sbi"]["test_margin_scale"],
        )
    assert Preprocessing.from_config(load_config(["configs/members/mff.yaml"])).face_crop is None


def test_train_and_infer_score_the_highest_face_crop_alike(tiny_project, monkeypatch, capsys):
    p = tiny_project
    member = yaml.safe_load(p["member_cfg"].read_text())
    member["data"]["face_crop"] = FACE_CROP
    p["member_cfg"].write_text(yaml.safe_dump(member))
    black = p["root"] / "data" / "test" / "t_000.png"
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(black)
    monkeypatch.setattr(
        data_prep.face_crop, "face_cropper", lambda prep, cache_dir=None: halves if prep.face_crop else None
    )
    assert cv_split.main(["--config", str(p["data_cfg"])]) == 0
    args = ["--config", str(p["member_cfg"]), "--data-config", str(p["data_cfg"]), "--fold", "0"]
    assert train.main(args) == 0

    fold = p["outputs"] / "tiny" / "fold0"
    test = pd.read_csv(fold / "test.csv").set_index("img_name")["y_pred"]
    assert np.isnan(test["t_000.png"]) and test.drop("t_000.png").notna().all()
    assert pd.read_csv(fold / "oof.csv")["y_pred"].notna().all()

    face = p["root"] / "data" / "test" / "t_001.png"
    network = load_trained(fold / "model.safetensors").model.eval()
    transform = build_transform({**member["data"]}, train=False)
    image = decode_image(face)
    import torch

    with torch.no_grad():
        probs = [network(transform(x, 0)[None])["logits"].double().softmax(1)[0, 1].item() for x in halves(image)]
        whole = network(transform(image, 0)[None])["logits"].double().softmax(1)[0, 1].item()
    assert test["t_001.png"] == pytest.approx(max(probs), abs=1e-6) and max(probs) != pytest.approx(whole, abs=1e-6)

    capsys.readouterr()
    weights = ["--weights", str(fold / "model.safetensors"), "--runtime", "torch", "--json"]
    assert infer.main([str(face), str(black), *weights]) == 1
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[0]["members"]["tiny"] == pytest.approx(test["t_001.png"], abs=1e-6)
    assert rows[1]["probability"] is None and "no face found" in rows[1]["skipped"]


def test_infer_takes_the_most_frames_a_member_records(tiny_project, monkeypatch):
    p = tiny_project
    folder = p["outputs"] / "m" / "fold0"
    folder.mkdir(parents=True)
    import models
    from core.checkpoint import save_weights

    cfg = {"name": "m", "model": {"name": "mff_expert", "backbone": "test_resnet"}, "data": {"image_size": 32}}
    save_weights(models.build_model(cfg["model"]).state_dict(), folder / "model.safetensors")

    def scorer(video_frames, *extra):
        data = {**cfg["data"], "video_frames": video_frames}
        (folder / "meta.json").write_text(json.dumps({"complete": True, "config": {**cfg, "data": data}}))
        args = infer.parse_args(["x.avi", "--weights", str(folder / "model.safetensors"), "--runtime", "torch", *extra])
        return infer.Scorer(infer.load_ensemble(args), args, report=lambda m: None)

    assert scorer(None).frames == infer.DEFAULT_FRAMES == 16
    assert scorer(32).frames == 32
    assert scorer(32, "--frames", "3").frames == 3


class CountingAnalyzer:
    """dlib's stand-in: one face box, and how many times it was asked."""

    def __init__(self):
        self.calls = 0

    def settings(self) -> str:
        return "stub"

    def boxes(self, image: np.ndarray) -> list:
        self.calls += 1
        return [(8, 8, 40, 40)]


def test_face_boxes_are_searched_once_per_image_with_a_cache(tmp_path):
    import pickle

    from core.preprocess import FaceCrop

    analyzer = CountingAnalyzer()
    cropper = data_prep.face_crop.FaceCropper(FaceCrop(**FACE_CROP), 32, analyzer, cache_dir=tmp_path / "boxes")
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    first = cropper(image)
    again = cropper(image.copy())
    assert analyzer.calls == 1 and len(first) == 1 and np.array_equal(first[0], again[0])
    assert first[0].shape == (32, 32, 3)
    cropper(255 - image)  # other pixels: searched
    assert analyzer.calls == 2
    assert pickle.loads(pickle.dumps(cropper)).analyzer is None  # loader workers load their own
