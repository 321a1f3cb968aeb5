"""Smoke test of bench.sbi_loader_throughput: every mode times real items, and the cores it
reports follow from the rates it measured."""

from __future__ import annotations

import pytest

from bench import sbi_loader_throughput as bench

pytest.importorskip("dlib")  # the bench embeds faces with it


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


def test_importing_the_bench_leaves_the_thread_environment_alone() -> None:
    """Its one-thread settings are for the program; a test that imports it must not hand
    OMP_NUM_THREADS=1 to every subprocess started later (they would compute differently)."""
    import subprocess
    import sys

    code = (
        "import os; before = {k: os.environ.get(k) for k in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS')}; "
        "import bench.sbi_loader_throughput; "
        "print(before == {k: os.environ.get(k) for k in before})"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
