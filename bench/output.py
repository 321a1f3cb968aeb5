"""How a bench hands over its result: the JSON on stdout, then a markdown table for the README,
and the JSON written atomically to `--out` when given."""

from __future__ import annotations

import json

from core.io import write_json


def publish(result: dict, table: str, out: str | None) -> None:
    print(json.dumps(result, indent=2))
    print()
    print(table)
    if out:
        write_json(result, out)
