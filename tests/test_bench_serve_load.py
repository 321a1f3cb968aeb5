"""The service load benchmark runs end to end (tiny networks) and prints complete JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow  # about a minute on 2 cores, most of it exporting the tiny networks
def test_a_short_run_reports_every_level(tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    cmd = [sys.executable, "-m", "bench.serve_load", "--requests", "6", "--clients", "1", "4", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result == json.loads(out.read_text())
    assert [level["clients"] for level in result["levels"]] == [1, 4]
    for level in result["levels"]:
        assert level["requests"] == 6 and level["requests_per_s"] > 0
        assert 0 < level["p50_ms"] <= level["p95_ms"] and level["mean_batch"] >= 1
    assert isinstance(result["machine"]["shared"], bool)
