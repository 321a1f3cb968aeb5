"""The latency benchmark runs end to end (tiny networks) and prints complete JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # about 2 min on 2 cores: every figure is a fresh process, most export first
def test_quick_mode_prints_complete_json(tmp_path: Path) -> None:
    out = tmp_path / "latency.json"
    cmd = [sys.executable, "-m", "bench.infer_latency", "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result == json.loads(out.read_text())
    head = result["headline"]
    for key in (
        "help_s",
        "demo_five_networks_s",
        "per_extra_network_s",
        "one_b4_vs_naive",
        "photos_48_speedup_vs_naive",
        "demo_all_image_s",
        "demo_all_image_peak_rss_mb",
        "demo_all_video_s",
    ):
        assert isinstance(head[key], float) and key in result["meets"]
    assert 0 < head["help_s"] < head["demo_ten_networks_s"]
    assert result["one_b4"]["infer"]["peak_rss_mb"] > 0 and result["photos_48"]["images"] == 4
    assert isinstance(result["machine"]["shared"], bool)
    assert "mff" not in result  # left out by --quick
    assert "sta_demo" in result["demo_all"]["members"]  # a clip member among them
