"""infer.py on videos: evenly sampled frames, faces cropped, max over faces, mean over frames."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from skimage import data as skdata

import infer
import models
from core.checkpoint import save_weights

CFG = {"name": "tiny", "model": {"name": "mff_expert", "backbone": "test_efficientnet"}, "data": {"image_size": 64}}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("member")
    model = models.build_model(CFG["model"])
    save_weights(model.state_dict(), folder / "model.safetensors")
    (folder / "meta.json").write_text(json.dumps({"complete": True, "config": CFG}))
    return folder / "model.safetensors"


def write_video(path, frames):
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, (w, h))
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def test_video_with_a_face_gets_a_probability(tmp_path, weights, capsys):
    face = skdata.astronaut()
    video = write_video(tmp_path / "clip.avi", [np.roll(face, 3 * i, axis=1) for i in range(6)])
    assert infer.main([str(video), "--weights", str(weights), "--frames", "3"]) == 0
    prob, name = capsys.readouterr().out.strip().split("\t")
    assert 0.0 <= float(prob) <= 1.0 and name.endswith("clip.avi")


def test_video_without_a_face_is_reported_not_scored(tmp_path, weights, capsys):
    video = write_video(tmp_path / "wall.avi", [np.full((96, 96, 3), 120, np.uint8)] * 4)
    assert infer.main([str(video), "--weights", str(weights)]) == 2
    captured = capsys.readouterr()
    assert "wall.avi: no face found in 4 frame(s)" in captured.err and captured.out == ""


def test_scores_pool_max_over_faces_then_mean_over_frames(weights, monkeypatch):
    args = infer.parse_args(["x.avi", "--weights", str(weights)])
    scorer = infer.Scorer(infer.load_ensemble(args), args, report=lambda m: None)
    crops = {0: [np.zeros((8, 8, 3))] * 2, 1: [np.ones((8, 8, 3))]}  # frame 0: two faces, frame 1: one
    monkeypatch.setattr(infer, "face_crops", lambda frame, analyzer: crops[int(frame)])
    # per crop, the one model's probability; the blend is taken of the pooled model probabilities
    monkeypatch.setattr(scorer.engine, "score_arrays", lambda arrays, face_crops=None: np.array([[0.3], [0.1], [0.5]]))
    monkeypatch.setattr(infer.Scorer, "analyzer", None)
    assert scorer.score_faces("x.avi", [0, 1]) == pytest.approx([(0.3 + 0.5) / 2, (0.3 + 0.5) / 2])


def test_a_face_cropping_network_cuts_the_frames_itself(weights, tmp_path, monkeypatch):
    """SBI's test crop is cut from the frame (`data.face_crop`), not from the aligned crops the
    other networks take; each network's frames without a face of its own are left out of its mean."""
    sbi = tmp_path / "sbi"
    sbi.mkdir()
    (sbi / "model.safetensors").write_bytes(weights.read_bytes())
    face_crop = {"kind": "sbi_test", "margin": 0.25, "margin_scale": 0.5}
    cfg = {**CFG, "name": "cropping", "data": {**CFG["data"], "face_crop": face_crop, "video_frames": 32}}
    (sbi / "meta.json").write_text(json.dumps({"complete": True, "config": cfg}))
    args = infer.parse_args(["x.avi", "--weights", str(weights), "--weights", str(sbi), "--runtime", "torch"])
    scorer = infer.Scorer(infer.load_ensemble(args), args, report=lambda m: None)
    assert scorer.frames == 32
    frames = [np.full((8, 8, 3), i, np.uint8) for i in range(3)]
    crops = {0: [np.zeros((8, 8, 3))] * 2, 1: [], 2: [np.ones((8, 8, 3))]}
    monkeypatch.setattr(infer, "face_crops", lambda frame, analyzer: crops[int(frame[0, 0, 0])])
    monkeypatch.setattr(infer.Scorer, "analyzer", None)
    nan = np.nan

    def score_arrays(arrays, face_crops=None):
        if face_crops:  # the cropping network is given the frames themselves; no face in frame 2
            assert all(a is f for a, f in zip(arrays, frames, strict=True))
            return np.array([[nan, 0.8], [nan, 0.4], [nan, nan]])
        return np.array([[0.3, nan], [0.1, nan], [0.5, nan]])  # the three aligned crops

    monkeypatch.setattr(scorer.engine, "score_arrays", score_arrays)
    assert scorer.pool_faces("x.avi", frames) == pytest.approx([(0.3 + 0.5) / 2, (0.8 + 0.4) / 2])
