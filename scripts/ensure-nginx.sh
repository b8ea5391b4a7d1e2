#!/usr/bin/env bash
# Installs Debian's nginx (the token-checking gateway in front of the test Hub mirror, see
# tests/hub/server.py) when it is absent; a no-op when it is there. Needs root and the Debian
# package mirror; waits for another apt run's lock instead of failing. The package's own service
# is not started: the tests run nginx with their own configuration on a free port.
set -euo pipefail
if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "ensure-nginx: nginx is missing; install it as root: apt-get install -y nginx-light" >&2
  exit 1
fi
echo "ensure-nginx: installing nginx (apt-get)" >&2
apt_get() { apt-get -o DPkg::Lock::Timeout=600 "$@"; }
apt_get update -qq >&2
# policy-rc.d 101: the package's postinst must not start a system nginx on port 80.
policy=/usr/sbin/policy-rc.d
had_policy=0; [ -e "$policy" ] && had_policy=1
[ "$had_policy" = 1 ] || { printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; }
DEBIAN_FRONTEND=noninteractive apt_get install -y -qq --no-install-recommends nginx-light >&2 || status=$?
[ "$had_policy" = 1 ] || rm -f "$policy"
exit "${status:-0}"
