#!/usr/bin/env bash
# Build the pinned upstream binaries for the local test cluster
# (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl,
# kubelet and fake-gpu-plugin (the real node), kwok, helm, versitygw: the S3-compatible server of the s3:// tests,
# and kueue: the queueing controller of the gang-admission test)
# from the Go module proxy into a cache outside the repo:
#
#   ${FINETUNE_CACHE:-$HOME/.cache/finetune-operator}/cluster/bin
#
# Pins live in the committed wrapper modules tests/cluster/{k8s,etcd,kwok,helm,versitygw,kueue}
# (go.mod + go.sum). Each binary has a stamp file keyed by its pin, the
# wrapper's go.mod/go.sum hash, the Go version and this script's build flags;
# a binary is rebuilt only when that key changes. Idempotent.
#
# Usage: tests/cluster/build.sh [name...]     (default: all, helm last)
# Env:   FINETUNE_CACHE, GO (go binary), CLUSTER_BUILD_NICE (default 15),
#        CLUSTER_BUILD_P (go build -p, default 2 = GOMAXPROCS), FORCE=1
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${FINETUNE_CACHE:-$HOME/.cache/finetune-operator}/cluster"
BIN="$CACHE/bin"
STAMPS="$BIN/.stamps"

export GOTOOLCHAIN=local
export GOFLAGS="${GOFLAGS:-} -mod=readonly"
export GOMAXPROCS="${GOMAXPROCS:-2}"
export CGO_ENABLED=0
GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
NICE="${CLUSTER_BUILD_NICE:-15}"
PAR="${CLUSTER_BUILD_P:-2}"

# ---- pins (must match the wrapper go.mod files; checked below) ----
K8S_VERSION=v1.36.3
K8S_STAGING_VERSION=v0.36.3
ETCD_VERSION=v3.6.16
KWOK_VERSION=v0.8.0
HELM_VERSION=v3.22.0
VERSITYGW_VERSION=v1.8.0
KUEUE_VERSION=v0.19.2

log() { printf '[build %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf '[build] ERROR: %s\n' "$*" >&2; exit 1; }

[ -x "$GO" ] || die "go not found (set GO=/usr/local/go/bin/go)"
GOVER="$("$GO" env GOVERSION)"

check_pin() { # dir module version
    grep -qE "^\s*(require\s+)?$2 $3(\s|$)" "$HERE/$1/go.mod" ||
        die "$1/go.mod does not require $2 $3 (update the pin in build.sh and go.mod together)"
}
check_pin k8s k8s.io/kubernetes "$K8S_VERSION"
grep -q "k8s.io/api => k8s.io/api $K8S_STAGING_VERSION" "$HERE/k8s/go.mod" ||
    die "k8s/go.mod staging replaces are not at $K8S_STAGING_VERSION"
check_pin etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION"
check_pin kwok sigs.k8s.io/kwok "$KWOK_VERSION"
check_pin helm helm.sh/helm/v3 "$HELM_VERSION"
check_pin versitygw github.com/versity/versitygw "$VERSITYGW_VERSION"
check_pin kueue sigs.k8s.io/kueue "$KUEUE_VERSION"

BUILD_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
k8s_ldflags() {
    local v="${K8S_VERSION#v}" major minor out="-s -w"
    major="${v%%.*}"; minor="${v#*.}"; minor="${minor%%.*}"
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        out+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
        out+=" -X $pkg.gitTreeState=clean -X $pkg.gitCommit=$K8S_VERSION-module-proxy"
        out+=" -X $pkg.buildDate=$BUILD_DATE"
    done
    printf '%s' "$out"
}

# name -> wrapper dir, package, pin, ldflags
spec() {
    case "$1" in
    etcd) echo "etcd|.|$ETCD_VERSION|-s -w" ;;
    kube-apiserver | kube-controller-manager | kube-scheduler | kubectl | kubelet)
        echo "k8s|k8s.io/kubernetes/cmd/$1|$K8S_VERSION|K8S" ;;
    fake-gpu-plugin) echo "k8s|./fakegpu|$K8S_VERSION|-s -w" ;;
    kwok) echo "kwok|sigs.k8s.io/kwok/cmd/kwok|$KWOK_VERSION|-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}" ;;
    helm) echo "helm|helm.sh/helm/v3/cmd/helm|$HELM_VERSION|-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean" ;;
    versitygw) echo "versitygw|github.com/versity/versitygw/cmd/versitygw|$VERSITYGW_VERSION|-s -w" ;;
    kueue) echo "kueue|sigs.k8s.io/kueue/cmd/kueue|$KUEUE_VERSION|-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION" ;;
    *) die "unknown binary: $1" ;;
    esac
}

