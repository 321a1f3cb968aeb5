"""infer.py's ONNX path preprocesses with NumPy and OpenCV exactly as the albumentations
pipeline that trained and validated the network."""

from __future__ import annotations

import numpy as np
import pytest

from core.data.transforms import build_transform
from core.preprocess import Preprocessing


@pytest.mark.parametrize(
    ("data", "shape"),
    [
        ({"image_size": 32}, (90, 70, 3)),
        ({"image_size": 48, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.5, 1.0]}, (40, 41, 3)),
    ],
)
def test_the_same_numbers_as_the_evaluation_transform(data, shape):
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    expected = build_transform(data, train=False)(image, 0).numpy()
    got = Preprocessing.from_config({"data": data})(image)
    assert got.dtype == np.float32 and got.shape == (3, data["image_size"], data["image_size"])
    np.testing.assert_array_equal(got, expected)
