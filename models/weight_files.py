"""Pretrained weight files as users download them: read without running any of their code, and
loaded into a network loudly, never half-loaded in silence.

Formats read by `read_weights`:

  safetensors                          timm and open_clip files of the HF hub, this project's own
  PyTorch pickles (.pth, .pt, .bin)    read with torch.load(weights_only=True): pretrainedmodels'
                                       Xception, efficientnet_pytorch's, open_clip's .bin, timm's
  TorchScript archives (.pt)           OpenAI's CLIP files: the tensors are read from the archive's
                                       pickle by an unpickler that knows tensors and plain containers
                                       only; the archive's code is neither compiled nor run
  a folder                             an HF hub snapshot: the weights file in it (`FOLDER_FILES`)

A state dict wrapped in a dict (`state_dict`, `model`) is unwrapped. Foreign key layouts are
converted by `models.layouts`; `load_checked` loads the result.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from core.checkpoint import CheckpointError, load_weights
from core.log import get_logger
from core.trained import is_safetensors

log = get_logger("weights")

# The weights file of a downloaded hub folder, in order of preference (safetensors first).
FOLDER_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
    "model.safetensors",
    "pytorch_model.bin",
)
# Holders of a state dict inside a checkpoint dict, as training scripts save them.
_HOLDERS = ("state_dict", "model")
# A partial load may leave at most this many tensors at their random initialisation (a stem widened
# to other channels, a position table of another size); more means the file is another network.
MAX_RANDOM = 4
# BatchNorm's batch counter is not a weight: files saved before PyTorch 0.4 lack it.
_COUNTER = "num_batches_tracked"

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
# TorchScript's pickle wraps typed lists and tags container types: values pass through unchanged.
_TYPED_CONTAINERS = {
    "build_intlist": lambda data: data,
    "build_tensorlist": lambda data: data,
    "build_doublelist": lambda data: data,
    "build_boollist": lambda data: data,
    "restore_type_tag": lambda value, _type: value,
}


class _ScriptObject:
    """Stands in for a TorchScript module or class of an archive: it keeps the attributes only."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *_: Any) -> torch.Tensor:
    return torch.as_strided(storage, size, stride, offset)


class _ArchiveUnpickler(pickle.Unpickler):
    """The pickle of a TorchScript archive, with tensors and plain containers only: any class the
    pickle names outside TorchScript's own (`__torch__.*`, which become `_ScriptObject`s) is refused."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__"):
            return self.classes.setdefault(f"{module}.{name}", type(name, (_ScriptObject,), {}))
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch.jit._pickle" and name in _TYPED_CONTAINERS:
            return _TYPED_CONTAINERS[name]
        raise pickle.UnpicklingError(f"the archive's pickle needs {module}.{name}; only tensors are read")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        kind, dtype, key, _location, _numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"unknown persistent record {kind!r}")
        raw = bytearray(self.archive.read(f"{self.prefix}/data/{key}"))
        return torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)


def _attribute_tensors(obj: Any, prefix: str, out: dict[str, torch.Tensor], seen: set[int]) -> None:
    """Every tensor reachable through the attributes of TorchScript objects, named by its path."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    for name, value in vars(obj).items():
        key = f"{prefix}{name}"
        if isinstance(value, torch.Tensor):
            out[key] = value
        elif isinstance(value, _ScriptObject):
            _attribute_tensors(value, f"{key}.", out, seen)


