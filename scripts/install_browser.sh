#!/usr/bin/env bash
# Install Debian's chromium, the headless browser tests/eval/test_report.py opens the
# mmdit-report page in. Idempotent; never fails the build: without root or apt-get it prints
# what to install and exits 0 (the test then skips, saying why).
set -u

if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
	exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
	echo "browser-deps: install chromium (Debian: apt-get install chromium) to run the" \
		"report page test in a real browser; it is skipped without one." >&2
	exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium \
	|| echo "browser-deps: apt-get could not install chromium; the report page test skips." >&2
exit 0