stamp_key() { # name
    local dir pkg pin flags
    IFS='|' read -r dir pkg pin flags <<<"$(spec "$1")"
    # BUILD_DATE is deliberately not part of the key.
    {
        echo "$1 $pkg $pin $GOVER CGO_ENABLED=$CGO_ENABLED flags=$flags"
        sha256sum "$HERE/$dir/go.mod" "$HERE/$dir/go.sum" | awk '{print $1}'
        [ "$dir" != etcd ] || sha256sum "$HERE/etcd/main.go" | awk '{print $1}'
        [ "$1" != fake-gpu-plugin ] || sha256sum "$HERE/k8s/fakegpu/main.go" | awk '{print $1}'
    } | sha256sum | awk '{print $1}'
}

build_one() {
    local name="$1" dir pkg pin flags key t0 t1
    IFS='|' read -r dir pkg pin flags <<<"$(spec "$name")"
    key="$(stamp_key "$name")"
    if [ "${FORCE:-0}" != 1 ] && [ -x "$BIN/$name" ] && [ "$(cat "$STAMPS/$name" 2>/dev/null)" = "$key" ]; then
        log "$name $pin: up to date ($BIN/$name)"
        return 0
    fi
    [ "$flags" = K8S ] && flags="$(k8s_ldflags)"
    log "$name $pin: downloading modules (tests/cluster/$dir) ..."
    (cd "$HERE/$dir" && nice -n "$NICE" "$GO" mod download) || die "$name: go mod download failed"
    log "$name $pin: building $pkg (nice -n $NICE, -p $PAR, GOMAXPROCS=$GOMAXPROCS) ..."
    t0=$(date +%s)
    # Print a heartbeat so a person can see it is still working.
    ( while sleep 60; do log "  ... $name still building ($(( $(date +%s) - t0 ))s)"; done ) &
    local hb=$!
    local rc=0
    (cd "$HERE/$dir" && nice -n "$NICE" "$GO" build -p "$PAR" -trimpath -ldflags "$flags" \
        -o "$BIN/.$name.tmp" "$pkg") || rc=$?
    kill "$hb" 2>/dev/null; wait "$hb" 2>/dev/null || true
    [ "$rc" = 0 ] || die "$name: go build failed (rc=$rc)"
    mv -f "$BIN/.$name.tmp" "$BIN/$name"
    echo "$key" >"$STAMPS/$name"
    t1=$(date +%s)
    log "$name $pin: built in $((t1 - t0))s ($(du -h "$BIN/$name" | cut -f1))"
}

mkdir -p "$BIN" "$STAMPS"
log "cache: $CACHE ($GOVER, GOMODCACHE=$("$GO" env GOMODCACHE))"
log "disk: $(df -h "$CACHE" | awk 'NR==2{print $4" free on "$6}')"
ALL=(etcd kube-apiserver kubectl kube-controller-manager kube-scheduler kubelet fake-gpu-plugin kwok versitygw kueue helm)
if [ $# -gt 0 ]; then TARGETS=("$@"); else TARGETS=("${ALL[@]}"); fi
T0=$(date +%s)
for n in "${TARGETS[@]}"; do build_one "$n"; done
log "done in $(( $(date +%s) - T0 ))s; $BIN:"
ls -la "$BIN" | grep -v '^total' | grep -v ' \.' || true
log "cache size: $(du -sh "$CACHE" | cut -f1)"
