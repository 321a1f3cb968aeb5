"""The inference throughput benchmark runs end to end (tiny model) and prints complete JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from infer import DEVICE_DEFAULTS

HEADLINE = [
    "naive_ips",
    "infer_path_ips",
    "best_pure_forward_ips",
    "pure_forward_at_infer_setting_ips",
    "speedup_vs_naive",
    "end_to_end_vs_pure_forward",
]


@pytest.mark.slow  # about 80 s on 2 cores: every sweep setting starts its own process
def test_quick_mode_prints_complete_json(tmp_path: Path) -> None:
    out = tmp_path / "infer.json"
    cmd = [sys.executable, "-m", "bench.infer_throughput", "--quick", "--rounds", "1", "--device", "cpu"]
    cmd += ["--batch-sizes", "1", "4", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == result

    for key in HEADLINE:
        assert result[key] > 0, key
    for key in ("speedup_vs_naive_target_met", "end_to_end_vs_pure_forward_target_met", "infer_defaults_are_best"):
        assert isinstance(result[key], bool), key
    assert result["speedup_vs_naive_target"] == 1.5
    cpu = DEVICE_DEFAULTS["cpu"]
    assert result["infer_defaults"]["batch_size"] == cpu["batch_size"]
    assert result["infer_defaults"]["workers"] == cpu["workers"]

    # The sweep covers the requested grid plus infer.py's own CPU setting.
    batch_sizes, workers = {1, 4, cpu["batch_size"]}, {0, 1, cpu["workers"]}
    sweep = result["sweep"]
    assert {(r["batch_size"], r["network"], r["workers"]) for r in sweep} == {
        (b, n, w) for b in batch_sizes for n in ("onnx", "channels_last", "nchw") for w in workers
    }
    assert result["infer_defaults"]["network"] == "onnx"
    export = result["onnx_export"]
    assert export["first_load_s"] > export["cached_load_s"] > 0 and export["file_mb"] > 0
    for row in sweep:
        assert row["ips"] > 0 and row["pure_forward_ips"] > 0
        assert row["peak_rss_mb"] >= row["model_rss_mb"] > 0
        if row["workers"]:
            assert row["workers_peak_rss_mb"] > 0
    assert result["naive_memory"]["peak_rss_mb"] > 0

    machine = result["machine"]
    assert machine["torch"] and machine["cpu_model"] and machine["torch_threads"] >= 1
    setup = result["setup"]
    assert setup["arch"] == "test_efficientnet" and setup["input_size"] == 128
    assert setup["images_per_contender_per_round"] >= 1 and setup["image_sizes_wh"]
    assert "ru_maxrss" in setup["memory_method"]
