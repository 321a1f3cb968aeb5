"""Device choice and the per-device settings measured in bench/infer_throughput.py."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


def autocast(device: torch.device, enabled: bool = True) -> AbstractContextManager:
    """bf16 autocast on GPU; fp32 on CPU, where bf16 is slower on most processors."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()
