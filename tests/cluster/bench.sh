#!/usr/bin/env bash
# Runs one operator benchmark on a fresh control plane: down → up with 50 kwok GPU nodes → CRDs
# applied and Established → `cargo bench` → down, even when the bench fails. Used by
# `make bench-operator` once per scenario, so the cluster sequence is written once.
#
# Usage: tests/cluster/bench.sh BENCH OUT_JSON RATE
#   BENCH      cargo bench target in finetune-operator (operator_scale, operator_churn)
#   OUT_JSON   where the bench writes its JSON
#   RATE       creates per second (0: all at once)
# Env: FINETUNE_OPERATOR_BIN (the operator binary), FINETUNE_CACHE, FINETUNE_CLUSTER_DIR.
set -uo pipefail
bench=$1 out=$2 rate=$3
here=$(cd "$(dirname "$0")" && pwd)
cache=${FINETUNE_CACHE:-$HOME/.cache/finetune-operator}
kubectl=$cache/cluster/bin/kubectl
kubeconfig=${FINETUNE_CLUSTER_DIR:-$cache/cluster/run}/kubeconfig
operator=${FINETUNE_OPERATOR_BIN:?FINETUNE_OPERATOR_BIN names the operator binary}

"$here/down.sh" >/dev/null 2>&1 || true
FINETUNE_CLUSTER_NODES=50 "$here/up.sh" || exit 1
"$operator" crd | "$kubectl" --kubeconfig "$kubeconfig" apply -f - >/dev/null &&
  "$kubectl" --kubeconfig "$kubeconfig" wait --for=condition=Established \
    crd/finetunejobs.finetune.dev crd/adapters.finetune.dev --timeout=60s >/dev/null &&
  KUBECONFIG=$kubeconfig BENCH_RATE=$rate BENCH_OUT=$out \
    cargo bench -p finetune-operator --bench "$bench"
status=$?
"$here/down.sh"
exit $status
