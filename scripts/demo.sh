#!/usr/bin/env bash
# One command: set up .venv, then start NATS + the Weaver + the 2-rank MNIST job with a live view.
# Extra arguments go to `torchloom demo` (e.g. --max-steps 3000).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/torchloom demo "$@"
