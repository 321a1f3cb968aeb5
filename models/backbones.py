"""timm backbones with pretrained weights from the hub or a local file, loaded loudly.

A local file may be in timm's layout or in one the methods' own code downloads (efficientnet_pytorch's
EfficientNet, pretrainedmodels' Xception): `models.layouts` converts it. Where the weights came from
is logged and recorded (`models.provenance`).
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch

from core.checkpoint import CheckpointError
from core.config import ConfigError
from models.layouts import timm_layout
from models.provenance import HUB, NONE, Source, hub_cache_revision, local_source, record, sha256_of
from models.weight_files import load_checked, read_weights

# Keys of a classifier head: dropped because the member brings its own head. Only keys the
# headless model lacks are dropped: timm keeps some `head.` parts with `num_classes=0`
# (ConvNeXtV2's final `head.norm`), and those must load.
_HEAD_PREFIXES = ("classifier.", "head.fc.", "head.", "fc.", "last_linear.")
# Files timm looks for in a hub repository, in its order.
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")


def load_backbone_weights(model: torch.nn.Module, name: str, path: str | Path, *, allow_mismatch: bool = False) -> None:
    """Load a local pretrained file (or a downloaded hub folder) into the timm `model`.

    Classifier keys the headless model has no place for are ignored. Any other missing or
    unexpected key, or a shape mismatch, raises unless `allow_mismatch`, and even then no more
    than a handful of tensors may stay random (`models.weight_files.load_checked`).
    """
    file, state, _ = read_weights(path)
    state, layout = timm_layout(state, model)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(_HEAD_PREFIXES)}
    load_checked(model, state, str(file), what="the backbone", allow_mismatch=allow_mismatch)
    record(local_source(f"timm {name}", file, layout))


def hub_source(name: str, model: torch.nn.Module) -> Source:
    """Where timm took `model`'s pretrained weights from: the Hugging Face repository and the
    cached file's commit, or the release URL and the cached file's SHA-256."""
    from huggingface_hub import try_to_load_from_cache

    cfg = getattr(model, "pretrained_cfg", None) or {}
    what = f"timm {name}"
    if cfg.get("hf_hub_id"):
        repo, _, revision = cfg["hf_hub_id"].partition("@")
        for filename in (cfg.get("hf_hub_filename"), *_HUB_FILES):
            cached = try_to_load_from_cache(repo, filename, revision=revision or None) if filename else None
            if isinstance(cached, str):
                return Source(what, HUB, f"{repo}/{filename}", revision=hub_cache_revision(cached))
        return Source(what, HUB, repo, revision=revision or None)
    url = cfg.get("url") or ""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    return Source(what, HUB, url, sha256=sha256_of(cached) if url and cached.is_file() else None)


def create_backbone(
    name: str,
    *,
    pretrained: bool = False,
    weights: str | None = None,
    allow_mismatch: bool = False,
    **kwargs,
) -> torch.nn.Module:
    """A timm model with its classifier removed (`num_classes=0`): returns pooled features.

    `weights` (a local file or hub folder) wins over `pretrained` (the hub), so an offline machine
    can load the same weights a connected one downloads.
    """
    if weights:
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        load_backbone_weights(model, name, weights, allow_mismatch=allow_mismatch)
        return model
    if pretrained:
        try:
            model = timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
        except Exception as err:  # noqa: BLE001 - hub failures come as HTTP, OS and huggingface_hub errors
            raise CheckpointError(
                f"cannot download pretrained weights for {name!r} ({type(err).__name__}: {err}); "
                "give a local file with model.weights=<path>, fetch every pretrained part on a connected "
                "machine with `python -m models.fetch_pretrained`, or set model.pretrained=false"
            ) from None
        record(hub_source(name, model))
        return model
    record(Source(f"timm {name}", NONE))
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


def set_bn_momentum(model: torch.nn.Module, momentum: float) -> None:
    """Every BatchNorm of `model` updates its running statistics with `momentum` (PyTorch's
    convention: the weight of the new batch; TensorFlow's 0.99 is PyTorch's 0.01)."""
    if not 0.0 < momentum <= 1.0:
        raise ConfigError(f"model.bn_momentum must be in (0, 1], not {momentum!r}")
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum


def pooled_before_norm(backbone: torch.nn.Module, feature_map: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """The pooled feature map before any normalisation in the head. timm's ConvNeXt head pools
    and then LayerNorms (`head.norm`) before its classifier; the winning solution's contrastive
    feature is the pooling's output (`head.global_pool`), not the normalised one. Backbones
    whose head pools only (EfficientNet, ResNet) give their classifier's input, `pooled`."""
    head = getattr(backbone, "head", None)
    norm = getattr(head, "norm", None)
    if isinstance(norm, torch.nn.Module) and not isinstance(norm, torch.nn.Identity) and hasattr(head, "global_pool"):
        return head.global_pool(feature_map).flatten(1)
    return pooled


def last_feature_stage(backbone: torch.nn.Module) -> torch.nn.Module:
    """The module whose output is the backbone's deepest feature map (stride 32 for the usual
    CNNs): the last entry of timm's `feature_info` (ResNet `layer4`, ConvNeXt `stages.3`,
    EfficientNet `blocks.6`, Xception `act4`). Grad-CAM reads its activations and gradients."""
    info = getattr(backbone, "feature_info", None)
    if not info:
        raise ValueError(f"{type(backbone).__name__}: no timm feature_info to find its last feature stage in")
    last = info.get_dicts()[-1] if hasattr(info, "get_dicts") else info[-1]
    return backbone.get_submodule(last["module"])
