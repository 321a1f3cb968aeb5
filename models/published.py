"""Published checkpoints as this project's networks (METHODS.md, "Published checkpoints").

Two releases map onto the project's members key by key:

- The winning solution: `weight.pth`, the state dict of an `nn.ModuleList` of seven experts,
  each holding its timm model (created with `num_classes=2`) under `baseline_extractor`, and
  `ema.state`, a dict {expert index: torch-ema state} whose `shadow_params` follow the order of
  `expert.parameters()`. Expert i becomes an `mff_expert` network (`models.mff`): the timm
  model's keys under `backbone.`, its 2-class classifier as `head.1`, and the EMA weights in
  place of the trained ones (buffers, e.g. BatchNorm statistics, come from `weight.pth`), as
  the released inference swaps them in.
- SBI: a dict whose `model` entry is the state dict of a module holding efficientnet_pytorch's
  `EfficientNet` under `net`. It becomes an `sbi_fed` network without the guidance heads
  (`models.sbi_fed`, backbone timm's `tf_efficientnet_b4.ap_in1k`: the same network with
  TensorFlow "same" padding and BatchNorm eps 1e-3), keys renamed block by block
  (`efficientnet_pytorch_to_timm`). The extension's release (B4 -> BatchNorm -> FC(2)) loads
  the same way into the `bn_fc` head (`model.head: bn_fc`).

Files are read only with `torch.load(weights_only=True)` on the CPU. Every converted state dict
is loaded strictly into the network its config builds, so a key or shape that does not fit
stops the import with one line naming the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from core.checkpoint import CheckpointError
from models.layouts import efficientnet_pytorch_to_timm
from models.registry import build_model
from models.weight_files import read_pickle


def _tensor_dict(obj: Any, path: Path, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: {what} is not a state dict of tensors (found {type(obj).__name__})")
    return dict(obj)


def _check_fits(network: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """A missing, unexpected or mis-shaped key of `state` for `network`, as one line."""
    own = network.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = {"missing": missing, "unexpected": unexpected, "shape mismatch": shapes}
    summary = "; ".join(f"{name} {len(keys)}, e.g. {keys[:2]}" for name, keys in problems.items() if keys)
    if summary:
        raise CheckpointError(f"{where}: does not fit the network ({summary})")


def timm_to_member(timm_keys: list[str], network: torch.nn.Module, where: str) -> dict[str, str]:
    """Where each key of a timm classifier (`num_classes=2`) goes in `network`: a member whose
    timm model (headless) is `backbone` and whose 2-class head is its only other part. Keys the
    headless backbone has go under `backbone.`; the classifier's weight and bias (`classifier.*`
    for EfficientNet, `head.fc.*` for ConvNeXt) become the head's. Any other key keeps its name,
    so that the strict check reports it as unexpected."""
    own = network.state_dict()
    keys = {k: f"backbone.{k}" for k in timm_keys if f"backbone.{k}" in own}
    rest = [k for k in timm_keys if k not in keys]
    prefixes = {k.rsplit(".", 1)[0] for k in rest}
    classifier = [p for p in sorted(prefixes) if {f"{p}.weight", f"{p}.bias"} <= set(rest)]
    head = {k.rsplit(".", 1)[-1]: k for k in own if not k.startswith("backbone.")}
    if len(classifier) != 1 or sorted(head) != ["bias", "weight"]:
        raise CheckpointError(f"{where}: expected one classifier (weight, bias) beside the backbone, found {rest[:4]}")
    keys.update({k: k for k in rest})
    keys.update({f"{classifier[0]}.{name}": target for name, target in head.items()})
    return keys


# --------------------------------------------------------------------------- the winning solution


def split_experts(state: dict[str, torch.Tensor], path: Path) -> dict[int, dict[str, torch.Tensor]]:
    """`<i>.baseline_extractor.<timm key>` -> {i: {timm key: tensor}}, in the file's key order."""
    experts: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        index, _, rest = key.partition(".")
        owner, _, timm_key = rest.partition(".")
        if not index.isdigit() or owner != "baseline_extractor" or not timm_key:
            raise CheckpointError(f"{path}: key {key!r} is not <expert>.baseline_extractor.<timm key>")
        experts.setdefault(int(index), {})[timm_key] = value
    return experts


def ema_shadow(ema: Any, index: int, path: Path) -> list[torch.Tensor]:
    """The EMA weights of expert `index` in `ema.state`: its `shadow_params` list."""
    state = ema.get(index) if isinstance(ema, Mapping) else None
    shadow = state.get("shadow_params") if isinstance(state, Mapping) else None
    if not isinstance(shadow, list) or not all(isinstance(t, torch.Tensor) for t in shadow):
        keys = sorted(ema) if isinstance(ema, Mapping) else type(ema).__name__
        raise CheckpointError(f"{path}: no shadow_params list of tensors for expert {index} (holds {keys})")
    return shadow


def apply_ema(
    converted: dict[str, torch.Tensor], order: list[str], shadow: list[torch.Tensor], where: str
) -> dict[str, torch.Tensor]:
    """`converted` with the parameters named by `order` (the network's keys of the published
    expert's parameters, in `expert.parameters()` order) replaced by `shadow`, one to one."""
    if len(order) != len(shadow):
        raise CheckpointError(f"{where}: {len(shadow)} EMA shadow parameters for {len(order)} parameters")
    out = dict(converted)
    for j, (key, tensor) in enumerate(zip(order, shadow, strict=True)):
        if tensor.shape != out[key].shape:
            raise CheckpointError(
                f"{where}: EMA shadow parameter {j} has shape {tuple(tensor.shape)}, but {key} is "
                f"{tuple(out[key].shape)}; the shadow list does not follow the expert's parameters"
            )
        out[key] = tensor.to(out[key].dtype)
    return out


