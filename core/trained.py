"""Trained models on disk, with no deep-learning import.

`outputs/<member>/fold<k>/{model.safetensors, meta.json}`: which folds a member has finished,
which of them a blend uses and what each one's meta.json says. Training, blending and
inference all read this layout; infer.py's ONNX path reads it without importing torch or
pandas (each costs seconds on a small CPU), so nothing here may import them.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

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


def training_record(weights: str | Path) -> dict:
    """What the member's recipe recorded about the training data of the fold whose weights are
    `weights` (meta.json's `training_data`, e.g. positives per attribute); {} where none was."""
    try:
        record = json.loads((Path(weights).parent / META_FILE).read_text()).get("training_data")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return {}
    return record if isinstance(record, dict) else {}


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
