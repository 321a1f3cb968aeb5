"""core.io: an output appears whole or not at all, with the mode a plain open() would give it."""

import stat

import pytest

from core.io import write_json, write_text, write_with


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_get_the_mode_of_a_plain_open(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    out = write_json({"a": 1}, tmp_path / "out.json")
    assert mode(out) == mode(plain)
    assert mode(out) & stat.S_IRGRP  # mkstemp alone would leave it 0600, unreadable to the group


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = write_text("old", tmp_path / "f.txt")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_with(path, half_then_fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
