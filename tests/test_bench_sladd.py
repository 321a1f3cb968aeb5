"""Smoke test of bench.sladd_throughput: every rate is measured and the worker counts follow from them."""

from __future__ import annotations

import pytest

from bench import sladd_throughput

pytest.importorskip("dlib")


def test_throughput_reports_every_rate_and_the_cores_they_imply() -> None:
    result = sladd_throughput.run(n=4, cpu_step=False, batch_items=4)
    assert result["size"] == 256 and result["cpu_step"] is None
    assert set(result["forge_pairs_per_cpu_s"]) == {"uniform", "alpha", "poisson", "copy"}
    for rate in (result["loader_items_per_cpu_s"], *result["forge_pairs_per_cpu_s"].values()):
        assert rate["per_cpu_s"] > 0 and rate["cpu_ms_each"] == pytest.approx(1000 / rate["per_cpu_s"], rel=0.05)
    assert [p["threads"] for p in result["prepare"]] == [1, 2]
    gpu_items = result["gpu_step"]["images_per_s"] / result["gpu_step"]["images_per_item"]
    workers = result["workers"]
    assert workers["loader_workers"] == pytest.approx(gpu_items / result["loader_items_per_cpu_s"]["per_cpu_s"], 0.01)
    uniform = result["forge_pairs_per_cpu_s"]["uniform"]["per_cpu_s"]
    assert workers["forge_threads"] == pytest.approx(gpu_items / uniform, rel=0.01)
