"""Blending a member's folds: by image name, finished folds only, and both OOF scores reported."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

import ensemble
from core.blend.predictions import member_predictions, metrics_table
from core.trained import SubmissionError, expected_folds, finished_folds, member_folds

TEST_NAMES = ["t0.png", "t1.png", "t2.png", "t3.png"]


def write_fold(outputs, member, k, oof, test, complete=True):
    """A fold folder as train.py leaves it: oof.csv, test.csv, then meta.json last."""
    d = outputs / member / f"fold{k}"
    d.mkdir(parents=True)
    oof.to_csv(d / "oof.csv", index=False)
    test.to_csv(d / "test.csv", index=False)
    (d / "meta.json").write_text(json.dumps({"complete": complete}))


def oof_rows(k, n=6, offset=0.0):
    """Fold k's validation images: perfectly ranked within the fold, shifted by `offset`."""
    target = np.arange(n) % 2
    return pd.DataFrame(
        {"img_name": [f"f{k}_{i}.png" for i in range(n)], "target": target, "y_pred": 0.1 + 0.5 * target + offset}
    )


def fold_test_rows(scores, order=None):
    order = order or list(range(len(TEST_NAMES)))
    return pd.DataFrame({"img_name": [TEST_NAMES[i] for i in order], "y_pred": [scores[i] for i in order]})


def test_test_predictions_are_matched_by_name_not_row_position(tmp_path):
    write_fold(tmp_path, "m", 0, oof_rows(0), fold_test_rows([0.1, 0.2, 0.3, 0.4]))
    write_fold(tmp_path, "m", 1, oof_rows(1), fold_test_rows([0.5, 0.6, 0.7, 0.8], order=[3, 1, 0, 2]))
    _, test = member_predictions(tmp_path, "m", [0, 1])
    assert test["img_name"].tolist() == TEST_NAMES
    assert test["y_pred"].tolist() == pytest.approx([0.3, 0.4, 0.5, 0.6])


def test_a_fold_whose_test_list_differs_is_refused(tmp_path):
    write_fold(tmp_path, "m", 0, oof_rows(0), fold_test_rows([0.1, 0.2, 0.3, 0.4]))
    other = fold_test_rows([0.1, 0.2, 0.3, 0.4]).assign(img_name=["t0.png", "t1.png", "t2.png", "x.png"])
    write_fold(tmp_path, "m", 1, oof_rows(1), other)
    with pytest.raises(
        SubmissionError, match=r"fold1/test.csv: other test images than fold 0's, e.g. \['t3.png', 'x.png'\]"
    ):
        member_predictions(tmp_path, "m", [0, 1])


def test_only_folds_marked_complete_count(tmp_path):
    write_fold(tmp_path, "m", 0, oof_rows(0), fold_test_rows([0.1] * 4))
    write_fold(tmp_path, "m", 1, oof_rows(1), fold_test_rows([0.9] * 4), complete=False)  # killed mid-way
    write_fold(tmp_path, "m", 2, oof_rows(2), fold_test_rows([0.5] * 4))
    (tmp_path / "m" / "fold2" / "meta.json").unlink()  # oof.csv alone does not make a fold finished
    assert finished_folds(tmp_path, "m") == [0]
    with pytest.raises(SubmissionError, match=r"^m: fold\(s\) \[1, 2\] of \[0, 1, 2\] not finished.*--allow-partial$"):
        member_folds(tmp_path, "m", [0, 1, 2], allow_partial=False)
    assert member_folds(tmp_path, "m", [0, 1, 2], allow_partial=True) == [0]
    with pytest.raises(SubmissionError, match="no finished fold"):
        member_folds(tmp_path, "other", [0], allow_partial=True)


