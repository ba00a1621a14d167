#!/usr/bin/env bash
# Install what the Slurm test starts: Debian's slurm-wlm (slurmctld, slurmd, srun) and munge.
# Idempotent; needs root (or sudo). The test (tests/integration/test_slurm.py) starts its own
# slurmctld and two slurmd with a config of its own; nothing here starts a service.
set -euo pipefail
if command -v slurmctld >/dev/null && command -v munged >/dev/null; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
echo "installing Debian's slurm-wlm and munge for the Slurm test"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 || {
  $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q slurm-wlm munge >/dev/null
}
slurmctld -V
