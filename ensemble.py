"""Blend the members' predictions and write the submission.

  python ensemble.py                       # members from configs/ensemble.yaml
  python ensemble.py --members mff_demo,sbi_fed    # a subset

  python ensemble.py --allow-partial        # blend a member from the folds it has finished

Prints, for every member and for the blend, the out-of-fold ROC-AUC and TPR at FPR = 1e-3
pooled over all folds and the per-fold AUC (mean +- std, min..max), and writes the
submission (img_name,y_pred in test-list order) atomically after checking that every test
image appears exactly once with a finite probability in [0, 1]. A member's folds are those
of folds.csv whose meta.json says complete; a member with a fold missing is refused unless
--allow-partial. Its test predictions are averaged over its folds, matched by img_name.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.blend import (
    SCORES_NOTE,
    SubmissionError,
    blend_members,
    check_submission,
    expected_folds,
    format_table,
    member_folds,
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
    p.add_argument(
        "--allow-partial",
        action="store_true",
        help="blend a member with unfinished folds from the folds it has (default: refuse it)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config([args.data_config, args.config], args.overrides)
        data = resolve_data(cfg)
        members = args.members.split(",") if args.members else blend_members(cfg, data.is_demo)
        if args.list_members:
            print("\n".join(members))
            return 0
        outputs = cfg["paths"]["outputs"]
        expected = expected_folds(cfg["paths"]["folds"])
        oofs, tests = {}, {}
        for m in members:
            folds = member_folds(outputs, m, expected, args.allow_partial)
            oofs[m], tests[m] = member_predictions(outputs, m, folds)
            log.info("%s: folds %s, %d OOF predictions", m, ",".join(map(str, folds)), len(oofs[m]))
        oof_blend = weighted_mean(oofs, cfg.get("weights"))
        test_blend = weighted_mean(tests, cfg.get("weights"))
        test_table = read_test_table(data)
        sub = check_submission(test_blend, test_table["img_name"].tolist(), cfg.get("fill_missing"))
    except (ConfigError, LabelError, SubmissionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = metrics_table(oofs, oof_blend)
    print("out-of-fold scores (model selection used only each fold's own validation data)")
    print(SCORES_NOTE)
    print(format_table(table))
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