def test_pooled_and_per_fold_scores_differ_and_are_both_reported(tmp_path):
    # Each fold ranks its own images perfectly (per-fold AUC 1), but fold 1's scores sit higher
    # than fold 0's, so pooled over both folds the ranking is imperfect.
    for k, offset in ((0, 0.0), (1, 0.6)):
        write_fold(tmp_path, "m", k, oof_rows(k, offset=offset), fold_test_rows([0.5] * 4))
    oof, _ = member_predictions(tmp_path, "m", [0, 1])
    row = metrics_table({"m": oof}, oof).iloc[0]
    assert row["folds"] == 2 and row["fold_auc_mean"] == 1.0 and row["fold_auc_std"] == 0.0
    assert row["pooled_auc"] == pytest.approx(0.75)  # fold 1's reals outscore fold 0's fakes: 9 of 36 pairs inverted


def test_expected_folds_come_from_the_split(tmp_path):
    pd.DataFrame({"img_name": list("abcd"), "target": [0, 1, 0, 1], "cluster": 0, "fold": [2, 0, 2, 1]}).to_csv(
        tmp_path / "folds.csv", index=False
    )
    assert expected_folds(tmp_path / "folds.csv") == [0, 1, 2]
    assert expected_folds(tmp_path / "none.csv") is None


@pytest.fixture
def project(tmp_path):
    """Configs, a split of two folds and a member with both folds finished, no training."""
    outputs = tmp_path / "outputs"
    (tmp_path / "test").mkdir()
    for name in TEST_NAMES:
        (tmp_path / "test" / name).write_bytes(b"")
    pd.DataFrame({"img_name": TEST_NAMES}).to_csv(tmp_path / "test_list.csv", index=False)
    train = pd.concat([oof_rows(0), oof_rows(1)])
    train[["img_name", "target"]].to_csv(tmp_path / "train.csv", index=False)
    train.assign(cluster=0, fold=[0] * 6 + [1] * 6)[["img_name", "target", "cluster", "fold"]].to_csv(
        tmp_path / "folds.csv", index=False
    )
    data = {
        "data": {
            "train_labels": str(tmp_path / "train.csv"),
            "train_root": str(tmp_path),
            "test_list": str(tmp_path / "test_list.csv"),
            "test_root": str(tmp_path / "test"),
            "use_prepared": False,
        },
        "paths": {"outputs": str(outputs), "folds": str(tmp_path / "folds.csv")},
    }
    blend = {"members": ["m"], "demo_members": ["demo"], "weights": None, "fill_missing": None}
    blend["submission"] = str(outputs / "submission.csv")
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "ensemble.yaml").write_text(yaml.safe_dump(blend))
    write_fold(outputs, "m", 0, oof_rows(0), fold_test_rows([0.1, 0.2, 0.3, 0.4]))
    return tmp_path


def run(project, *extra):
    return ensemble.main(
        ["--config", str(project / "ensemble.yaml"), "--data-config", str(project / "data.yaml"), *extra]
    )


def test_ensemble_refuses_a_member_with_a_missing_fold_unless_allowed(project, capsys):
    assert run(project) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: m: fold(s) [1] of [0, 1] not finished; train them (train.py --config "
        "configs/members/m.yaml --fold all) or pass --allow-partial"
    ]
    assert run(project, "--allow-partial") == 0
    sub = pd.read_csv(project / "outputs" / "submission.csv")
    assert sub["y_pred"].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_ensemble_prints_pooled_and_per_fold_scores(project, capsys):
    write_fold(project / "outputs", "m", 1, oof_rows(1, offset=0.6), fold_test_rows([0.5, 0.6, 0.7, 0.8], [2, 0, 3, 1]))
    assert run(project) == 0
    out = capsys.readouterr().out
    assert "pooled: every train image scored once" in out and "per fold: the metric within each" in out
    line = next(x for x in out.splitlines() if x.startswith("m "))
    assert "0.7500" in line and "1.0000 +- 0.0000 (1.0000..1.0000, 2 folds)" in line
    scores = pd.read_csv(project / "outputs" / "oof_scores.csv")
    assert {"pooled_auc", "fold_auc_mean", "fold_auc_std", "folds"} <= set(scores.columns)
    sub = pd.read_csv(project / "outputs" / "submission.csv")
    assert sub["y_pred"].tolist() == pytest.approx([0.3, 0.4, 0.5, 0.6])
