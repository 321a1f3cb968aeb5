"""Inference-only rewrites of a trained network that leave its outputs unchanged.

`fold_batchnorm` folds every eval-mode BatchNorm that directly follows a convolution into
that convolution's weights and bias: y = gamma * (W x + b - mean) / sqrt(var + eps) + beta
is the convolution with W' = W * s and b' = (b - mean) * s + beta, s = gamma / sqrt(var + eps).
The BatchNorm pass over the activations disappears (about 14% of an EfficientNet-B4 forward
at 512 px on a 2-core CPU: docs/benchmarks.md); an activation fused into the norm (timm's
BatchNormAct2d) stays.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from core.log import get_logger

log = get_logger("fusion")


def _foldable_conv(module: nn.Module) -> bool:
    """Convolutions whose forward uses `weight` and `bias` as stored (not, e.g., weight-standardised)."""
    from timm.layers import Conv2dSame

    return type(module) in (nn.Conv2d, Conv2dSame)


def _norm_replacement(bn: nn.Module) -> nn.Module | None:
    """What a folded norm becomes, or None for a norm this module does not know how to fold."""
    from timm.layers import BatchNormAct2d

    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if type(bn) is BatchNormAct2d:
        return nn.Sequential(bn.drop, bn.act)
    return None


def _trace(model: nn.Module, example: torch.Tensor) -> tuple[list[tuple[str, str]], list[torch.Tensor]]:
    """One forward of `model` on `example`: its outputs, and the (conv name, norm name) pairs
    where the norm's input was the output tensor of the convolution that ran just before it.
    Only the latest conv output is held, so the trace costs no more memory than a forward
    pass. A conv whose output also feeds something else is caught by the output check in
    `fold_batchnorm`."""
    names = {m: n for n, m in model.named_modules()}
    latest: list = [None, None]  # (conv, its output)
    pairs: list[tuple[str, str]] = []

    def after_conv(module, _inputs, output):
        latest[:] = [module, output]

    def before_norm(module, inputs):
        conv, output = latest
        if inputs[0] is output and _norm_replacement(module) is not None and module.track_running_stats:
            pairs.append((names[conv], names[module]))

    hooks = []
    for module in model.modules():
        if _foldable_conv(module):
            hooks.append(module.register_forward_hook(after_conv))
        elif isinstance(module, nn.BatchNorm2d):
            hooks.append(module.register_forward_pre_hook(before_norm))
    try:
        with torch.inference_mode():
            outputs = flat_outputs(model(example))
    finally:
        for hook in hooks:
            hook.remove()
    convs = [c for c, _ in pairs]
    return [(c, n) for c, n in pairs if convs.count(c) == 1], outputs


def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        scale = bn.running_var.add(bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        if conv.bias is not None:
            shift = shift + conv.bias * scale
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype))
        conv.bias = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=False)


def flat_outputs(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for v in output.values() for t in flat_outputs(v)]
    if isinstance(output, list | tuple):
        return [t for v in output for t in flat_outputs(v)]
    return []


def outputs_match(
    before: list[torch.Tensor], after: list[torch.Tensor], *, rtol: float = 1e-3, atol: float = 1e-4
) -> bool:
    """Same number of outputs, each equal within float tolerance (an inference rewrite's check)."""
    return len(before) == len(after) and all(
        torch.allclose(a.float(), b.float(), rtol=rtol, atol=atol) for a, b in zip(before, after, strict=True)
    )


def fold_batchnorm(model: nn.Module, example: torch.Tensor, *, rtol: float = 1e-3, atol: float = 1e-4) -> nn.Module:
    """A copy of the eval-mode `model` with every conv -> BatchNorm pair folded, checked to give
    the same outputs as `model` on `example`; `model` itself where there is nothing to fold or
    the outputs differ (logged: the network uses a conv output elsewhere too)."""
    if model.training:
        raise ValueError("fold_batchnorm needs an eval-mode model (training uses batch statistics)")
    pairs, before = _trace(model, example)
    if not pairs:
        return model
    folded = copy.deepcopy(model)
    modules = dict(folded.named_modules())
    for conv_name, bn_name in pairs:
        bn = modules[bn_name]
        _fold_pair(modules[conv_name], bn)
        parent_name, _, attr = bn_name.rpartition(".")
        setattr(modules[parent_name] if parent_name else folded, attr, _norm_replacement(bn))
    with torch.inference_mode():
        after = flat_outputs(folded(example))
    if not outputs_match(before, after, rtol=rtol, atol=atol):
        name = type(model).__name__
        log.warning("BatchNorm folding changed the outputs of %s; scoring with the unfolded network", name)
        return model
    log.debug("folded %d BatchNorm layers into their convolutions", len(pairs))
    return folded
