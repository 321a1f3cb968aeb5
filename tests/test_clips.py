"""Clips in the data layer (core/clip_reading.py, core/data/clips.py): adjacent frames from a window
as the published code cuts them, every clip scored, stills as clips, video folds."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from core.clip_reading import (
    ClipSettings,
    check_uniform_clips,
    clip_starts,
    drift_clip,
    read_window,
    training_start,
    video_clips,
)
from core.config import ConfigError
from core.data.clips import ClipDataset, eval_dataset, video_folds, with_videos
from core.data.datasets import collate_skip_errors
from core.data.sources import DataPaths
from core.imaging import ImageDecodeError
from core.train.prediction import mean_per_item
from tests.test_infer_video import write_video


def numbered_video(path, n: int, size: int = 32):
    """Frame i is uniformly grey at level 8 * i, so a decoded frame tells its index."""
    return write_video(path, [np.full((size, size, 3), 8 * i, np.uint8) for i in range(n)])


def frame_numbers(frames) -> list[int]:
    return [int(round(float(f.mean()) / 8)) for f in frames]


def over_reported(path, n: int, reported: int):
    """An MJPG AVI of `n` numbered frames whose headers (avih's total frames, strh's length) announce
    `reported`: OpenCV's frame count then says `reported`."""
    data = bytearray(numbered_video(path, n).read_bytes())
    for chunk, offset in ((b"avih", 24), (b"strh", 40)):
        at = data.find(chunk) + offset
        data[at : at + 4] = reported.to_bytes(4, "little")
    path.write_bytes(bytes(data))
    cap = cv2.VideoCapture(str(path))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == reported  # the container really over-reports
    cap.release()
    return path


def test_clips_tile_the_window_as_the_published_code_cuts_it():
    assert clip_starts(300, 8, 32) == [0, 8, 16, 24]  # 4 clips of 8 adjacent frames from the first 32
    assert clip_starts(20, 8, 32) == [0, 12]  # a short video: fewer clips, spread over what it has
    assert clip_starts(5, 8, 32) == [0]  # shorter than a clip: one (its last frame repeated)
    assert clip_starts(100, 4, 16) == [0, 4, 8, 12]


def test_a_training_clip_starts_in_one_segment_and_ends_in_the_window():
    rng = np.random.default_rng(0)
    starts = [training_start(300, 8, 32, rng) for _ in range(400)]
    assert min(starts) == 0 and max(starts) == 24  # every segment is reached, the clip never leaves the window
    assert len(set(starts)) > 8  # offsets inside the segments are drawn, not only their starts
    assert {training_start(5, 8, 32, rng) for _ in range(20)} == {0}


def test_clips_are_adjacent_frames_of_the_window_decoded_once(tmp_path, monkeypatch):
    video = numbered_video(tmp_path / "v.avi", 30)
    reads = []
    real = cv2.VideoCapture

    class Counting:
        def __init__(self, *args):
            self.cap = real(*args)

        def read(self):
            reads.append(1)
            return self.cap.read()

        def __getattr__(self, name):
            return getattr(self.cap, name)

    monkeypatch.setattr(cv2, "VideoCapture", Counting)
    clips = video_clips(str(video), ClipSettings(frames=4, window=16))
    assert [frame_numbers(c) for c in clips] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert len(reads) == 16  # the window, once, for all four clips; never the rest of the video


def test_a_video_whose_container_over_reports_is_read_to_its_real_end(tmp_path):
    video = over_reported(tmp_path / "over.avi", 12, reported=200)
    assert frame_numbers(read_window(str(video), 32)) == list(range(12))
    clips = video_clips(str(video), ClipSettings(frames=4, window=32))
    assert [frame_numbers(c) for c in clips] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    item = eval_dataset({"clip": {"frames": 4}, "model": {"name": "sta"}}, [str(video)], [1], None)[0]
    assert "error" not in item and item["image"].shape == (3, 4, 3, 32, 32) and item["clips"] == 3


def test_a_video_that_records_no_frame_count_is_counted_and_read(tmp_path):
    from core.imaging import indexed_video_frames

    video = over_reported(tmp_path / "uncounted.avi", 12, reported=0)
    assert frame_numbers(read_window(str(video), 32)) == list(range(12))
    clips = video_clips(str(video), ClipSettings(frames=4, window=8))
    assert [frame_numbers(c) for c in clips] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    indexed = indexed_video_frames(video, 4)  # the image members' frames, spread over all 12
    assert [i for i, _ in indexed] == [0, 4, 7, 11] and frame_numbers(f for _, f in indexed) == [0, 4, 7, 11]


def test_a_cut_video_keeps_its_decodable_frames_and_junk_is_one_line(tmp_path):
    video = numbered_video(tmp_path / "cut.avi", 24, size=64)
    data = video.read_bytes()
    video.write_bytes(data[: len(data) // 2])
    try:
        frames = read_window(str(video), 32)
    except ImageDecodeError as err:  # some OpenCV builds refuse the cut index outright
        assert "cut.avi" in str(err) and "\n" not in str(err)
    else:
        assert 0 < len(frames) < 24 and frame_numbers(frames) == list(range(len(frames)))
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all")
    with pytest.raises(ImageDecodeError, match=r"junk\.mp4: ") as err:
        read_window(str(junk), 8)
    assert "\n" not in str(err.value)


def test_a_scored_video_is_the_mean_of_its_clips():
    items = [
        {"image": torch.zeros(3, 2, 3, 4, 4), "clips": 3, "index": 0},
        {"image": torch.ones(1, 2, 3, 4, 4), "clips": 1, "index": 1},
    ]
    batch = collate_skip_errors(items)
    assert batch["image"].shape == (4, 2, 3, 4, 4) and batch["clips"].tolist() == [3, 1]
    scores = np.array([[0.1], [0.2], [0.6], [0.9]])
    assert mean_per_item(scores, batch["clips"].numpy())[:, 0] == pytest.approx([0.3, 0.9])


def seed_recorder():
    seen = []

    def transform(image, seed):
        seen.append(seed)
        return torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32))

    return transform, seen


