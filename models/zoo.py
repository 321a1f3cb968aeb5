"""Trained members on disk: `outputs/<member>/fold<k>/{model.safetensors, meta.json}`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.blend import nan_weighted_mean
from core.checkpoint import META_FILE, CheckpointError, load_weights
from models.registry import build_model


@dataclass
class TrainedModel:
    member: str
    weights: Path
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
    return TrainedModel(cfg["name"], weights, cfg, model.eval())


class Ensemble:
    """Trained models grouped by member; a member's folds are averaged first, then members
    are blended with `weights` (equal by default), as ensemble.py does for the submission."""

    def __init__(self, trained: list[TrainedModel], weights: dict[str, float] | None = None):
        if not trained:
            raise CheckpointError("no trained model given")
        self.trained = trained
        self.members = sorted({t.member for t in trained})
        self.weights = np.array([1.0 if not weights else float(weights.get(m, 0.0)) for m in self.members])

    def groups(self) -> dict[str, list[int]]:
        """Indices of models sharing one evaluation transform, so each image is decoded and
        resized once per input size rather than once per model."""
        out: dict[str, list[int]] = {}
        for i, t in enumerate(self.trained):
            out.setdefault(json.dumps(t.config["data"], sort_keys=True), []).append(i)
        return out

    def blend(self, probs: np.ndarray) -> np.ndarray:
        """(N, n_models) per-model probabilities -> (N,) ensemble probability (NaN-aware)."""
        columns = [[i for i, t in enumerate(self.trained) if t.member == m] for m in self.members]
        per_member = np.stack([nan_weighted_mean(probs[:, c]) for c in columns], axis=1)
        return nan_weighted_mean(per_member, self.weights)
