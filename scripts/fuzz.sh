#!/usr/bin/env bash
# Runs each fuzz target (tests/fuzz, cargo-fuzz + libFuzzer on nightly) for SECONDS (default 60):
# `make fuzz` runs the long version, `make test` a short smoke run. Inputs that reach new coverage
# go to $FINETUNE_CACHE/fuzz/corpus/TARGET (the repo's seeds stay read-only); a crash, a run over
# 5 s or over 1 GiB RSS is an artifact under $FINETUNE_CACHE/fuzz/artifacts/TARGET and fails the run.
# Prints one line per target (executions, coverage, corpus) and writes them to fuzz-summary.json.
set -euo pipefail
seconds=${1:-60}
cd "$(dirname "$0")/.."
cache=${FINETUNE_CACHE:-$HOME/.cache/finetune-operator}
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz@0.13.2
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal

# Release with debug assertions: integer overflow panics, so unchecked arithmetic is a finding.
# No sanitizer: the product is safe Rust, and ASan does not mix with the prebuilt libtorch.
flags=(--fuzz-dir tests/fuzz -O --debug-assertions -s none)
# The targets link the trainer's libtorch (the venv's torch wheel) without the trainer's rpath.
torch_lib=$(python -c "import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec('torch').origin), 'lib'))")
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cargo +nightly fuzz build "${flags[@]}"

targets=$(cargo +nightly fuzz list --fuzz-dir tests/fuzz)
# Binary seeds (a tiny GGUF, safetensors) are written here rather than kept in the repository.
generated="$cache/fuzz/seeds-generated"
python tests/fuzz/make_seeds.py "$generated"
summary="$cache/fuzz/fuzz-summary.json"
mkdir -p "$cache/fuzz"
echo "[" > "$summary.tmp"
failures=0
sep=""
for t in $targets; do
  corpus="$cache/fuzz/corpus/$t" artifacts="$cache/fuzz/artifacts/$t"
  mkdir -p "$corpus" "$artifacts"
  log="$cache/fuzz/$t.log"
  seeds=()
  for dir in "tests/fuzz/seeds/$t" "$generated/$t"; do [ -d "$dir" ] && seeds+=("$dir"); done
  if ! cargo +nightly fuzz run "${flags[@]}" "$t" "$corpus" "${seeds[@]}" -- \
      -max_total_time="$seconds" -timeout=5 -rss_limit_mb=1024 -print_final_stats=1 \
      -artifact_prefix="$artifacts/" >"$log" 2>&1; then
    failures=$((failures + 1))
    echo "FAILED  $t: $(grep -m1 -E 'panicked at|==[0-9]+== ERROR|ALARM: working on the last Unit|out-of-memory|error while loading' "$log" || tail -1 "$log")"
    grep -m1 -A1 'panicked at' "$log" | tail -1 | sed 's/^/        /'
    echo "        input: $(ls -t "$artifacts" | head -1 | sed "s|^|$artifacts/|") (log: $log)"
  fi
  runs=$(grep -oP 'stat::number_of_executed_units:\s*\K\d+' "$log" | tail -1)
  cov=$(grep -oP '#\d+\s+DONE\s+cov: \K\d+' "$log" | tail -1)
  ft=$(grep -oP '#\d+\s+DONE\s+cov: \d+ ft: \K\d+' "$log" | tail -1)
  corp=$(find "$corpus" -type f | wc -l)
  printf '%-20s %10s execs  cov %6s  features %6s  corpus %5s\n' "$t" "${runs:-?}" "${cov:-?}" "${ft:-?}" "$corp"
  printf '%s{"target": "%s", "seconds": %s, "execs": %s, "cov": %s, "features": %s, "corpus": %s}\n' \
    "$sep" "$t" "$seconds" "${runs:-null}" "${cov:-null}" "${ft:-null}" "$corp" >> "$summary.tmp"
  sep=","
done
echo "]" >> "$summary.tmp"
mv "$summary.tmp" "$summary"
echo "fuzz summary: $summary"
n=$(wc -w <<<"$targets")
# One line in the form the CI summary adds up: each target is a test.
echo "fuzz targets:"
echo "$((n - failures)) passed, $failures failed"
[ "$failures" -eq 0 ]
