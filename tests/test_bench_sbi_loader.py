"""Smoke test of bench.sbi_loader_throughput: every mode times real items, and the cores it
reports follow from the rates it measured."""

from __future__ import annotations

import pytest

from bench import sbi_loader_throughput as bench

pytest.importorskip("dlib")


@pytest.mark.slow  # about 20 s: dlib's landmark model loads and a dozen face descriptors run
def test_tiny_run_reports_every_mode_and_consistent_core_counts() -> None:
    result = bench.run(n=4, size=64, descriptor_n=2)
    assert set(result["modes"]) == set(bench.MODES) and result["output_size"] == 64
    for mode, rate in result["modes"].items():
        assert rate["pairs_per_cpu_s"] > 0 and rate["images_per_cpu_s"] == pytest.approx(
            2 * rate["pairs_per_cpu_s"], 0.01
        )
        for step, spec in bench.STEP_RATES.items():
            expected = spec["images_per_s"] / rate["images_per_cpu_s"]
            assert result["cores_to_feed"][mode][step] == pytest.approx(expected, abs=0.06)
    # a dlib descriptor per fake costs more than the blend itself
    assert result["modes"]["dlib_cached"]["cpu_ms_per_pair"] > result["modes"]["off"]["cpu_ms_per_pair"]
    assert result["modes"]["dlib_online"]["cpu_ms_per_pair"] > result["modes"]["dlib_cached"]["cpu_ms_per_pair"]
    assert result["dlib_descriptor_cpu_ms"] > 0
