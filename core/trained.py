"""Trained models on disk and how their scores blend, with no deep-learning import.

`outputs/<member>/fold<k>/{model.safetensors, meta.json}`: which folds a member has finished,
which of them a blend uses, what each one's meta.json says, and the blend of their
probabilities. infer.py's ONNX path reads all of this without importing torch or pandas
(each costs seconds on a small CPU), so nothing here may import them.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # core.fitted_blend imports this module
    from core.fitted_blend import FittedBlend

WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"


class CheckpointError(ValueError):
    """A weights file is missing, unsafe or does not fit; the message names it."""


class SubmissionError(ValueError):
    """Predictions are missing, duplicated or out of range; the message says which."""


def blend_members(cfg: dict, is_demo: bool) -> list[str]:
    """The members the ensemble config blends for the configured data: `demo_members` on the
    demo sample, `members` otherwise. ensemble.py and infer.py both ask here, so a leftover
    demo member never joins a real ensemble."""
    return list(cfg["demo_members"] if is_demo else cfg["members"])


def expected_folds(folds_csv: str | Path) -> list[int] | None:
    """The folds of the split the members were trained on (None when there is no folds file)."""
    path = Path(folds_csv)
    if not path.is_file():
        return None
    with open(path, newline="") as fh:
        return sorted({int(row["fold"]) for row in csv.DictReader(fh)})


def finished_folds(outputs: str | Path, member: str) -> list[int]:
    """Folds of `member` whose meta.json says complete (train.py writes it last)."""
    done = []
    for meta in (Path(outputs) / member).glob(f"fold*/{META_FILE}"):
        suffix = meta.parent.name.removeprefix("fold")
        if suffix.isdigit() and json.loads(meta.read_text()).get("complete"):
            done.append(int(suffix))
    return sorted(done)


def weights_files(path: str | Path) -> list[Path]:
    """What `infer.py --weights` names: a weights file; a fold's folder (its weights file); or a
    member's folder, `outputs/<member>`, standing for every finished fold's weights file."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    if (path / WEIGHTS_FILE).is_file():
        return [path / WEIGHTS_FILE]
    folds = finished_folds(path.parent, path.name)
    if not folds:
        raise CheckpointError(f"{path}: a folder with neither {WEIGHTS_FILE} nor a finished fold<k>/{WEIGHTS_FILE}")
    return [path / f"fold{k}" / WEIGHTS_FILE for k in folds]


def is_imported(outputs: str | Path, member: str, fold: int) -> bool:
    """Whether the fold came from a published release (`models.import_published`): its folds are
    its authors' models, not folds of this project's split."""
    meta = Path(outputs) / member / f"fold{fold}" / META_FILE
    return meta.is_file() and json.loads(meta.read_text()).get("imported") is not None


def member_folds(outputs: str | Path, member: str, expected: list[int] | None, allow_partial: bool) -> list[int]:
    """The folds of `member` to blend: every expected fold, finished. A member with a fold
    missing is refused unless `allow_partial` (then its finished folds are used). An imported
    member uses all of its folds, whatever the split (seven published experts are not five folds)."""
    done = finished_folds(outputs, member)
    if not done:
        how = f"train.py --config configs/members/{member}.yaml --fold all"
        raise SubmissionError(f"{Path(outputs) / member}: no finished fold (run {how})")
    if expected is None or is_imported(outputs, member, done[0]):
        return done
    missing = sorted(set(expected) - set(done))
    if missing and not allow_partial:
        raise SubmissionError(
            f"{member}: fold(s) {missing} of {expected} not finished; train them "
            f"(train.py --config configs/members/{member}.yaml --fold all) or pass --allow-partial"
        )
    return [f for f in done if f in expected]


