"""A trained network exported to ONNX and run by ONNX Runtime: infer.py's CPU path.

On a CPU, ONNX Runtime runs the same network much faster than PyTorch eager (its own
depthwise-convolution kernels, convolutions fused with their norm and activation): for
EfficientNet-B4 at 512 px on 2 cores, well over the 1.5x target over the naive loop
(README, Benchmarks). Exporting takes a while (torch.export traces the network: about 20 s
for B4), so the ONNX file is cached beside the weights (`model.safetensors` ->
`model.onnx`), tagged with a key made of the weights' hash, the input size and the torch
version; a file whose key does not match is exported again.

Every exported network is checked against PyTorch on a random image before it is used. An
export that fails or disagrees is logged and the PyTorch network is scored instead, so the
fast path can never change a probability beyond float tolerance.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch
from torch import nn

from core.io import write_with
from core.log import get_logger
from models.fusion import flat_outputs, outputs_match

log = get_logger("onnx")

# Bumped when the export recipe changes, so caches written by an older one are redone.
EXPORT_VERSION = "1"
KEY_FIELD = "export_key"


class _Tupled(nn.Module):
    """The network with its dict output as a tuple in a fixed key order (ONNX outputs are a list)."""

    def __init__(self, model: nn.Module, keys: list[str] | None):
        super().__init__()
        self.model = model
        self.keys = keys

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(images)
        return tuple(out[k] for k in self.keys) if self.keys else (out,)


class OnnxNetwork(nn.Module):
    """An ONNX Runtime session behind the interface of the network it was exported from:
    takes a float image batch (N, 3, H, W) on the CPU, returns the same dict (or tensor)."""

    def __init__(self, session, keys: list[str] | None):
        super().__init__()
        self.session = session
        self.keys = keys
        self.input_name = session.get_inputs()[0].name

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor] | torch.Tensor:
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        outputs = [torch.from_numpy(o) for o in self.session.run(None, {self.input_name: array})]
        return dict(zip(self.keys, outputs, strict=True)) if self.keys else outputs[0]


def export_key(weights: Path, size: int) -> str:
    """What the cached export depends on: the weights' bytes, the input size, the exporter."""
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    digest.update(f"|{size}|{torch.__version__}|{EXPORT_VERSION}".encode())
    return digest.hexdigest()


def export_onnx(model: nn.Module, example: torch.Tensor, keys: list[str] | None, key: str) -> bytes:
    """The eval-mode `model` as an ONNX model (batch size free, input size fixed by `example`)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        # torch.export's notes on tracing are about its own internals, not the network.
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _Tupled(model, keys).eval(),
            (example,),
            input_names=["images"],
            output_names=keys or ["output"],
            dynamic_shapes=({0: batch},),
            dynamo=True,
            verbose=False,
        )
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = KEY_FIELD, key
    return proto.SerializeToString()


def make_session(model_bytes: bytes | str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: its notes on unused initialisers are noise here
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def _cached_session(cache: Path, key: str, threads: int):
    """The session of a cached export whose key matches, else None."""
    if not cache.is_file():
        return None
    try:
        session = make_session(str(cache), threads)
    except Exception as err:  # noqa: BLE001 (any unreadable cache is redone, never fatal)
        log.warning("%s: unreadable cached export (%s); exporting again", cache, str(err).splitlines()[0])
        return None
    return session if session.get_modelmeta().custom_metadata_map.get(KEY_FIELD) == key else None


def _store(cache: Path, model_bytes: bytes) -> None:
    try:
        write_with(cache, lambda tmp: Path(tmp).write_bytes(model_bytes))
    except OSError as err:
        log.warning("%s: cannot cache the export (%s); it is redone at each load", cache, err.strerror)


def onnx_network(model: nn.Module, example: torch.Tensor, weights: Path | None = None) -> nn.Module:
    """`model` (eval mode, on the CPU) as an `OnnxNetwork` for inputs of `example`'s image size,
    exported or read from the cache beside `weights`; `model` itself if the export fails or its
    outputs differ from PyTorch's on `example` (logged)."""
    size = example.shape[-1]
    with torch.inference_mode():
        reference = model(example)
    keys = list(reference) if isinstance(reference, dict) else None
    threads = torch.get_num_threads()
    key = export_key(weights, size) if weights is not None else "uncached"
    cache = weights.with_suffix(".onnx") if weights is not None else None
    session = _cached_session(cache, key, threads) if cache is not None else None
    name = type(model).__name__
    if session is None:
        log.info("exporting %s to ONNX for the CPU (once per checkpoint)", name)
        try:
            model_bytes = export_onnx(model, example, keys, key)
            session = make_session(model_bytes, threads)
        except Exception as err:  # noqa: BLE001 (an op without an ONNX form: score with PyTorch)
            log.warning("ONNX export of %s failed (%s); scoring with PyTorch", name, str(err).splitlines()[0])
            return model
        if cache is not None:
            _store(cache, model_bytes)
    network = OnnxNetwork(session, keys)
    with torch.inference_mode():
        if not outputs_match(flat_outputs(reference), flat_outputs(network(example))):
            log.warning("the ONNX export of %s gives different outputs; scoring with PyTorch", name)
            return model
    return network
