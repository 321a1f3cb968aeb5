"""SLADD: self-supervised learning of adversarial deepfake examples (METHODS.md section 3).

Two networks train together, each with its own optimiser, in one training step:

- the **detector** (`SLADDNet`, registered as model `sladd`): a timm backbone (Xception at 256,
  `legacy_xception`) with the heads the method describes:

      f (pooled) --> Dropout -> FC(2)        real/fake logits (inference; or a cosine head for AM-softmax)
        |--> FC(5)                           blend type: alpha, poisson, copy, real, other fake
        `--> FC(1) -> sigmoid                the blend ratio `mag`
      mid-level map (model.map_layer) --> separable 3x3 conv to 1 channel -> sigmoid -> 16 x 16
                                             the blend mask

  Inference reads `logits` alone; the other heads exist in training mode only.

- the **synthesizer** (`Synthesizer`, inside `SynthesizerPart`, the member's `core.train.trainer.Auxiliary`):
  a backbone over the 6-channel pair (the real face and its forgery source) with a categorical
  distribution over the 10 regions, one over the 4 blend types and a Beta distribution over
  `mag` in [forge.mag_min, 1]. Per pair it samples a configuration, the pair is forged with it
  in the training step (`data_prep.sladd_online.forge_pair`; for the next batch on a thread
  while the detector steps, `SynthesizerPart.ahead`), and it learns by REINFORCE to maximise
  the detector's loss (`reinforce_loss`; published: the loss on the whole batch, for every action).

The batch the detector sees (`recipe: sladd`): B reals, then the B synthesized images made
from them (fakes, or reals where the configuration changed nothing), then the training fakes
the items brought; every target of the auxiliary heads comes from the configuration that made
the image (`SynthesizerPart.prepare`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from timm.models import adapt_input_conv
from torch import nn
from torch.distributions import Beta, Categorical

from core.config import ConfigError
from core.device import autocast
from core.distributed import average_gradients, broadcast_from_first, sum_over_processes
from core.log import get_logger
from models.backbones import create_backbone
from models.heads import fp32_head
from models.registry import TrainData, register_criterion, register_model, register_recipe

if TYPE_CHECKING:  # the forgery code is imported where it runs: `import models` stays light for inference
    from data_prep.sladd_online import Forged, ForgeSettings, RecipeSettings

log = get_logger("sladd")

N_REGIONS = 10  # data_prep.blending.SLADD_REGIONS
N_BLENDS = 4  # data_prep.blending.BLEND_TYPES: alpha, poisson, copy, none
NONE_BLEND = 3
N_TYPE_CLASSES = 5  # data_prep.sladd_online.TYPE_CLASSES
LOSS_TERMS = ("cls", "map", "type", "mag")
CLS_LOSSES = ("ce", "am_softmax")
CLS_HEADS = ("linear", "cosine")
REWARDS = ("batch", "image")
# Beta concentrations are 0.5 + softplus(z): bounded away from 0 (no sample stuck at 0 or 1),
# and z = log(e^0.5 - 1) gives 1, i.e. Beta(1, 1), the uniform distribution.
CONCENTRATION_FLOOR = 0.5
UNIFORM_BETA_BIAS = math.log(math.exp(0.5) - 1.0)


# --------------------------------------------------------------------------- the detector


class SeparableConv2d(nn.Module):
    """Depthwise k x k convolution, then pointwise to `out_channels` (no bias: the published map head)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        pad = kernel_size // 2
        self.depthwise = nn.Conv2d(in_channels, in_channels, kernel_size, padding=pad, groups=in_channels, bias=False)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class CosineHead(nn.Module):
    """cos(f, w_c) per class c: the input of AM-softmax. Returns the cosines, (B, classes)."""

    def __init__(self, width: int, classes: int = 2):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(classes, width) * 0.01)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features, dim=1) @ F.normalize(self.weight, dim=1).t()


