"""Build validation folds that keep every parent image with the fakes derived from it.

  python cv_split.py                          # stratified folds from configs/data.yaml
  python cv_split.py split.n_folds=4 --force  # overrides as key=value

Writes folds.csv (img_name,target,cluster,fold) and the resolved config beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from core.config import ConfigError, load_config, save_config
from core.datasource import read_train_table, resolve_data
from core.folds import FOLD_COLUMNS, FoldError, check_folds, stratified_group_folds
from core.io import write_csv
from core.labels import LabelError
from core.log import get_logger

log = get_logger("cv_split")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/data.yaml", help="data config (default: %(default)s)")
    p.add_argument("--mode", choices=["stratified"], help="split mode (default: split.mode in the config)")
    p.add_argument("--out", help="folds CSV to write (default: paths.folds in the config)")
    p.add_argument("--force", action="store_true", help="rebuild even if the folds file exists")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config([args.config], args.overrides)
        out = Path(args.out or cfg["paths"]["folds"])
        if out.exists() and not args.force:
            log.info("%s exists; skipping (use --force to rebuild)", out)
            return 0
        mode = args.mode or cfg["split"]["mode"]
        df = read_train_table(resolve_data(cfg))
        log.info(
            "read %d train images (%d fake) in %d parent groups", len(df), df["target"].sum(), df["parent"].nunique()
        )
        if mode != "stratified":
            raise FoldError(f"split mode {mode!r} is not available; use stratified")
        df["fold"] = stratified_group_folds(df, cfg["split"]["n_folds"], cfg["split"]["seed"])
        df["cluster"] = -1
        check_folds(df)
    except (ConfigError, LabelError, FoldError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_csv(df[FOLD_COLUMNS], out)
    save_config(cfg, out.with_suffix(".config.yaml"))
    summary = pd.crosstab(df["fold"], df["target"]).rename(columns={0: "real", 1: "fake"})
    log.info("wrote %s (%s mode)\n%s", out, mode, summary.to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