def nan_weighted_mean(values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Row-wise weighted mean of (N, M) `values` over the columns that are not NaN; NaN
    where a row has none. A member that could not score an image does not pull it to 0."""
    values = np.asarray(values, dtype=float)
    w = np.ones(values.shape[1]) if weights is None else np.asarray(weights, dtype=float)
    ok = ~np.isnan(values)
    den = ok @ w
    num = np.where(ok, values, 0.0) @ w
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def is_safetensors(path: Path) -> bool:
    # safetensors: 8-byte little-endian header size, then a JSON header starting with '{'.
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{"


@dataclass
class ModelFile:
    """A trained network as stored: its member, weights file and the config from its meta.json."""

    member: str
    weights: Path
    config: dict
    stamp: str  # SHA-256 of its meta.json: changes whenever train.py writes the fold anew


def read_model_file(weights: str | Path) -> ModelFile:
    """The meta.json beside `weights`: which member and architecture it holds, and how it was fed.
    The weights file must be there and be safetensors (a pickle is refused before any is read)."""
    weights = Path(weights)
    if not weights.is_file():
        raise CheckpointError(f"{weights}: no such weights file")
    if not is_safetensors(weights):
        raise CheckpointError(f"{weights}: not a safetensors file; refusing to load a pickle checkpoint")
    meta_path = weights.parent / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{weights}: no {META_FILE} beside it to say which architecture it holds")
    try:
        raw = meta_path.read_bytes()
        cfg = json.loads(raw)["config"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{meta_path}: not a meta.json written by train.py ({err!r})") from None
    return ModelFile(cfg["name"], weights, cfg, _stamp(raw))


def takes_clips(cfg: dict) -> bool:
    """Whether a member config feeds its network clips (it has a `clip` section)."""
    return bool(cfg.get("clip"))


def models_stamp(stamps: Iterable[str]) -> str:
    """One fingerprint of a set of trained models (their meta.json stamps, in any order), so a blend
    fitted on their predictions is not applied to models trained since."""
    return hashlib.sha256("\n".join(sorted(stamps)).encode()).hexdigest()


def _stamp(meta: bytes) -> str:
    return hashlib.sha256(meta).hexdigest()


def meta_stamp(meta_path: str | Path) -> str:
    """The stamp read_model_file gives the model whose meta.json is `meta_path`."""
    return _stamp(Path(meta_path).read_bytes())


class Ensemble:
    """Trained models grouped by member; a member's folds are averaged first, then members are
    blended as ensemble.py blends them for the submission: with the blend it fitted (`fit`,
    read from its ensemble_fit.json) when that was fitted for exactly these members and these
    trained models, else with `weights` (equal by default; `fit_refused` then says why)."""

    def __init__(
        self, trained: Iterable[ModelFile], weights: dict[str, float] | None = None, fit: FittedBlend | None = None
    ):
        self.trained = list(trained)
        if not self.trained:
            raise CheckpointError("no trained model given")
        self.members = sorted({t.member for t in self.trained})
        self.weights = np.array([1.0 if not weights else float(weights.get(m, 0.0)) for m in self.members])
        self.fit_refused = None if fit is None else self._refusal(fit)
        self.fit = fit.reorder(self.members) if fit is not None and self.fit_refused is None else None

    def _refusal(self, fit: FittedBlend) -> str | None:
        """Why `fit` does not apply to these models, or None when it does."""
        if sorted(fit.members) != self.members:
            return f"it was fitted for {', '.join(sorted(fit.members))}"
        if fit.models is not None and fit.models != models_stamp(t.stamp for t in self.trained):
            return "a member was trained again since it was fitted"
        return None

    def groups(self) -> dict[str, list[int]]:
        """Indices of the image models sharing one evaluation transform, so each image is decoded
        and resized once per input size rather than once per model. Clip models are not in them."""
        out: dict[str, list[int]] = {}
        for i, t in enumerate(self.trained):
            if not takes_clips(t.config):
                out.setdefault(json.dumps(t.config["data"], sort_keys=True), []).append(i)
        return out

    def clip_models(self) -> list[int]:
        """Indices of the models that take clips of frames (scored apart, in PyTorch)."""
        return [i for i, t in enumerate(self.trained) if takes_clips(t.config)]

    def member_probs(self, probs: np.ndarray) -> np.ndarray:
        """(N, n_models) per-model probabilities -> (N, n_members): each member's folds averaged."""
        columns = [[i for i, t in enumerate(self.trained) if t.member == m] for m in self.members]
        return np.stack([nan_weighted_mean(probs[:, c]) for c in columns], axis=1)

    def blend(self, probs: np.ndarray) -> np.ndarray:
        """(N, n_models) per-model probabilities -> (N,) ensemble probability (NaN-aware)."""
        if self.fit is not None:
            return self.fit.apply(self.member_probs(probs))
        return nan_weighted_mean(self.member_probs(probs), self.weights)
