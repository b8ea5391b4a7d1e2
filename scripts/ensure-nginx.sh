#!/usr/bin/env bash
# Installs Debian's nginx (the token-checking gateway in front of the test Hub mirror, see
# tests/hub/server.py) when it is absent; a no-op when it is there. The package's own service is
# not started: the tests run nginx with their own configuration on a free port.
set -euo pipefail
if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
  exit 0
fi
exec "$(dirname "$0")/apt-install.sh" ensure-nginx nginx-light
