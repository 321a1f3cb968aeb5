"""Checkpoints as safetensors, never pickles.

Model weights go to `model.safetensors`. Training state (optimizer, scheduler, EMA,
counters) is a nested structure: its tensors are flattened into one safetensors file and
everything else is kept as JSON in the file's metadata, so resuming needs no pickle either.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from core.io import atomic_path

# Re-exported: defined where infer.py's fast path reads them without importing torch.
from core.trained import META_FILE as META_FILE
from core.trained import WEIGHTS_FILE as WEIGHTS_FILE
from core.trained import CheckpointError as CheckpointError
from core.trained import is_safetensors

_SEP = "/"  # separator of flattened keys; state-dict keys use dots, so no clash


def save_weights(state_dict: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> Path:
    """Write a flat tensor dict atomically as safetensors; metadata values become strings."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def load_weights(path: str | Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Load a state dict from safetensors.

    A pickle (`.pt`, `.pth`, `.bin`) is refused unless `allow_pickle`; even then it is read
    with `torch.load(weights_only=True)`, which executes no code. Pretrained backbone
    files from model hubs need that; this project's own checkpoints never do.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    if is_safetensors(path):
        try:
            return load_file(str(path))
        except SafetensorError as err:
            raise CheckpointError(f"{path}: corrupt safetensors file ({err})") from None
    if not allow_pickle:
        raise CheckpointError(f"{path}: not a safetensors file; refusing to load a pickle checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for unsafe or corrupt pickles
        raise CheckpointError(f"{path}: cannot load with weights_only=True ({type(err).__name__}: {err})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state


def _flatten(obj: Any, prefix: str, tensors: dict, rest: dict) -> None:
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
    elif isinstance(obj, dict):
        rest[prefix] = {"__kind__": "dict", "keys": [[type(k).__name__, k] for k in obj]}
        for k, v in obj.items():
            _flatten(v, f"{prefix}{_SEP}{k}", tensors, rest)
    elif isinstance(obj, (list, tuple)):
        rest[prefix] = {"__kind__": type(obj).__name__, "len": len(obj)}
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}{_SEP}{i}", tensors, rest)
    else:
        rest[prefix] = {"__kind__": "value", "value": obj}


def _unflatten(prefix: str, tensors: dict, rest: dict) -> Any:
    if prefix in tensors:
        return tensors[prefix]
    node = rest[prefix]
    kind = node["__kind__"]
    if kind == "value":
        return node["value"]
    if kind == "dict":
        casts = {"int": int, "str": str, "float": float}
        return {casts[t](k): _unflatten(f"{prefix}{_SEP}{k}", tensors, rest) for t, k in node["keys"]}
    items = [_unflatten(f"{prefix}{_SEP}{i}", tensors, rest) for i in range(node["len"])]
    return tuple(items) if kind == "tuple" else items


def save_state(state: dict, path: str | Path) -> Path:
    """Save a nested training state (tensors, dicts, lists, JSON scalars) as safetensors."""
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, Any] = {}
    _flatten(state, "", tensors, rest)
    # safetensors refuses tensors that share storage; training state may hold views.
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"structure": json.dumps(rest)})
    return Path(path)


def load_state(path: str | Path) -> dict:
    """Inverse of `save_state`."""
    path = Path(path)
    if not path.is_file() or not is_safetensors(path):
        raise CheckpointError(f"{path}: not a safetensors training state")
    with safe_open(str(path), framework="pt") as fh:
        rest = json.loads(fh.metadata()["structure"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open is no dict
    return _unflatten("", tensors, rest)
