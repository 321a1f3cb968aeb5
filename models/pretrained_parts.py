"""The pretrained parts a config asks for, found by the shape of its sections (no member is named):

  a section with `backbone` and `pretrained`/`weights`     a timm network (`model`, `synthesizer`, ...)
  `experts`: a list merged into `model`, one per fold      a timm network per expert
  a section with `clip` or `model_cfg` and `pretrained`    an open_clip CLIP (a tag, or a local file)
  `kind: timm` / `kind: open_clip` with `name`             an encoder (the split's)
  `kind: dlib` / `kind: torch` with `models_dir` / `file`  a face-recognition network (local only)

`models.fetch_pretrained` downloads the hub ones and writes the overrides that point a config at
the files; `--check` reports, per member, which are present.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from models.clip_towers import names_a_file

TIMM, OPEN_CLIP, DLIB, TORCH_EXPORT = "timm", "open_clip", "dlib", "torch"


@dataclass(frozen=True)
class Part:
    """One pretrained part. `owner`: the member (or `data`); `key`: its config section (`model`,
    `experts.2`, `synthesizer`, `loss.embedder`, `split.encoder`); `kind`: timm, open_clip, dlib or
    torch; `name`: the network (timm name, open_clip architecture; '' for an inline config);
    `tag`: the open_clip pretrained tag; `local`: the local file or folder the config names;
    `wanted`: whether the config asks for pretrained weights at all."""

    owner: str
    key: str
    kind: str
    name: str
    tag: str | None = None
    local: str | None = None
    wanted: bool = True

    @property
    def hub_id(self) -> str | None:
        """What the hub knows it by (`timm:<name>`, `open_clip:<name>:<tag>`); None for a part
        that is local only or already given as a file, or not wanted."""
        if not self.wanted or self.local or self.kind not in (TIMM, OPEN_CLIP) or not self.name:
            return None
        return f"{TIMM}:{self.name}" if self.kind == TIMM else f"{OPEN_CLIP}:{self.name}:{self.tag}"

    def describe(self) -> str:
        what = f"{self.kind} {self.name or 'inline config'}{f' {self.tag}' if self.tag else ''}"
        return f"{self.key} ({what})"


def section_part(node: Mapping, key: str, owner: str) -> Part | None:
    """The part a config section describes, or None when it describes none."""
    kind = node.get("kind")
    if "backbone" in node and ("pretrained" in node or "weights" in node):
        weights = node.get("weights") or None
        return Part(owner, key, TIMM, str(node["backbone"]), None, weights, bool(weights or node.get("pretrained")))
    if kind == TIMM and node.get("name"):
        weights = node.get("weights") or None
        return Part(owner, key, TIMM, str(node["name"]), None, weights, bool(weights or node.get("pretrained")))
    clip_section = ("clip" in node or "model_cfg" in node) and "pretrained" in node
    if clip_section or kind == OPEN_CLIP:
        name = "" if node.get("model_cfg") else str(node.get("clip") or node.get("name") or "")
        source = node.get("weights") or node.get("pretrained") or None
        local = str(source) if source and (not name or names_a_file(str(source))) else None
        tag = None if local or not source else str(source)
        return Part(owner, key, OPEN_CLIP, name, tag, local, bool(source))
    if kind in (DLIB, TORCH_EXPORT) and ("models_dir" in node or "file" in node):
        local = node.get("file") if kind == TORCH_EXPORT else node.get("models_dir")
        return Part(owner, key, kind, "face embedder", None, local or None)
    return None


def _walk(node: Any, key: str, owner: str, out: list[Part]) -> None:
    if isinstance(node, Mapping):
        part = section_part(node, key, owner) if key else None
        if part is not None:
            out.append(part)
            return
        for name, value in node.items():
            _walk(value, f"{key}.{name}" if key else str(name), owner, out)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _walk(value, f"{key}.{i}", owner, out)


def member_parts(cfg: Mapping) -> list[Part]:
    """Every pretrained part of a member config. With `experts`, each expert (merged into `model`,
    as train.py trains fold k) is a part and `model` itself is not."""
    owner = str(cfg.get("name", "member"))
    out: list[Part] = []
    experts = cfg.get("experts") or []
    for i, expert in enumerate(experts):
        part = section_part({**dict(cfg.get("model") or {}), **dict(expert)}, f"experts.{i}", owner)
        if part is not None:
            out.append(part)
    rest = {k: v for k, v in cfg.items() if not (experts and k in ("experts", "model"))}
    _walk(rest, "", owner, out)
    return out


def data_parts(data_cfg: Mapping, demo: bool) -> list[Part]:
    """The split encoder's part (`split.encoder`, with `split.demo` replacing it on the demo sample)."""
    split = dict(data_cfg.get("split") or {})
    key = "split.demo.encoder" if demo and "encoder" in (split.get("demo") or {}) else "split.encoder"
    encoder = split["demo"]["encoder"] if key == "split.demo.encoder" else split.get("encoder")
    part = section_part(encoder, key, "data") if isinstance(encoder, Mapping) else None
    return [part] if part is not None else []
