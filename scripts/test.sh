#!/usr/bin/env bash
# One command: set up .venv, then lint, type-check, check import contracts, build the docs
# (warnings are errors), and run every test
# (unit tests, and integration tests against a real nats-server — one, or a cluster of three on
# network-namespace hosts — real torch/torchrun processes, a real Slurm (Debian's slurm-wlm) and,
# for the dashboard, Debian's Chromium driven by Playwright).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/browser.sh
bash scripts/slurm.sh
. .venv/bin/activate
# one command per line: under `set -e` a failing command stops the script (the left side
# of `a && b` would not)
echo "== ruff check";    ruff check src tests examples bench
echo "== ruff format";   ruff format --check src tests examples bench
echo "== mypy";          mypy
echo "== import-linter"; lint-imports
echo "== docs";          sphinx-build -W --keep-going -q -b html docs "$(mktemp -d)"
echo "== pytest";        python -m pytest tests "$@"
