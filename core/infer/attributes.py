"""What a member says was altered: attribute probabilities next to the fake probability.

A network that explains an image returns, besides `logits`, one output per attribute named
`attribute:<name>` (N,): the probability that <name> was altered (eye, mouth, identity, ...).
The names travel with the outputs (dict keys in PyTorch, output names in ONNX), so nothing
else has to know a member's attributes. Torch-free: infer.py's ONNX path uses it as it is.

`AttributeScorer` runs the networks of an ensemble on image files and keeps, per image and
member, each attribute's probability with the member's folds averaged. A network whose first
output has no attribute is not run again.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from core.imaging import ImageDecodeError, decode_image
from core.infer.scoring import Group

ATTRIBUTE_PREFIX = "attribute:"

Attributes = dict[str, dict[str, float]]  # member -> attribute -> probability


def attribute_outputs(outputs: object) -> dict[str, np.ndarray]:
    """The attribute probabilities among one network call's outputs, by attribute name."""
    if not isinstance(outputs, dict):
        return {}
    return {
        k[len(ATTRIBUTE_PREFIX) :]: np.asarray(v, dtype=np.float64).reshape(-1)
        for k, v in outputs.items()
        if k.startswith(ATTRIBUTE_PREFIX)
    }


class AttributeScorer:
    """Attribute probabilities per image: `groups` as `core.infer.scoring.ArrayScorer` holds them
    (preprocessing, NumPy-in networks, their model columns), `members` the member of each column."""

    def __init__(self, groups: Sequence[Group], members: Sequence[str]):
        # Networks fed face crops are scored per face, not on the image: none explains attributes.
        self.groups = [g for g in groups if g.crop is None]
        self.members = list(members)
        self.silent: set[int] = set()  # columns whose network explains nothing

    def score_image(self, image: np.ndarray) -> Attributes:
        sums: dict[str, dict[str, list[float]]] = {}
        for group in self.groups:
            x = group.preprocessing(image)[None]
            for network, column in zip(group.networks, group.columns, strict=True):
                if column in self.silent:
                    continue
                found = attribute_outputs(network(x))
                if not found:
                    self.silent.add(column)
                for name, value in found.items():
                    sums.setdefault(self.members[column], {}).setdefault(name, []).append(float(value[0]))
        return {m: {name: float(np.mean(v)) for name, v in attrs.items()} for m, attrs in sums.items()}

    def score_files(self, paths: Sequence[str | Path]) -> list[Attributes]:
        """One entry per path; empty where the image cannot be read (the fake-probability pass
        reports it) or no member explains."""
        rows: list[Attributes] = []
        for path in paths:
            try:
                rows.append(self.score_image(decode_image(path)))
            except ImageDecodeError:
                rows.append({})
        return rows


def format_attributes(attributes: Attributes) -> str:
    """`member: name=0.12 name=0.80` per member, tab-separated, for infer.py's text lines."""
    return "".join(
        f"\t{member}: " + " ".join(f"{name}={p:.4f}" for name, p in attrs.items())
        for member, attrs in sorted(attributes.items())
    )
