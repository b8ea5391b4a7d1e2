#!/usr/bin/env bash
# Stages what the trainer image carries into OUT, a root-filesystem fragment:
#   OUT/usr/local/bin/finetune-trainer   the binary, its rpath set to /opt/libtorch/lib
#   OUT/opt/libtorch/lib/                libtorch from the torch wheel the binary was linked against
#   OUT/etc/ssl/certs/ca-certificates.crt the build machine's CA bundle, for https:// downloads
#                                        (the Hub, S3) on a base image that has none
# The Dockerfile's build stage and `make images` (scripts/images.sh) both run it, so the published
# image and the one tested here carry the same files in the same places.
#
# VARIANT picks the libtorch layer, the only difference between the two images:
#   cpu   the shared libraries the binary loads (its ldd closure, ~2.6 GB: libtorch_cuda.so is a
#         link-time dependency, so cudart, cuBLAS, cuFFT, NCCL ... come too, but nothing that is
#         only dlopen'ed on a GPU, such as cuDNN's engines)
#   cuda  every shared library of torch/lib and the nvidia-* wheels
#
# Usage: trainer-image/stage-runtime.sh BINARY OUT [cpu|cuda]
set -euo pipefail
bin=${1:?usage: stage-runtime.sh BINARY OUT [cpu|cuda]}
out=${2:?usage: stage-runtime.sh BINARY OUT [cpu|cuda]}
variant=${3:-cpu}
lib=/opt/libtorch/lib

# The directory torch-sys linked against, from the rpath trainer-image/build.rs gave the binary.
torch_lib=$(readelf -d "$bin" | sed -n 's/.*R\(UN\)\{0,1\}PATH.*\[\(.*\)\]/\2/p' | tr ':' '\n' |
    while read -r d; do [ -e "$d/libtorch_cpu.so" ] && echo "$d" && break; done)
[ -n "$torch_lib" ] || { echo "stage-runtime: $bin has no rpath to a torch/lib with libtorch_cpu.so" >&2; exit 1; }
site=$(cd "$torch_lib/../.." && pwd)

rm -rf "$out"
mkdir -p "$out/usr/local/bin" "$out$lib"
case "$variant" in
cpu)
    # Every library ldd resolves outside the system directories comes from the wheel.
    ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3}' | grep -v -E '^/(usr/)?lib(64)?/' |
        while read -r so; do cp -L "$so" "$out$lib/$(basename "$so")"; done
    ldd "$bin" | grep -q 'not found' && { echo "stage-runtime: unresolved libraries:" >&2; ldd "$bin" | grep 'not found' >&2; exit 1; }
    ;;
cuda)
    for so in "$torch_lib"/*.so* "$site"/nvidia/*/lib/*.so*; do
        [ -f "$so" ] && cp -L "$so" "$out$lib/$(basename "$so")"
    done
    ;;
*) echo "stage-runtime: VARIANT must be cpu or cuda, not $variant" >&2; exit 1 ;;
esac
install -m 0755 "$bin" "$out/usr/local/bin/finetune-trainer"
install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$out/etc/ssl/certs/ca-certificates.crt"
# The build machine's path means nothing in the image; the libraries' own dependencies are found
# through LD_LIBRARY_PATH, which the Dockerfile sets to the same directory.
patchelf --set-rpath "$lib" "$out/usr/local/bin/finetune-trainer"
echo "stage-runtime: $variant: $(find "$out$lib" -type f | wc -l) libraries, $(du -sh "$out" | cut -f1) in $out" >&2
