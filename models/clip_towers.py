"""open_clip CLIP models for the members built on CLIP (sjedd: both towers; sta: the image tower)
and for the split's encoder, with their pretrained weights from the hub or a local file.

`pretrained` is an open_clip tag (e.g. `openai`: its file comes from the hub or the local hub
cache, whichever open_clip finds) or a local file or folder in any of the formats users download:

  open_clip state dicts     open_clip_model.safetensors / open_clip_pytorch_model.bin (HF hub), .pt
  OpenAI's TorchScript      ViT-B-32.pt, ViT-L-14.pt as OpenAI's `clip.load` fetches them (SJEDD, StA)
  transformers' CLIPModel   model.safetensors / pytorch_model.bin of openai/clip-vit-* (or its folder)

Every file is read without running code (`models.weight_files`), converted to open_clip's names
(`models.layouts.clip_layout`) and loaded strictly: a key or shape that does not fit is one line
naming the file. The file is found (or downloaded) before the network is built, so a missing one
fails in a second, not after building ViT-L/14.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from core.checkpoint import CheckpointError
from core.config import ConfigError
from models.layouts import clip_layout
from models.provenance import HUB, NONE, Source, hub_cache_revision, local_source, record, sha256_of
from models.weight_files import load_checked, read_weights

_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".tar")
_VISUAL = "visual."


def names_a_file(pretrained: str) -> bool:
    """A `pretrained` value that is a path (it exists, has a folder part or a weights suffix), not a tag."""
    path = Path(pretrained)
    return path.exists() or len(path.parts) > 1 or path.suffix in _WEIGHT_SUFFIXES


def model_config(clip: str | None, model_cfg: Mapping | None) -> dict:
    """The open_clip config of a named architecture (`clip`, e.g. ViT-L-14) or an inline `model_cfg`."""
    import open_clip  # heavy; only CLIP members need it

    if not model_cfg and not clip:
        raise ConfigError("model: give `clip` (an open_clip name such as ViT-L-14) or an inline `model_cfg`")
    cfg = dict(model_cfg) if model_cfg else open_clip.get_model_config(clip)
    if cfg is None:
        raise ConfigError(f"model.clip={clip!r}: not an open_clip architecture")
    return cfg


def vision_shape(clip: str | None, model_cfg: Mapping | None) -> tuple[int, int]:
    """(width, blocks) of the image tower of `clip` or `model_cfg`, read from its config (nothing built)."""
    import open_clip

    vision = model_config(clip, model_cfg)["vision_cfg"]
    vision = open_clip.model.CLIPVisionCfg(**vision) if isinstance(vision, dict) else vision
    return int(vision.width), int(vision.layers)


def hub_file(clip: str, tag: str) -> tuple[Path, Source]:
    """The file of open_clip's pretrained `tag` for `clip`: from the local hub cache, else downloaded."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(clip, tag)
    if not cfg:
        known = open_clip.list_pretrained_tags_by_model(clip)
        raise CheckpointError(f"open_clip has no pretrained weights {tag!r} for {clip!r} (it has {known})")
    try:
        path = Path(open_clip.download_pretrained(cfg))
    except Exception as err:  # noqa: BLE001 - downloads fail as HTTP, OS and hub errors
        raise CheckpointError(
            f"open_clip {clip!r} with pretrained={tag!r}: cannot download its weights ({type(err).__name__}: {err}); "
            "give a local checkpoint file as model.pretrained=<path>, or fetch every pretrained part on a "
            "connected machine with `python -m models.fetch_pretrained`"
        ) from None
    what = f"open_clip {clip} {tag}"
    if cfg.get("hf_hub"):
        repo = os.path.split(cfg["hf_hub"])[0]  # 'org/name/' or 'org/name/file'
        return path, Source(what, HUB, f"{repo}/{path.name}", revision=hub_cache_revision(path))
    return path, Source(what, HUB, cfg.get("url") or str(path), sha256=sha256_of(path))


def _weights(clip: str | None, pretrained: str) -> tuple[Path, dict[str, torch.Tensor], Source]:
    """(file, tensors, where they came from) of a tag or a local file."""
    what = f"open_clip {clip or 'inline config'}"
    if names_a_file(str(pretrained)):
        file, state, archive = read_weights(pretrained)
        return file, state, local_source(what, file, archive and f"OpenAI's {archive} archive")
    if not clip:
        raise ConfigError(f"model.pretrained={pretrained!r}: an inline model_cfg takes a local checkpoint file")
    file, source = hub_file(clip, str(pretrained))
    _, state, _ = read_weights(file)
    return file, state, source


def _load(module: nn.Module, state: dict, own: dict, file: Path, source: Source, prefix: str = "") -> None:
    state, layout = clip_layout(state, own)
    if prefix:
        state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    load_checked(module, state, str(file), what=source.what)
    record(Source(**{**source.as_dict(), "layout": layout or source.layout}))


def build_clip(
    clip: str | None, model_cfg: Mapping | None, pretrained: str | bool | None, quick_gelu: bool
) -> nn.Module:
    """open_clip's CLIP (both towers): the named architecture or the inline config, with the
    weights of `pretrained` (a tag or a local file; false/null: random)."""
    import open_clip

    weights = _weights(clip, str(pretrained)) if pretrained else None
    if model_cfg:
        model = open_clip.model.CLIP(**dict(model_cfg), quick_gelu=quick_gelu)
    else:
        model_config(clip, None)  # an unknown name: one line
        model = open_clip.create_model(clip, pretrained=None, force_quick_gelu=quick_gelu)
    if weights is None:
        record(Source(f"open_clip {clip or 'inline config'}", NONE))
        return model
    file, state, source = weights
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = open_clip.model.convert_to_custom_text_state_dict(state)  # a CustomTextCLIP's names
    _load(model, state, model.state_dict(), file, source)
    return model


def build_visual(
    clip: str | None, model_cfg: Mapping | None, pretrained: str | bool | None, quick_gelu: bool = False
) -> nn.Module:
    """open_clip's image tower alone, with the image tower's weights of a whole CLIP file."""
    import open_clip

    cfg = model_config(clip, model_cfg)
    weights = _weights(clip, str(pretrained)) if pretrained else None
    visual = open_clip.model._build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu)
    if weights is None:
        record(Source(f"open_clip {clip or 'inline config'} image tower", NONE))
        return visual
    file, state, source = weights
    own = {f"{_VISUAL}{k}": v for k, v in visual.state_dict().items()}
    _load(visual, state, own, file, Source(**{**source.as_dict(), "what": f"{source.what} image tower"}), _VISUAL)
    return visual
