"""One-off studies: experiments that answered a question once (their results are in the docs),
kept runnable and smoke-tested, apart from the benches of the product's figures in bench/."""

from __future__ import annotations

import argparse

from core.config import load_config


def member_study_config(description: str, argv: list[str] | None) -> tuple[dict, str | None]:
    """A study of a trained member's folds: its config (the data config, the member config and
    key=value overrides, `sta_demo` by default) and where to write the JSON (--out, or None)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/members/sta_demo.yaml")
    p.add_argument("--data-config", default="configs/data.yaml")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    return load_config([args.data_config, args.config], args.overrides), args.out
