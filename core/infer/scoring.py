"""Scoring images with networks that take and give NumPy arrays (ONNX Runtime on a CPU).

infer.py's ONNX path: each image is decoded once (in a read-ahead thread, or `workers`
threads), preprocessed once per input recipe (`core.preprocess`), and every network of that
recipe scores the batch, or each of its test-time views (`core.data.tta`) with the probabilities
averaged; softmax in float64 as `core.train.prediction.fake_probability` does. No
torch import: a network is any callable `images (N, 3, H, W) float32 -> outputs`, the
outputs a dict with `logits` (N, 2) or the logits array itself.

A group whose checkpoints take face crops (`Preprocessing.face_crop`) is given a `crop`
callable: an image -> the crops its networks take, one per face. The group scores every crop
and keeps the highest probability (the published recipe for an image with several faces); an
image with no face is NaN for that group alone, reported with the group's `label`.

With `explain`, `ArrayScorer.score_files` also keeps each whole-image network's attribute
outputs (`core.infer.attributes`) from the same forward pass, averaged over the same views.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from core.data.tta import average_views, check_mode
from core.imaging import ImageDecodeError, decode_image
from core.infer.attributes import attribute_outputs
from core.prefetch import read_ahead
from core.preprocess import Preprocessing

Network = Callable[[np.ndarray], "dict[str, np.ndarray] | np.ndarray"]
Crop = Callable[[np.ndarray], list[np.ndarray]]


def fake_probability(outputs: dict | np.ndarray) -> np.ndarray:
    """Softmax probability of class 1 (fake) from a 2-class output, in float64 (see
    `core.train.prediction.fake_probability` for why float64)."""
    logits = np.asarray(outputs["logits"] if isinstance(outputs, dict) else outputs, dtype=np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp[:, 1] / exp.sum(axis=1)


def network_scores(network: Network, images: np.ndarray, tta: str = "none") -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """`network`'s fake probability of each image of the batch and its attribute outputs by name
    (none for most networks), each averaged over the views of `tta`: one forward pass per view."""
    found: list[dict[str, np.ndarray]] = []

    def probability(view: np.ndarray) -> np.ndarray:
        outputs = network(view)
        found.append(attribute_outputs(outputs))
        return fake_probability(outputs)

    probs = average_views(probability, images, tta)
    return probs, {name: np.mean([f[name] for f in found], axis=0) for name in found[0]}


def network_probability(network: Network, images: np.ndarray, tta: str = "none") -> np.ndarray:
    """`network`'s fake probability of each image of the batch, averaged over the views of `tta`."""
    return network_scores(network, images, tta)[0]


@dataclass
class Group:
    """Networks fed by one preprocessing recipe, and their columns in the ensemble; `crop` and
    `label` for networks that take face crops (see the module docstring)."""

    preprocessing: Preprocessing
    networks: list[Network]
    columns: list[int]
    crop: Crop | None = None
    label: str = ""

    def inputs(self, image: np.ndarray) -> np.ndarray | None:
        """The image's network input (3, S, S), or its face crops' (n_faces, 3, S, S); None: no face."""
        if self.crop is None:
            return self.preprocessing(image)
        crops = self.crop(image)
        return np.stack([self.preprocessing(c) for c in crops]) if crops else None

    def scores(self, inputs: list[np.ndarray | None], tta: str = "none") -> tuple[np.ndarray, list[dict]]:
        """(n_images, n_networks) fake probabilities of a batch of `inputs`, averaged over the
        views of `tta`; with a crop, the highest over each image's faces, NaN for an image without
        one. And per network its attribute outputs by name, (n_images,) each; a group fed face
        crops explains nothing (its score is the highest over faces)."""
        if self.crop is None:
            x = np.stack(inputs)
            scored = [network_scores(network, x, tta) for network in self.networks]
            return np.stack([p for p, _ in scored], axis=1), [a for _, a in scored]
        out = np.full((len(inputs), len(self.networks)), np.nan)
        found = [i for i, x in enumerate(inputs) if x is not None]
        if found:
            x = np.concatenate([inputs[i] for i in found])
            owner = np.repeat(found, [len(inputs[i]) for i in found])
            scores = np.stack([network_probability(network, x, tta) for network in self.networks], axis=1)
            for i in found:
                out[i] = scores[owner == i].max(axis=0)
        return out, [{} for _ in self.networks]


def ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """`map(fn, items)` computed ahead of the caller: in one read-ahead thread (`workers` 0), or
    by `workers` threads with at most twice as many items in flight, in order."""
    if workers <= 0:
        yield from read_ahead(map(fn, items))
        return
    items = iter(items)
    with ThreadPoolExecutor(workers) as pool:
        pending = [pool.submit(fn, item) for item in islice(items, 2 * workers)]
        while pending:
            result = pending.pop(0).result()
            pending += [pool.submit(fn, item) for item in islice(items, 1)]
            yield result


class ArrayScorer:
    """Fake probability of every network for every image, shape (N, n_models), averaged over
    the views of `tta`; NaN where an image could not be read. With `explain`, `score_files`
    leaves in `attributes` {image index: {column: {attribute: joint probability}}} for the
    networks that gave any (`core.infer.attributes`)."""

    def __init__(
        self,
        groups: Sequence[Group],
        n_models: int,
        batch_size: int = 1,
        workers: int = 0,
        tta: str = "none",
        explain: bool = False,
    ):
        self.groups = list(groups)
        self.n_models = n_models
        self.batch_size = batch_size
        self.workers = workers
        self.tta = check_mode(tta, "tta")
        self.explain = explain
        self.attributes: dict[int, dict[int, dict[str, float]]] = {}

    def _groups(self, face_crops: bool | None) -> list[Group]:
        """Every group (None), or only those that take face crops (True) or whole images (False)."""
        return [g for g in self.groups if face_crops is None or (g.crop is not None) == face_crops]

    def _score(
        self,
        items: Iterable[tuple[int, list[np.ndarray | None] | str]],
        n: int,
        on_error,
        progress: bool,
        names: Sequence[str | Path] | None = None,
        explain: bool = False,
        groups: Sequence[Group] | None = None,
    ):
        """(n, n_models) probabilities of `items` (per image, the inputs of each of `groups`, by
        default all); with `names` (files), an image in which a face-cropping group found no face
        is reported by name; with `explain`, the attribute outputs go to `attributes`."""
        groups = self.groups if groups is None else groups
        probs = np.full((n, self.n_models), np.nan)
        batches = _batches(items, self.batch_size, on_error)
        if progress:
            from core.progress import progress_bar  # tqdm: only where a bar is shown

            batches = progress_bar(batches, desc="predict", total=-(-n // self.batch_size), leave=False)
        for index, inputs in batches:
            for g, group in enumerate(groups):
                probs[np.ix_(index, group.columns)], found = group.scores([one[g] for one in inputs], self.tta)
                if explain:
                    self._keep(index, group.columns, found)
                if names is not None:
                    for i, one in zip(index, inputs, strict=True):
                        if one[g] is None:
                            on_error(f"{names[i]}: no face found; not scored by {group.label}")
        return probs

    def _keep(self, index: list[int], columns: list[int], found: list[dict[str, np.ndarray]]) -> None:
        for column, attrs in zip(columns, found, strict=True):
            if not attrs:  # a network that explains nothing
                continue
            for k, i in enumerate(index):
                self.attributes.setdefault(i, {})[column] = {name: float(v[k]) for name, v in attrs.items()}

    def score_files(self, paths: Sequence[str | Path], on_error: Callable[[str], None]) -> np.ndarray:
        def load(item: tuple[int, str | Path]) -> tuple[int, list[np.ndarray] | str]:
            i, path = item
            try:
                image = decode_image(path)
                return i, [g.inputs(image) for g in self.groups]
            except ImageDecodeError as err:
                return i, str(err)

        items = ordered_map(load, enumerate(paths), self.workers)
        self.attributes = {}
        progress = len(paths) > self.batch_size
        return self._score(items, len(paths), on_error, progress, names=paths, explain=self.explain)

    def score_arrays(self, arrays: Sequence[np.ndarray], face_crops: bool | None = None) -> np.ndarray:
        """Like `score_files` for images in memory; `face_crops` True or False scores only the
        groups that take face crops or whole images (the other columns stay NaN)."""
        groups = self._groups(face_crops)
        items = ((i, [g.inputs(a) for g in groups]) for i, a in enumerate(arrays))
        return self._score(items, len(arrays), on_error=None, progress=False, groups=groups)


def _batches(items: Iterable[tuple[int, list[np.ndarray] | str]], size: int, on_error) -> Iterator:
    """(indices, per-image inputs) of up to `size` readable images; unreadable ones go to `on_error`."""
    index, inputs = [], []
    for i, item in items:
        if isinstance(item, str):
            on_error(item)
            continue
        index.append(i)
        inputs.append(item)
        if len(index) == size:
            yield index, inputs
            index, inputs = [], []
    if index:
        yield index, inputs
