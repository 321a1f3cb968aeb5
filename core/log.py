"""One logging format for every stage: what was read, written and skipped."""

from __future__ import annotations

import logging
import sys


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of the call, not at set-up, so a
    redirected stderr (a test's capture, a wrapper script) receives the log."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass  # the base class assigns a stream in __init__; the property above wins


def get_logger(name: str) -> logging.Logger:
    root = logging.getLogger("ffdi")
    if not root.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    return root.getChild(name)
