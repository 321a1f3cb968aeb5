"""Smoke test of bench.train_throughput in a tiny mode: the JSON it prints is complete and sane."""

from __future__ import annotations

import json

import pytest
import torch

from bench import train_throughput


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """--threads changes the process-wide torch setting; give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("images", "kl"), [("photos", 1.0), ("data", 0.0)])
def test_train_throughput_tiny(tiny_project, capsys, images, kl):
    argv = [
        "--data-config",
        str(tiny_project["data_cfg"]),
        "--steps",
        "2",
        "--warmup",
        "1",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--threads",
        "1",  # two threads on two busy cores can take seconds a step
        "--images",
        images,
        "--n-photos",
        "4",
        "--loader-batches",
        "3",
        "data.image_size=32",
        "train.num_workers=0",
        f"loss.kl={kl}",
    ]
    assert train_throughput.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("step", "loader", "loader_vs_step", "target", "target_met", "device", "batch_size"):
        assert key in out, key
    step, loader = out["step"], out["loader"]
    assert out["device"] == "cpu" and out["batch_size"] == 4 and out["image_size"] == 32
    assert step["steps"] == 2 and step["images_per_s"] > 0 and step["seconds_per_step"] > 0
    # with a KL weight the noisy copy doubles the forward batch
    assert step["loss"]["kl"] == kl and step["forward_images_per_step"] == (8 if kl else 4)
    assert step["last_loss"] == step["last_loss"]  # not NaN
    assert loader["images_per_s"] > 0 and loader["batches"] == 3 and loader["num_workers"] == 0
    assert loader["image_shape"] == [3, 32, 32]  # the training transforms resized every file
    assert ("photo JPEGs" in loader["files"]) == (images == "photos")
    ratio = loader["images_per_s"] / step["images_per_s"]
    assert out["loader_vs_step"] == pytest.approx(ratio, rel=1e-2)
    assert out["target_met"] == (out["loader_vs_step"] >= out["target"])


def test_train_throughput_refuses_a_bad_override(capsys):
    assert train_throughput.main(["--steps", "1", "data.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
