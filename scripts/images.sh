#!/usr/bin/env bash
# `make images`: the trainer and operator images, built from their published Dockerfiles without a
# registry. Base layer: a Debian bookworm root filesystem made by mmdebstrap from Debian's packages
# (the same distribution as the Dockerfiles' debian:bookworm-slim default). Build stage: replaced by
# the binaries built on this machine (`make build`), staged by trainer-image/stage-runtime.sh into
# the layout the Dockerfile's own build stage produces. The images are tagged with the chart's
# default names, so a node that has them imported runs the chart and the operator's pods unchanged.
#
# Everything lives in $FINETUNE_CACHE/images: podman's storage (overlay), the base root filesystem
# (rebuilt only when its package list changes) and the saved OCI archives that
# tests/cluster/node.sh imports into containerd. Prints each image's size (also in sizes.json).
#
# Env: FINETUNE_CACHE, CARGO_TARGET_DIR (the release binaries), TRAINER_LIBTORCH (cpu | cuda).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${FINETUNE_CACHE:-$HOME/.cache/finetune-operator}
dir="$cache/images"
release=${CARGO_TARGET_DIR:-$cache/target}/release
variant=${TRAINER_LIBTORCH:-cpu}
version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$root/charts/finetune-operator/Chart.yaml")
TRAINER_IMAGE=ghcr.io/finetune-operator/trainer:$version
OPERATOR_IMAGE=ghcr.io/finetune-operator/operator:$version
PAUSE_VERSION=3.10
PAUSE_IMAGE=localhost/finetune-pause:$PAUSE_VERSION

log() { printf '[images %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[images] ERROR: %s\n' "$*" >&2; exit 1; }
for tool in podman mmdebstrap patchelf gcc go; do
    command -v "$tool" >/dev/null || die "$tool missing: apt-get install podman mmdebstrap patchelf gcc"
done
for b in finetune-trainer finetune-operator; do
    [ -x "$release/$b" ] || die "$release/$b missing: run make build first"
done
mkdir -p "$dir"
podman_() { podman --root "$dir/podman/root" --runroot "$dir/podman/run" --storage-driver overlay "$@"; }

# ---- base: Debian bookworm, only what the binaries load from the system (glibc, libstdc++,
# libgcc); the CA bundle comes with the trainer's artifacts, as on debian:bookworm-slim.
BASE_PACKAGES=libstdc++6,libgcc-s1
base_key=$(printf '%s\n' bookworm essential "$BASE_PACKAGES" | sha256sum | cut -c1-12)
BASE_IMAGE=localhost/finetune-base:$base_key
if ! podman_ image exists "$BASE_IMAGE"; then
    log "base: mmdebstrap bookworm ($BASE_PACKAGES)"
    rm -f "$dir"/base-*.tar
    mmdebstrap --quiet --variant=essential --include="$BASE_PACKAGES" \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
        bookworm "$dir/base-$base_key.tar"
    podman_ import --quiet "$dir/base-$base_key.tar" "$BASE_IMAGE" >/dev/null
    rm -f "$dir/base-$base_key.tar"
fi

# ---- artifacts: /out as each Dockerfile's build stage would leave it.
stage_trainer() { "$root/trainer-image/stage-runtime.sh" "$release/finetune-trainer" "$1" "$variant"; }
stage_operator() { install -D -m 0755 "$release/finetune-operator" "$1/usr/local/bin/finetune-operator"; }

