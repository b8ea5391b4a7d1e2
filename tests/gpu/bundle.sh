#!/usr/bin/env bash
# `make gpu-bundle`: everything `make gpu-check` needs on a GPU machine that has torch and nothing
# else we can count on (no network, no cargo, no transformers): the release trainer binary and the
# Python wheels of the transformers+PEFT reference, in the ignored folder .gpu-bundle/, which the
# device tool carries beside the working tree (64 MiB in all, so sizes are checked here).
#
#   .gpu-bundle/finetune-trainer.xz   the release binary, stripped and xz-compressed (28 MB -> ~6 MB)
#   .gpu-bundle/BINARY.txt            its sha256, size, mtime and the checkout's commit
#   .gpu-bundle/wheels/               transformers, peft, accelerate ... and their dependencies
#   .gpu-bundle/smollm2/              SmolLM2-135M's config.json and tokenizer files (from the GGUF)
set -euo pipefail
cd "$(dirname "$0")/../.."
CACHE=${FINETUNE_CACHE:-$HOME/.cache/finetune-operator}
VENV=$CACHE/venv
PY=$VENV/bin/python
TRAINER=${FINETUNE_TRAINER_BIN:-${CARGO_TARGET_DIR:-$CACHE/target}/release/finetune-trainer}
BUNDLE=.gpu-bundle
LIMIT_MIB=${GPU_BUNDLE_LIMIT_MIB:-60}

[ -x "$TRAINER" ] || { echo "gpu-bundle: $TRAINER not found: build it with 'make build'" >&2; exit 1; }
[ -x "$PY" ] || { echo "gpu-bundle: $PY not found: run 'make setup'" >&2; exit 1; }
rm -rf "$BUNDLE"
mkdir -p "$BUNDLE/wheels" "$BUNDLE/smollm2"

# The binary: stripping drops only symbols; xz keeps it inside the transfer limit.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp "$TRAINER" "$tmp/finetune-trainer"
strip "$tmp/finetune-trainer"
xz -T0 -6 -c "$tmp/finetune-trainer" >"$BUNDLE/finetune-trainer.xz"
{
  echo "source: $TRAINER"
  echo "sha256 (stripped): $(sha256sum "$tmp/finetune-trainer" | cut -d' ' -f1)"
  echo "built: $(date -u -r "$TRAINER" +%Y-%m-%dT%H:%M:%SZ)"
  echo "checkout commit when bundled: $(git rev-parse HEAD)$(git diff --quiet HEAD -- trainer-image crds || echo ' (with uncommitted changes)')"
  echo "torch the binary was linked against: $("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)')"
} >"$BUNDLE/BINARY.txt"

# Wheels: the reference's packages and their dependencies, at the venv's versions (the ones the
# parity tests use), minus torch and what torch brings (the GPU machine has torch). Left out, by
# size: numpy (16 MB per Python version; the GPU image ships numpy 2.x) and hf-xet (4 MB; only
# Hub downloads use it, and the GPU machine has no network). gpu_check.py says so if either is
# missing there.
"$PY" - "$BUNDLE/wheels" <<'PY'
import importlib.metadata as md, subprocess, sys
from packaging.requirements import Requirement

def closure(roots, stop=frozenset()):
    seen, todo = {}, list(roots)
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen or key in stop:
            continue
        dist = md.distribution(name)
        seen[key] = dist.version
        for r in dist.requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen

skip = set(closure(["torch"])) | {"numpy", "hf-xet"}
pins = closure(["transformers", "peft", "accelerate"], stop=frozenset(skip))
dest = sys.argv[1]
pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", dest]
plats = []
for p in ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
          "manylinux2014_x86_64", "manylinux_2_12_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]:
    plats += ["--platform", p]
for name, version in sorted(pins.items()):
    # Python 3.10-3.12 covers the torch 2.11 wheels' interpreters; a pure or abi3 wheel is the same
    # file for all three and is saved once.
    got = False
    for pyver in ["3.10", "3.11", "3.12"]:
        r = subprocess.run(pip + ["--python-version", pyver, "--implementation", "cp", *plats,
                                  f"{name}=={version}"], capture_output=True, text=True)
        got |= r.returncode == 0
    if not got:
        sys.exit(f"gpu-bundle: no wheel of {name}=={version} for Python 3.10-3.12 on manylinux x86_64")
    print(f"  {name}=={version}")
PY

# SmolLM2-135M's shape and tokenizer from the GGUF the example uses (its 94 MB of weights do not fit
# the transfer; gpu_check.py trains the example on random weights of the same shape). The
# pre-tokenizer is SmolLM2's own, as in tests/reference/conftest.py.
GGUF=$(scripts/smollm2-path.sh)
"$PY" tests/gpu/smollm2_files.py "$GGUF" "$BUNDLE/smollm2"

bundle=$(du -sk "$BUNDLE" | cut -f1)
tracked=$(git ls-files -z | xargs -0 du -ck 2>/dev/null | tail -1 | cut -f1)
untracked=$(git ls-files -z --others --exclude-standard | xargs -0 -r du -ck 2>/dev/null | tail -1 | cut -f1)
untracked=${untracked:-0}
total=$(( bundle + tracked + untracked ))
echo "gpu-bundle: $(ls "$BUNDLE/wheels" | wc -l) wheels"
du -sh "$BUNDLE"/* | sed 's/^/  /'
printf 'gpu-bundle: bundle %.1f MiB + tracked files %.1f MiB + untracked %.1f MiB = %.1f MiB (limit %s MiB)\n' \
  "$(echo "$bundle/1024" | bc -l)" "$(echo "$tracked/1024" | bc -l)" "$(echo "$untracked/1024" | bc -l)" \
  "$(echo "$total/1024" | bc -l)" "$LIMIT_MIB"
if [ "$total" -gt $(( LIMIT_MIB * 1024 )) ]; then
  echo "gpu-bundle: over the limit: the device tool carries 64 MiB in all" >&2
  exit 1
fi
