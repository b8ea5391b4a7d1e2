#!/usr/bin/env bash
# `make demo`, the README's main job: the SmolLM2 example fine-tuned through the operator.
#  1. every example manifest is validated exactly as the apiserver would (schema + CEL rules);
#  2. a real control plane starts on 127.0.0.1 (tests/cluster);
#     and a real node joins it: the kubelet with containerd and runc (tests/cluster/node.sh), the
#     trainer image of `make images` imported (not pulled), and a device plugin advertising one
#     GPU with nothing behind it, so the example schedules as written and the trainer, finding
#     no CUDA, runs on this machine's CPU;
#  3. the CRDs are installed and the operator starts (on this machine; it reaches the trainer's
#     /status over the node's pod bridge);
#  4. the model PVC (a hostPath volume holding the SmolLM2 GGUF) and the example datasets
#     ConfigMap are created;
#  5. examples/sft-lora-smollm2.yaml is applied and followed until it finishes;
#  6. the result: status, the adapter's files, and the same question answered before and after
#     (and by llama.cpp from the job's GGUF export).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bin=${CARGO_TARGET_DIR:-$HOME/.cache/finetune-operator/target}/release
cluster=${FINETUNE_CACHE:-$HOME/.cache/finetune-operator}/cluster
export KUBECONFIG=$cluster/run/kubeconfig
kubectl() { "$cluster/bin/kubectl" "$@"; }
job=smollm2-kubectl-sft
step() { printf '\n== %s\n' "$*"; }

step "1/6  Validating the example manifests (finetune-operator check)"
"$bin/finetune-operator" check examples/*.yaml

step "2/6  Starting the control plane (etcd, kube-apiserver, controller-manager, scheduler) and a real node"
tests/cluster/down.sh >/dev/null 2>&1 || true
FINETUNE_CLUSTER_NODES=0 tests/cluster/up.sh
tests/cluster/node.sh
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    tests/cluster/down.sh >/dev/null 2>&1 || true
}
trap cleanup EXIT

step "3/6  Installing the CRDs; starting the operator"
"$bin/finetune-operator" crd | kubectl apply -f -
kubectl wait --for=condition=Established crd/finetunejobs.finetune.dev crd/adapters.finetune.dev --timeout=60s
logs=$cluster/run/logs
work=$cluster/run/volumes
model=$(scripts/smollm2-path.sh)
"$bin/finetune-operator" run --http-addr 127.0.0.1:0 --progress-interval 2 >"$logs/operator.log" 2>&1 &
pids+=($!)
echo "operator log: $logs/operator.log   kubelet log: $logs/kubelet.log"

step "4/6  The model volume and the example datasets"
# hostPath volumes on the node: the model, read by the trainer's UID 65532, and the job's storage,
# written by it. A copy, not a link: the container sees only what is inside the volume.
rm -rf "$work" && mkdir -p "$work/pvc/default/models/smollm2" "$work/pvc/default/$job-storage"
cp "$model" "$work/pvc/default/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
chown -R 65532:65532 "$work/pvc/default/$job-storage"
chmod -R a+rX "$work/pvc/default/models"
for claim in models $job-storage; do
    kubectl apply -f - <<YAML
apiVersion: v1
kind: PersistentVolume
metadata: {name: demo-$claim}
spec:
  capacity: {storage: 100Gi}
  accessModes: [ReadWriteOnce]
  hostPath: {path: $work/pvc/default/$claim}
  storageClassName: ""
  claimRef: {namespace: default, name: $claim}
YAML
done
kubectl apply -f - <<'YAML'
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: models}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: ""
  resources: {requests: {storage: 1Gi}}
YAML
kubectl apply -k examples/data

step "5/6  kubectl apply -f examples/sft-lora-smollm2.yaml, followed until it finishes"
kubectl apply -f examples/sft-lora-smollm2.yaml
# The training takes a few minutes on an idle 2-core machine; a loaded one can take many times
# that (measured: 30 min to 93 % of the steps with a test suite running beside it).
deadline=$((SECONDS + ${DEMO_TIMEOUT:-3600}))
last=""
while :; do
    line=$(kubectl get ftj "$job" --no-headers 2>/dev/null || true)
    # A line when something but the AGE column changed.
    if [ "${line% *}" != "$last" ]; then
        printf '%s  %s\n' "$(date +%H:%M:%S)" "$line"
        last=${line% *}
    fi
    phase=$(kubectl get ftj "$job" -o jsonpath='{.status.phase}' 2>/dev/null || true)
    case "$phase" in Succeeded | Failed) break ;; esac
    if [ "$SECONDS" -gt "$deadline" ]; then
        echo "timed out; trainer output: kubectl logs $job-attempt-0 (KUBECONFIG=$KUBECONFIG)" >&2
        exit 1
    fi
    sleep 3
done

step "6/6  Result"
kubectl get ftj "$job" -o wide
kubectl get ftj "$job" -o jsonpath='{.status.conditions[?(@.status=="True")].message}{"\n"}'
kubectl get ftj "$job" -o jsonpath='{.status.metrics}{"\n"}'
if [ "$phase" != Succeeded ]; then
    echo "the job failed; its pods' logs: $cluster/run/node/pod-logs" >&2
    exit 1
fi
adapter=$(find "$work/pvc/default/$job-storage" -name adapter_config.json -path '*output*' | head -1 | xargs dirname)
echo "adapter (PEFT layout): $adapter"
ls -l "$adapter"
# The first held-out request of the example eval set, asked the way the adapter was trained.
eval_turn() {
    python3 -c "import json; print(json.loads(open('examples/data/chat-eval.jsonl').readline())['messages'][$1]['content'])"
}
system=$(eval_turn 0)
question=$(eval_turn 1)
answer=$(eval_turn 2)
echo
echo "system:     $system"
echo "user:       $question"
echo "expected:   $answer"
printf 'base model: '
"$bin/finetune-trainer" generate --model "$model" --chat --system "$system" --max-new-tokens 32 --prompt "$question"
printf 'fine-tuned: '
"$bin/finetune-trainer" generate --model "$model" --adapter "$adapter" --chat --system "$system" --max-new-tokens 32 --prompt "$question"
# The job's GGUF export (output.gguf: model-f16.gguf or model-q8_0.gguf), answered by llama.cpp.
for gguf in "$adapter"/model-*.gguf; do
    [ -f "$gguf" ] || continue
    printf 'llama.cpp:  '
    "${PYTHON:-${FINETUNE_CACHE:-$HOME/.cache/finetune-operator}/venv/bin/python}" scripts/llama-cpp-answer.py \
        "$gguf" "$system" "$question" 32
done
