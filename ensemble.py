"""Blend the members' predictions and write the submission.

  python ensemble.py                       # members from configs/ensemble.yaml
  python ensemble.py --members mff_demo,sbi_fed    # a subset

Prints OOF ROC-AUC and TPR at FPR = 1e-3 for every member and for the blend, and writes
the submission (img_name,y_pred in test-list order) atomically after checking that every
test image appears exactly once with a finite probability in [0, 1].
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.blend import (
    SubmissionError,
    check_submission,
    member_predictions,
    metrics_table,
    weighted_mean,
    write_submission,
)
from core.config import ConfigError, load_config
from core.datasource import read_test_table, resolve_data
from core.io import write_csv
from core.labels import LabelError
from core.log import get_logger
from core.metrics import score_report

log = get_logger("ensemble")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/ensemble.yaml", help="ensemble config (default: %(default)s)")
    p.add_argument("--data-config", default="configs/data.yaml", help="data config (default: %(default)s)")
    p.add_argument("--members", help="comma-separated members to blend (default: from the config)")
    p.add_argument("--out", help="submission path (default: submission in the config)")
    p.add_argument("--list-members", action="store_true", help="print the members for the configured data and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p.parse_args(argv)


def selected_members(cfg: dict, is_demo: bool) -> list[str]:
    return list(cfg["demo_members"] if is_demo else cfg["members"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config([args.data_config, args.config], args.overrides)
        data = resolve_data(cfg)
        members = args.members.split(",") if args.members else selected_members(cfg, data.is_demo)
        if args.list_members:
            print("\n".join(members))
            return 0
        outputs = cfg["paths"]["outputs"]
        oofs, tests = {}, {}
        for m in members:
            oofs[m], tests[m], n_folds = member_predictions(outputs, m)
            log.info("%s: %d folds, %d OOF predictions", m, n_folds, len(oofs[m]))
        oof_blend = weighted_mean(oofs, cfg.get("weights"))
        test_blend = weighted_mean(tests, cfg.get("weights"))
        test_table = read_test_table(data)
        sub = check_submission(test_blend, test_table["img_name"].tolist(), cfg.get("fill_missing"))
    except (ConfigError, LabelError, SubmissionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = metrics_table(oofs, oof_blend)
    print("out-of-fold scores (model selection used only each fold's own validation data):")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    out = Path(args.out or cfg["submission"])
    write_submission(sub, out)
    write_csv(table, out.with_name("oof_scores.csv"))
    if "target" in test_table.columns:
        scored = test_table[["img_name", "target"]].merge(sub, on="img_name")
        test_scores = score_report(scored["target"], scored["y_pred"])
        print("test (answers known, reported only): auc {auc:.4f}, tpr@fpr1e-3 {tpr@fpr1e-3:.4f}".format(**test_scores))
    print(f"submission: {out} ({len(sub)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
