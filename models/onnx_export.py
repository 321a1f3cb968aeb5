"""A trained network exported to ONNX, checked against PyTorch once, and cached: infer.py's CPU path.

On a CPU, ONNX Runtime runs the same network much faster than PyTorch eager (its own
depthwise-convolution kernels, convolutions fused with their norm and activation): for
EfficientNet-B4 at 512 px on 2 cores, well over the 1.5x target over the naive loop
(docs/benchmarks.md). Exporting takes a while (torch.export traces the network: about 20 s
for B4), so the export is made once per checkpoint and cached beside the weights
(`model.safetensors` -> `model.onnx`) with a tag recording whether it gave PyTorch's outputs
(`core.infer.onnx_cache`); infer.py then loads a verified export without importing torch, and
scores a network whose export failed or disagreed with PyTorch without trying again.

The network is traced with a two-image example. With one image, torch.export specialises
the batch size in ConvNeXt(V2): the convolution after each block's channels-last MLP asks
which memory layout its input has, which for a batch of one depends on the batch size, so
the trace adds the guard `batch <= 1` and the export fails its dynamic-batch constraint
(`Invalid ranges [2:1]`). Any example batch above one avoids the question.

A network with a part that does not depend on its input (SJEDD's prompt embeddings, made by
a text tower that costs several times its image tower) offers `export_constants()`, a context
under which the export takes that part as a constant computed once, not a subgraph run per call.

A network that takes clips (`takes_clips`: (N, T, 3, H, W) in) is exported with its clip length
free too, from 1 (a still as a one-frame clip) to the longest its config cuts (`clip.frames`),
and checked on a full-length clip and on one-frame clips.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from core.infer.onnx_cache import (
    FAILED,
    KEY_FIELD,
    VERIFIED,
    CachedExport,
    OrtNetwork,
    lookup,
    make_session,
    new_tag,
    onnx_path,
    write_tag,
)
from core.io import write_with
from core.log import get_logger
from models.fusion import flat_outputs

log = get_logger("onnx")

EXAMPLE_BATCH = 2  # see the module docstring
# ONNX Runtime against PyTorch on the same inputs; the scores, a softmax of the logits, move
# by less than that.
RTOL, ATOL = 1e-3, 1e-4


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
    """An `OrtNetwork` behind the torch interface of the network it was exported from: takes a
    float image batch (N, 3, H, W) on the CPU, returns the same dict (or tensor)."""

    def __init__(self, network: OrtNetwork):
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor] | torch.Tensor:
        out = self.network(images.detach().to("cpu", torch.float32).contiguous().numpy())
        if isinstance(out, dict):
            return {k: torch.from_numpy(v) for k, v in out.items()}
        return torch.from_numpy(out)


def _examples(size: int, frames: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The tracing example (two images, or two clips of `frames`) and the check's inputs (one image,
    then three; one full-length clip, then three one-frame clips)."""
    gen = torch.Generator().manual_seed(0)
    if frames is None:
        images = torch.randn(3, 3, size, size, generator=gen)
        return torch.randn(EXAMPLE_BATCH, 3, size, size, generator=gen), [images[:1], images]
    example = torch.randn(EXAMPLE_BATCH, frames, 3, size, size, generator=gen)
    return example, [
        torch.randn(1, frames, 3, size, size, generator=gen),
        torch.randn(3, 1, 3, size, size, generator=gen),
    ]


