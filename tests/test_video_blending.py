"""Video-level blending (data_prep/video_blending.py): one facial feature warped anew in every frame,
blended inside its feathered mask; nothing outside the mask changes."""

from __future__ import annotations

import numpy as np
import pytest

from core.config import ConfigError
from data_prep.edits import region_mask
from data_prep.video_blending import frame_warps, load_vblend_config, video_blend

CFG = load_vblend_config()  # the shipped recipe, configs/members/sta.yaml


def face_landmarks(cx: float, cy: float, s: float = 1.0) -> np.ndarray:
    """68 points laid out like dlib's: jaw, brows, nose, eyes and mouth of a face centred at (cx, cy)."""
    pts = np.zeros((68, 2))
    a = np.linspace(np.pi, 0, 17)
    pts[0:17] = np.stack([cx - 30 * s * np.cos(a), cy + 10 * s + 28 * s * np.sin(a) * 0.9], 1)
    pts[17:22] = np.stack([np.linspace(cx - 26, cx - 6, 5) * 1, np.full(5, cy - 22)], 1)
    pts[22:27] = np.stack([np.linspace(cx + 6, cx + 26, 5), np.full(5, cy - 22)], 1)
    pts[27:31] = np.stack([np.full(4, cx), np.linspace(cy - 14, cy + 2, 4)], 1)
    pts[31:36] = np.stack([np.linspace(cx - 8, cx + 8, 5), np.full(5, cy + 6)], 1)
    for start, ex in ((36, cx - 15), (42, cx + 15)):
        t = np.linspace(0, 2 * np.pi, 6, endpoint=False)
        pts[start : start + 6] = np.stack([ex + 7 * np.cos(t), cy - 12 + 3 * np.sin(t)], 1)
    t = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    pts[48:60] = np.stack([cx + 14 * np.cos(t), cy + 20 + 5 * np.sin(t)], 1)
    t = np.linspace(0, 2 * np.pi, 8, endpoint=False)
    pts[60:68] = np.stack([cx + 9 * np.cos(t), cy + 20 + 2 * np.sin(t)], 1)
    return pts


def textured_clip(frames: int = 8, size: int = 128) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    clip = [np.roll(base, t, axis=1) for t in range(frames)]  # the camera pans one pixel a frame
    return clip, [face_landmarks(64 + t, 64) for t in range(frames)]


def test_the_warp_is_drawn_anew_for_every_frame_within_its_bounds():
    params = frame_warps(200, CFG, np.random.default_rng(3))
    bounds = np.array([CFG.scale, CFG.shift, CFG.shift, CFG.rotate])
    assert (np.abs(params[:, 1:]) <= bounds[1:]).all() and (np.abs(params[:, 0] - 1) <= CFG.scale).all()
    # independent frames: consecutive draws are uncorrelated, and the steps span the range
    for k in range(4):
        assert abs(np.corrcoef(params[:-1, k], params[1:, k])[0, 1]) < 0.25
        assert np.abs(np.diff(params[:, k])).max() > bounds[k]


@pytest.mark.parametrize("seed", range(4))
def test_only_the_drawn_feature_moves_and_nothing_outside_its_mask(seed):
    clip, landmarks = textured_clip()
    fakes, weights = video_blend(clip, landmarks, CFG, np.random.default_rng(seed))
    region = CFG.regions[np.random.default_rng(seed).integers(len(CFG.regions))]
    for real, fake, weight, lm in zip(clip, fakes, weights, landmarks, strict=True):
        assert np.array_equal(fake[weight == 0], real[weight == 0])
        # the weight is the feature's own mask: within its hull it is near the drawn ratio
        hard = region_mask(lm, region, real.shape).astype(bool)
        assert weight[hard].max() >= CFG.ratio[0] * 0.9 and weight.max() <= CFG.ratio[1]
        assert (weight > 0).sum() < 4 * hard.sum()  # a feature, not the face
        assert not np.array_equal(fake[hard], real[hard])


def test_the_feature_drifts_between_frames_of_a_still_scene():
    frame = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    lm = face_landmarks(64, 64)
    fakes, weights = video_blend([frame] * 6, [lm] * 6, CFG, np.random.default_rng(5))
    diffs = [np.abs(a.astype(int) - b.astype(int)).sum() for a, b in zip(fakes, fakes[1:], strict=False)]
    assert min(diffs) > 0  # the real scene is still; the blended feature moves every frame


def test_bad_vblend_settings_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="vblend.regions"):
        load_vblend_config(regions=["ears"])
    with pytest.raises(ConfigError, match="vblend.share"):
        load_vblend_config(share=1.0)
    with pytest.raises(ConfigError, match="vblend.ratio"):
        load_vblend_config(ratio=[0.9, 0.5])
