#!/usr/bin/env bash
# Installs Debian packages for the scripts/ensure-*.sh checks: as root, from the Debian package
# mirror, waiting for another apt run's lock instead of failing, without recommends, and without
# letting a package's postinst start its service (policy-rc.d answers 101): the tests run their
# own servers (nginx, containerd) with their own configuration.
# Usage: scripts/apt-install.sh WHO PACKAGE...   (WHO names the caller in messages)
set -euo pipefail
who=$1
shift
if [ "$(id -u)" -ne 0 ]; then
  echo "$who: missing $*; install as root: apt-get install -y $*" >&2
  exit 1
fi
echo "$who: installing $* (apt-get)" >&2
apt_get() { apt-get -o DPkg::Lock::Timeout=600 "$@"; }
apt_get update -qq >&2
policy=/usr/sbin/policy-rc.d
had_policy=0; [ -e "$policy" ] && had_policy=1
[ "$had_policy" = 1 ] || { printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; }
DEBIAN_FRONTEND=noninteractive apt_get install -y -qq --no-install-recommends "$@" >&2 || status=$?
[ "$had_policy" = 1 ] || rm -f "$policy"
exit "${status:-0}"
