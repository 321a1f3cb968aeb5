"""Test-time augmentation: a network scores several views of each input and the scores are averaged.

Modes (`predict.tta` in a member's config for train.py's predictions, `--tta` for infer.py):
- `none`: the input as it is;
- `flip`: the input and its horizontal mirror;
- `6view`: the input, its rotations by 90, 180 and 270 degrees, its horizontal and its vertical
  mirror, averaged as the competition's 3rd-place solution describes it.

The views are taken of the preprocessed batch, (N, C, H, W), after resizing and normalisation,
so every runtime applies them to what it already feeds the network: NumPy arrays on infer.py's
ONNX path, torch tensors on its PyTorch path and in train.py. This module imports no torch: a
tensor is handled through its own `rot90` and `flip` methods, which follow NumPy's conventions.

Fake probabilities are averaged, not logits. The 3rd-place description says only that the six
views are averaged; probabilities are what this project averages everywhere else (a member's
folds, the members of the blend), so a view weighs as a fold does, and one view whose logit
saturates cannot outvote the others as it can in a mean of logits.

A view helps where the network has learnt to score it: the training augmentation here mirrors
images left to right (core/data/transforms.py) but neither rotates nor turns them upside down.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import numpy as np

from core.config import ConfigError

T = TypeVar("T")  # an (N, C, H, W) numpy.ndarray or torch.Tensor

TTA_MODES = {
    "none": ("identity",),
    "flip": ("identity", "hflip"),
    "6view": ("identity", "rot90", "rot180", "rot270", "hflip", "vflip"),
}
ROTATIONS = {"rot90": 1, "rot180": 2, "rot270": 3}
# Counted from the end, so an image batch (N, C, H, W) and a clip batch (N, T, C, H, W) turn alike.
H_AXIS, W_AXIS = -2, -1


class TTAError(ConfigError):
    """A test-time augmentation mode that does not exist, or an input it cannot take."""


def check_mode(mode: object, where: str = "predict.tta") -> str:
    """`mode` if it names a mode; otherwise TTAError naming `where` and the modes."""
    if mode not in TTA_MODES:
        raise TTAError(f"{where} must be one of {list(TTA_MODES)}, not {mode!r}")
    return str(mode)


def tta_mode(cfg: Mapping) -> str:
    """The config's `predict.tta`; `none` where the config has no `predict` section (a checkpoint
    trained before the key existed). Unknown keys in the section are refused, as a typo would
    otherwise be ignored."""
    section = cfg.get("predict") or {}
    unknown = sorted(set(section) - {"tta"})
    if unknown:
        raise TTAError(f"unknown predict setting(s) {unknown}; known: ['tta']")
    return check_mode(section.get("tta", "none"))


def _rot90(x: T, k: int) -> T:
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(np.rot90(x, k, axes=(H_AXIS, W_AXIS)))
    return x.rot90(k, (H_AXIS, W_AXIS))


def _flip(x: T, axis: int) -> T:
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(np.flip(x, axis))
    return x.flip(axis)


def view(x: T, name: str) -> T:
    """One named view of the batch `x` (N, C, H, W): identity, rot90/180/270 (counter-clockwise,
    from the H axis towards the W axis, as numpy.rot90), hflip (mirror along W), vflip (along H)."""
    if name == "identity":
        return x
    if name in ROTATIONS:
        return _rot90(x, ROTATIONS[name])
    if name == "hflip":
        return _flip(x, W_AXIS)
    if name == "vflip":
        return _flip(x, H_AXIS)
    raise TTAError(f"unknown view {name!r}")


def views(x: T, mode: str) -> list[T]:
    """The views of `mode`, in the order of TTA_MODES; a rotation needs a square input."""
    names = TTA_MODES[check_mode(mode, "test-time augmentation")]
    height, width = x.shape[H_AXIS], x.shape[W_AXIS]
    if height != width and any(n in ROTATIONS for n in names):
        raise TTAError(f"test-time augmentation {mode!r} rotates the input, which must be square, not {height}x{width}")
    return [view(x, n) for n in names]


def average_views(score: Callable[[T], T], x: T, mode: str) -> T:
    """The mean of `score` (a batch -> its fake probabilities) over the views of `x`; with `none`,
    `score(x)` itself."""
    if check_mode(mode, "test-time augmentation") == "none":
        return score(x)
    total = None
    for v in views(x, mode):
        probs = score(v)
        total = probs if total is None else total + probs
    return total / len(TTA_MODES[mode])
