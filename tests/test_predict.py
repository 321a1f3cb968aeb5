"""The read-ahead thread that overlaps decoding with the forward pass when there are no loader workers."""

from __future__ import annotations

import threading
import time

import pytest

from core.predict import read_ahead


def _running_read_ahead_threads() -> int:
    return sum(t.name == "read-ahead" for t in threading.enumerate())


def test_items_arrive_in_order_and_the_thread_ends():
    assert list(read_ahead(range(50), depth=3)) == list(range(50))
    assert _running_read_ahead_threads() == 0


def test_the_next_item_is_fetched_while_the_caller_works():
    fetched: list[int] = []

    def slow_items():
        for i in range(3):
            time.sleep(0.05)
            fetched.append(i)
            yield i

    items = read_ahead(slow_items())
    assert next(items) == 0
    deadline = time.monotonic() + 5
    while len(fetched) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fetched == [0, 1]  # item 1 is ready before the caller asked for it
    assert list(items) == [1, 2]


def test_an_error_while_fetching_reaches_the_caller():
    def broken():
        yield 1
        raise OSError("disk gone")

    items = read_ahead(broken())
    assert next(items) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(items)
    assert _running_read_ahead_threads() == 0


def test_leaving_early_stops_the_thread():
    pulled: list[int] = []

    def endless():
        i = 0
        while True:
            pulled.append(i)
            yield i
            i += 1

    for item in read_ahead(endless(), depth=2):
        if item == 3:
            break
    assert _running_read_ahead_threads() == 0
    assert len(pulled) <= 3 + 2 + 1  # at most depth items ahead, plus the one being fetched
