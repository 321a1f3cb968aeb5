"""timm backbones with pretrained weights from the hub or a local file, loaded loudly."""

from __future__ import annotations

from pathlib import Path

import timm
import torch

from core.checkpoint import CheckpointError, load_weights
from core.log import get_logger

log = get_logger("backbones")

# Keys of a classifier head: dropped because the member brings its own head. Only keys the
# headless model lacks are dropped: timm keeps some `head.` parts with `num_classes=0`
# (ConvNeXtV2's final `head.norm`), and those must load.
_HEAD_PREFIXES = ("classifier.", "head.fc.", "head.", "fc.", "last_linear.")
# Wrappers that training scripts commonly add around a state dict.
_WRAPPER_PREFIXES = ("module.", "model.", "backbone.")


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_backbone_weights(model: torch.nn.Module, path: str | Path, *, strict: bool = True) -> None:
    """Load a local pretrained file into `model`, logging what loaded.

    Classifier keys the headless model has no place for are ignored. Any other missing or
    unexpected key, or a shape mismatch, raises unless `strict=False`, in which case it is
    logged and skipped.
    """
    state = _strip_wrappers(load_weights(path, allow_pickle=True))
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(_HEAD_PREFIXES)}
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state]
    problems = {"missing": missing, "unexpected": unexpected, "shape mismatch": mismatched}
    summary = "; ".join(f"{name}: {len(keys)} e.g. {keys[:3]}" for name, keys in problems.items() if keys)
    if summary and strict:
        raise CheckpointError(f"{path}: does not fit the backbone ({summary}); set allow_mismatch to load anyway")
    loadable = {k: v for k, v in state.items() if k in own and k not in mismatched}
    model.load_state_dict(loadable, strict=False)
    log.info(
        "loaded %d/%d backbone tensors from %s%s", len(loadable), len(own), path, f" ({summary})" if summary else ""
    )


def create_backbone(
    name: str,
    *,
    pretrained: bool = False,
    weights: str | None = None,
    allow_mismatch: bool = False,
    **kwargs,
) -> torch.nn.Module:
    """A timm model with its classifier removed (`num_classes=0`): returns pooled features.

    `weights` (a local file) wins over `pretrained` (the hub), so an offline machine can
    load the same weights a connected one downloads.
    """
    if weights:
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        load_backbone_weights(model, weights, strict=not allow_mismatch)
        return model
    if pretrained:
        try:
            model = timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
        except Exception as err:  # noqa: BLE001 - hub failures come as HTTP, OS and huggingface_hub errors
            raise RuntimeError(
                f"cannot download pretrained weights for {name!r} ({type(err).__name__}: {err}); "
                "give a local file with model.weights=<path> or set model.pretrained=false"
            ) from None
        log.info("loaded pretrained %s from the hub", name)
        return model
    # Debug only: inference rebuilds the architecture this way before loading a checkpoint.
    log.debug("%s: randomly initialised (pretrained=false, no weights file)", name)
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


def last_feature_stage(backbone: torch.nn.Module) -> torch.nn.Module:
    """The module whose output is the backbone's deepest feature map (stride 32 for the usual
    CNNs): the last entry of timm's `feature_info` (ResNet `layer4`, ConvNeXt `stages.3`,
    EfficientNet `blocks.6`, Xception `act4`). Grad-CAM reads its activations and gradients."""
    info = getattr(backbone, "feature_info", None)
    if not info:
        raise ValueError(f"{type(backbone).__name__}: no timm feature_info to find its last feature stage in")
    last = info.get_dicts()[-1] if hasattr(info, "get_dicts") else info[-1]
    return backbone.get_submodule(last["module"])
