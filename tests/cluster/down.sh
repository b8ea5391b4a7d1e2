#!/usr/bin/env bash
# Stop the local test cluster started by up.sh: SIGTERM each component (reverse
# start order), wait up to 15s, then SIGKILL. Idempotent; keeps the state dir
# (logs) for inspection -- up.sh wipes it on the next start.
# Env: FINETUNE_CLUSTER_DIR / FINETUNE_CACHE as for up.sh; CLEAN=1 also removes the state dir.
set -uo pipefail
LOG_TAG=down
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

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
