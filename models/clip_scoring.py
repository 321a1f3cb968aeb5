"""infer.py's scoring of networks that take clips (a `clip` section in their meta.json config).

Each input is fed as the member's own validation fed it (`core.data.clips.eval_dataset`): a video as
every clip of its window (`core.clip_reading`), face-cropped when `clip.face_crop` is on, its
probability the mean of its clips'; a still image as a one-frame clip or a clip built from it, as
`clip.still` says.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from core.data.clips import eval_dataset
from core.data.transforms import build_transform
from core.infer.ensemble import Ensemble
from data_prep.clip_faces import clip_cropper
from models.scoring import loaded_network


class ClipScorer:
    """Fills the clip models' columns of infer.py's (N, n_models) probabilities. Models fed the
    same clips (a member's folds) form a group: each input is read once per group."""

    def __init__(self, ensemble: Ensemble, device: str):
        self.device = torch.device(device)
        groups: dict[str, list[int]] = {}
        for i in ensemble.clip_models():
            cfg = ensemble.trained[i].config
            groups.setdefault(json.dumps([cfg["data"], cfg["clip"], cfg.get("prep")], sort_keys=True), []).append(i)
        self.groups = []
        for idx in groups.values():
            cfg = ensemble.trained[idx[0]].config
            self.groups.append((cfg, build_transform(cfg["data"], train=False), clip_cropper(cfg), idx))
        self.networks = {
            i: loaded_network(ensemble.trained[i]).float().to(self.device).eval()
            for *_, idx in self.groups
            for i in idx
        }

    @torch.no_grad()
    def score(self, paths: Sequence[Path], probs: np.ndarray, report: Callable[[str], None]) -> None:
        """Score every input with every clip model into `probs[:, model]`; an input that cannot be
        read as a clip is reported once and left NaN."""
        for row, path in enumerate(paths):
            for cfg, transform, crop, idx in self.groups:
                item = eval_dataset(cfg, [str(path)], None, transform, crop)[0]  # one input: any still mode
                if "error" in item:
                    report(item["error"])
                    break
                clips = item["image"].to(self.device)  # (K, T, 3, H, W): the input's every clip
                for i in idx:
                    logits = self.networks[i](clips)["logits"].double()
                    probs[row, i] = torch.softmax(logits, dim=1)[:, 1].mean().item()