class SLADDNet(nn.Module):
    """See the module docstring. `forward` returns `logits` and `features` always; in training
    mode also `mask_map` (B, 1, map_size, map_size), `type_logits` (B, 5), `mag` (B,) and, with
    the cosine head, `cosine` (B, 2); every head's output in fp32."""

    def __init__(
        self,
        backbone: nn.Module,
        map_layer: str,
        map_size: int = 16,
        drop_rate: float = 0.5,
        cls_head: str = "linear",
        cosine_scale: float = 30.0,
    ):
        super().__init__()
        if cls_head not in CLS_HEADS:
            raise ConfigError(f"model.cls_head must be one of {list(CLS_HEADS)}, not {cls_head!r}")
        self.backbone = backbone
        width = backbone.num_features
        self.cosine_scale = float(cosine_scale)
        self.cosine = cls_head == "cosine"
        self.head = nn.Sequential(nn.Dropout(drop_rate), CosineHead(width) if self.cosine else nn.Linear(width, 2))
        self.type_head = nn.Linear(width, N_TYPE_CLASSES)
        self.mag_head = nn.Linear(width, 1)
        self.map_size = int(map_size)
        try:
            tap = backbone.get_submodule(map_layer)
        except AttributeError:
            names = [n for n, _ in backbone.named_children()]
            raise ConfigError(
                f"model.map_layer {map_layer!r} is not a layer of the backbone (top level: {names})"
            ) from None
        self._mid: torch.Tensor | None = None
        tap.register_forward_hook(self._keep_mid)
        self.map_head = SeparableConv2d(self._mid_channels(), 1)

    def _keep_mid(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if self.training:
            self._mid = output

    @torch.no_grad()
    def _mid_channels(self) -> int:
        """Channels of the map layer's output, from one small forward pass in eval mode (which
        changes no BatchNorm statistic)."""
        was_training = self.training
        self.train()
        self.backbone.eval()
        self.backbone(torch.zeros(1, 3, 64, 64))
        channels = int(self._mid.shape[1])
        self._mid = None
        self.train(was_training)
        return channels

    def _mask_map(self, mid: torch.Tensor) -> torch.Tensor:
        m = torch.sigmoid(fp32_head(self.map_head, mid))
        if m.shape[-2:] != (self.map_size, self.map_size):
            shrink = m.shape[-1] > self.map_size
            m = F.interpolate(m, size=(self.map_size,) * 2, mode="bilinear", align_corners=False, antialias=shrink)
        return m

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self._mid = None
        features = self.backbone(images)
        head = fp32_head(self.head, features)
        out = {"logits": self.cosine_scale * head if self.cosine else head, "features": features}
        if self.training:
            out["mask_map"] = self._mask_map(self._mid)
            out["type_logits"] = fp32_head(self.type_head, features)
            out["mag"] = torch.sigmoid(fp32_head(self.mag_head, features)).squeeze(1)
            if self.cosine:
                out["cosine"] = head
            self._mid = None
        return out


@register_model("sladd")
def build_sladd(
    backbone: str,
    map_layer: str,
    pretrained: bool = False,
    weights: str | None = None,
    allow_mismatch: bool = False,
    map_size: int = 16,
    drop_rate: float = 0.5,
    cls_head: str = "linear",
    cosine_scale: float = 30.0,
) -> SLADDNet:
    net = create_backbone(backbone, pretrained=pretrained, weights=weights, allow_mismatch=allow_mismatch)
    return SLADDNet(net, map_layer, map_size, drop_rate, cls_head, cosine_scale)


# --------------------------------------------------------------------------- the detector's loss


def am_softmax(cosine: torch.Tensor, target: torch.Tensor, margin: float, scale: float) -> torch.Tensor:
    """Per image: L_i = -log softmax(s * (cos_i - m * onehot(y_i)))[y_i] (additive-margin softmax:
    the true class must win by a cosine margin m; s the scale)."""
    shifted = cosine.float() - margin * F.one_hot(target, cosine.shape[1]).float()
    return F.cross_entropy(scale * shifted, target, reduction="none")


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `valid`; 0 (still in the graph) where nothing is valid."""
    if not valid.any():
        return values.sum() * 0.0
    return values[valid].mean()


def per_image_terms(out: dict, batch: dict, cls: str, margin: float, scale: float) -> dict[str, torch.Tensor]:
    """Each term per image i, (N,) tensors:

    cls_i  = CE(logits_i, y_i), or am_softmax(cosine_i, y_i) with `cls_loss: am_softmax`
    map_i  = 1/(S*S) sum_p (M_i(p) - T_i(p))^2     predicted 16 x 16 blend mask M, target T
    type_i = CE(type_logits_i, t_i)                 t: alpha, poisson, copy, real, other fake
    mag_i  = (mag_i - r_i)^2                        r: the ratio the image was blended at
    """
    target = batch["target"]
    if cls == "am_softmax":
        if "cosine" not in out:
            raise ConfigError("loss.cls_loss am_softmax needs the cosine head (model.cls_head: cosine)")
        cls_i = am_softmax(out["cosine"], target, margin, scale)
    else:
        cls_i = F.cross_entropy(out["logits"].float(), target, reduction="none")
    return {
        "cls": cls_i,
        "map": (out["mask_map"].float() - batch["map_target"]).square().flatten(1).mean(1),
        "type": F.cross_entropy(out["type_logits"].float(), batch["type_target"], reduction="none"),
        "mag": (out["mag"].float() - batch["mag_target"].nan_to_num(0.0)).square(),
    }


BATCH_KEYS = ("type_target", "mag_target", "mag_valid", "map_target", "map_valid")


@register_criterion("sladd")
def build_sladd_loss(cfg: dict) -> Callable:
    """L = w_cls L_cls + w_map L_map + w_type L_type + w_mag L_mag (published: 1, 0.1, 0.05, 0.1).

    With the per-image terms of `per_image_terms`: L_cls = mean_i cls_i and L_type = mean_i type_i
    over every image; L_map = mean of map_i over the images whose mask is known (reals: empty;
    synthesized images: their blend weight; the training set's own fakes: unknown, left out);
    L_mag = mean of mag_i over the synthesized fakes whose blend type takes `mag`. A term with
    weight 0 is computed and added times 0, so every head takes part in every step (DDP).

    The logs carry `loss`, L itself (the synthesizer's reward for every action of the batch, as
    published), and `sample_loss` (N,), each image's own share of L:
    w_cls cls_i + w_map map_i [mask known] + w_type type_i + w_mag mag_i [mag known] (the reward
    for the image an action made, with `synthesizer.reward: image`).
    """
    unknown = sorted(set(cfg) - {"name", "add", "cls_loss", "am_margin", "am_scale", *LOSS_TERMS})
    if unknown:
        raise ConfigError(f"loss: unknown key(s) {unknown} for the sladd loss")
    weights = {k: float(cfg.get(k, d)) for k, d in zip(LOSS_TERMS, (1.0, 0.1, 0.05, 0.1), strict=True)}
    cls = str(cfg.get("cls_loss", "ce"))
    if cls not in CLS_LOSSES:
        raise ConfigError(f"loss.cls_loss must be one of {list(CLS_LOSSES)}, not {cls!r}")
    margin, scale = float(cfg.get("am_margin", 0.45)), float(cfg.get("am_scale", 30.0))

    def criterion(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise ConfigError(
                f"the sladd loss needs the sladd recipe's targets in the batch (recipe: sladd); no {missing}"
            )
        out = model(batch["image"])
        terms = per_image_terms(out, batch, cls, margin, scale)
        valid = {"cls": None, "map": batch["map_valid"], "type": None, "mag": batch["mag_valid"]}
        logs = {k: (v.mean() if valid[k] is None else masked_mean(v, valid[k])) for k, v in terms.items()}
        loss = sum(weights[k] * logs[k] for k in LOSS_TERMS)
        sample = sum(weights[k] * (v if valid[k] is None else v * valid[k]) for k, v in terms.items())
        logs = {k: v.detach() for k, v in logs.items()}
        logs["loss"] = loss.detach()
        logs["sample_loss"] = sample.detach()
        return loss, out["logits"], logs

    return criterion


# --------------------------------------------------------------------------- the synthesizer


class Synthesizer(nn.Module):
    """backbone over the (real, source) pair, 6 channels -> pooled features -> dropout -> region
    logits (10), blend-type logits (4) and the two concentrations of a Beta distribution over
    mag; each head draws its own dropout mask (published: 0.5 before each head's FC). The heads
    start at zero weights, so before any update the policy is uniform (regions, types and, with
    Beta(1, 1), mag): a learnt synthesizer starts where the random one stays."""

    def __init__(self, backbone: nn.Module, drop_rate: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.drop_rate = float(drop_rate)
        width = backbone.num_features
        self.region = nn.Linear(width, N_REGIONS)
        self.blend = nn.Linear(width, N_BLENDS)
        self.mag = nn.Linear(width, 2)
        for head in (self.region, self.blend, self.mag):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        nn.init.constant_(self.mag.bias, UNIFORM_BETA_BIAS)

    def forward(self, pair: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(pair)

        def head(fc: nn.Linear) -> torch.Tensor:
            return fp32_head(fc, F.dropout(features, self.drop_rate, self.training))

        return {
            "region_logits": head(self.region),
            "blend_logits": head(self.blend),
            "mag_concentration": CONCENTRATION_FLOOR + F.softplus(head(self.mag)),
        }


def widen_input(model: nn.Module, in_chans: int) -> nn.Module:
    """`model` with its first convolution (timm's `first_conv`) taking `in_chans` channels; its
    weights adapted by timm (repeated over the new channels and rescaled), so pretrained
    filters stay meaningful on the real face and the source alike."""
    name = model.pretrained_cfg.get("first_conv")
    if not name:
        raise ConfigError(f"{type(model).__name__}: timm records no first convolution to widen to {in_chans} channels")
    conv = model.get_submodule(name)
    wide = copy.deepcopy(conv)
    wide.in_channels = in_chans
    wide.weight = nn.Parameter(adapt_input_conv(in_chans, conv.weight.detach()))
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, wide)
    return model


@dataclass
class Actions:
    """The configurations sampled for B pairs, with what REINFORCE and the history need: `region`,
    `blend` (index into BLEND_TYPES), `mag` in [mag_min, 1]; `log_prob` of the sampled choices
    that shaped the image, `entropy` of the three distributions; the probabilities (detached)."""

    region: torch.Tensor
    blend: torch.Tensor
    mag: torch.Tensor
    log_prob: torch.Tensor
    entropy: torch.Tensor
    region_probs: torch.Tensor
    blend_probs: torch.Tensor
    mag_mean: torch.Tensor


def sample_actions(policy: dict[str, torch.Tensor], mag_min: float, takes_mag: torch.Tensor) -> Actions:
    """One configuration per pair from the synthesizer's distributions.

    log pi(a) = log p(blend) + [blend != none] log p(region) + [blend takes mag] log Beta(u):
    a choice that did not shape the image (the region of `none`, the mag of a type that blends
    at 1) adds no log-probability, so it takes no credit for the reward. mag = mag_min +
    (1 - mag_min) u with u ~ Beta(a, b). H = H(region) + H(blend) + H(Beta) (the last one
    differential, at most 0, for Beta(1, 1)).
    """
    region_dist = Categorical(logits=policy["region_logits"].float())
    blend_dist = Categorical(logits=policy["blend_logits"].float())
    conc = policy["mag_concentration"].float()
    beta = Beta(conc[:, 0], conc[:, 1])
    region, blend = region_dist.sample(), blend_dist.sample()
    u = beta.sample().clamp(1e-4, 1.0 - 1e-4)
    shaped = (blend != NONE_BLEND).float()
    log_prob = blend_dist.log_prob(blend) + shaped * region_dist.log_prob(region)
    log_prob = log_prob + takes_mag.to(blend.device)[blend].float() * beta.log_prob(u)
    return Actions(
        region=region,
        blend=blend,
        mag=mag_min + (1.0 - mag_min) * u,
        log_prob=log_prob,
        entropy=region_dist.entropy() + blend_dist.entropy() + beta.entropy(),
        region_probs=region_dist.probs.detach(),
        blend_probs=blend_dist.probs.detach(),
        mag_mean=(mag_min + (1.0 - mag_min) * beta.mean).detach(),
    )


def reinforce_loss(
    log_prob: torch.Tensor, entropy: torch.Tensor, reward: torch.Tensor, baseline: float, entropy_weight: float
) -> torch.Tensor:
    """L_syn = -1/B sum_i (R_i - b) log pi(a_i | x_i) - beta_H 1/B sum_i H_i.

    R_i: the reward of action a_i, no gradient (published: the detector's loss on the whole
    batch, the same for every action; or the loss on the image a_i made); b: a baseline (published:
    none, 0; or a moving average of past rewards, so only better- or worse-than-usual choices move
    the policy); beta_H: the entropy bonus (published 1e-5). Descending L_syn ascends the
    expected detector loss: the synthesizer learns to make forgeries the detector gets wrong.
    """
    advantage = reward.detach().float() - baseline
    return -(advantage * log_prob).mean() - entropy_weight * entropy.mean()


@dataclass(frozen=True)
class SynthSettings:
    """The `synthesizer:` section. mode: `learned` (REINFORCE) or `random` (uniform configurations,
    no network: the ablation's reference). reward: `batch` (published: every action is paid the
    detector's loss on the whole batch) or `image` (each action the loss on the image it made).
    baseline_momentum: null (published: no baseline) or the momentum of a moving average of the
    mean reward, subtracted from every reward."""

    mode: str
    backbone: str
    pretrained: bool
    weights: str | None
    allow_mismatch: bool
    image_size: int
    drop_rate: float
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    entropy_weight: float
    reward: str
    baseline_momentum: float | None
    clip_grad: float | None

    @classmethod
    def from_cfg(cls, cfg: dict) -> SynthSettings:
        section = cfg.get("synthesizer")
        if not isinstance(section, dict):
            raise ConfigError(f"{cfg.get('name', 'member')}: the sladd recipe needs a `synthesizer:` section")
        names = {f.name for f in fields(cls)}
        missing, unknown = sorted(names - set(section)), sorted(set(section) - names)
        if missing or unknown:
            raise ConfigError(f"{cfg.get('name', 'member')}: `synthesizer:` lacks {missing}, has unknown {unknown}")
        s = cls(**{**section, "betas": tuple(section["betas"])})
        if s.mode not in ("learned", "random"):
            raise ConfigError(f"synthesizer.mode must be learned or random, not {s.mode!r}")
        if s.reward not in REWARDS:
            raise ConfigError(f"synthesizer.reward must be one of {list(REWARDS)}, not {s.reward!r}")
        if s.baseline_momentum is not None and not 0.0 <= s.baseline_momentum < 1.0:
            raise ConfigError(f"synthesizer.baseline_momentum must be null or in [0, 1), not {s.baseline_momentum}")
        return s


def build_synthesizer(s: SynthSettings) -> Synthesizer:
    """The policy network: a timm backbone (hub weights or a local file, as every member's) with
    its first convolution widened to the pair's 6 channels."""
    if s.weights or s.pretrained:
        net = create_backbone(s.backbone, pretrained=s.pretrained, weights=s.weights, allow_mismatch=s.allow_mismatch)
        net = widen_input(net, 6)
    else:
        net = create_backbone(s.backbone, in_chans=6)
    return Synthesizer(net, s.drop_rate)


class SynthesizerPart:
    """The synthesizer as the trainer's `Auxiliary`: draws a configuration per pair, forges the
    batch, learns from the detector's per-image losses with its own Adam, and keeps the
    figures the history records (its region and blend-type distributions, what the
    forgeries became, the reward)."""

    def __init__(
        self,
        net: Synthesizer | None,
        s: SynthSettings,
        forge: ForgeSettings,
        recipe: RecipeSettings,
        mean: Sequence[float],
        std: Sequence[float],
        amp: bool,
    ):
        from data_prep.blending import BLEND_TYPES

        self.net, self.s, self.forge, self.recipe = net, s, forge, recipe
        # (x / 255 - mean) / std as x * scale - shift, in place
        std_ = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.scale, self.shift = 1.0 / (255.0 * std_), torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) / std_
        self.amp = amp
        self.takes_mag = torch.tensor([b in forge.mag_types for b in BLEND_TYPES])
        self.optimizer = (
            torch.optim.Adam(net.parameters(), lr=s.lr, betas=s.betas, weight_decay=s.weight_decay) if net else None
        )
        self.baseline = float("nan")  # set from the first batch's rewards
        self.device = torch.device("cpu")
        self.pending: tuple[Actions, int] | None = None
        self.pool: ThreadPoolExecutor | None = None
        # The next batch, its configurations and its forgeries under way (`ahead`), on their own thread.
        self.upcoming: tuple[dict, Actions, Future] | None = None
        self.background: ThreadPoolExecutor | None = None
        self._reset_stats()

    # ---- the Auxiliary protocol ----------------------------------------------------------
    def to(self, device: torch.device) -> None:
        self.device = device
        self.scale, self.shift = self.scale.to(device), self.shift.to(device)
        if self.net is not None:
            self.net.to(device).train()
            broadcast_from_first([*self.net.parameters(), *self.net.buffers()])

    def prepare(self, batch: dict, learn: bool) -> dict:
        """The detector's batch: the B target reals, their B synthesized images, then the M images
        that pass through, with `target`, `type_target`, `mag_target`/`mag_valid` and
        `map_target`/`map_valid` from the configuration that made each image (a passing image's
        mask is unknown); tensors on the device."""
        from data_prep.sladd_online import OTHER_FAKE_TYPE, REAL_TYPE

        b, other = len(batch["real"]), batch["other_target"].tolist()
        upcoming, self.upcoming = self.upcoming, None
        if learn and upcoming is not None and upcoming[0] is batch:
            actions, forged = upcoming[1], upcoming[2].result()
        else:
            actions = self._act(batch, learn) if b else None
            forged = self._forge(batch, actions) if b else []
        if learn:
            self.pending = (actions, b)
            if b:
                self._record(actions, forged)
        size, m = self.forge.map_size, len(other)
        slots = torch.from_numpy(np.stack([f.image for f in forged])) if b else batch["real"][:0]
        maps = [np.zeros((b, size, size), np.float32), *(f.mask_map[None] for f in forged)]
        nan = [float("nan")]
        out = {
            "image": self._normalise(torch.cat([batch["real"], slots, batch["other"]])),
            "target": torch.tensor([0] * b + [f.label for f in forged] + other),
            "type_target": torch.tensor(
                [REAL_TYPE] * b + [f.type_class for f in forged] + [OTHER_FAKE_TYPE if y else REAL_TYPE for y in other]
            ),
            "mag_target": torch.tensor(nan * b + [f.mag for f in forged] + nan * m, dtype=torch.float32),
            "map_target": torch.from_numpy(np.concatenate([*maps, np.zeros((m, size, size), np.float32)]))[:, None],
            "map_valid": torch.tensor([True] * (2 * b) + [False] * m),
            "errors": batch["errors"],
        }
        out["mag_valid"] = ~out["mag_target"].isnan()
        return out

    def backward(self, batch: dict, logs: dict, scale: float) -> None:
        """REINFORCE on this batch's actions (`reinforce_loss`) with the rewards of `rewards`; a
        moving baseline then moves towards their mean over every process. Every process takes
        part in the sum, also one whose batch held no target."""
        if self.pending is None:
            return
        actions, b = self.pending
        self.pending = None
        reward = self.rewards(logs, b)
        totals = sum_over_processes(torch.stack([reward.sum(), reward.new_tensor(float(b))]))
        if totals[1] == 0:
            return
        mean = float(totals[0] / totals[1])
        momentum = self.s.baseline_momentum
        if momentum is not None and math.isnan(self.baseline):
            self.baseline = mean
        self.stats["reward"] += float(reward.sum())
        if self.net is not None and b:
            baseline = 0.0 if momentum is None else self.baseline
            loss = reinforce_loss(actions.log_prob, actions.entropy, reward, baseline, self.s.entropy_weight)
            (loss * scale).backward()
        if momentum is not None:
            self.baseline = momentum * self.baseline + (1.0 - momentum) * mean

    def rewards(self, logs: dict, b: int) -> torch.Tensor:
        """The reward of each of the batch's b actions, (b,): with `reward: batch` the criterion's
        loss on the whole batch for every one (published: a forgery is worth what the batch
        it joined costs the detector, and the label of `none` (the real, kept) counts only
        through that); with `reward: image` the loss on the image the action made (the batch's
        images b .. 2b - 1)."""
        key = "loss" if self.s.reward == "batch" else "sample_loss"
        if key not in logs:
            raise ConfigError(f"the sladd synthesizer learns from the sladd loss's `{key}` (loss.name: sladd)")
        if self.s.reward == "batch":
            return logs["loss"].detach().float().reshape(1).expand(b)
        return logs["sample_loss"][b : 2 * b].float()

    def ahead(self, batch: dict) -> None:
        """Start on the step's next batch: draw its configurations now (after this step's update,
        as `prepare` would) and forge them on a thread of their own while the detector steps;
        `prepare(batch, learn=True)` then waits for them."""
        if not len(batch["real"]):
            return
        actions = self._act(batch, learn=True)
        if self.background is None:
            self.background = ThreadPoolExecutor(1, thread_name_prefix="sladd-ahead")
        self.upcoming = (batch, actions, self.background.submit(self._forge, batch, actions))

    def step(self) -> None:
        """One Adam step on the gradients averaged over every process."""
        if self.net is None:
            return
        params = list(self.net.parameters())
        average_gradients(params)
        if self.s.clip_grad:
            torch.nn.utils.clip_grad_norm_(params, self.s.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def summary(self) -> dict[str, float]:
        """This epoch's figures over every process: the mean probability of each region and
        blend type, the mean of the mag distribution, what the synthesized images became
        (shares of fake, none, unchanged, failed), the mean reward and the baseline."""
        from data_prep.blending import BLEND_TYPES, SLADD_REGION_NAMES
        from data_prep.sladd_online import STATUSES

        keys = sorted(self.stats)
        values = torch.tensor([self.stats[k] for k in keys], dtype=torch.float64, device=self.device)
        totals = sum_over_processes(values)
        t = dict(zip(keys, totals.tolist(), strict=True))
        n = max(t["slots"], 1.0)
        out = {f"synth_p_{name}": t[f"region{i}"] / n for i, name in enumerate(SLADD_REGION_NAMES)}
        out.update({f"synth_p_{name}": t[f"blend{i}"] / n for i, name in enumerate(BLEND_TYPES)})
        out.update({f"synth_{status}": t[status] / n for status in STATUSES})
        out.update(synth_mag_mean=t["mag"] / n, synth_reward=t["reward"] / n, synth_baseline=self.baseline)
        if t["failed"]:
            log.warning("sladd: %d of %d forgeries could not be made and were kept as reals", int(t["failed"]), int(n))
        self._reset_stats()
        return out

    def state_dict(self) -> dict:
        return {
            "network": self.net.state_dict() if self.net is not None else {},
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else {},
            "baseline": torch.tensor([self.baseline], dtype=torch.float64),
        }

    def load_state_dict(self, state: dict) -> None:
        if self.net is not None:
            self.net.load_state_dict(state["network"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.baseline = float(state["baseline"][0])

    # ---- inside the step -------------------------------------------------------------------
    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N x H x W x 3 -> float N x 3 x H x W on the device, (x / 255 - mean) / std as the
        evaluation transform (made contiguous while still uint8: float arithmetic on the permuted
        view runs at a third of the speed)."""
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).contiguous().float()
        return x.mul_(self.scale).sub_(self.shift)

    def _act(self, batch: dict, learn: bool) -> Actions:
        b = len(batch["real"])
        if self.net is None:
            policy = {
                "region_logits": torch.zeros(b, N_REGIONS),
                "blend_logits": torch.zeros(b, N_BLENDS),
                "mag_concentration": torch.ones(b, 2),
            }
            return sample_actions(policy, self.forge.mag_min, self.takes_mag)
        pair = torch.cat([self._normalise(batch["real"]), self._normalise(batch["source"])], dim=1)
        if pair.shape[-1] != self.s.image_size:
            size = (self.s.image_size,) * 2
            pair = F.interpolate(pair, size=size, mode="bilinear", align_corners=False, antialias=True)
        with torch.set_grad_enabled(learn), autocast(self.device, self.amp):
            # BatchNorm in training mode fails on one value per channel (a batch with one target
            # and a 1 x 1 map): a second copy of the pair leaves every statistic as it is.
            policy = self.net(pair.expand(2, -1, -1, -1) if b == 1 else pair)
            return sample_actions({k: v[:b] for k, v in policy.items()}, self.forge.mag_min, self.takes_mag)

    def _forge(self, batch: dict, actions: Actions) -> list[Forged]:
        from data_prep.blending import BLEND_TYPES
        from data_prep.sladd_online import forge_pair

        real, source = batch["real"].numpy(), batch["source"].numpy()
        real_lm, source_lm = batch["real_lm"].numpy(), batch["source_lm"].numpy()
        region, blend, mag = (actions.region.tolist(), actions.blend.tolist(), actions.mag.tolist())
        seeds = batch["seed"].tolist()

        def one(i: int) -> Forged:
            blend_type = BLEND_TYPES[blend[i]]
            return forge_pair(
                real[i], real_lm[i], source[i], source_lm[i], region[i], blend_type, mag[i], seeds[i], self.forge
            )

        indices = range(len(seeds))
        if self.recipe.forge_threads == 1:
            return [one(i) for i in indices]
        if self.pool is None:
            self.pool = ThreadPoolExecutor(self.recipe.forge_threads, thread_name_prefix="sladd-forge")
        return list(self.pool.map(one, indices))

    def _reset_stats(self) -> None:
        from data_prep.sladd_online import STATUSES

        self.stats = dict.fromkeys(
            [f"region{i}" for i in range(N_REGIONS)]
            + [f"blend{i}" for i in range(N_BLENDS)]
            + list(STATUSES)
            + ["mag", "reward", "slots"],
            0.0,
        )

    def _record(self, actions: Actions, forged: list[Forged]) -> None:
        region = actions.region_probs.sum(0).tolist()
        blend = actions.blend_probs.sum(0).tolist()
        for i, p in enumerate(region):
            self.stats[f"region{i}"] += p
        for i, p in enumerate(blend):
            self.stats[f"blend{i}"] += p
        for f in forged:
            self.stats[f.status] += 1.0
        self.stats["mag"] += float(actions.mag_mean.sum())
        self.stats["slots"] += float(len(forged))


# --------------------------------------------------------------------------- the training batches


@register_recipe("sladd")
def sladd_recipe(cfg: dict, table: pd.DataFrame, transform: Callable, seed: int) -> TrainData:
    """Each item a real with a cached face and a forgery source (data_prep.sladd_online); the
    synthesizer forges the pair in the training step. `transform` is not used: every image is
    resized as the evaluation transform resizes (and mirrored), so that a forgery and its real
    differ only by the forgery."""
    from data_prep.sladd_online import ForgeSettings, RecipeSettings, collate_sladd, sladd_items

    s = SynthSettings.from_cfg(cfg)
    forge = ForgeSettings.from_cfg(cfg)
    if forge.map_size != int(cfg["model"].get("map_size", 16)):
        raise ConfigError(
            f"forge.map_size ({forge.map_size}) must equal model.map_size ({cfg['model'].get('map_size')})"
        )
    recipe = RecipeSettings.from_cfg(cfg)
    dataset = sladd_items(cfg, table, seed)
    net = build_synthesizer(s) if s.mode == "learned" else None
    data = cfg["data"]
    from core.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    amp = bool((cfg.get("train") or {}).get("amp", True))
    part = SynthesizerPart(net, s, forge, recipe, data.get("mean", IMAGENET_MEAN), data.get("std", IMAGENET_STD), amp)
    return TrainData(dataset, collate_sladd, part)
