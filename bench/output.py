"""How a bench hands over its result: the JSON on stdout, then a markdown table for the docs,
and the JSON written atomically to `--out` when given."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

from core.config import ConfigError
from core.data.folds import FoldError
from core.data.labels import LabelError
from core.io import write_json
from core.trained import SubmissionError

# What a bench that trains members reports in one line (exit 2) instead of a traceback: a bad
# config, label file, split or prediction file.
DATA_ERRORS = (ConfigError, LabelError, FoldError, SubmissionError)


def publish(result: dict, table: str, out: str | None) -> None:
    print(json.dumps(result, indent=2))
    print()
    print(table)
    if out:
        write_json(result, out)


def run_and_publish(run: Callable[[], dict], table: Callable[[dict], str], out: str | None) -> int:
    """A training bench's main: run it, publish its result; a data or config problem is one line, exit 2."""
    try:
        result = run()
    except DATA_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    publish(result, table(result), out)
    return 0
