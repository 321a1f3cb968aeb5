"""Clips in the data layer (core/data/clips.py): evenly spaced frames, stills as clips, video folds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from core.config import ConfigError
from core.data.clips import (
    ClipDataset,
    ClipSettings,
    check_uniform_clips,
    clip_indices,
    drift_clip,
    read_clip,
    video_folds,
    with_videos,
)
from core.data.datasets import collate_skip_errors
from core.data.sources import DataPaths
from core.imaging import ImageDecodeError
from tests.test_infer_video import write_video


def numbered_video(path, n: int, size: int = 32):
    """Frame i is uniformly grey at level 8 * i, so a decoded frame tells its index."""
    return write_video(path, [np.full((size, size, 3), 8 * i, np.uint8) for i in range(n)])


def frame_numbers(frames) -> list[int]:
    return [int(round(float(f.mean()) / 8)) for f in frames]


def test_indices_spread_over_the_whole_video_not_its_start():
    assert clip_indices(30, 4).tolist() == [0, 10, 19, 29]
    assert clip_indices(3, 5).tolist() == [0, 0, 1, 2, 2]  # a short video repeats frames
    assert clip_indices(100, 1).tolist() == [0]


def test_read_clip_takes_the_evenly_spaced_frames(tmp_path):
    video = numbered_video(tmp_path / "v.avi", 24)
    frames = read_clip(str(video), 8)
    assert len(frames) == 8 and frames[0].shape == (32, 32, 3)
    assert frame_numbers(frames) == clip_indices(24, 8).tolist() == [0, 3, 7, 10, 13, 16, 20, 23]


def test_truncated_and_unreadable_videos_raise_one_line_naming_the_file(tmp_path):
    video = numbered_video(tmp_path / "cut.avi", 24, size=64)
    data = video.read_bytes()
    video.write_bytes(data[: len(data) // 2])  # the header still announces 24 frames
    with pytest.raises(ImageDecodeError, match=r"cut\.avi: (truncated|video reports no frames|cannot open)") as err:
        read_clip(str(video), 8)
    assert "\n" not in str(err.value)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all")
    with pytest.raises(ImageDecodeError, match=r"junk\.mp4: "):
        read_clip(str(junk), 8)


def seed_recorder():
    seen = []

    def transform(image, seed):
        seen.append(seed)
        return torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32))

    return transform, seen


def test_a_clip_gets_one_augmentation_draw_for_all_its_frames(tmp_path):
    video = numbered_video(tmp_path / "v.avi", 16)
    transform, seen = seed_recorder()
    item = ClipDataset([str(video)], [1], transform, ClipSettings(frames=4), seed=3)[0]
    assert item["image"].shape == (4, 3, 32, 32) and item["target"] == 1
    assert len(seen) == 4 and len(set(seen)) == 1


@pytest.mark.parametrize(("still", "frames"), [("single", 1), ("clip", 6)])
def test_stills_are_one_frame_clips_or_clips_built_from_the_image(tmp_path, still, frames):
    from PIL import Image

    rng = np.random.default_rng(0)
    path = tmp_path / "face.png"
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(path)
    ds = ClipDataset([str(path)], [0], None, ClipSettings(frames=6, still=still))
    assert ds[0]["image"].shape == (frames, 3, 48, 48)
    assert torch.equal(ds[0]["image"], ds[0]["image"])  # deterministic for (seed, epoch, index)


def test_drift_clip_moves_smoothly():
    image = np.zeros((64, 64, 3), np.uint8)
    image[24:40, 24:40] = 255
    frames = drift_clip(image, 8, 0.1, np.random.default_rng(1))
    centres = np.array([np.argwhere(f[..., 0] > 127).mean(0) for f in frames])
    steps = np.linalg.norm(np.diff(centres, axis=0), axis=1)
    assert steps.max() <= 64 * 0.2 / 7 + 1.0  # at most the whole drift spread over the clip, plus rounding
    assert np.linalg.norm(centres[-1] - centres[0]) > 0.5  # it does move


def test_bad_video_in_a_batch_becomes_an_error_message_not_a_crash(tmp_path):
    good = numbered_video(tmp_path / "good.avi", 8)
    bad = tmp_path / "bad.avi"
    bad.write_bytes(b"\x00" * 100)
    ds = ClipDataset([str(good), str(bad)], [0, 1], None, ClipSettings(frames=4))
    batch = collate_skip_errors([ds[0], ds[1]])
    assert batch["image"].shape == (1, 4, 3, 32, 32) and batch["index"].tolist() == [0]
    assert len(batch["errors"]) == 1 and batch["errors"][0].startswith(str(bad))


def test_one_frame_stills_and_video_clips_cannot_share_batches():
    with pytest.raises(ConfigError, match="mixes videos and still images.*clip.still=clip"):
        check_uniform_clips(["a.jpg", "b.mp4"], ClipSettings(frames=8, still="single"), "the training set")
    check_uniform_clips(["a.jpg", "b.mp4"], ClipSettings(frames=8, still="clip"), "the training set")
    check_uniform_clips(["a.jpg", "b.jpg"], ClipSettings(frames=8, still="single"), "the training set")


def test_clip_settings_are_checked():
    with pytest.raises(ConfigError, match="clip.frames"):
        ClipSettings.from_cfg({"clip": {"still": "clip"}})
    with pytest.raises(ConfigError, match="clip.still"):
        ClipSettings.from_cfg({"clip": {"frames": 4, "still": "loop"}})
    with pytest.raises(ConfigError, match="unknown clip setting"):
        ClipSettings.from_cfg({"clip": {"frames": 4, "fps": 3}})


def video_table(n_real: int = 12) -> pd.DataFrame:
    rows = []
    for i in range(n_real):
        rows.append({"img_name": f"videos/r{i}.mp4", "target": 0, "parent": f"videos/r{i}.mp4"})
        rows.append({"img_name": f"videos/f{i}a.mp4", "target": 1, "parent": f"videos/r{i}.mp4"})
        rows.append({"img_name": f"videos/f{i}b.mp4", "target": 1, "parent": f"videos/r{i}.mp4"})
    return pd.DataFrame(rows).assign(sources="")


def test_video_folds_keep_a_source_video_and_its_fakes_together():
    videos = video_table()
    folds = video_folds(videos, [0, 1, 2], seed=42)
    assert set(folds) == {0, 1, 2}
    per_parent = pd.Series(folds).groupby(videos["parent"].to_numpy()).nunique()
    assert (per_parent == 1).all()
    assert np.array_equal(folds, video_folds(videos, [0, 1, 2], seed=42))


def test_with_videos_adds_the_videos_to_a_clip_members_table_only(tmp_path):
    videos = video_table(6)
    for name in videos["img_name"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    videos[["img_name", "target"]].to_csv(tmp_path / "video_labels.csv", index=False)
    videos.assign(method="real", region="").to_csv(tmp_path / "video_manifest.csv", index=False)
    paths = DataPaths(
        *(tmp_path / n for n in ("l.csv", "r", "t.csv", "tr")),
        None,
        None,
        True,
        video_labels=tmp_path / "video_labels.csv",
        video_root=tmp_path,
        video_manifest=tmp_path / "video_manifest.csv",
    )
    table = pd.DataFrame({"img_name": ["a.jpg", "b.jpg"], "target": [0, 1], "fold": [0, 1], "cluster": [0, 1]})
    cfg = {"clip": {"frames": 4}, "split": {"seed": 42}}
    joined = with_videos(cfg, paths, table)
    assert len(joined) == 2 + len(videos) and set(joined["fold"]) == {0, 1}
    added = joined.iloc[2:]
    assert (added["cluster"] == -1).all() and added["path"].str.startswith(str(tmp_path)).all()
    assert with_videos({"split": {"seed": 42}}, paths, table) is table
