"""Training objectives. Each criterion runs the forward pass itself, because some need
more than one (a noisy view for the KL term, a synthesiser step for SLADD).

A criterion is `criterion(model, images, target) -> (loss, logits, logs)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from core.distributed import gather_with_grad, world_size
from models.registry import register_criterion


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


@register_criterion("ce")
def build_ce(cfg: dict):
    smoothing = float(cfg.get("label_smoothing", 0.0))

    def criterion(model: torch.nn.Module, images: torch.Tensor, target: torch.Tensor):
        out = model(images)
        loss = cross_entropy(out["logits"], target, smoothing)
        return loss, out["logits"], {"ce": loss.detach()}

    return criterion


@register_criterion("mff")
def build_mff(cfg: dict):
    """The winning solution's objective: w_ce L_ce + w_nce L_nce + w_kl L_kl.

    The published figure gives the three terms, not their exact forms or weights: the forms
    are documented on each function above, the weights live in the member config.
    """
    w_ce, w_nce, w_kl = (float(cfg.get(k, d)) for k, d in (("ce", 1.0), ("nce", 0.1), ("kl", 1.0)))
    temperature = float(cfg.get("temperature", 0.1))
    noise_kind, noise_scale = cfg.get("noise", "gaussian"), float(cfg.get("noise_scale", 0.1))
    smoothing = float(cfg.get("label_smoothing", 0.0))

    def criterion(model: torch.nn.Module, images: torch.Tensor, target: torch.Tensor):
        n = len(images)
        if w_kl:
            # One forward over clean and noisy views together: DDP expects one forward per
            # backward, and one large batch is faster than two small ones.
            both = model(torch.cat([images, add_noise(images, noise_kind, noise_scale)]))
            out = {k: v[:n] for k, v in both.items()}
        else:
            out = model(images)
        logs = {"ce": cross_entropy(out["logits"], target, smoothing)}
        if w_nce:
            logs["nce"] = real_contrastive(out["features"], target, temperature)
        if w_kl:
            logs["kl"] = noise_consistency(out["logits"], both["logits"][n:])
        weights = {"ce": w_ce, "nce": w_nce, "kl": w_kl}
        loss = sum(weights[k] * v for k, v in logs.items())
        return loss, out["logits"], {k: v.detach() for k, v in logs.items()}

    return criterion
