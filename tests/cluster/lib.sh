# Shared settings for tests/cluster/*.sh (sourced, not executed).
# shellcheck shell=bash

CLUSTER_SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$CLUSTER_SRC/../.." && pwd)"
CACHE="${FINETUNE_CACHE:-$HOME/.cache/finetune-operator}/cluster"
BIN="${FINETUNE_CLUSTER_BIN:-$CACHE/bin}"
STATE="${FINETUNE_CLUSTER_DIR:-$CACHE/run}"
KUBECONFIG_FILE="$STATE/kubeconfig"
PIDS="$STATE/pids"
LOGS="$STATE/logs"

# Start order; down.sh stops in reverse.
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)
# The real node (node.sh), when started: stopped first by down.sh, its containers before it.
NODE_COMPONENTS=(containerd kubelet fake-gpu-plugin)
REAL_NODE_NAME="${FINETUNE_REAL_NODE_NAME:-real-node-0}"
NODE_STATE="$STATE/node"
CONTAINERD_SOCK="$NODE_STATE/containerd.sock"
IMAGES="${FINETUNE_CACHE:-$HOME/.cache/finetune-operator}/images"
ctr_() { ctr --address "$CONTAINERD_SOCK" --namespace k8s.io "$@"; }

log() { printf '[%s %s] %s\n' "${LOG_TAG:-cluster}" "$(date +%H:%M:%S)" "$*"; }
die() { printf '[%s] ERROR: %s\n' "${LOG_TAG:-cluster}" "$*" >&2; exit 1; }

kubectl_() { "$BIN/kubectl" --kubeconfig "$KUBECONFIG_FILE" "$@"; }

pid_of() { cat "$PIDS/$1.pid" 2>/dev/null || true; }
alive() { local p; p="$(pid_of "$1")"; [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }

# A TCP port on 127.0.0.1 that nothing listens on, random from 20000 up to the kernel's ephemeral
# range: a port inside that range can be taken by an outgoing connection between the pick and the
# bind (seen: kube-scheduler "address already in use").
free_port() {
    local p i top
    top=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
    [ "$top" -gt 21000 ] || top=32768
    for i in $(seq 1 200); do
        p=$((20000 + RANDOM % (top - 20000)))
        case " ${USED_PORTS:-} " in *" $p "*) continue ;; esac
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            USED_PORTS="${USED_PORTS:-} $p"
            echo "$p"
            return 0
        fi
    done
    die "no free port found"
}

# wait_until <timeout_s> <what> <logfile|-> <command...>
# Polls the command once a second, printing progress
# a line every 10s. Fails (printing the log tail) on timeout, or at once if
# WAIT_PROC names a component whose process has exited.
wait_until() {
    local timeout="$1" what="$2" logf="$3" t0 now
    shift 3
    t0=$(date +%s)
    while true; do
        if "$@" >/dev/null 2>&1; then
            now=$(($(date +%s) - t0))
            log "$what: ok after ${now}s"
            return 0
        fi
        now=$(($(date +%s) - t0))
        if [ -n "${WAIT_PROC:-}" ] && ! alive "$WAIT_PROC"; then
            log "$what: $WAIT_PROC exited (see $logf)"
            if [ "$logf" != - ]; then
                echo "---- last 25 lines of $logf ----" >&2
                tail -n 25 "$logf" >&2 || true
                echo "---- end of $logf ----" >&2
            fi
            return 1
        fi
        if [ "$now" -ge "$timeout" ]; then
            log "$what: TIMEOUT after ${timeout}s"
            if [ "$logf" != - ]; then
                echo "---- last 25 lines of $logf ----" >&2
                tail -n 25 "$logf" >&2 || true
                echo "---- end of $logf ----" >&2
            fi
            return 1
        fi
        if [ $((now % 10)) -eq 0 ] && [ "$now" -gt 0 ]; then
            log "  ... waiting for $what (${now}s/${timeout}s$([ "$logf" = - ] || echo ", log: $logf"))"
        fi
        sleep 1
    done
}
