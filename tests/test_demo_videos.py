"""The demo sample's videos (data_prep/demo_videos.py): labels, parents, lengths, what the fakes change."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.clip_reading import read_window
from core.data.labels import read_labels
from data_prep.demo import build_demo
from data_prep.demo_videos import VIDEO_FRAMES, VIDEO_SIZE


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo(tmp_path_factory.mktemp("demo") / "out", n_real=4, n_test=2, size=64, progress=False, n_videos=6)


def frame_count(path: Path) -> int:
    import cv2

    cap = cv2.VideoCapture(str(path))
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    cap.release()
    return n


def test_videos_are_labelled_per_video_in_the_competition_format(built):
    labels = read_labels(built / "video_labels.csv", built)
    assert list(labels.columns[:2]) == ["img_name", "target"] and len(labels) == 12
    assert labels["img_name"].str.fullmatch(r"videos/\d{5}\.mp4").all() and labels["target"].sum() == 6
    test = read_labels(built / "video_test_labels.csv", built)
    assert len(test) == 2 and test["img_name"].str.startswith("video_test/").all()


def test_each_fake_is_made_from_a_real_clip_of_the_set(built):
    man = pd.read_csv(built / "video_manifest.csv", keep_default_na=False)
    reals = set(man.loc[man.target == 0, "img_name"])
    fakes = man[man.target == 1]
    assert set(fakes["parent"]) <= reals and fakes["parent"].is_unique
    assert (man.loc[man.target == 0, "parent"] == man.loc[man.target == 0, "img_name"]).all()
    assert set(fakes["method"]) <= {"edit:swap", "edit:faceswap", "vblend"} and "vblend" in set(fakes["method"])


def test_clips_are_short_small_and_move(built):
    man = pd.read_csv(built / "video_manifest.csv", keep_default_na=False)
    for name in man["img_name"]:
        assert VIDEO_FRAMES[0] <= frame_count(built / name) <= VIDEO_FRAMES[1]
    real = read_window(str(built / man.loc[man.target == 0, "img_name"].iloc[0]), 32)
    assert real[0].shape == (VIDEO_SIZE, VIDEO_SIZE, 3)
    assert np.abs(real[0].astype(float) - real[-1].astype(float)).mean() > 2  # camera motion and lighting


def test_a_fake_clip_differs_from_its_real_mostly_inside_the_face(built):
    man = pd.read_csv(built / "video_manifest.csv", keep_default_na=False)
    for _, row in man[man.target == 1].iterrows():
        fake, real = read_window(str(built / row["img_name"]), 4), read_window(str(built / row["parent"]), 4)
        diff = np.abs(np.stack(fake).astype(float) - np.stack(real).astype(float)).mean(axis=(0, 3))
        c = VIDEO_SIZE // 4  # the faces sit around the centre of the frame
        centre, border = diff[c:-c, c:-c].mean(), np.concatenate([diff[:8].ravel(), diff[-8:].ravel()]).mean()
        assert centre > border, row["img_name"]
