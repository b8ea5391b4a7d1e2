#!/usr/bin/env bash
# Keeps the shared cargo target directory from growing without bound. Every checkout path (CI
# clones a fresh one each run) builds its own copy of each workspace test binary and library,
# and cargo never deletes the old ones. This keeps the two newest of each (by modification time)
# and drops incremental state untouched for a day. Anything removed that is still wanted is
# rebuilt by cargo, so pruning costs at most build time, never correctness.
set -euo pipefail
target=${CARGO_TARGET_DIR:?CARGO_TARGET_DIR is not set}
keep=2
deps=$target/debug/deps
[ -d "$deps" ] || exit 0

# Workspace artefacts only: test executables (no extension) and our own libraries. Registry
# crates build once per feature set and are shared by every checkout.
stems() {
  find "$deps" -maxdepth 1 -type f \( \( -executable ! -name '*.*' \) -o -name 'libfinetune_*' \) \
    -printf '%f\n' | sed -E 's/-[0-9a-f]{16}(\.[a-z]+)?$/ \1/' | sort -u
}

freed=0
while read -r stem ext; do
  mapfile -t old < <(ls -t "$deps/$stem"-????????????????"$ext" 2>/dev/null | tail -n +$((keep + 1)))
  for f in "${old[@]}"; do
    freed=$((freed + $(stat -c %s "$f")))
    rm -f "$f" "${f%"$ext"}.d"
  done
done < <(stems)
find "$target/debug/incremental" -mindepth 1 -maxdepth 1 -type d -mtime +0 -exec rm -rf {} + 2>/dev/null || true
echo "prune-target: removed $((freed / 1048576)) MiB of superseded test binaries and libraries"
