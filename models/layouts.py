"""Key layouts of the pretrained files the methods' code downloads, converted to the networks built here.

- timm backbones (`timm_layout`):
  - efficientnet_pytorch's EfficientNet (SBI's `EfficientNet.from_pretrained("efficientnet-b4",
    advprop=True)`, file `adv-efficientnet-b4-44fb3a87.pth`): blocks listed flat, renamed block by
    block to timm's `tf_efficientnet_*` (`efficientnet_pytorch_to_timm`);
  - pretrainedmodels' Xception (`xception-b5690688.pth`, which SLADD's code loads): timm's
    `legacy_xception` names, but its pointwise convolutions stored as 2-D (out, in) matrices; the
    public code unsqueezes them to (out, in, 1, 1), as `pointwise_as_conv` does. The file predates
    BatchNorm's batch counters, which `weight_files.load_checked` does not ask for.
- open_clip CLIP models (`clip_layout`):
  - OpenAI's TorchScript files (read by `weight_files`): open_clip's names already, plus attributes
    that are not weights (`input_resolution`, `context_length`, `vocab_size`, the attention masks);
  - Hugging Face transformers' `CLIPModel` (`model.safetensors` of openai/clip-vit-*): renamed
    layer by layer, q/k/v projections joined into one in-projection, projections transposed
    (`hf_clip_to_open_clip`).

Every function returns a new dict and leaves tensors' values alone; a key they cannot place is kept
under its own name, so the strict load names it.
"""

from __future__ import annotations

import re

import torch

from core.checkpoint import CheckpointError

# Wrappers that training scripts commonly add around a state dict.
_WRAPPER_PREFIXES = ("module.", "model.", "backbone.")


def strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` without a prefix that every key shares (`module.` from DDP, ...)."""
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


# --------------------------------------------------------------------------- efficientnet_pytorch

# Top-level modules of efficientnet_pytorch's EfficientNet and timm's EfficientNet.
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Inside a block with an expansion convolution (timm's InvertedResidual) ...
_EXPANDED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
# ... and without one (expansion ratio 1, the first stage: timm's DepthwiseSeparableConv).
_DEPTHWISE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(.+)")


def _stage_of(depths: list[int]) -> list[tuple[int, int]]:
    """Flat block index -> (stage, index in stage), as timm nests the blocks efficientnet_pytorch lists flat."""
    return [(stage, i) for stage, depth in enumerate(depths) for i in range(depth)]


def efficientnet_pytorch_to_timm(state: dict[str, torch.Tensor], depths: list[int]) -> dict[str, torch.Tensor]:
    """efficientnet_pytorch's EfficientNet state dict with timm's EfficientNet key names.

    efficientnet_pytorch lists the MBConv blocks flat (`_blocks.<n>`); timm nests them by stage
    (`blocks.<stage>.<i>`, stage lengths `depths`, the same round-up of the depth multiplier). A
    block with an expansion convolution renames its parts as timm's InvertedResidual (`_EXPANDED`),
    one without as its DepthwiseSeparableConv (`_DEPTHWISE`); the stem, head convolution, their
    BatchNorms and `_fc` as `_TOP`. A key that fits none of these raises.
    """
    where = _stage_of(depths)
    expanded = {int(m.group(1)) for k in state if (m := _BLOCK_KEY.fullmatch(k)) and m.group(2) == "_expand_conv"}
    out = {}
    for key, value in state.items():
        block = _BLOCK_KEY.fullmatch(key)
        if block is None:
            module, _, param = key.partition(".")
            if module not in _TOP:
                raise CheckpointError(f"unexpected efficientnet_pytorch key {key!r}")
            out[f"{_TOP[module]}.{param}"] = value
            continue
        n, module, param = int(block.group(1)), block.group(2), block.group(3)
        names = _EXPANDED if n in expanded else _DEPTHWISE
        if n >= len(where) or module not in names:
            raise CheckpointError(f"unexpected efficientnet_pytorch key {key!r} (the network has {len(where)} blocks)")
        stage, i = where[n]
        out[f"blocks.{stage}.{i}.{names[module]}.{param}"] = value
    return out


# --------------------------------------------------------------------------- timm backbones


def pointwise_as_conv(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> tuple[dict, int]:
    """`state` with every 2-D (out, in) weight whose place in the network is a 1x1 convolution of
    that shape stored as (out, in, 1, 1): pretrainedmodels' Xception keeps its pointwise
    convolutions as matrices. The same numbers; returns the count converted."""
    out, converted = dict(state), 0
    for key, value in state.items():
        target = own.get(key)
        if target is not None and value.ndim == 2 and target.shape == (*value.shape, 1, 1):
            out[key] = value[:, :, None, None]
            converted += 1
    return out, converted


def timm_layout(state: dict[str, torch.Tensor], model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], str | None]:
    """`state` in the names and shapes of the timm `model`, and which foreign layout it came in (None:
    timm's own)."""
    state = strip_wrappers(state)
    if any(k.startswith("_conv_stem.") for k in state):
        blocks = getattr(model, "blocks", None)
        if blocks is None:
            raise CheckpointError(f"an efficientnet_pytorch file, but {type(model).__name__} is no timm EfficientNet")
        return efficientnet_pytorch_to_timm(state, [len(stage) for stage in blocks]), "efficientnet_pytorch"
    state, converted = pointwise_as_conv(state, model.state_dict())
    return state, f"pretrainedmodels ({converted} 2-D pointwise weights as 1x1 convolutions)" if converted else None


# --------------------------------------------------------------------------- open_clip CLIP

# Attributes of OpenAI's scripted CLIP that are no weights of open_clip's.
_OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")
_HF_TOWERS = {"text_model": "", "vision_model": "visual."}
_HF_LAYER = re.compile(r"(text_model|vision_model)\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_HF_LAYER_PARTS = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_HF_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # open_clip's in-projection order
_HF_NAMES = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",  # sic: transformers' spelling
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "logit_scale": "logit_scale",
}
_HF_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}
_HF_POSITION_IDS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


def is_hf_clip(state: dict[str, torch.Tensor]) -> bool:
    return "vision_model.embeddings.patch_embedding.weight" in state or "text_model.final_layer_norm.weight" in state


def hf_clip_to_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers `CLIPModel` state dict in open_clip's `CLIP` names.

    Per layer: q, k and v projections stacked (in that order) into `attn.in_proj_*`; layer norms,
    MLP and the attention's output projection renamed (`_HF_LAYER_PARTS`). Embeddings and the
    outer layer norms renamed (`_HF_NAMES`); the two projections are Linear weights (out, in) in
    transformers and matrices applied as x @ P in open_clip, hence transposed. Position ids (a
    buffer of 0..n-1) are dropped.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        layer = _HF_LAYER.fullmatch(key)
        if key in _HF_POSITION_IDS:
            continue
        if layer is None:
            if key in _HF_TRANSPOSED:
                out[_HF_TRANSPOSED[key]] = value.t()
            else:
                out[_HF_NAMES.get(key, key)] = value
            continue
        tower, index, part, param = layer.groups()
        prefix = f"{_HF_TOWERS[tower]}transformer.resblocks.{index}"
        if part in _HF_QKV:
            qkv.setdefault((prefix, param, tower), {})[part] = value
        elif part in _HF_LAYER_PARTS:
            out[f"{prefix}.{_HF_LAYER_PARTS[part]}.{param}"] = value
        else:
            out[key] = value
    for (prefix, param, _), parts in qkv.items():
        if set(parts) != set(_HF_QKV):
            raise CheckpointError(f"{prefix}: the attention has {sorted(parts)}, not q, k and v projections")
        out[f"{prefix}.attn.in_proj_{param}"] = torch.cat([parts[p] for p in _HF_QKV])
    return out


def clip_layout(
    state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], str | None]:
    """`state` in the names of open_clip's CLIP whose state dict is `own`, and the foreign layout it
    came in (None: open_clip's, or OpenAI's, which open_clip kept)."""
    state, layout = strip_wrappers(state), None
    if is_hf_clip(state):
        state, layout = hf_clip_to_open_clip(state), "transformers CLIPModel"
    # OpenAI's scripted models hold a few non-weight attributes; open_clip's mask is no state either.
    state = {
        k: v for k, v in state.items() if k in own or not (k in _OPENAI_EXTRAS or k.rsplit(".", 1)[-1] == "attn_mask")
    }
    scale = state.get("logit_scale")
    if scale is not None and "logit_scale" in own and scale.shape != own["logit_scale"].shape:
        state["logit_scale"] = scale.reshape(own["logit_scale"].shape)  # a scalar in some files, (1,) in others
    return state, layout