@contextlib.contextmanager
def _quiet_exporter():
    """torch.export reports a failure as hundreds of log and print lines before raising it;
    the caller logs one line with the exception's first line instead."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            # torch.export's notes on tracing are about its own internals, not the network.
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_onnx(model: nn.Module, size: int, keys: list[str] | None, key: str, frames: int | None = None) -> bytes:
    """The eval-mode `model` as an ONNX model (batch size free, input size `size`; with `frames`, clips
    of 1 to `frames` frames), tagged with `key`."""
    example, _ = _examples(size, frames)
    free = {0: torch.export.Dim("batch", min=1, max=4096)}
    if frames is not None and frames > 1:
        free[1] = torch.export.Dim("frames", min=1, max=frames)
    constants = getattr(model, "export_constants", contextlib.nullcontext)
    with _quiet_exporter(), constants():
        program = torch.onnx.export(
            _Tupled(model, keys).eval(),
            (example,),
            input_names=["images"],
            output_names=keys or ["output"],
            dynamic_shapes=(free,),
            dynamo=True,
            verbose=False,
        )
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = KEY_FIELD, key
    return proto.SerializeToString()


def compare(model: nn.Module, network: OrtNetwork, size: int, frames: int | None = None) -> float | None:
    """Largest difference between `network` and `model` on one and on three random images or clips
    (so the free batch size and clip length are checked too); None where any output is out of
    tolerance."""
    _, inputs = _examples(size, frames)
    worst = 0.0
    for x in inputs:
        with torch.inference_mode():
            expected = flat_outputs(model(x))
        got = network(x.numpy())
        got = [torch.from_numpy(v) for v in (got.values() if isinstance(got, dict) else [got])]
        if len(got) != len(expected):
            return None
        for a, b in zip(expected, got, strict=True):
            if not torch.allclose(a.float(), b.float(), rtol=RTOL, atol=ATOL):
                return None
            worst = max(worst, float((a.float() - b.float()).abs().max()))
    return worst


def _output_keys(model: nn.Module, size: int, frames: int | None) -> list[str] | None:
    with torch.inference_mode():
        out = model(_examples(size, frames)[0])
    return list(out) if isinstance(out, dict) else None


def _store(path: Path, model_bytes: bytes) -> bool:
    try:
        write_with(path, lambda tmp: Path(tmp).write_bytes(model_bytes))
    except OSError as err:
        log.warning("%s: cannot cache the export (%s); it is redone at each load", path, err.strerror)
        return False
    return True


def export_and_check(
    model: nn.Module,
    size: int,
    name: str,
    cached: CachedExport | None = None,
    threads: int = 0,
    frames: int | None = None,
) -> tuple[OrtNetwork | None, str]:
    """Export `model` (eval mode, CPU; a clip network with `frames`, its longest clip) and compare it
    with PyTorch: the network, or None and the reason. With `cached` (the cache state of its
    weights file), the export and the verdict are recorded beside the weights, a failure included,
    so neither is redone at the next load."""
    keys = _output_keys(model, size, frames)
    network, reason, details = None, "", {}
    try:
        model_bytes = export_onnx(model, size, keys, cached.key if cached else "uncached", frames)
        network = OrtNetwork(make_session(model_bytes, threads), keys)
    except Exception as err:  # noqa: BLE001 (an op without an ONNX form: score with PyTorch)
        reason = f"export failed: {str(err).strip().splitlines()[0]}"
    if network is not None:
        worst = compare(model, network, size, frames)
        if worst is None:
            network, reason = None, "its outputs differ from PyTorch's"
        else:
            details = {"keys": keys, "max_abs_diff": worst}
    if cached is not None:
        stored = network is None or _store(onnx_path(cached.weights), model_bytes)
        if stored:
            verdict = VERIFIED if network is not None else FAILED
            write_tag(cached.weights, new_tag(cached, size, verdict, reason=reason, **details))
    if network is None:
        log.warning("%s: no ONNX export (%s); scoring with PyTorch", name, reason)
    return network, reason


def onnx_network(
    model: nn.Module, size: int, weights: Path | None = None, threads: int = 0, frames: int | None = None
) -> OrtNetwork | None:
    """`model` (eval mode, on the CPU) as an ONNX Runtime network for `size` px inputs (clips of up
    to `frames` frames for a clip network): the verified export cached beside `weights`, or a new
    one checked against PyTorch now and cached with its verdict; None where the export failed or
    disagreed (now or, recorded, before)."""
    name = str(weights) if weights is not None else type(model).__name__
    if weights is None:
        return export_and_check(model, size, name, threads=threads, frames=frames)[0]
    cached = lookup(weights, size, threads)
    if cached.state == VERIFIED:
        return cached.network
    if cached.state == FAILED:
        log.warning("%s: no ONNX export (%s, recorded in its tag); scoring with PyTorch", name, cached.reason)
        return None
    log.info("%s: exporting to ONNX for the CPU and checking it against PyTorch (once per checkpoint)", name)
    return export_and_check(model, size, name, cached, threads, frames)[0]
