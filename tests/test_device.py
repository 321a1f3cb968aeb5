"""Mixed precision is bf16 on a GPU and off on a CPU, as the training and scoring paths ask for it."""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import pytest
import torch

from core.device import autocast, pick_device


def test_gpu_autocast_is_bf16():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # without a GPU torch warns that it would disable it
        ctx = autocast(torch.device("cuda"))
    assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == torch.bfloat16


@pytest.mark.parametrize(("device", "enabled"), [("cpu", True), ("cuda", False)])
def test_fp32_on_cpu_or_when_disabled(device, enabled):
    assert isinstance(autocast(torch.device(device), enabled), nullcontext)


def test_asking_for_a_missing_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        pick_device("cuda")