# ---- build each published Dockerfile with the local base and artifacts; save it for containerd.
# An image is rebuilt only when its key changes: the binary, the staging script, the Dockerfile,
# the base and the libtorch variant. The artifacts image is dropped once the image is built (it
# is as large as the image).
build() { # name dockerfile tag stage-function
    local name=$1 file=$2 tag=$3 stage=$4 key art archive="$dir/$1.oci.tar"
    key=$(cat "$release/$name" "$root/trainer-image/stage-runtime.sh" "$root/$file" |
        { cat; echo "$BASE_IMAGE $variant"; } | sha256sum | cut -c1-12)
    if [ "$(cat "$archive.key" 2>/dev/null)" = "$key" ] && [ -f "$archive" ] && podman_ image exists "$tag"; then
        log "$name: up to date ($tag, key $key)"
        return 0
    fi
    art=localhost/$name-artifacts:$key
    log "$name: staging $release/$name"
    rm -rf "$dir/stage"
    "$stage" "$dir/stage/out"
    tar -C "$dir/stage" -c out | podman_ import --quiet - "$art" >/dev/null
    rm -rf "$dir/stage"
    log "$name: podman build -f $file (RUNTIME_BASE=$BASE_IMAGE, ARTIFACTS=$art)"
    podman_ build --quiet --isolation chroot --pull=never --timestamp 0 \
        --build-arg RUNTIME_BASE="$BASE_IMAGE" --build-arg ARTIFACTS="$art" \
        -f "$root/$file" -t "$tag" "$root/$(dirname "$file")" >/dev/null
    podman_ rmi --force "$art" >/dev/null
    log "$name: saving $archive"
    rm -f "$archive" "$archive.key"
    podman_ save --quiet --format oci-archive -o "$archive" "$tag"
    echo "$key" >"$archive.key"
}
build finetune-trainer trainer-image/Dockerfile "$TRAINER_IMAGE" stage_trainer
build finetune-operator operator/Dockerfile "$OPERATOR_IMAGE" stage_operator

# ---- the pod sandbox image of the real node (tests/cluster/node.sh): registry.k8s.io/pause cannot
# be pulled here, so it is compiled from the pause.c of the pinned k8s.io/kubernetes module.
pause_src=$(cd "$root/tests/cluster/k8s" && GOTOOLCHAIN=local GOFLAGS=-mod=readonly go mod download -json k8s.io/kubernetes |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')/build/pause/linux/pause.c
[ -f "$pause_src" ] || die "$pause_src missing (go mod download k8s.io/kubernetes in tests/cluster/k8s)"
pause_key=$(sha256sum "$pause_src" | cut -c1-12)
if [ "$(cat "$dir/pause.oci.tar.id" 2>/dev/null)" != "$pause_key" ]; then
    log "pause: gcc -static $pause_src"
    rm -rf "$dir/pause-ctx" && mkdir -p "$dir/pause-ctx"
    gcc -Os -Wall -static -DVERSION="$PAUSE_VERSION" -o "$dir/pause-ctx/pause" "$pause_src"
    printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' >"$dir/pause-ctx/Containerfile"
    podman_ build --quiet --pull=never --timestamp 0 -t "$PAUSE_IMAGE" "$dir/pause-ctx" >/dev/null
    rm -f "$dir/pause.oci.tar"
    podman_ save --quiet --format oci-archive -o "$dir/pause.oci.tar" "$PAUSE_IMAGE"
    echo "$pause_key" >"$dir/pause.oci.tar.id"
    rm -rf "$dir/pause-ctx"
fi
podman_ image prune --force >/dev/null 2>&1 || true

# Sizes: unpacked (what a node stores) and the OCI archive (compressed, what a registry stores).
printf '%-45s %10s %12s  %s\n' IMAGE UNPACKED COMPRESSED ARCHIVE
sizes="{"
for pair in "$TRAINER_IMAGE finetune-trainer" "$OPERATOR_IMAGE finetune-operator"; do
    read -r image name <<<"$pair"
    size=$(podman_ image inspect --format '{{.Size}}' "$image")
    packed=$(stat -c %s "$dir/$name.oci.tar")
    printf '%-45s %7d MB %9d MB  %s\n' "$image" $((size / 1000000)) $((packed / 1000000)) "$dir/$name.oci.tar"
    sizes+="\"$image\": {\"unpacked\": $size, \"archive\": $packed}, "
done
echo "${sizes%, }}" >"$dir/sizes.json"
