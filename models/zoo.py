"""Trained members on disk: `outputs/<member>/fold<k>/{model.safetensors, meta.json}`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from core.checkpoint import META_FILE, WEIGHTS_FILE, CheckpointError, load_weights
from models.registry import build_model


@dataclass
class TrainedModel:
    member: str
    fold_dir: Path
    config: dict
    model: torch.nn.Module


def load_trained(weights: str | Path) -> TrainedModel:
    """Rebuild a trained model from its weights file and the `meta.json` beside it.

    Loads strictly: a key or shape that does not fit is an error, never skipped.
    """
    weights = Path(weights)
    meta_path = weights.parent / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{weights}: no {META_FILE} beside it to say which architecture it holds")
    meta = json.loads(meta_path.read_text())
    cfg = meta["config"]
    model = build_model(cfg["model"], pretrained=False)
    state = load_weights(weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"{weights}: does not fit {cfg['model']['name']} ({first})") from None
    return TrainedModel(cfg["name"], weights.parent, cfg, model.eval())


def find_trained(outputs: str | Path, members: list[str] | None = None) -> list[Path]:
    """Weights files of finished folds under `outputs`, optionally only the named members."""
    found = []
    for meta_path in sorted(Path(outputs).glob(f"*/fold*/{META_FILE}")):
        member = meta_path.parent.parent.name
        if members is not None and member not in members:
            continue
        if json.loads(meta_path.read_text()).get("complete") and (meta_path.parent / WEIGHTS_FILE).is_file():
            found.append(meta_path.parent / WEIGHTS_FILE)
    return found
