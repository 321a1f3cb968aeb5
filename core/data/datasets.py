"""A Dataset over image files that reports bad files instead of crashing the loader."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from core.imaging import ImageDecodeError, decode_image

Transform = Callable[[np.ndarray, int], torch.Tensor]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A per-sample seed that depends only on (seed, epoch, index)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class ImageDataset(Dataset):
    """Items are dicts `image`, `target`, `index`; an undecodable file yields `error` instead."""

    def __init__(
        self,
        paths: Sequence[str],
        targets: Sequence[int] | None = None,
        transform: Transform | None = None,
        seed: int = 0,
    ):
        self.paths = [str(p) for p in paths]
        self.targets = None if targets is None else [int(t) for t in targets]
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def subset(self, indices: Sequence[int]) -> ImageDataset:
        """The items at `indices`, renumbered from 0 (item i of the subset reports index i)."""
        targets = None if self.targets is None else [self.targets[i] for i in indices]
        return ImageDataset([self.paths[i] for i in indices], targets, self.transform, self.seed)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        try:
            image = decode_image(self.paths[index])
        except ImageDecodeError as err:
            return {"index": index, "error": str(err)}
        if self.transform is None:
            tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        else:
            tensor = self.transform(image, sample_seed(self.seed, self.epoch, index))
        item = {"image": tensor, "index": index}
        if self.targets is not None:
            item["target"] = self.targets[index]
        return item


def collate_skip_errors(items: list[dict]) -> dict:
    """Stack the good items; carry the bad ones' messages in `errors` for the caller to report. Items
    that hold several clips (`clips`, a scoring `core.data.clips.ClipDataset`) are concatenated
    clip by clip, with `clips` saying how many belong to each item."""
    good = [it for it in items if "error" not in it]
    batch: dict = {"errors": [it["error"] for it in items if "error" in it]}
    batch["index"] = torch.tensor([it["index"] for it in good], dtype=torch.long)
    if not good:
        return batch
    if "clips" in good[0]:  # items of several clips each: all clips in a row, and how many per item
        batch["image"] = torch.cat([it["image"] for it in good])
        batch["clips"] = torch.tensor([it["clips"] for it in good], dtype=torch.long)
    else:
        batch["image"] = torch.stack([it["image"] for it in good])
    if "target" in good[0]:
        batch["target"] = torch.tensor([it["target"] for it in good], dtype=torch.long)
    return batch


def make_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    *,
    shuffle: bool = False,
    drop_last: bool = False,
    seed: int = 0,
    batch_sampler: torch.utils.data.Sampler | None = None,
    collate: Callable[[list[dict]], dict] | None = None,
) -> DataLoader:
    """A loader whose batches carry the bad items' messages (`collate`, default
    `collate_skip_errors`). With `batch_sampler`, it decides batches and order; `batch_size`,
    `shuffle`, `drop_last` are then unused."""
    batching = (
        {"batch_sampler": batch_sampler}
        if batch_sampler is not None
        else {"batch_size": batch_size, "shuffle": shuffle, "drop_last": drop_last}
    )
    return DataLoader(
        dataset,
        **batching,
        num_workers=num_workers,
        collate_fn=collate or collate_skip_errors,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,  # workers must see set_epoch() of the new epoch
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if num_workers > 0 else None,
    )
