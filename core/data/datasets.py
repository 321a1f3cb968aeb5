"""A Dataset over image files that reports bad files instead of crashing the loader.

A network that takes face crops (`core.preprocess.Preprocessing.face_crop`) gets a `crop`
(the data stage's detector; core does not import it): each item is then the stack of the
image's face crops, and the collated batch says which image each crop belongs to (`owner`), so
the caller can keep the highest score over an image's faces.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from core.imaging import ImageDecodeError, decode_image

Transform = Callable[[np.ndarray, int], torch.Tensor]
# An image -> the crops, one per face, that a face-cropping network takes.
Crop = Callable[[np.ndarray], list[np.ndarray]]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A per-sample seed that depends only on (seed, epoch, index)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class ImageDataset(Dataset):
    """Items are dicts `image`, `target`, `index`; an undecodable file yields `error` instead.
    With `crop`, `image` is (n_faces, 3, H, W) with `faces` = n_faces, and an image without a
    face yields `error`."""

    def __init__(
        self,
        paths: Sequence[str],
        targets: Sequence[int] | None = None,
        transform: Transform | None = None,
        seed: int = 0,
        crop: Crop | None = None,
    ):
        self.paths = [str(p) for p in paths]
        self.targets = None if targets is None else [int(t) for t in targets]
        self.transform = transform
        self.seed = seed
        self.crop = crop
        self.epoch = 0

    def subset(self, indices: Sequence[int]) -> ImageDataset:
        """The items at `indices`, renumbered from 0 (item i of the subset reports index i)."""
        targets = None if self.targets is None else [self.targets[i] for i in indices]
        return ImageDataset([self.paths[i] for i in indices], targets, self.transform, self.seed, self.crop)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        try:
            image = decode_image(self.paths[index])
        except ImageDecodeError as err:
            return {"index": index, "error": str(err)}
        seed = sample_seed(self.seed, self.epoch, index)
        if self.crop is None:
            item = {"image": self._tensor(image, seed), "index": index}
        else:
            faces = self.crop(image)
            if not faces:
                return {"index": index, "error": f"{self.paths[index]}: no face found; not scored"}
            item = {"image": torch.stack([self._tensor(f, seed) for f in faces]), "faces": len(faces), "index": index}
        if self.targets is not None:
            item["target"] = self.targets[index]
        return item

    def _tensor(self, image: np.ndarray, seed: int) -> torch.Tensor:
        if self.transform is None:
            return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return self.transform(image, seed)


def collate_skip_errors(items: list[dict]) -> dict:
    """Stack the good items; carry the bad ones' messages in `errors` for the caller to report.
    Face-cropped items are concatenated, `owner` giving each crop's place among the good items;
    items that hold several clips (`clips`, a scoring `core.data.clips.ClipDataset`) are
    concatenated clip by clip, with `clips` saying how many belong to each item."""
    good = [it for it in items if "error" not in it]
    batch: dict = {"errors": [it["error"] for it in items if "error" in it]}
    batch["index"] = torch.tensor([it["index"] for it in good], dtype=torch.long)
    if not good:
        return batch
    if "faces" in good[0]:
        batch["image"] = torch.cat([it["image"] for it in good])
        batch["owner"] = torch.repeat_interleave(torch.arange(len(good)), torch.tensor([it["faces"] for it in good]))
    elif "clips" in good[0]:  # items of several clips each: all clips in a row, and how many per item
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
