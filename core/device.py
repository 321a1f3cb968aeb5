"""Device choice and the per-device settings measured in bench/infer_throughput.py."""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

# torch is imported where a device is made: infer.py's ONNX path asks `gpu_may_be_present`
# first and, on a machine without a GPU, never pays the seconds that importing torch takes.
if TYPE_CHECKING:
    import torch

# Device nodes a CUDA (NVIDIA) or ROCm (AMD) driver creates on Linux; torch can find a GPU
# only where one of them exists.
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")


def gpu_may_be_present() -> bool:
    """False only where no GPU can be present (Linux without a GPU driver's device nodes), so
    the caller may skip asking torch; elsewhere True, and torch decides."""
    if not sys.platform.startswith("linux"):
        return True
    return any(Path(node).exists() for node in GPU_DEVICE_NODES)


def pick_device(name: str = "auto") -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


def autocast(device: torch.device, enabled: bool = True) -> AbstractContextManager:
    """bf16 autocast on GPU; fp32 on CPU, where bf16 is slower on most processors."""
    if enabled and device.type == "cuda":
        import torch

        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()
