"""Training objectives. Each criterion runs the forward pass itself, because some need
more than one (a noisy view for the KL term, a synthesiser step for SLADD).

A criterion is `criterion(model, batch) -> (loss, logits, logs)`: `batch` is the member's
training batch with every tensor on the device (`image`, `target` and what its recipe adds).
`build_criterion` adds the winning solution's feature-level NCE and noise-KL terms to any
member's criterion by config (`loss.add: {nce: w, kl: w}`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from core.config import ConfigError
from core.distributed import gather_with_grad, world_size
from models.registry import member_criterion, register_criterion


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """L_ce = -1/B sum_i log softmax(z_i)[y_i] (optionally with label smoothing)."""
    return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)


def real_contrastive(features: torch.Tensor, target: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """L_nce: supervised contrastive loss anchored on real samples.

    With u_i = f_i / ||f_i|| and s_ij = u_i . u_j / t, for every real anchor i that has at
    least one other real in the batch:

        l_i = -1/|P(i)| sum_{p in P(i)} log( exp(s_ip) / sum_{a != i} exp(s_ia) )

    where P(i) are the other reals and the denominator runs over every other sample, real
    or fake. Reals are pulled together and pushed from fakes; fakes are never pulled
    together (forgeries of different kinds need not share a cluster). L_nce is the mean
    of l_i over those anchors, 0 when there are none.

    Under torchrun the batch is the global one, not this process's slice (4 images of a
    batch of 32 on 8 GPUs hold 0 or 1 reals): each process gathers every process's
    features, with their gradients, and sums l_i over its own anchors. That sum is divided
    by the global number of anchors and multiplied by the number of processes, so the
    average DDP takes over processes is the one-process loss and gradient.
    """
    u = F.normalize(features.float(), dim=1)
    u_all, offset = gather_with_grad(u)
    target_all, _ = gather_with_grad(target)
    n = len(u)
    sim = u @ u_all.t() / temperature  # (this process's rows, global batch)
    not_self = torch.ones_like(sim, dtype=torch.bool)
    rows = torch.arange(n, device=sim.device)
    not_self[rows, offset + rows] = False
    log_prob = sim - torch.logsumexp(sim.masked_fill(~not_self, float("-inf")), dim=1, keepdim=True)
    real, real_all = target == 0, target_all == 0
    positives = real[:, None] & real_all[None, :] & not_self
    anchors = real & (positives.sum(1) > 0)
    n_real = int(real_all.sum())
    if n_real < 2:  # no real has another real to be pulled to, on any process
        return sim.new_zeros(())
    per_anchor = -(log_prob * positives).sum(1)[anchors] / positives.sum(1)[anchors]
    return per_anchor.sum() * world_size() / n_real


def noise_consistency(clean_logits: torch.Tensor, noisy_logits: torch.Tensor) -> torch.Tensor:
    """L_kl = 1/B sum_i KL( p_i || q_i ), p = softmax(clean logits), q = softmax(noisy logits).

    Gradients flow through both views, so the expert learns a prediction that random
    noise on the input does not move.
    """
    log_p = F.log_softmax(clean_logits.float(), dim=1)
    log_q = F.log_softmax(noisy_logits.float(), dim=1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def add_noise(images: torch.Tensor, kind: str, scale: float) -> torch.Tensor:
    """Random noise on normalised images: `gaussian` N(0, scale^2) or `uniform` U(-scale, scale)."""
    if kind == "gaussian":
        return images + scale * torch.randn_like(images)
    if kind == "uniform":
        return images + scale * (2 * torch.rand_like(images) - 1)
    raise ValueError(f"noise kind must be gaussian or uniform, not {kind!r}")


def _ce(weight: float, smoothing: float) -> Callable:
    def criterion(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        out = model(batch["image"])
        ce = cross_entropy(out["logits"], batch["target"], smoothing)
        return weight * ce, out["logits"], {"ce": ce.detach()}

    return criterion


@register_criterion("ce")
def build_ce(cfg: dict) -> Callable:
    """L = L_ce."""
    return _ce(1.0, float(cfg.get("label_smoothing", 0.0)))


@register_criterion("mff")
def build_mff(cfg: dict) -> Callable:
    """The winning solution's objective: w_ce L_ce + w_nce L_nce + w_kl L_kl.

    The published figure gives the three terms, not their exact forms or weights: the forms
    are documented on each function above, the weights live in the member config. It is CE
    with the NCE and KL terms added the way `loss.add` adds them to any member.
    """
    w_ce = float(cfg.get("ce", 1.0))
    added = {"nce": cfg.get("nce", 0.1), "kl": cfg.get("kl", 1.0)}
    added.update({k: cfg[k] for k in ("temperature", "noise", "noise_scale") if k in cfg})
    return add_terms(_ce(w_ce, float(cfg.get("label_smoothing", 0.0))), added)


class FirstForward:
    """Stands in for the network inside a criterion. Its first call runs the network once on
    the images and, when the KL term is on, their noisy copy in the same batch (DDP expects one
    forward per backward), returns the clean half and keeps what the added terms read. Later
    calls go straight to the network."""

    def __init__(self, model: nn.Module, noise: tuple[str, float] | None):
        self.model = model
        self.noise = noise
        self.clean: dict | None = None
        self.noisy_logits: torch.Tensor | None = None

    def __call__(self, images: torch.Tensor) -> dict:
        if self.clean is not None:
            return self.model(images)
        if self.noise is None:
            self.clean = self.model(images)
            return self.clean
        n = len(images)
        both = self.model(torch.cat([images, add_noise(images, *self.noise)]))
        self.clean = {k: v[:n] for k, v in both.items()}
        self.noisy_logits = both["logits"][n:]
        return self.clean

    def __getattr__(self, name: str):
        return getattr(self.model, name)


ADD_KEYS = ("nce", "kl", "temperature", "noise", "noise_scale")


def add_terms(criterion: Callable, add: dict) -> Callable:
    """`criterion` plus w_nce L_nce on the network's pooled `features` and w_kl L_kl between
    its clean and noisy predictions, both from the criterion's first network call, which must
    be on `batch["image"]` (its targets `batch["target"]`). `noise_scale` is in the units of the
    member's input (normalised pixels for ImageNet mean/std, [0, 1] for members that only
    divide by 255)."""
    unknown = sorted(set(add) - set(ADD_KEYS))
    if unknown:
        raise ConfigError(f"loss.add: unknown key(s) {unknown}; known: {list(ADD_KEYS)}")
    w_nce, w_kl = float(add.get("nce", 0.0)), float(add.get("kl", 0.0))
    temperature = float(add.get("temperature", 0.1))
    noise = (str(add.get("noise", "gaussian")), float(add.get("noise_scale", 0.1))) if w_kl else None

    def criterion_with_terms(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        tap = FirstForward(model, noise)
        loss, logits, logs = criterion(tap, batch)
        if tap.clean is None:
            raise RuntimeError("loss.add: the member's criterion never ran the network")
        if w_nce:
            if "features" not in tap.clean:
                raise ConfigError("loss.add.nce needs a network that returns `features`; this one does not")
            nce = real_contrastive(tap.clean["features"], batch["target"], temperature)
            loss, logs["nce"] = loss + w_nce * nce, nce.detach()
        if w_kl:
            kl = noise_consistency(tap.clean["logits"], tap.noisy_logits)
            loss, logs["kl"] = loss + w_kl * kl, kl.detach()
        return loss, logits, logs

    return criterion_with_terms


def build_criterion(cfg: dict) -> Callable:
    """The member's training objective (`loss.name`), with `loss.add` terms when configured."""
    loss_cfg = cfg.get("loss", {"name": "ce"})
    criterion = member_criterion(loss_cfg)
    return add_terms(criterion, loss_cfg["add"]) if loss_cfg.get("add") else criterion
