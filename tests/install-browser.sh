#!/usr/bin/env bash
# Installs Debian's Chromium for the real-browser UI test (tests/test_ui_browser.py), which drives
# it through Playwright's Python package with the system browser as its executable (no browser
# download from Playwright). Does nothing when a chromium is already on PATH.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
elif command -v sudo >/dev/null 2>&1; then
  sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
else
  echo "tests/install-browser.sh: chromium is missing; install Debian's 'chromium' package (needs root)" >&2
  exit 1
fi
