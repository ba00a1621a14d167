#!/usr/bin/env bash
# Install the browser the dashboard tests drive: Debian's Chromium (Playwright's own download
# cannot run here). Idempotent; needs root (or sudo) on a machine without /usr/bin/chromium.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
echo "installing Debian's chromium for the dashboard tests"
$SUDO apt-get install -y -q chromium >/dev/null 2>&1 || {
  $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q chromium >/dev/null
}
/usr/bin/chromium --version
