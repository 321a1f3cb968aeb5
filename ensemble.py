"""Blend the members' predictions, calibrate the blend, report, and write the submission.

  python ensemble.py                       # members from configs/ensemble.yaml
  python ensemble.py --members mff_demo,sbi_fed    # a subset
  python ensemble.py ensemble.method=weights       # force a blend method (auto picks one)
  python ensemble.py --allow-partial        # blend a member from the folds it has finished

Blend methods (`ensemble.method`): mean, rank_mean, weights (fitted to maximise the OOF AUC),
stack (logistic regression on the members' logits). Each is fitted on out-of-fold (OOF)
predictions only and measured by nested cross-validation over the same folds; `auto` keeps
the plain mean unless another method beats it by more than the fold-to-fold spread. The
chosen blend is fitted on every OOF prediction, then calibrated (`ensemble.calibration`) on
its own nested OOF scores; that calibration is measured nested inside the nested blend (each
fold's by a fit on scores from blends that never saw the fold). `ensemble.method=auto` measures
every method, a forced method is measured against the plain mean only. Writes, under
paths.outputs: ensemble_fit.json (what infer.py applies), ensemble_report.md with
ensemble_{roc,correlation,reliability}.png, oof_blend.csv (img_name,target,fold, each member,
the nested blend and its out-of-fold calibration as y_pred); and the submission
(img_name,y_pred in test-list order) with oof_scores.csv beside it.

Prints, for every member and for the blend, the out-of-fold ROC-AUC and TPR at FPR = 1e-3
pooled over all folds and the per-fold AUC (mean +- std, min..max). The submission is
checked: every test image exactly once with a finite probability in [0, 1]. A member's folds
are those of folds.csv whose meta.json says complete; a member with a fold missing is refused
unless --allow-partial. Its test predictions are averaged over its folds, matched by img_name.
Test answers, when configured, are only reported: nothing is chosen with them.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from core.blend.applied import FIT_FILE
from core.blend.fitting import BlendFitError, BlendSettings, EnsembleFit, blend_row_note, fit_ensemble
from core.blend.predictions import (
    SCORES_NOTE,
    check_submission,
    format_table,
    member_matrix,
    member_predictions,
    metrics_table,
    write_submission,
)
from core.blend.report import write_report
from core.config import ConfigError, load_config
from core.data.labels import LabelError
from core.data.sources import read_test_table, resolve_data
from core.io import write_csv, write_json
from core.log import get_logger
from core.metrics import score_report
from core.trained import (
    META_FILE,
    SubmissionError,
    blend_members,
    expected_folds,
    member_folds,
    meta_stamp,
    models_stamp,
)

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


def blend_summary(fit: EnsembleFit) -> str:
    lines = [
        f"blend: {fit.method} ({fit.reason})",
        f"calibration: {fit.calibration.applied} ({fit.calibration.reason})",
    ]
    for name, r in fit.results.items():
        spread = "not available: " + r.error if r.error else f"nested per-fold AUC {r.fold_auc_mean:.4f}"
        lines.append(f"  {name:<10} {spread}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config([args.data_config, args.config], args.overrides)
        settings = BlendSettings.from_cfg(cfg.get("ensemble"))
        data = resolve_data(cfg)
        members = args.members.split(",") if args.members else blend_members(cfg, data.is_demo)
        if args.list_members:
            print("\n".join(members))
            return 0
        outputs = Path(cfg["paths"]["outputs"])
        expected = expected_folds(cfg["paths"]["folds"])
        oofs, tests, stamps = {}, {}, []
        for m in members:
            folds = member_folds(outputs, m, expected, args.allow_partial)
            oofs[m], tests[m] = member_predictions(outputs, m, folds)
            stamps += [meta_stamp(outputs / m / f"fold{k}" / META_FILE) for k in folds]
            log.info("%s: folds %s, %d OOF predictions", m, ",".join(map(str, folds)), len(oofs[m]))
        oof, test = member_matrix(oofs), member_matrix(tests)
        probs = oof[members].to_numpy(dtype=float)
        fit = fit_ensemble(members, probs, oof["target"], oof["fold"], settings, cfg.get("weights"))
        test["y_pred"] = fit.fitted.apply(test[members].to_numpy(dtype=float))
        test_table = read_test_table(data)
        sub = check_submission(test, test_table["img_name"].tolist(), cfg.get("fill_missing"))
    except (ConfigError, LabelError, SubmissionError, BlendFitError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    oof_blend = oof.assign(blend=fit.calibration.uncalibrated, y_pred=fit.calibration.calibrated)
    table = metrics_table(oofs, oof_blend[["img_name", "target", "fold", "y_pred"]])
    print("out-of-fold scores (model selection used only each fold's own validation data)")
    print(SCORES_NOTE)
    print(format_table(table))
    print(blend_row_note(fit))
    print(blend_summary(fit))
    out = Path(args.out or cfg["submission"])
    write_submission(sub, out)
    write_csv(table, out.with_name("oof_scores.csv"))
    write_csv(oof_blend, outputs / "oof_blend.csv")
    write_json(replace(fit.fitted, models=models_stamp(stamps)).to_json(), outputs / FIT_FILE)
    test_scores = None
    if "target" in test_table.columns:
        scored = test_table[["img_name", "target"]].merge(sub, on="img_name")
        test_scores = score_report(scored["target"], scored["y_pred"])
        print("test (answers known, reported only): auc {auc:.4f}, tpr@fpr1e-3 {tpr@fpr1e-3:.4f}".format(**test_scores))
    report = write_report(fit, oof, outputs, test_scores)
    print(f"report: {report[-1]}")
    print(f"submission: {out} ({len(sub)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
