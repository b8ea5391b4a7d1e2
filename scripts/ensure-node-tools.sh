#!/usr/bin/env bash
# Installs what `make images` and the real node (tests/cluster/node.sh) need from Debian's
# packages when any is absent; a no-op when all are there. No service is started: node.sh runs
# containerd with its own configuration and socket.
#   podman, mmdebstrap, patchelf           the images (scripts/images.sh)
#   containerd, runc, containernetworking-plugins (CNI bridge), iptables   the node
set -euo pipefail
need=()
for pair in podman:podman mmdebstrap:mmdebstrap patchelf:patchelf containerd:containerd runc:runc \
    /usr/lib/cni/bridge:containernetworking-plugins ip:iproute2 iptables:iptables; do
    tool=${pair%%:*} pkg=${pair#*:}
    if [ "${tool#/}" != "$tool" ]; then [ -x "$tool" ] || need+=("$pkg"); else command -v "$tool" >/dev/null || need+=("$pkg"); fi
done
[ ${#need[@]} -eq 0 ] && exit 0
exec "$(dirname "$0")/apt-install.sh" ensure-node-tools "${need[@]}"
