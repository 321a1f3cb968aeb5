#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the CPU test suite.
# Extra arguments go to pytest (e.g. `bash run_tests.sh -m slow` for the longer checks).
set -euo pipefail
cd "$(dirname "$0")"
bash setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