def test_a_clip_gets_one_augmentation_draw_for_all_its_frames(tmp_path):
    video = numbered_video(tmp_path / "v.avi", 16)
    transform, seen = seed_recorder()
    item = ClipDataset([str(video)], [1], transform, ClipSettings(frames=4, window=16), seed=3)[0]
    assert item["image"].shape == (4, 3, 32, 32) and item["target"] == 1
    assert len(seen) == 4 and len(set(seen)) == 1
    numbers = frame_numbers(item["image"].numpy().transpose(0, 2, 3, 1))
    assert numbers == list(range(numbers[0], numbers[0] + 4)) and numbers[-1] < 16  # adjacent, in the window


@pytest.mark.parametrize(("still", "frames"), [("single", 1), ("clip", 6)])
def test_stills_are_one_frame_clips_or_clips_built_from_the_image(tmp_path, still, frames):
    from PIL import Image

    rng = np.random.default_rng(0)
    path = tmp_path / "face.png"
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(path)
    ds = ClipDataset([str(path)], [0], None, ClipSettings(frames=6, still=still))
    assert ds[0]["image"].shape == (frames, 3, 48, 48)
    assert torch.equal(ds[0]["image"], ds[0]["image"])  # deterministic for (seed, epoch, index)


def test_a_scored_stills_clip_depends_on_the_image_not_its_place(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for name in ("a", "b", "c"):
        paths.append(tmp_path / f"{name}.png")
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(paths[-1])
    copy = tmp_path / "elsewhere.png"
    copy.write_bytes(paths[2].read_bytes())
    cfg = {"clip": {"frames": 6, "still": "clip", "drift": 0.1}, "model": {"name": "sta"}}
    listed = eval_dataset(cfg, [str(p) for p in paths], None, None)
    alone = eval_dataset(cfg, [str(copy)], None, None)
    assert torch.equal(listed[2]["image"], alone[0]["image"])  # third in a list, or alone under another name
    assert listed[2]["image"].shape == (1, 6, 3, 48, 48)
    training = ClipDataset([str(p) for p in paths], None, None, ClipSettings(frames=6, still="clip", drift=0.1))
    training.set_epoch(1)
    assert not torch.equal(training[2]["image"], listed[2]["image"][0])  # training draws still vary


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
    ds = ClipDataset([str(good), str(bad)], [0, 1], None, ClipSettings(frames=4, window=8))
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
    with pytest.raises(ConfigError, match="clip.window"):
        ClipSettings.from_cfg({"clip": {"frames": 8, "window": 4}})


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


def test_face_boxes_follow_a_moving_face_smoothed_over_the_clip():
    from data_prep.clip_faces import smoothed_boxes

    jitter = [3, -3] * 4
    found = [(20 + 6 * i + j, 40, 60 + 6 * i + j, 80) for i, j in enumerate(jitter)]
    found[3] = None  # no face found in one frame: its neighbour's box stands in
    boxes = np.asarray(smoothed_boxes(found, (200, 200, 3), margin=0.0), dtype=float)
    sides = boxes[:, 2] - boxes[:, 0]
    assert set(sides) == {40.0} and set(boxes[:, 3] - boxes[:, 1]) == {40.0}  # one square side per clip
    centres = (boxes[:, 0] + boxes[:, 2]) / 2
    assert centres[-1] - centres[0] > 25  # the box follows the face across the frame
    raw = np.array([40 + 6 * i + j for i, j in enumerate(jitter)], float)
    assert np.abs(np.diff(centres, 2)).max() < np.abs(np.diff(raw, 2)).max() / 2  # the jitter is smoothed out


def test_clip_face_boxes_are_found_once_per_frame_and_cached(tmp_path):
    from data_prep.clip_faces import ClipFaceCropper

    calls = []

    class Finder:  # a face at a known place per frame (its grey level), none in frame 2
        def primary_box(self, frame):
            i = int(round(float(frame.mean()) / 8))
            calls.append(i)
            return None if i == 2 else (4 + i, 8, 20 + i, 24)

    video = numbered_video(tmp_path / "v.avi", 8, size=48)
    cropper = ClipFaceCropper(tmp_path / "cache")
    cropper._analyzer = Finder()
    first, second = video_clips(str(video), ClipSettings(frames=4, window=8, face_crop=True), cropper)
    assert calls == list(range(8))  # each frame of the window searched once
    assert {f.shape for f in first + second} == {(25, 25, 3)}  # one side per clip: 16 px plus 30 % per side
    assert frame_numbers(first) == [0, 1, 2, 3]
    again = ClipFaceCropper(tmp_path / "cache")
    again._analyzer = Finder()
    video_clips(str(video), ClipSettings(frames=4, window=8, face_crop=True), again)
    assert calls == list(range(8))  # the second reader finds every box in the cache
