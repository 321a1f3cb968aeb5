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
