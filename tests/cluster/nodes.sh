#!/usr/bin/env bash
# Create (or update) N fake GPU nodes managed by kwok: kwok-gpu-0 .. kwok-gpu-(N-1).
# Each has annotation kwok.x-k8s.io/node=fake (what up.sh's kwok manages),
# label type=kwok and capacity nvidia.com/gpu: 8. Idempotent (kubectl apply).
#
# Usage: tests/cluster/nodes.sh [N]      (default 2)
# Env:   GPUS_PER_NODE (8), NODE_CPU (64), NODE_MEMORY (512Gi), NODE_PODS (110),
#        GPU_PRODUCT (NVIDIA-A100-SXM4-80GB: not the H100 examples/full-finetune.yaml
#        selects, so that the control-plane test running that example as written lands on
#        its executor node, labelled H100, and not on these)
set -euo pipefail
LOG_TAG=nodes
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

N="${1:-2}"
GPUS="${GPUS_PER_NODE:-8}"
CPU="${NODE_CPU:-64}"
MEM="${NODE_MEMORY:-512Gi}"
PODS="${NODE_PODS:-110}"
PRODUCT="${GPU_PRODUCT:-NVIDIA-A100-SXM4-80GB}"

manifest() {
    local i name
    for i in $(seq 0 $((N - 1))); do
        name="kwok-gpu-$i"
        cat <<YAML
---
apiVersion: v1
kind: Node
metadata:
  name: $name
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    type: kwok
    kubernetes.io/hostname: $name
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    node.kubernetes.io/instance-type: kwok-gpu-$GPUS
    nvidia.com/gpu.present: "true"
    nvidia.com/gpu.count: "$GPUS"
    nvidia.com/gpu.product: $PRODUCT
spec: {}
status:
  capacity:
    cpu: "$CPU"
    memory: $MEM
    pods: "$PODS"
    ephemeral-storage: 1Ti
    nvidia.com/gpu: "$GPUS"
  allocatable:
    cpu: "$CPU"
    memory: $MEM
    pods: "$PODS"
    ephemeral-storage: 1Ti
    nvidia.com/gpu: "$GPUS"
YAML
    done
}

if [ "${1:-}" = --print ]; then N="${2:-2}"; manifest; exit 0; fi
log "applying $N fake GPU node(s) ($GPUS x nvidia.com/gpu each)"
manifest | kubectl_ apply -f -
