"""Batched scoring of image files: decoding overlapped with compute in loader workers."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from core.dataset import ImageDataset, make_loader
from core.device import autocast
from core.log import get_logger

log = get_logger("predict")


def fake_probability(outputs: dict | torch.Tensor) -> torch.Tensor:
    """Softmax probability of class 1 (fake) from a 2-class output."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs
    return torch.softmax(logits.float(), dim=1)[:, 1]


def _batches(arrays: Sequence[np.ndarray], transform: Callable, batch_size: int):
    for start in range(0, len(arrays), batch_size):
        chunk = arrays[start : start + batch_size]
        images = torch.stack([transform(a, 0) for a in chunk])
        yield {"image": images, "index": torch.arange(start, start + len(chunk)), "errors": []}


@torch.inference_mode()
def predict_arrays(
    models: Sequence[torch.nn.Module],
    arrays: Sequence[np.ndarray],
    transform: Callable,
    device: torch.device,
    *,
    batch_size: int,
    channels_last: bool = False,
) -> np.ndarray:
    """Like `predict_loader` for images already in memory (video frames, face crops)."""
    for model in models:
        model.eval()
    probs = np.full((len(arrays), len(models)), np.nan, dtype=np.float64)
    for batch in _batches(arrays, transform, batch_size):
        probs[batch["index"].numpy()] = _forward(models, batch["image"], device, channels_last)
    return probs


def _forward(models: Sequence[torch.nn.Module], images: torch.Tensor, device: torch.device, channels_last: bool):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
    with autocast(device):
        p = torch.stack([fake_probability(m(images)) for m in models], dim=1)
    return p.float().cpu().numpy()


@torch.inference_mode()
def predict_loader(
    models: Sequence[torch.nn.Module],
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    *,
    channels_last: bool = False,
    progress: bool = True,
    on_error: Callable[[str], None] | None = None,
) -> np.ndarray:
    """Fake probability of every model for every item, shape (N, len(models)); NaN where
    the file was bad.

    Errors are passed to `on_error` (default: logged) as they appear, so a bad file among
    thousands is reported and the rest are scored.
    """
    report = on_error or log.warning
    for model in models:
        model.eval()
    probs = np.full((len(loader.dataset), len(models)), np.nan, dtype=np.float64)
    for batch in tqdm(loader, desc="predict", disable=not progress, leave=False):
        for message in batch["errors"]:
            report(message)
        if "image" not in batch:
            continue
        probs[batch["index"].numpy()] = _forward(models, batch["image"], device, channels_last)
    return probs


def predict_paths(
    models: Sequence[torch.nn.Module],
    paths: Sequence[str],
    transform: Callable,
    device: torch.device,
    *,
    batch_size: int,
    num_workers: int,
    channels_last: bool = False,
    progress: bool = True,
    on_error: Callable[[str], None] | None = None,
) -> np.ndarray:
    loader = make_loader(ImageDataset(paths, transform=transform), batch_size, num_workers)
    return predict_loader(models, loader, device, channels_last=channels_last, progress=progress, on_error=on_error)
