"""One logging format for every stage: what was read, written and skipped."""

from __future__ import annotations

import logging
import sys


def get_logger(name: str) -> logging.Logger:
    root = logging.getLogger("ffdi")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    return root.getChild(name)
