"""What a member says was altered: attribute probabilities beside its fake probability.

A network that explains an image returns, besides `logits`, one output per attribute named
`attribute:<name>` (N,): the joint probability that the image is fake and <name> was altered
(eye, mouth, identity, ...); it is at most the network's p(fake). The names travel with the
outputs (dict keys in PyTorch, output names in ONNX), so nothing else has to know a member's
attributes. The scorers keep them from the same forward pass that gives the fake probability
(`core.infer.scoring.ArrayScorer(explain=True)`): nothing runs twice. Torch-free: infer.py's
ONNX path uses it as it is.

`explain_member` turns one image's outputs into what a reader is shown, per member: its p(fake)
(its folds averaged), each attribute given fake (the folds' mean joint probability over their
mean p(fake): the probability of the alteration if the image is fake) and the attributes it
never saw altered in training (`untrained`: every fold's meta.json records 0 positive examples),
which are left out of the evidence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

ATTRIBUTE_PREFIX = "attribute:"
POSITIVES_KEY = "attribute_positives"  # in meta.json's training_data: attribute -> positive training examples

Explained = dict[str, object]  # {"fake": p, "given_fake": {attribute: p}, "untrained": [attribute, ...]}


def attribute_outputs(outputs: object) -> dict[str, np.ndarray]:
    """The attribute probabilities among one network call's outputs, by attribute name."""
    if not isinstance(outputs, dict):
        return {}
    return {
        k[len(ATTRIBUTE_PREFIX) :]: np.asarray(v, dtype=np.float64).reshape(-1)
        for k, v in outputs.items()
        if k.startswith(ATTRIBUTE_PREFIX)
    }


def explain_member(
    joint: Sequence[Mapping[str, float]], fake: Sequence[float], positives: Sequence[Mapping[str, int] | None]
) -> Explained:
    """One member's explanation of one image from its folds: per fold the joint attribute
    probabilities, p(fake) and the positives its training data held per attribute (None: not
    recorded). An attribute is untrained when every fold that records its positives has none."""
    names = list(joint[0])
    p_fake = float(np.mean(fake))
    recorded = [p for p in positives if p is not None]
    untrained = [n for n in names if recorded and all(int(p.get(n, 0)) == 0 for p in recorded)]
    given = {}
    for name in names:
        if name not in untrained:
            mean_joint = float(np.mean([j[name] for j in joint]))
            given[name] = min(1.0, mean_joint / p_fake) if p_fake > 0 else float("nan")
    return {"fake": p_fake, "given_fake": given, "untrained": untrained}


def format_attributes(attributes: Mapping[str, Explained]) -> str:
    """`member: p(fake) 0.87 | if fake: identity 0.82 eye 0.80 | untrained: expression` per member,
    tab-separated, for infer.py's text lines (2 decimals: the third is noise to a reader)."""
    parts = []
    for member, e in sorted(attributes.items()):
        given = " ".join(f"{name} {p:.2f}" for name, p in e["given_fake"].items())
        text = f"\t{member}: p(fake) {e['fake']:.2f} | if fake: {given}"
        parts.append(text + (f" | untrained: {' '.join(e['untrained'])}" if e["untrained"] else ""))
    return "".join(parts)