def torchscript_prefix(path: Path) -> str | None:
    """The archive folder of a TorchScript file (a zip holding `<folder>/code/`), else None."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    roots = {n.split("/", 1)[0] for n in names if n.endswith("/data.pkl") and n.count("/") == 1}
    scripted = [r for r in roots if any(n.startswith(f"{r}/code/") for n in names)]
    return scripted[0] if scripted else None


def read_torchscript(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of a TorchScript archive, named as the scripted module's state dict names them
    (with its tensor attributes that are neither parameters nor buffers among them)."""
    try:
        with zipfile.ZipFile(path) as archive:
            root = _ArchiveUnpickler(archive.read(f"{prefix}/data.pkl"), archive, prefix).load()
            tensors: dict[str, torch.Tensor] = {}
            if not isinstance(root, _ScriptObject):
                raise pickle.UnpicklingError(f"the archive holds a {type(root).__name__}, not a module")
            _attribute_tensors(root, "", tensors, set())
    except (pickle.UnpicklingError, KeyError, ValueError, RuntimeError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: not a readable TorchScript archive ({type(err).__name__}: {err})") from None
    return tensors


def folder_file(folder: Path) -> Path:
    """The weights file of a downloaded hub folder."""
    for name in FOLDER_FILES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: a folder without a weights file (looked for {', '.join(FOLDER_FILES)})")


def read_pickle(path: str | Path, what: str) -> Any:
    """A published PyTorch file, read with `torch.load(weights_only=True)` on the CPU (its tensors
    may have been saved from a GPU). Errors name the file: missing, refused by weights_only
    (it would need code to rebuild), or not a PyTorch file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (the {what})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's weights-only unpickler names the class or function the file would need.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found is None:
            raise CheckpointError(
                f"{path}: torch.load(weights_only=True) cannot read it: not a PyTorch checkpoint, or one that "
                "holds more than tensors and plain containers"
            ) from None
        raise CheckpointError(
            f"{path}: refused by torch.load(weights_only=True): it needs {found.group(1)}; only tensors and plain "
            "containers are read"
        ) from None
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch file ({type(err).__name__}: {err})") from None


def _unwrap(state: Any, path: Path) -> dict[str, torch.Tensor]:
    for holder in _HOLDERS:
        if isinstance(state, Mapping) and isinstance(state.get(holder), Mapping):
            state = state[holder]
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        found = sorted(state)[:5] if isinstance(state, Mapping) else type(state).__name__
        raise CheckpointError(f"{path}: not a state dict of tensors (found {found})")
    return dict(state)


def read_weights(path: str | Path) -> tuple[Path, dict[str, torch.Tensor], str | None]:
    """(the file read, its tensors, 'TorchScript' when it was an archive) for a weights file or a
    hub folder. Errors are one line naming the file: missing, unreadable, not tensors."""
    path = Path(path)
    if path.is_dir():
        path = folder_file(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    prefix = torchscript_prefix(path)
    if prefix is not None:
        return path, read_torchscript(path, prefix), "TorchScript"
    state = load_weights(path) if is_safetensors(path) else read_pickle(path, "weights file")
    return path, _unwrap(state, path), None


def _is_counter(key: str) -> bool:
    return key.rsplit(".", 1)[-1] == _COUNTER


def load_checked(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    where: str,
    *,
    what: str = "the network",
    allow_mismatch: bool = False,
) -> int:
    """Load `state` into `model`; return how many tensors loaded.

    A missing, unexpected or mis-shaped key raises, naming them, unless `allow_mismatch`: then
    those keys are skipped, but never more than `MAX_RANDOM` of the network's tensors may stay at
    their random initialisation (the error names them). BatchNorm counters a file lacks do not
    count. One log line says how much loaded from where.
    """
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and not _is_counter(k)]
    problems = {"missing": missing, "unexpected": unexpected, "shape mismatch": mismatched}
    summary = "; ".join(f"{name}: {len(keys)} e.g. {keys[:3]}" for name, keys in problems.items() if keys)
    if summary and not allow_mismatch:
        raise CheckpointError(f"{where}: does not fit {what} ({summary}); set allow_mismatch to load anyway")
    loadable = {k: v for k, v in state.items() if k in own and k not in mismatched}
    random = [k for k in own if k not in loadable and not _is_counter(k)]
    if len(random) > MAX_RANDOM:
        raise CheckpointError(
            f"{where}: would leave {len(random)} tensors of {what} at random initialisation, e.g. {random[:6]} "
            f"(at most {MAX_RANDOM} may stay random, even with allow_mismatch): a file of another network?"
        )
    model.load_state_dict(loadable, strict=False)
    expected = [k for k in own if k in state or not _is_counter(k)]
    skipped = f" ({summary})" if summary else ""
    log.info("loaded %d/%d tensors of %s from %s%s", len(loadable), len(expected), what, where, skipped)
    return len(loadable)
