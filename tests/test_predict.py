"""Batched scoring: the read-ahead thread that overlaps decoding with compute, and scores that keep fp32 precision."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

import core.train.prediction as predict
from core.train.prediction import read_ahead
from models.heads import fp32_head


def _running_read_ahead_threads() -> int:
    return sum(t.name == "read-ahead" for t in threading.enumerate())


def test_items_arrive_in_order_and_the_thread_ends():
    assert list(read_ahead(range(50), depth=3)) == list(range(50))
    assert _running_read_ahead_threads() == 0


def test_the_next_item_is_fetched_while_the_caller_works():
    fetched: list[int] = []

    def slow_items():
        for i in range(3):
            time.sleep(0.05)
            fetched.append(i)
            yield i

    items = read_ahead(slow_items())
    assert next(items) == 0
    deadline = time.monotonic() + 5
    while len(fetched) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fetched == [0, 1]  # item 1 is ready before the caller asked for it
    assert list(items) == [1, 2]


def test_an_error_while_fetching_reaches_the_caller():
    def broken():
        yield 1
        raise OSError("disk gone")

    items = read_ahead(broken())
    assert next(items) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(items)
    assert _running_read_ahead_threads() == 0


def test_leaving_early_stops_the_thread():
    pulled: list[int] = []

    def endless():
        i = 0
        while True:
            pulled.append(i)
            yield i
            i += 1

    for item in read_ahead(endless(), depth=2):
        if item == 3:
            break
    assert _running_read_ahead_threads() == 0
    assert len(pulled) <= 3 + 2 + 1  # at most depth items ahead, plus the one being fetched


# --- precision: scores keep the resolution of fp32 logits under bf16 autocast ----------------


class _FeatureNet(torch.nn.Module):
    """Images are feature vectors already (N, 3, 1, D/3); the head is the only layer."""

    def __init__(self, dim: int, keep_fp32: bool):
        super().__init__()
        self.head = torch.nn.Linear(dim, 2)
        self.keep_fp32 = keep_fp32

    def forward(self, images: torch.Tensor) -> dict:
        features = images.flatten(1)
        logits = fp32_head(self.head, features) if self.keep_fp32 else self.head(features)
        return {"logits": logits}


def _cpu_bf16(device, enabled=True):
    """What autocast does on a GPU, reproduced on the CPU so the test runs anywhere."""
    from contextlib import nullcontext

    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else nullcontext()


def test_ten_thousand_distinct_logits_stay_distinct_under_bf16(monkeypatch):
    monkeypatch.setattr(predict, "autocast", _cpu_bf16)
    torch.manual_seed(0)
    net = _FeatureNet(96, keep_fp32=True)
    features = [np.random.default_rng(i).normal(0, 0.5, (3, 1, 32)).astype(np.float32) for i in range(10_000)]
    probs = predict.predict_arrays(
        [net], features, lambda a, _seed: torch.from_numpy(a), torch.device("cpu"), batch_size=1000
    )[:, 0]
    with torch.no_grad():
        as_batch = torch.from_numpy(np.stack(features)).flatten(1)
        exact = torch.softmax(net.head(as_batch).double(), 1)[:, 1].numpy()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what a plain head under autocast gives
            collapsed = torch.softmax(net.head(as_batch).double(), 1)[:, 1].numpy()
    assert probs.dtype == np.float64
    # Every distinction the float32 head makes survives (a CPU's float32 kernels may map two of the
    # 10,000 inputs to one logit, so the count is the exact head's, not 10,000 itself).
    assert len(np.unique(probs)) == len(np.unique(exact)) >= 9_990
    np.testing.assert_allclose(probs, exact, rtol=0, atol=1e-6)
    assert len(np.unique(collapsed)) < 5_000


def test_a_network_with_a_low_precision_head_is_refused(monkeypatch):
    monkeypatch.setattr(predict, "autocast", _cpu_bf16)
    arrays = [np.ones((3, 1, 2), np.float32)] * 2
    with pytest.raises(TypeError, match="bfloat16 logits.*models.heads.fp32_head"):
        predict.predict_arrays(
            [_FeatureNet(6, keep_fp32=False)],
            arrays,
            lambda a, _s: torch.from_numpy(a),
            torch.device("cpu"),
            batch_size=2,
        )


def test_saturated_probabilities_stay_ordered():
    logits = torch.tensor([[0.0, 20.0], [0.0, 21.0], [0.0, 22.0]])
    p = predict.fake_probability({"logits": logits}).numpy()
    assert p[0] < p[1] < p[2] < 1.0  # float32 rounds all three to 1.0


def test_amp_false_never_enters_autocast(monkeypatch):
    seen: list[bool] = []

    def recording(device, enabled=True):
        seen.append(enabled)
        return _cpu_bf16(device, enabled)

    monkeypatch.setattr(predict, "autocast", recording)
    net = _FeatureNet(3, keep_fp32=False)
    arrays = [np.ones((3, 1, 1), np.float32)] * 4
    to_tensor = lambda a, _seed: torch.from_numpy(a)  # noqa: E731
    kept = predict.predict_arrays([net], arrays, to_tensor, torch.device("cpu"), batch_size=2, amp=False)
    assert seen == [False, False]
    with torch.no_grad():
        fp32 = torch.softmax(net.head(torch.ones(1, 3)).double(), 1)[0, 1].item()
    assert kept[0, 0] == pytest.approx(fp32, abs=1e-12)


class _Brightness(torch.nn.Module):
    """Logits (0, mean pixel value): the fake probability rises with brightness."""

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        mean = images.float().mean(dim=(1, 2, 3))
        return {"logits": torch.stack([torch.zeros_like(mean), mean], dim=1)}


def test_face_cropped_images_score_their_highest_face_and_faceless_ones_are_nan(tmp_path):
    """A network that takes face crops: every face of an image is scored and the highest kept, as
    SBI's test does; an image without a face is reported and NaN."""
    from PIL import Image

    from core.data.datasets import ImageDataset, make_loader

    levels = {"two_faces.png": (0.2, 0.9), "one_face.png": (0.5,), "no_face.png": ()}
    paths = []
    for name, faces in levels.items():
        Image.fromarray(np.full((16, 16, 3), 10 * len(faces), np.uint8)).save(tmp_path / name)
        paths.append(str(tmp_path / name))

    def crop(image: np.ndarray) -> list[np.ndarray]:
        faces = levels[{20: "two_faces.png", 10: "one_face.png", 0: "no_face.png"}[int(image[0, 0, 0])]]
        return [np.full((4, 4, 3), level, np.float32) for level in faces]

    def transform(face: np.ndarray, seed: int) -> torch.Tensor:
        return torch.from_numpy(face.transpose(2, 0, 1).copy())

    errors: list[str] = []
    dataset = ImageDataset(paths, [1, 0, 1], transform, crop=crop)
    assert len(dataset.subset([0, 2])) == 2 and dataset.subset([0])[0]["faces"] == 2
    loader = make_loader(dataset, batch_size=3, num_workers=0)
    probs = predict.predict_loader([_Brightness()], loader, torch.device("cpu"), progress=False, on_error=errors.append)
    sigmoid = 1 / (1 + np.exp(-np.array([0.9, 0.5])))
    np.testing.assert_allclose(probs[:2, 0], sigmoid)
    assert np.isnan(probs[2, 0]) and errors == [f"{paths[2]}: no face found; not scored"]
