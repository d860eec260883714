#!/usr/bin/env bash
# Installs Debian's chromium for the dashboard's browser test (tests/e2e/test_dashboard.py).
#
# Playwright drives this system browser through its executable path; `playwright install` is
# never used, since CI machines may have no route to Playwright's browser downloads. Without
# root, or on a system without apt-get, this says why and leaves the test to skip itself.
set -euo pipefail

CHROMIUM="${FLEET_TEST_CHROMIUM:-/usr/bin/chromium}"

if [ -x "$CHROMIUM" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_browser: no apt-get here; install chromium yourself (the dashboard test skips without it)" >&2
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install_browser: not root; run 'apt-get install -y chromium' as root (the dashboard test skips without it)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq chromium >/dev/null
echo "install_browser: installed $("$CHROMIUM" --version 2>/dev/null || echo chromium)"
