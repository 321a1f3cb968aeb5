"""Cached ONNX exports of trained networks and their verdicts, read without importing torch.

A network is exported once per checkpoint (models/onnx_export.py, which needs torch) and
checked against PyTorch then, not at every load. Beside the weights it leaves:

- `model.onnx`: the export, with the cache key in its metadata;
- `model.onnx.json`, the tag: the key, the verdict (`verified`: ONNX Runtime gave PyTorch's
  outputs; `failed`: the export failed or disagreed, with the reason) and the fingerprint of
  the weights file it was made from;
- `model.optimized.onnx`: the graph as ONNX Runtime optimised it on this kind of machine
  (written at the first load, named in the tag by `machine_id`), so later loads skip that step.

The key covers what an export depends on: the weights' bytes, the input size, the torch and
ONNX Runtime versions and the export recipe. A changed weights file (other size or
modification time, then other bytes), another input size, a torch or ONNX Runtime upgrade
or a new recipe makes the cache stale, and the next load exports and checks again; a failure
is not retried until then. The weights' SHA-256 is computed only when their size or
modification time differ from the tag's (as git and make trust file stamps), so a cached load
does not read hundreds of megabytes of weights.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from core.io import atomic_path, file_sha256, write_json
from core.log import get_logger

log = get_logger("onnx")

# Bumped when the export recipe changes, so caches written by an older one are redone.
# 2: traced with a two-image example (ConvNeXtV2 exports), verdict kept in the tag.
# 3: input-independent parts exported as constants (`export_constants`, models/onnx_export.py).
EXPORT_RECIPE = "3"
KEY_FIELD = "export_key"
VERIFIED = "verified"
FAILED = "failed"


def onnx_path(weights: Path) -> Path:
    return weights.with_suffix(".onnx")


def tag_path(weights: Path) -> Path:
    return weights.with_suffix(".onnx.json")


@functools.cache  # read from the installed metadata: 4-8 ms a call, and a load asks twice per network
def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def fingerprint(weights: Path, known: dict | None = None) -> dict:
    """Size, modification time and SHA-256 of `weights`; the hash is taken from `known` (a
    tag's record) when size and time match it, else computed."""
    stat = weights.stat()
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if known and all(known.get(k) == v for k, v in stamp.items()) and known.get("sha256"):
        return {**stamp, "sha256": known["sha256"]}
    return {**stamp, "sha256": file_sha256(weights)}


def export_key(weights_sha256: str, size: int) -> str:
    """What a cached export depends on: the weights' bytes, the input size, the exporter and runtime."""
    parts = [weights_sha256, str(size), _version("torch"), _version("onnxruntime"), EXPORT_RECIPE]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def read_tag(weights: Path) -> dict | None:
    """The tag beside `weights`, or None where there is none or it cannot be read (redone)."""
    path = tag_path(weights)
    try:
        tag = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("%s: unreadable export tag (%s); exporting again", path, err)
        return None
    return tag if isinstance(tag, dict) else None


def write_tag(weights: Path, tag: dict) -> None:
    """Write the tag atomically; an unwritable folder costs a new export and check at each load."""
    try:
        write_json(tag, tag_path(weights))
    except OSError as err:
        log.warning("%s: cannot record the export (%s); it is redone at each load", tag_path(weights), err.strerror)


def make_session(model: bytes | str | Path, threads: int = 0, *, optimized: bool = False, save_to: Path | None = None):
    """An ONNX Runtime CPU session (`threads` 0: ONNX Runtime's choice, one per physical core).
    `optimized`: the model is a graph ONNX Runtime already optimised (`save_to` writes one)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # No spinning: a worker thread that has finished waits on a lock instead of polling. infer.py
    # holds a session per network (25 with every fold of the demo members), each with its own pool,
    # run one after the other: polling threads took the 2 cores from the session that was running
    # (one demo image with 25 networks 1.27 s -> 0.78 s, 80 images 9.4 s -> 6.9 s; one network alone
    # the same, 0.85 s either way).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: its notes on unused initialisers are noise here
    if optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if save_to is not None:
        options.optimized_model_filepath = str(save_to)
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def optimized_path(weights: Path) -> Path:
    return weights.with_suffix(".optimized.onnx")


@functools.cache
def machine_id() -> str:
    """What an optimised graph is specific to: ONNX Runtime picks its fused kernels and blocked
    layouts for the processor's instruction set, so a graph optimised on one machine is used on
    that kind of machine only."""
    flags = ""
    with contextlib.suppress(OSError):
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    parts = [platform.machine(), platform.system(), flags, _version("onnxruntime")]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


class OrtNetwork:
    """An ONNX Runtime session behind the interface of the network it was exported from, in
    NumPy: a float32 image batch (N, 3, H, W) in, the same dict of outputs (or the one array) out."""

    def __init__(self, session, keys: list[str] | None):
        self.session = session
        self.keys = keys
        self.input_name = session.get_inputs()[0].name

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray] | np.ndarray:
        outputs = self.session.run(None, {self.input_name: np.ascontiguousarray(images, dtype=np.float32)})
        return dict(zip(self.keys, outputs, strict=True)) if self.keys else outputs[0]


@dataclass
class CachedExport:
    """What the cache beside a weights file holds for one input size.

    `state`: `verified` (`network` is ready), `failed` (`reason` says why; score with
    PyTorch) or `stale` (nothing usable: export and check now). `key` and `stamp` (the
    weights' fingerprint) are what a new tag records."""

    state: str
    weights: Path
    key: str
    stamp: dict
    reason: str = ""
    network: OrtNetwork | None = field(default=None, repr=False)


def _optimized_session(weights: Path, tag: dict, threads: int):
    """The session of the graph ONNX Runtime optimised on this kind of machine, if there is one.
    Building a session from it skips the graph optimisation: 0.13 s instead of 0.4-0.5 s for
    B4 at 512 px on 2 cores, for the same forward pass."""
    path = optimized_path(weights)
    if tag.get("optimized_for") != machine_id() or not path.is_file():
        return None
    try:
        return make_session(path, threads, optimized=True)
    except Exception:  # noqa: BLE001 (unreadable: optimised again from the export below)
        return None


def _session_optimizing(weights: Path, tag: dict, threads: int):
    """A session of the export that also writes its optimised graph for the next loads (recorded
    in the tag); an unwritable folder only costs that saving."""
    try:
        with atomic_path(optimized_path(weights)) as tmp:
            session = make_session(onnx_path(weights), threads, save_to=tmp)
    except OSError:
        return make_session(onnx_path(weights), threads)
    write_tag(weights, {**tag, "optimized_for": machine_id()})
    return session


def _open_export(weights: Path, tag: dict, keys: list[str] | None, threads: int) -> OrtNetwork | None:
    """The cached export as a network, if it is readable and carries the tag's key."""
    path = onnx_path(weights)
    if not path.is_file():
        return None
    try:
        session = _optimized_session(weights, tag, threads) or _session_optimizing(weights, tag, threads)
    except Exception as err:  # noqa: BLE001 (any unreadable cache is redone, never fatal)
        log.warning("%s: unreadable cached export (%s); exporting again", path, str(err).splitlines()[0])
        return None
    if session.get_modelmeta().custom_metadata_map.get(KEY_FIELD) != tag["key"]:
        return None
    return OrtNetwork(session, keys)


def lookup(weights: Path, size: int, threads: int = 0) -> CachedExport:
    """The cached export of `weights` at input size `size`, with the verdict made when it was exported."""
    tag = read_tag(weights) or {}
    stamp = fingerprint(weights, tag.get("weights"))
    key = export_key(stamp["sha256"], size)
    if tag.get("key") != key or tag.get("verdict") not in (VERIFIED, FAILED):
        return CachedExport("stale", weights, key, stamp)
    if tag.get("weights") != stamp:  # same bytes, new file time: record it so the next load skips the hash
        tag = {**tag, "weights": stamp}
        write_tag(weights, tag)
    if tag["verdict"] == FAILED:
        return CachedExport(FAILED, weights, key, stamp, reason=str(tag.get("reason", "unknown")))
    network = _open_export(weights, tag, tag.get("keys"), threads)
    return CachedExport(VERIFIED if network else "stale", weights, key, stamp, network=network)


def needs_export(weights: Path, size: int) -> bool:
    """Whether `lookup` would find nothing usable for `weights` at `size` px (no export, or a stale
    one), read from the tag alone: no session is opened."""
    tag = read_tag(weights) or {}
    key = export_key(fingerprint(weights, tag.get("weights"))["sha256"], size)
    if tag.get("key") != key or tag.get("verdict") not in (VERIFIED, FAILED):
        return True
    return tag["verdict"] == VERIFIED and not onnx_path(weights).is_file()


def new_tag(cached: CachedExport, size: int, verdict: str, **details) -> dict:
    """The tag recording an export of the weights `cached` describes, and the check's verdict."""
    return {
        "key": cached.key,
        "verdict": verdict,
        "input_size": size,
        "weights": cached.stamp,
        "torch": _version("torch"),
        "onnxruntime": _version("onnxruntime"),
        "recipe": EXPORT_RECIPE,
        **details,
    }
