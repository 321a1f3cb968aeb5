import subprocess
import sys

from tests.conftest import ROOT


def test_ruff_clean():
    # In the checkout itself (the working folder only links it, and ruff does not follow links
    # into folders), without writing ruff's cache there.
    cmd = [sys.executable, "-m", "ruff", "check", "--no-cache", "."]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
