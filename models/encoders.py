"""Image encoders for the unlabelled clustering behind the hard validation split.

An encoder config (`split.encoder`, `split.demo.encoder` in configs/data.yaml) is one of

  {kind: timm, name: convnext_base.fb_in22k, pretrained: true, weights: null, image_size: null, seed: 0}
  (every key has a default: configs/data.yaml writes them all, null or false where the default applies,
  so each can be overridden on the command line)
  {kind: open_clip, name: ViT-L-14, pretrained: openai}           # a tag, or a local file (models.clip_towers)
  {kind: open_clip, name: ViT-L-14, pretrained: ViT-L-14.pt, quick_gelu: true}   # OpenAI's file: say QuickGELU
  {kind: open_clip, model_cfg: {embed_dim: .., vision_cfg: {..}, text_cfg: {..}}, weights: null}

`model_cfg` builds an open_clip model from an inline config (no download), which is what
the tests use. Only the image tower is kept.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from core.checkpoint import CheckpointError
from core.config import ConfigError
from core.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from core.log import get_logger
from models.backbones import create_backbone

log = get_logger("encoders")

KINDS = ("timm", "open_clip")
# Every key an encoder config may hold (configs/data.yaml writes them all, so each can be overridden).
KEYS = frozenset(
    ("kind", "name", "pretrained", "weights", "image_size", "mean", "std", "quick_gelu", "model_cfg")
    + ("allow_mismatch", "seed")
)


class EncoderError(ValueError):
    """An encoder config is wrong or its weights cannot be had; the message says which."""


@dataclass
class Encoder:
    """`module(images) -> (B, D)` features, and the input it expects."""

    module: torch.nn.Module
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: str

    def transform_cfg(self) -> dict:
        """The `data`-section form that `core.data.transforms.build_transform` takes."""
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}


def _weights_stamp(path: str | None) -> dict | None:
    # A changed local weights file must invalidate cached features even under the same name.
    if not path or not Path(path).is_file():
        return None
    st = Path(path).stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def encoder_key(cfg: Mapping) -> str:
    """A short hash of everything that changes the features: the config and any local weights file."""
    stamp = {
        "cfg": dict(cfg),
        "weights": _weights_stamp(cfg.get("weights")),
        "pretrained_file": _weights_stamp(cfg.get("pretrained") if isinstance(cfg.get("pretrained"), str) else None),
    }
    blob = json.dumps(stamp, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _build_timm(cfg: Mapping) -> Encoder:
    name = cfg.get("name")
    if not name:
        raise EncoderError("timm encoder: `name` is required (a timm model name)")
    try:
        model = create_backbone(
            name,
            pretrained=bool(cfg.get("pretrained", False)),
            weights=cfg.get("weights"),
            allow_mismatch=bool(cfg.get("allow_mismatch", False)),
        )
    except (RuntimeError, CheckpointError) as err:
        raise EncoderError(f"timm encoder {name!r}: {err}") from None
    pcfg = getattr(model, "pretrained_cfg", {}) or {}
    size = int(cfg.get("image_size") or pcfg.get("input_size", (3, 224, 224))[-1])
    mean = tuple(cfg.get("mean") or pcfg.get("mean") or IMAGENET_MEAN)
    std = tuple(cfg.get("std") or pcfg.get("std") or IMAGENET_STD)
    source = cfg.get("weights") or ("hub" if cfg.get("pretrained") else "random weights")
    return Encoder(model, size, mean, std, f"timm {name} ({source}) at {size}px")


def _build_open_clip(cfg: Mapping) -> Encoder:
    import open_clip  # heavy; only this encoder kind needs it

    from models.clip_towers import build_visual, names_a_file

    name, inline = cfg.get("name"), cfg.get("model_cfg")
    if not inline and not name:
        raise EncoderError("open_clip encoder: give `name` (e.g. ViT-B-32) or an inline `model_cfg`")
    pretrained = cfg.get("weights") or cfg.get("pretrained") or None
    tag = str(pretrained) if pretrained and name and not inline and not names_a_file(str(pretrained)) else None
    tag_cfg = open_clip.get_pretrained_cfg(name, tag) if tag else {}
    # The OpenAI weights were trained with QuickGELU; building without it degrades them silently. A
    # tag says which it takes; a local file cannot, so `quick_gelu` says it.
    chosen = cfg.get("quick_gelu")  # null in the config: not chosen
    quick_gelu = bool(tag_cfg.get("quick_gelu", False) if chosen is None else chosen)
    try:
        visual = build_visual(None if inline else name, inline, pretrained, quick_gelu)
    except (CheckpointError, ConfigError) as err:
        raise EncoderError(f"open_clip encoder: {err}") from None
    sides = visual.image_size if isinstance(visual.image_size, (tuple, list)) else (visual.image_size,)
    size = int(cfg.get("image_size") or sides[-1])
    mean = tuple(cfg.get("mean") or tag_cfg.get("mean") or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(cfg.get("std") or tag_cfg.get("std") or open_clip.OPENAI_DATASET_STD)
    label = name or "inline config"
    return Encoder(visual, size, mean, std, f"open_clip {label} ({pretrained or 'random weights'}) at {size}px")


def build_encoder(cfg: Mapping) -> Encoder:
    """Build the encoder described by `cfg` (see the module docstring), in eval mode."""
    kind = cfg.get("kind")
    if kind not in KINDS:
        raise EncoderError(f"encoder kind must be one of {list(KINDS)}, got {kind!r}")
    unknown = sorted(set(cfg) - KEYS)
    if unknown:  # a misspelt key would otherwise be ignored silently
        raise EncoderError(f"encoder config: unknown key(s) {unknown}; known: {sorted(KEYS)}")
    # Weights not loaded from a file are drawn from torch's generator: seed it (without
    # touching the caller's stream), so a random-weight encoder gives the same clusters on
    # every machine and every run, not only while its features are cached.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.get("seed", 0)))
        encoder = _build_timm(cfg) if kind == "timm" else _build_open_clip(cfg)
    encoder.module.eval()
    log.info("encoder: %s", encoder.description)
    return encoder
