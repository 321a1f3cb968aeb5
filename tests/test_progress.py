"""Progress output: a bar on a terminal, one line per stage in a log file."""

from __future__ import annotations

import io
import sys

import pytest
from tqdm import tqdm

from core.progress import LineProgress, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_file_gets_one_line_per_stage_and_no_carriage_returns(capsys):
    with progress_bar(total=500, desc="faces", unit="img") as bar:
        for _ in range(500):
            bar.update(1)
    for _ in progress_bar(range(300), desc="originals", unit="img"):
        pass
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 2
    assert "faces: 500/500 img" in lines[0]
    assert "originals: 300/300 img" in lines[1]


def test_transient_bars_are_silent_in_a_log_file(capsys):
    bar = progress_bar(range(50), desc="epoch 1/3", leave=False)
    for _ in bar:
        bar.set_postfix(loss="0.1234")
    assert capsys.readouterr().err == ""


def test_postfix_and_early_exit_still_log_once(capsys):
    bar = progress_bar(range(10), desc="predict")
    for i in bar:
        bar.set_postfix(loss="0.5")
        if i == 3:
            break
    bar.close()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert "predict: 4/10 it" in lines[0] and "loss 0.5" in lines[0]


def test_terminal_gets_a_tqdm_bar(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert isinstance(progress_bar(range(3), desc="x"), tqdm)
    monkeypatch.undo()
    assert isinstance(progress_bar(range(3), desc="x"), LineProgress)


@pytest.mark.parametrize("stream", [io.StringIO(), None])
def test_disabled_bar_is_silent_anywhere(monkeypatch, capsys, stream):
    if stream is not None:
        monkeypatch.setattr(sys, "stderr", stream)
    for _ in progress_bar(range(5), desc="quiet", disable=True):
        pass
    assert capsys.readouterr().err == "" and (stream is None or stream.getvalue() == "")
