"""What every output records about how it was made: versions, curves."""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from pathlib import Path

import pandas as pd

from core.io import atomic_path

_PACKAGES = ("torch", "torchvision", "timm", "open_clip_torch", "albumentations", "numpy", "scikit-learn")


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (servers have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, title: str = "") -> Path:
    """Title, lay out and write `fig` as a PNG atomically, then free it."""
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    pyplot().close(fig)
    return Path(path)


def plot_history(history: list[dict], path: str | Path, title: str = "") -> Path:
    """Training loss and validation AUC per epoch, as a PNG."""
    plt = pyplot()
    df = pd.DataFrame(history)
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(df["epoch"], df["train_loss"], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="training loss")
    ax_auc.plot(df["epoch"], df["auc"], marker="o", label="AUC")
    ax_auc.plot(df["epoch"], df["tpr@fpr1e-3"], marker="s", label="TPR@FPR=1e-3")
    ax_auc.set(xlabel="epoch", ylim=(0, 1.02), title="validation (EMA weights)")
    ax_auc.legend(loc="lower right")
    return save_figure(fig, path, title)
