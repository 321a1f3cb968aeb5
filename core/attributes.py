"""What a member says was altered: attribute probabilities next to the fake probability.

A network that explains an image returns, besides `logits`, one output per attribute named
`attribute:<name>` (N,): the probability that <name> was altered (eye, mouth, identity, ...).
The names travel with the outputs (dict keys in PyTorch, output names in ONNX), so nothing
else has to know a member's attributes. Torch-free: infer.py's ONNX path uses it as it is.
"""

from __future__ import annotations

ATTRIBUTE_PREFIX = "attribute:"
