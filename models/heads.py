"""Classifier heads that stay in float32 under mixed precision.

Under bf16 autocast a Linear head returns bf16 logits: 8 bits of mantissa, so the fake
probabilities of a large validation or test set collapse onto a few thousand values (200k
random 1792-d features through a 2-class head gave 21k distinct probabilities in bf16 against
199.8k in fp32). Ties lower the AUC and above all TPR at FPR = 1e-3, which checkpoint selection,
`oof.csv` and `test.csv` rely on. The backbone keeps the speed of bf16; the head, a few
thousand multiply-adds per image, runs in fp32. Every member computes its logits through here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

Out = TypeVar("Out")


def fp32_head(head: Callable[[torch.Tensor], Out], features: torch.Tensor) -> Out:
    """`head(features)` computed in float32 even inside an autocast region (`head`: a module,
    or a function of several, e.g. a member's training-only heads)."""
    device_type = features.device.type
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return head(features.float())
    return head(features.float())
