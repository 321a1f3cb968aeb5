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


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from safetensors; a pickle (`.pt`, `.pth`, `.bin`) is refused. Pretrained
    files from the hubs, pickles among them, are read by `models.weight_files`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    if not is_safetensors(path):
        raise CheckpointError(f"{path}: not a safetensors file; refusing to load a pickle checkpoint")
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise CheckpointError(f"{path}: corrupt safetensors file ({err})") from None


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
