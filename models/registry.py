"""Members are built by name from config: `build_model(cfg["model"])`, `build_criterion(cfg)`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_MODELS: dict[str, Callable[..., torch.nn.Module]] = {}
_CRITERIA: dict[str, Callable[[dict], Callable]] = {}


def register_model(name: str) -> Callable:
    def wrap(fn: Callable[..., torch.nn.Module]) -> Callable[..., torch.nn.Module]:
        _MODELS[name] = fn
        return fn

    return wrap


def register_criterion(name: str) -> Callable:
    def wrap(fn: Callable[[dict], Callable]) -> Callable[[dict], Callable]:
        _CRITERIA[name] = fn
        return fn

    return wrap


def _lookup(table: dict[str, Any], name: str, kind: str) -> Any:
    if name not in table:
        raise KeyError(f"unknown {kind} {name!r}; known: {sorted(table)}")
    return table[name]


def build_model(model_cfg: dict, *, pretrained: bool | None = None) -> torch.nn.Module:
    """Build the network named by `model_cfg["name"]`.

    `pretrained=False` skips downloading backbone weights, for when a trained checkpoint
    is loaded right after (inference, resume).
    """
    cfg = dict(model_cfg)
    if pretrained is not None:
        cfg["pretrained"] = pretrained
    return _lookup(_MODELS, cfg.pop("name"), "model")(**cfg)


def build_criterion(cfg: dict) -> Callable:
    """The member's training objective: `criterion(model, batch) -> (loss, logits, logs)`."""
    loss_cfg = cfg.get("loss", {"name": "ce"})
    return _lookup(_CRITERIA, loss_cfg["name"], "loss")(loss_cfg)
