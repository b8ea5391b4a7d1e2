#!/usr/bin/env bash
# Installs Debian's chromium (for the report test, which renders report.html headless) when
# /usr/bin/chromium is absent; a no-op when it is there, so `make test` can call it every time.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
# A font too: without recommends nothing else brings one, and the report's text would not show.
"$(dirname "$0")/apt-install.sh" ensure-chromium chromium fonts-dejavu-core
test -x /usr/bin/chromium
