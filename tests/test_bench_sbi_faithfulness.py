"""The SBI faithfulness benchmark: its measures on masks with known answers, and a tiny run."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from bench import sbi_faithfulness as bench
from data_prep.blending import SBIMask

pytest.importorskip("dlib")


@pytest.mark.parametrize("sigma", [3.0, 8.0, 16.0])
def test_edge_width_of_a_blurred_disk(sigma):
    """A step blurred by a Gaussian goes from 0.1 to 0.9 over 2 * 1.2816 sigma."""
    m = np.zeros((400, 360), np.float32)
    cv2.ellipse(m, (180, 200), (110, 140), 20, 0, 360, 1, -1)
    width = bench.edge_width(cv2.GaussianBlur(m, (0, 0), sigma))
    assert width == pytest.approx(2 * 1.2816 * sigma, abs=0.6)


def test_edge_width_ignores_the_image_border():
    m = np.zeros((200, 200), np.float32)
    m[:, :120] = 1.0  # a half-plane: its only true edge is the vertical one
    width = bench.edge_width(cv2.GaussianBlur(m, (0, 0), 4.0, borderType=cv2.BORDER_REPLICATE))
    assert width == pytest.approx(2 * 1.2816 * 4.0, abs=0.6)
    assert np.isnan(bench.edge_width(np.zeros((50, 50), np.float32)))


def test_eroded_share_and_coverage():
    hull = np.zeros((200, 200), np.float32)
    cv2.circle(hull, (100, 100), 80, 1, -1)
    eroded = np.zeros_like(hull)
    cv2.circle(eroded, (100, 100), 60, 1, -1)
    share = bench.eroded_share(SBIMask(hull, eroded, hull))
    assert share == pytest.approx(1 - (60 / 80) ** 2, abs=0.02)
    assert bench.coverage(hull) == pytest.approx(np.pi * 80**2 / 200**2, abs=0.01)


def test_tiny_run_prints_and_writes_complete_json(tmp_path, capsys):
    out = tmp_path / "faith.json"
    assert bench.main(["--n", "2", "--sizes", "380", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == result
    size = result["sizes"]["380"]
    assert set(size["inputs"]) == {"astronaut/photo", "astronaut/face", "grace_hopper/photo", "grace_hopper/face"}
    for group, n in (("all", 8), ("photo", 4), ("face", 4)):
        for frame in ("input", "cut", "output"):
            edge = size[group][frame]["edge_width_px"]
            assert 0 < edge["n"] <= n and 0 < edge["min"] <= edge["p50"] <= edge["max"] < 380
            assert 0 < size[group][frame]["coverage"]["p50"] < 1
        for frame in ("input", "cut"):
            assert 0 < size[group][frame]["eroded_share"]["p50"] < 1
    assert result["reference"]["edge_width_px"] == [9, 46]
