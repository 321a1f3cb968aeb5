"""Trained models blended for inference, with no deep-learning import.

A member's folds are averaged first, then members are blended as ensemble.py blends them for
the submission. infer.py's ONNX path builds this without importing torch or pandas.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import numpy as np

from core.blend.applied import FittedBlend, nan_weighted_mean
from core.trained import CheckpointError, ModelFile, models_stamp, takes_clips


class Ensemble:
    """Trained models grouped by member; a member's folds are averaged first, then members are
    blended as ensemble.py blends them for the submission: with the blend it fitted (`fit`,
    read from its ensemble_fit.json) when that was fitted for exactly these members and these
    trained models, else with `weights` (equal by default; `fit_refused` then says why)."""

    def __init__(
        self, trained: Iterable[ModelFile], weights: dict[str, float] | None = None, fit: FittedBlend | None = None
    ):
        self.trained = list(trained)
        if not self.trained:
            raise CheckpointError("no trained model given")
        self.members = sorted({t.member for t in self.trained})
        self.weights = np.array([1.0 if not weights else float(weights.get(m, 0.0)) for m in self.members])
        self.fit_refused = None if fit is None else self._refusal(fit)
        self.fit = fit.reorder(self.members) if fit is not None and self.fit_refused is None else None

    def _refusal(self, fit: FittedBlend) -> str | None:
        """Why `fit` does not apply to these models, or None when it does."""
        if sorted(fit.members) != self.members:
            return f"it was fitted for {', '.join(sorted(fit.members))}"
        if fit.models is not None and fit.models != models_stamp(t.stamp for t in self.trained):
            return "a member was trained again since it was fitted"
        return None

    def groups(self) -> dict[str, list[int]]:
        """Indices of the image models sharing one evaluation transform, so each image is decoded
        and resized once per input size rather than once per model. Clip models are not in them."""
        out: dict[str, list[int]] = {}
        for i, t in enumerate(self.trained):
            if not takes_clips(t.config):
                out.setdefault(json.dumps(t.config["data"], sort_keys=True), []).append(i)
        return out

    def clip_models(self) -> list[int]:
        """Indices of the models that take clips of frames (scored apart: `core.infer.clip_scoring`)."""
        return [i for i, t in enumerate(self.trained) if takes_clips(t.config)]

    def clip_groups(self) -> dict[str, list[int]]:
        """Indices of the clip models fed the same clips (a member's folds), so each input is read
        and cut once per group."""
        out: dict[str, list[int]] = {}
        for i in self.clip_models():
            cfg = self.trained[i].config
            key = json.dumps([cfg["data"], cfg["clip"], cfg.get("prep")], sort_keys=True)
            out.setdefault(key, []).append(i)
        return out

    def member_probs(self, probs: np.ndarray) -> np.ndarray:
        """(N, n_models) per-model probabilities -> (N, n_members): each member's folds averaged."""
        columns = [[i for i, t in enumerate(self.trained) if t.member == m] for m in self.members]
        return np.stack([nan_weighted_mean(probs[:, c]) for c in columns], axis=1)

    def blend(self, probs: np.ndarray) -> np.ndarray:
        """(N, n_models) per-model probabilities -> (N,) ensemble probability (NaN-aware)."""
        if self.fit is not None:
            return self.fit.apply(self.member_probs(probs))
        return nan_weighted_mean(self.member_probs(probs), self.weights)
