"""Training objectives. Each criterion runs the forward pass itself, because some need
more than one (a noisy view for the KL term, a synthesiser step for SLADD)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.registry import register_criterion


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """L_ce = -mean_i log softmax(z_i)[y_i], optionally with label smoothing."""
    return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)


@register_criterion("ce")
def build_ce(cfg: dict):
    smoothing = float(cfg.get("label_smoothing", 0.0))

    def criterion(model: torch.nn.Module, images: torch.Tensor, target: torch.Tensor):
        out = model(images)
        loss = cross_entropy(out["logits"], target, smoothing)
        return loss, out["logits"], {"ce": loss.detach()}

    return criterion
