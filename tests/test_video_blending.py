"""Video-level blending (data_prep/video_blending.py): a smooth drift, a blend inside the face."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.edits import face_hull_mask
from data_prep.video_blending import drift_params, load_vblend_config, video_blend

CFG = load_vblend_config()  # the shipped recipe, configs/members/sta.yaml


def ellipse_landmarks(cx: float, cy: float, rx: float = 30, ry: float = 38) -> np.ndarray:
    """68 points on an ellipse; 8 (the chin) at the bottom and 17-26 (the brows) near the top."""
    angles = np.linspace(0.25 * np.pi, 2.25 * np.pi, 68, endpoint=False)
    pts = np.stack([cx + rx * np.cos(angles), cy + ry * np.sin(angles)], axis=1)
    pts[8] = (cx, cy + ry)
    pts[17:27] = np.stack([np.linspace(cx - rx * 0.8, cx + rx * 0.8, 10), np.full(10, cy - ry * 0.7)], axis=1)
    return pts


def textured_clip(frames: int = 16, size: int = 128) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    clip = [np.roll(base, t, axis=1) for t in range(frames)]  # the camera pans one pixel a frame
    return clip, [ellipse_landmarks(64 + t, 64) for t in range(frames)]


def test_the_warp_drifts_smoothly():
    params = drift_params(16, CFG, np.random.default_rng(3))
    steps = np.abs(np.diff(params, axis=0))
    bounds = np.array([CFG.scale, CFG.shift, CFG.shift, CFG.rotate])
    # a smoothstep's slope is at most 1.5: a step never exceeds 1.5 x the full range / (T - 1)
    assert (steps <= 1.5 * 2 * bounds / 15 + 1e-12).all()
    assert (np.abs(params[:, 1:]) <= bounds[1:] + 1e-12).all() and (np.abs(params[:, 0] - 1) <= CFG.scale).all()
    assert np.abs(params[-1] - params[0]).sum() > 0  # it does drift


def test_frame_to_frame_change_of_the_blend_is_bounded():
    clip, landmarks = textured_clip()
    fakes, weights = video_blend(clip, landmarks, CFG, np.random.default_rng(1))
    # the weight moves with the face (one pixel a frame), so realigned weights change little between frames
    realigned = [np.roll(w, -t, axis=1) for t, w in enumerate(weights)]
    changes = [np.abs(b - a).max() for a, b in zip(realigned, realigned[1:], strict=False)]
    assert max(changes) < 0.05
    assert all(w.max() > 0.5 for w in weights)  # and something is blended in every frame
    assert not all(np.array_equal(f, c) for f, c in zip(fakes, clip, strict=True))


def test_the_blend_stays_inside_the_face_mask():
    clip, landmarks = textured_clip()
    fakes, weights = video_blend(clip, landmarks, CFG, np.random.default_rng(2))
    for real, fake, weight, lm in zip(clip, fakes, weights, landmarks, strict=True):
        outside = face_hull_mask(lm, real.shape) == 0
        assert (weight[outside] == 0).all()
        assert np.array_equal(fake[outside], real[outside])


def test_a_blur_wider_than_the_erosion_is_refused():
    with pytest.raises(ValueError, match="blur \\* 3 must not exceed erode"):
        load_vblend_config(blur=0.05, erode=0.06)
