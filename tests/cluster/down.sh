#!/usr/bin/env bash
# Stop the local test cluster started by up.sh: SIGTERM each component (reverse
# start order), wait up to 15s, then SIGKILL. Idempotent; keeps the state dir
# (logs) for inspection -- up.sh wipes it on the next start.
# Env: FINETUNE_CLUSTER_DIR / FINETUNE_CACHE as for up.sh; CLEAN=1 also removes the state dir.
set -uo pipefail
LOG_TAG=down
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# The real node (node.sh): its pods are deleted through the API while the kubelet still runs, so
# the kubelet stops their containers and tears their network down; whatever is left (the cluster
# already gone, a stuck container) is killed through containerd and unmounted.
stop_proc() { # name signal
    local pid
    pid="$(pid_of "$1")"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || { rm -f "$PIDS/$1.pid"; return 0; }
    log "stopping $1 (pid $pid)"
    kill "-$2" "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$PIDS/$1.pid"
}
stop_node() {
    [ -d "$NODE_STATE" ] || return 0
    if alive kubelet && alive kube-apiserver; then
        kubectl_ delete pods --all-namespaces --field-selector "spec.nodeName=$REAL_NODE_NAME" \
            --grace-period=1 --wait=true --timeout=60s >/dev/null 2>&1 || true
    fi
    stop_proc fake-gpu-plugin TERM
    stop_proc kubelet TERM
    if alive containerd; then
        for task in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s KILL "$task" >/dev/null 2>&1 || true; done
        sleep 1
    fi
    stop_proc containerd TERM
    # runc shims outlive containerd by design; these are the ones of this node's socket.
    pkill -KILL -f "containerd-shim-runc-v2 .*-address $CONTAINERD_SOCK" 2>/dev/null || true
    awk -v p="$NODE_STATE/" 'index($2, p) == 1 {print $2}' /proc/mounts | sort -r |
        while read -r m; do umount -l "$m" 2>/dev/null || true; done
    if [ -f "$NODE_STATE/service-dnat" ]; then
        # shellcheck disable=SC2046
        iptables -t nat -D PREROUTING $(cat "$NODE_STATE/service-dnat") 2>/dev/null || true
        rm -f "$NODE_STATE/service-dnat"
    fi
    ip link del ftnode0 2>/dev/null || true
    # The unpacked images (several GB): up.sh starts each cluster afresh, so they would never be
    # used again. The logs stay.
    rm -rf "$NODE_STATE/containerd"
}
stop_node
# Kueue (kueue.sh), a client of the apiserver: before it.
stop_proc kueue TERM

stopped=0
for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
    c="${COMPONENTS[$i]}"
    pid="$(pid_of "$c")"
    [ -n "$pid" ] || continue
    if ! kill -0 "$pid" 2>/dev/null; then
        rm -f "$PIDS/$c.pid"
        continue
    fi
    # Only signal the process if it is still the binary we started.
    exe="$(readlink "/proc/$pid/exe" 2>/dev/null || true)"
    case "$exe" in
    */"$c" | */"$c"" (deleted)") ;;
    *)
        log "pid $pid for $c is now '$exe', not ours; leaving it alone"
        rm -f "$PIDS/$c.pid"
        continue
        ;;
    esac
    log "stopping $c (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$c (pid $pid) still running after 15s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$PIDS/$c.pid"
    stopped=$((stopped + 1))
done
if [ "$stopped" = 0 ]; then log "nothing running"; else log "stopped $stopped component(s)"; fi
if [ "${CLEAN:-0}" = 1 ]; then
    rm -rf "$STATE"
    log "removed $STATE"
elif [ -d "$STATE" ]; then
    log "logs kept in $LOGS"
fi
exit 0
