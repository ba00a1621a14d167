#!/usr/bin/env bash
# One command: set up .venv, then lint, type-check, check import contracts, and run every test
# (unit tests, and integration tests against a real nats-server and real torch/torchrun processes).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
echo "== ruff";          ruff check src tests examples bench && ruff format --check src tests examples bench
echo "== mypy";          mypy
echo "== import-linter"; lint-imports
echo "== pytest";        python -m pytest tests "$@"