def convert_winner_expert(
    timm_state: dict[str, torch.Tensor], shadow: list[torch.Tensor], model_cfg: dict, where: str
) -> dict[str, torch.Tensor]:
    """One published expert (its timm state dict and EMA shadow list) as the state dict of the
    `mff_expert` network `model_cfg` builds, checked by a strict load."""
    network = build_model(model_cfg, pretrained=False)
    keys = timm_to_member(list(timm_state), network, where)
    converted = {keys[k]: v for k, v in timm_state.items()}
    params = {name for name, _ in network.named_parameters()}
    # A state dict lists modules in the order parameters() visits them, each module's parameters
    # before its buffers: its parameters, in file order, are in expert.parameters() order.
    order = [keys[k] for k in timm_state if keys[k] in params]
    _check_fits(network, converted, where)
    state = apply_ema(converted, order, shadow, where)
    network.load_state_dict(state, strict=True)
    return state


def convert_winner(weight_file: Path, ema_file: Path, expert_models: list[dict]) -> list[dict[str, torch.Tensor]]:
    """The seven experts of `weight.pth` with `ema.state`'s weights, as `mff_expert` state dicts
    (expert i built by `expert_models[i]`)."""
    state = _tensor_dict(read_pickle(weight_file, "weight.pth"), weight_file, "weight.pth")
    ema = read_pickle(ema_file, "ema.state")
    experts = split_experts(state, weight_file)
    if sorted(experts) != list(range(len(expert_models))):
        raise CheckpointError(f"{weight_file}: holds experts {sorted(experts)}, the config names {len(expert_models)}")
    converted = []
    for i, model_cfg in enumerate(expert_models):
        where = f"{weight_file} expert {i} ({model_cfg['backbone']})"
        converted.append(convert_winner_expert(experts[i], ema_shadow(ema, i, ema_file), model_cfg, where))
    return converted


# --------------------------------------------------------------------------- SBI


def bn_fc_head(rest: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """The extension's classifier, BatchNorm -> FC(2), as the `bn_fc` head's keys (`head.0.*`,
    `head.1.*`). Its parts are found by what they hold, not by their names, which no public
    file fixes: the one module with running statistics is the BatchNorm, the one with a
    (2, width) weight and a bias the FC. Anything else raises."""
    prefixes = sorted({k.rsplit(".", 1)[0] for k in rest})
    norms = [p for p in prefixes if f"{p}.running_mean" in rest]
    fcs = [p for p in prefixes if p not in norms and rest.get(f"{p}.weight", torch.empty(0)).shape[:1] == (2,)]
    if len(norms) != 1 or len(fcs) != 1 or len(prefixes) != 2:
        raise CheckpointError(
            f"{where}: expected one BatchNorm and one FC(2) beside the backbone (model.head: bn_fc), found {prefixes}"
        )
    out = {f"head.0.{k.rsplit('.', 1)[1]}": v for k, v in rest.items() if k.startswith(f"{norms[0]}.")}
    out.update({f"head.1.{k.rsplit('.', 1)[1]}": v for k, v in rest.items() if k.startswith(f"{fcs[0]}.")})
    return out


def convert_sbi(file: Path, model_cfg: dict) -> dict[str, torch.Tensor]:
    """SBI's released EfficientNet-B4 (`{"model": {"net.<key>": tensor}}`) as the state dict of
    the `sbi_fed` network `model_cfg` builds (guidance heads off), checked by a strict load.

    With `model.head: bn_fc`, the extension's release: the same `net.` backbone (its own `_fc`
    unused and absent, or used as the FC), and beside it a BatchNorm over the pooled 1792
    features and an FC(2) (`bn_fc_head`)."""
    obj = read_pickle(file, "SBI checkpoint")
    if not isinstance(obj, Mapping) or "model" not in obj:
        found = sorted(obj)[:5] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{file}: expected a dict with a 'model' entry (SBI's checkpoint), found {found}")
    state = _tensor_dict(obj["model"], file, "its 'model' entry")
    extension = model_cfg.get("head", "sbi") == "bn_fc"
    outside = {k: v for k, v in state.items() if not k.startswith("net.")}
    if outside and not extension:
        raise CheckpointError(
            f"{file}: keys outside 'net.' (efficientnet_pytorch's EfficientNet), e.g. {sorted(outside)[:3]}; "
            "the extension's release loads with model.head=bn_fc"
        )
    network = build_model(model_cfg, pretrained=False)
    depths = [len(stage) for stage in network.backbone.blocks]
    net = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    try:
        timm_state = efficientnet_pytorch_to_timm(net, depths)
    except CheckpointError as err:
        raise CheckpointError(f"{file}: {err}") from None
    if extension:
        own = network.state_dict()
        converted = {f"backbone.{k}": v for k, v in timm_state.items() if f"backbone.{k}" in own}
        rest = {k: v for k, v in timm_state.items() if f"backbone.{k}" not in own} | outside
        converted.update(bn_fc_head(rest, str(file)))
    else:
        keys = timm_to_member(list(timm_state), network, str(file))
        converted = {keys[k]: v for k, v in timm_state.items()}
    _check_fits(network, converted, f"{file} ({model_cfg['backbone']})")
    network.load_state_dict(converted, strict=True)
    return converted
