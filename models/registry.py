"""Members are built by name from config: their network, criterion and training-batch recipe."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

_MODELS: dict[str, Callable[..., torch.nn.Module]] = {}
_CRITERIA: dict[str, Callable[[dict], Callable]] = {}
_RECIPES: dict[str, Callable[..., TrainData]] = {}
_RECIPE_CHECKS: dict[str, Callable[[dict, Any], None]] = {}


@dataclass
class TrainData:
    """What a member's training-batch recipe gives the trainer.

    `dataset`: `__len__`, `set_epoch(epoch)` and `__getitem__(index) -> dict`, deterministic in
    (seed, epoch, index) so that any number of loader workers and a resume give the same
    batches; an item that cannot be made carries `error` (a one-line reason) instead.
    `collate(items) -> batch`: a dict with `errors` (the reasons, list of str) and, when any
    item was good, `image` (N, 3, H, W), `target` (N,) and whatever tensors with first
    dimension N the member's criterion reads (the trainer moves every tensor to the device).
    `auxiliary`: an extra trainable part with its own optimiser step (`core.train.trainer.Auxiliary`,
    e.g. a synthesizer that turns the collated batch into the criterion's), or None.
    `record`: JSON-able facts about the training data that inference needs (train.py keeps them as
    meta.json's `training_data`; e.g. positives per attribute, `core.infer.attributes`).
    """

    dataset: Any
    collate: Callable[[list[dict]], dict]
    auxiliary: Any = None
    record: dict = field(default_factory=dict)


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


def register_recipe(name: str) -> Callable:
    """Register a training-batch recipe: `fn(cfg, table, transform, seed) -> TrainData`, with
    `cfg` the member config, `table` the training rows (img_name, path, target, method,
    parent, ...), `transform` the member's training transform."""

    def wrap(fn: Callable[..., TrainData]) -> Callable[..., TrainData]:
        _RECIPES[name] = fn
        return fn

    return wrap


def register_recipe_check(name: str) -> Callable:
    """Register the config checks of recipe `name`: `fn(cfg, table) -> None`, raising ConfigError, with
    `table` every row the member will train or be validated on. `check_train_data` runs them before
    any network is built or downloaded."""

    def wrap(fn: Callable[[dict, Any], None]) -> Callable[[dict, Any], None]:
        _RECIPE_CHECKS[name] = fn
        return fn

    return wrap


def _lookup(table: dict[str, Any], name: str, kind: str) -> Any:
    if name not in table:
        raise KeyError(f"unknown {kind} {name!r}; known: {sorted(table)}")
    return table[name]


def without_pretrained(cfg: Any) -> Any:
    """`cfg` with every pretrained source switched off, in every nested section: `pretrained` (and
    open_clip's `timm_model_pretrained`) false, `weights` null: a backbone, a CLIP tower, any part."""
    if isinstance(cfg, dict):
        out = {k: without_pretrained(v) for k, v in cfg.items()}
        for key in out:
            if key == "pretrained" or key.endswith("_pretrained"):
                out[key] = False
            elif key == "weights":
                out[key] = None
        return out
    if isinstance(cfg, list):
        return [without_pretrained(v) for v in cfg]
    return cfg


def build_model(model_cfg: dict, *, pretrained: bool = True) -> torch.nn.Module:
    """Build the network named by `model_cfg["name"]`.

    `pretrained=False` reads no pretrained source at all (`without_pretrained`): for a network
    whose every tensor comes from a trained checkpoint loaded next (inference, export, import,
    resume), so a trained fold is scored on a machine without the files it started from.
    """
    cfg = dict(model_cfg) if pretrained else without_pretrained(model_cfg)
    return _lookup(_MODELS, cfg.pop("name"), "model")(**cfg)


def member_criterion(loss_cfg: dict) -> Callable:
    """The criterion registered as `loss_cfg["name"]`: `criterion(model, batch) -> (loss, logits,
    logs)`. `models.build_criterion` adds the configured `loss.add` terms around it."""
    return _lookup(_CRITERIA, loss_cfg["name"], "loss")(loss_cfg)


def check_train_data(cfg: dict, table: Any) -> None:
    """The member's recipe exists and its config checks pass on `table` (see `register_recipe_check`)."""
    name = (cfg.get("recipe") or {"name": "images"})["name"]
    _lookup(_RECIPES, name, "training-batch recipe")
    if name in _RECIPE_CHECKS:
        _RECIPE_CHECKS[name](cfg, table)


def build_train_data(cfg: dict, table: Any, transform: Callable, seed: int) -> TrainData:
    """The member's training data: its `recipe` (default `images`: the table's files as they are)."""
    recipe = cfg.get("recipe") or {"name": "images"}
    return _lookup(_RECIPES, recipe["name"], "training-batch recipe")(cfg, table, transform, seed)
