"""Trained members on disk, rebuilt as PyTorch networks: `outputs/<member>/fold<k>/{model.safetensors, meta.json}`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from core.checkpoint import CheckpointError, load_weights
from core.trained import ModelFile, read_model_file
from models.registry import build_model


@dataclass
class TrainedModel(ModelFile):
    model: torch.nn.Module


def load_trained(weights: str | Path) -> TrainedModel:
    """Rebuild a trained model from its weights file and the `meta.json` beside it.

    Loads strictly: a key or shape that does not fit is an error, never skipped.
    """
    stored = read_model_file(weights)
    model = build_model(stored.config["model"], pretrained=False)
    state = load_weights(stored.weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"{stored.weights}: does not fit {stored.config['model']['name']} ({first})") from None
    return TrainedModel(stored.member, stored.weights, stored.config, stored.stamp, model.eval())
