#!/usr/bin/env bash
# Installs Debian's chromium (for the report test, which renders report.html headless) when
# /usr/bin/chromium is absent; a no-op when it is there, so `make test` can call it every time.
# Needs root and the Debian package mirror; waits for another apt run's lock instead of failing.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "ensure-chromium: /usr/bin/chromium is missing; install it as root: apt-get install -y chromium" >&2
  exit 1
fi
echo "ensure-chromium: installing chromium (apt-get)" >&2
apt_get() { apt-get -o DPkg::Lock::Timeout=600 "$@"; }
apt_get update -qq >&2
# A font too: without recommends nothing else brings one, and the report's text would not show.
DEBIAN_FRONTEND=noninteractive apt_get install -y -qq --no-install-recommends chromium fonts-dejavu-core >&2
test -x /usr/bin/chromium
