"""Batched scoring of image files: decoding overlapped with compute (in loader workers, or
in a read-ahead thread where there are none)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from core.data.datasets import ImageDataset, make_loader
from core.data.tta import average_views
from core.device import autocast
from core.log import get_logger
from core.prefetch import read_ahead
from core.progress import progress_bar

log = get_logger("predict")


def fake_probability(outputs: dict | torch.Tensor) -> torch.Tensor:
    """Softmax probability of class 1 (fake) from a 2-class output, in float64.

    Members compute their logits in fp32 (`models.heads.fp32_head`); the softmax runs in
    float64 so that distinct logits keep distinct probabilities up to the saturated tails,
    where float32 would round p = 1 - 1e-9 and p = 1 - 2e-9 to one value.
    """
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs
    if logits.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"the network returned {logits.dtype} logits, whose few distinct values tie the scores; "
            "compute its classifier head with models.heads.fp32_head"
        )
    return torch.softmax(logits.double(), dim=1)[:, 1]


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
    amp: bool = True,
    tta: str = "none",
) -> np.ndarray:
    """Like `predict_loader` for images already in memory (video frames, face crops)."""
    for model in models:
        model.eval()
    probs = np.full((len(arrays), len(models)), np.nan, dtype=np.float64)
    for batch in _batches(arrays, transform, batch_size):
        probs[batch["index"].numpy()] = _forward(models, batch["image"], device, channels_last, amp, tta)
    return probs


def _forward(
    models: Sequence[torch.nn.Module],
    images: torch.Tensor,
    device: torch.device,
    channels_last: bool,
    amp: bool,
    tta: str = "none",
) -> np.ndarray:
    """Float64 probabilities, averaged over the views of `tta` (`core.data.tta`): bf16 autocast (GPU,
    `amp`) covers the networks, whose heads run in fp32 (`models.heads`); the softmax runs outside
    it in float64 (`fake_probability`)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def score(view: torch.Tensor) -> torch.Tensor:
        view = view.contiguous(memory_format=memory_format)
        with autocast(device, amp):
            outputs = [m(view) for m in models]
        return torch.stack([fake_probability(o) for o in outputs], dim=1)

    return average_views(score, images.to(device, non_blocking=True), tta).cpu().numpy()


@torch.inference_mode()
def predict_loader(
    models: Sequence[torch.nn.Module],
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    *,
    channels_last: bool = False,
    amp: bool = True,
    progress: bool = True,
    on_error: Callable[[str], None] | None = None,
    tta: str = "none",
) -> np.ndarray:
    """Fake probability of every model for every item, shape (N, len(models)); NaN where
    the file was bad. `amp=False` keeps a GPU in fp32 (a member's `train.amp: false`); `tta`
    averages over views of each image (`core.data.tta`).

    Errors are passed to `on_error` (default: logged) as they appear, so a bad file among
    thousands is reported and the rest are scored.
    """
    report = on_error or log.warning
    for model in models:
        model.eval()
    probs = np.full((len(loader.dataset), len(models)), np.nan, dtype=np.float64)
    batches = read_ahead(loader) if loader.num_workers == 0 else loader
    for batch in progress_bar(batches, desc="predict", total=len(loader), disable=not progress, leave=False):
        for message in batch["errors"]:
            report(message)
        if "image" not in batch:
            continue
        scores = _forward(models, batch["image"], device, channels_last, amp, tta)
        if "clips" in batch:
            scores = mean_per_item(scores, batch["clips"].numpy())
        probs[batch["index"].numpy()] = scores
    return probs


def mean_per_item(scores: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(items, models) means of the consecutive rows of `scores` that belong to each item (`counts`
    rows each): a video's probability is the mean of its clips', as the published test scores it."""
    owner = np.repeat(np.arange(len(counts)), counts)
    sums = np.zeros((len(counts), scores.shape[1]))
    np.add.at(sums, owner, scores)
    return sums / counts[:, None]


def predict_paths(
    models: Sequence[torch.nn.Module],
    paths: Sequence[str],
    transform: Callable,
    device: torch.device,
    *,
    batch_size: int,
    num_workers: int,
    channels_last: bool = False,
    amp: bool = True,
    progress: bool = True,
    on_error: Callable[[str], None] | None = None,
    tta: str = "none",
) -> np.ndarray:
    loader = make_loader(ImageDataset(paths, transform=transform), batch_size, num_workers)
    return predict_loader(
        models, loader, device, channels_last=channels_last, amp=amp, progress=progress, on_error=on_error, tta=tta
    )
