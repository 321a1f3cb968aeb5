"""bench.scale runs every stage's command end to end at a tiny N (slow: five processes per size)."""

from __future__ import annotations

import pytest

from bench import scale


def test_growth_is_scaled_to_a_4x_step():
    assert scale.per_4x(10.0, 50.0, 2000, 10000) == 4.0  # linear over a 5x step
    assert scale.per_4x(10.0, 250.0, 2000, 10000) == 16.0  # quadratic
    assert scale.per_4x(3.0, 3.0, 100, 400) == 1.0


@pytest.mark.slow
def test_every_stage_runs_at_a_tiny_n(tmp_path, capsys):
    assert scale.main(["--n", "60", "120", "--work", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for stage in scale.STAGES:
        assert f"`{stage}`" in out
    assert (tmp_path / "n120" / "preds.csv").read_text().count("\n") == 13  # header and 12 test images
    assert len(list((tmp_path / "n120" / "outputs").glob("drawn*/fold*/oof.csv"))) == 5 * 7
