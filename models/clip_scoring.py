"""infer.py's scoring of networks that take clips (a `clip` section in their meta.json config).

Each input is fed as the member's own validation fed it (`core.clips.eval_dataset`): a video as
`clip.frames` frames at evenly spaced indices over its whole length, cut at one face box per clip
when `clip.face_crop` is on; a still image as a one-frame clip or a clip built from it, as
`clip.still` says. PyTorch only: clip networks are not exported to ONNX (the export traces one
input shape, and a clip's length differs between stills and videos).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from core.clips import eval_dataset
from core.trained import Ensemble
from core.transforms import build_transform
from data_prep.clip_faces import clip_cropper
from models.scoring import loaded_network


class ClipScorer:
    """Fills the clip models' columns of infer.py's (N, n_models) probabilities."""

    def __init__(self, ensemble: Ensemble, device: str):
        self.device = torch.device(device)
        self.trained = [(i, ensemble.trained[i]) for i in ensemble.clip_models()]
        self.networks = {i: loaded_network(t).float().to(self.device).eval() for i, t in self.trained}

    @torch.no_grad()
    def score(self, paths: Sequence[Path], probs: np.ndarray, report: Callable[[str], None]) -> None:
        """Score every input with every clip model into `probs[:, model]`; an input that cannot be
        read as a clip is reported once and left NaN."""
        unreadable: set[int] = set()
        for i, trained in self.trained:
            cfg = trained.config
            transform, crop = build_transform(cfg["data"], train=False), clip_cropper(cfg)
            for row, path in enumerate(paths):
                if row in unreadable:
                    continue
                item = eval_dataset(cfg, [str(path)], None, transform, crop)[0]  # one input: any still mode
                if "error" in item:
                    report(item["error"])
                    unreadable.add(row)
                    continue
                logits = self.networks[i](item["image"][None].to(self.device))["logits"].float()
                probs[row, i] = torch.softmax(logits, dim=1)[0, 1].item()
