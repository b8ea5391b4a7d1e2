#!/usr/bin/env bash
# Smoke test against the cluster started by tests/cluster/up.sh:
#   - the repo's generated CRDs (crds/*.yaml) are accepted and become Established
#     (anything the apiserver says about them -- errors or warnings -- is printed verbatim)
#   - every examples/*.yaml applies; examples/data (kustomize ConfigMap) applies
#   - CEL rules reject bad FinetuneJobs with the expected messages
#   - `kubectl get ftj` prints the printer columns
#   - kwok GPU nodes become Ready and a pod requesting nvidia.com/gpu: 1 is scheduled
# Exits non-zero on any failed expectation; the last line is "N passed, N failed".
# Leaves the CRDs/examples in place (they are cheap); deletes its probe pod.
# SMOKE_CRD_DIR=DIR applies the CRDs from DIR instead of crds/ (e.g. a patched copy).
set -uo pipefail
LOG_TAG=smoke
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PASS=0
FAIL=0
FAILED=()
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
NS=default

ok() { PASS=$((PASS + 1)); echo "PASS: $*"; }
ko() { FAIL=$((FAIL + 1)); FAILED+=("$*"); echo "FAIL: $*"; }
section() { echo; echo "=== $* ==="; }
# Indent captured output so it is easy to tell apart from PASS/FAIL lines.
show() { sed 's/^/    | /' "$@"; }

# run_ok <description> <command...>: must exit 0; prints stdout+stderr.
run_ok() {
    local d="$1" rc=0
    shift
    "$@" >"$TMP/out" 2>&1 || rc=$?
    show "$TMP/out"
    if [ "$rc" = 0 ]; then ok "$d"; else ko "$d (exit $rc)"; fi
}

# run_rejected <description> <expected substring> <command...>: must fail and
# its output must contain the substring.
run_rejected() {
    local d="$1" want="$2"
    shift 2
    if "$@" >"$TMP/out" 2>&1; then
        show "$TMP/out"
        ko "$d: was accepted, expected a rejection containing: $want"
    elif grep -qF -- "$want" "$TMP/out"; then
        show "$TMP/out"
        ok "$d"
    else
        show "$TMP/out"
        ko "$d: rejected, but the message does not contain: $want"
    fi
}

[ -x "$BIN/kubectl" ] || die "$BIN/kubectl missing: run tests/cluster/build.sh"
[ -f "$KUBECONFIG_FILE" ] || die "$KUBECONFIG_FILE missing: run tests/cluster/up.sh"
cd "$REPO_ROOT"

section "cluster"
if ! kubectl_ get --raw /readyz >/dev/null 2>&1; then
    ko "apiserver /readyz via $KUBECONFIG_FILE (is the cluster up? tests/cluster/up.sh)"
    echo
    echo "$PASS passed, $FAIL failed"
    exit 1
fi
ok "apiserver /readyz"
kubectl_ version >"$TMP/ver" 2>&1
show "$TMP/ver"
if grep -q '^Server Version: v1.36' "$TMP/ver" && grep -q '^Client Version: v1.36' "$TMP/ver"; then
    ok "kubectl and apiserver report v1.36.x"
else
    ko "kubectl version does not report v1.36.x for client and server"
fi

CRD_DIR="${SMOKE_CRD_DIR:-crds}"
section "CRDs: kubectl apply -f $CRD_DIR/ (apiserver output verbatim)"
run_ok "CRDs accepted by the apiserver" kubectl_ apply -f "$CRD_DIR/"
if grep -qi 'warning' "$TMP/out"; then
    echo "    NOTE: the apiserver returned warnings for the CRDs (see above)"
fi
CRDS=(finetunejobs.finetune.dev adapters.finetune.dev)
for c in "${CRDS[@]}"; do
    if ! kubectl_ get "crd/$c" >/dev/null 2>&1; then
        ko "CRD $c does not exist (see the apply output above)"
        continue
    fi
    run_ok "CRD $c Established" kubectl_ wait --for=condition=Established "crd/$c" --timeout=60s
    # NonStructuralSchema / other problems show up as conditions, not apply errors.
    kubectl_ get "crd/$c" -o jsonpath='{range .status.conditions[*]}{.type}={.status} {.reason}: {.message}{"\n"}{end}' >"$TMP/cond" 2>&1
    show "$TMP/cond"
    if grep -qE '^NonStructuralSchema=True' "$TMP/cond"; then
        ko "CRD $c has NonStructuralSchema"
    else
        ok "CRD $c: no NonStructuralSchema condition"
    fi
done

section "examples: kubectl apply -f examples/"
for f in examples/*.yaml; do
    run_ok "apply $f" kubectl_ -n "$NS" apply -f "$f"
done
run_ok "apply -k examples/data (dataset ConfigMap)" kubectl_ -n "$NS" apply -k examples/data
run_ok "kubectl apply -f examples/ (all at once)" kubectl_ -n "$NS" apply -f examples/

section "CEL: rejected manifests (server-side dry run)"
SRC=examples/sft-lora-smollm2.yaml
grep -qE '^    epochs: ' "$SRC" || ko "$SRC no longer has spec.hyperparameters.epochs at the expected indent"
sed -e 's/^  name: smollm2-kubectl-sft$/  name: smoke-epochs-and-maxsteps/' \
    -e 's/^\(    epochs: .*\)$/\1\n    maxSteps: 10/' "$SRC" >"$TMP/both.yaml"
grep -q 'maxSteps: 10' "$TMP/both.yaml" || ko "could not build the epochs+maxSteps manifest"
run_rejected "epochs + maxSteps rejected by CEL" \
    "set exactly one of hyperparameters.epochs or hyperparameters.maxSteps" \
    kubectl_ -n "$NS" create --dry-run=server -f "$TMP/both.yaml"

sed -e 's/^  name: smollm2-kubectl-sft$/  name: smoke-rank-zero/' \
    -e 's/^      rank: 16$/      rank: 0/' "$SRC" >"$TMP/rank0.yaml"
grep -q 'rank: 0' "$TMP/rank0.yaml" || ko "could not build the rank: 0 manifest"
run_rejected "lora rank 0 rejected naming spec.adapter.lora.rank" \
    "spec.adapter.lora.rank" \
    kubectl_ -n "$NS" create --dry-run=server -f "$TMP/rank0.yaml"

LONG=a123456789012345678901234567890123456789012345678 # 49 characters
sed -e "s/^  name: smollm2-kubectl-sft\$/  name: $LONG/" "$SRC" >"$TMP/long.yaml"
run_rejected "FinetuneJob name over 48 characters rejected" \
    "metadata.name must be at most 48 characters" \
    kubectl_ -n "$NS" create --dry-run=server -f "$TMP/long.yaml"

# Transition rule: spec.hyperparameters is immutable once status.startTime is set.
sed -e 's/^  name: smollm2-kubectl-sft$/  name: smoke-immutable/' "$SRC" >"$TMP/imm.yaml"
kubectl_ -n "$NS" delete ftj smoke-immutable --ignore-not-found >/dev/null 2>&1
if kubectl_ -n "$NS" create -f "$TMP/imm.yaml" >"$TMP/out" 2>&1 &&
    kubectl_ -n "$NS" patch ftj smoke-immutable --subresource=status --type=merge \
        -p '{"status":{"startTime":"2026-01-01T00:00:00Z"}}' >>"$TMP/out" 2>&1; then
    show "$TMP/out"
    run_rejected "spec.hyperparameters immutable after status.startTime (transition rule)" \
        "spec.hyperparameters cannot change once the job has started" \
        kubectl_ -n "$NS" patch ftj smoke-immutable --type=merge -p '{"spec":{"hyperparameters":{"epochs":3}}}'
    run_ok "other spec fields still editable after start" \
        kubectl_ -n "$NS" patch ftj smoke-immutable --type=merge -p '{"spec":{"runPolicy":{"backoffLimit":4}}}'
else
    show "$TMP/out"
    ko "could not create smoke-immutable and set status.startTime"
fi
kubectl_ -n "$NS" delete ftj smoke-immutable --ignore-not-found >/dev/null 2>&1

section "printer columns: kubectl get ftj"
# Expected columns come from the CRD as served: priority 0 in the default
# view, all of them with -o wide.
check_columns() { # resource crd
    local res="$1" crd="$2" want_default="NAME" want_wide="NAME" name prio header missing view rows
    while IFS=: read -r name prio; do
        [ -n "$name" ] || continue
        name="$(echo "$name" | tr '[:lower:]' '[:upper:]')"
        want_wide+=" $name"
        [ "${prio:-0}" = 0 ] && want_default+=" $name"
    done < <(kubectl_ get "crd/$crd" -o jsonpath='{range .spec.versions[?(@.served==true)].additionalPrinterColumns[*]}{.name}:{.priority}{"\n"}{end}' 2>/dev/null)
    if [ "$want_wide" = NAME ]; then
        ko "$crd: no additionalPrinterColumns found (CRD missing?)"
        return
    fi
    for view in default wide; do
        local args=() want="$want_default"
        [ "$view" = wide ] && args=(-o wide) && want="$want_wide"
        if ! kubectl_ -n "$NS" get "$res" "${args[@]}" >"$TMP/cols" 2>&1; then
            show "$TMP/cols"
            ko "kubectl get $res${args[*]:+ ${args[*]}} failed"
            continue
        fi
        show "$TMP/cols"
        header="$(head -1 "$TMP/cols")"
        missing=""
        for col in $want; do
            echo " $header " | grep -qE "[[:space:]]$col([[:space:]]|\$)" || missing+=" $col"
        done
        rows=$(($(wc -l <"$TMP/cols") - 1))
        if [ -z "$missing" ] && [ "$rows" -ge 1 ]; then
            ok "kubectl get $res${args[*]:+ ${args[*]}}: columns $want ($rows row(s))"
        else
            ko "kubectl get $res${args[*]:+ ${args[*]}}: missing columns:${missing:- none}; rows: $rows"
        fi
    done
}
check_columns ftj finetunejobs.finetune.dev
check_columns adp adapters.finetune.dev

section "garbage collection (kube-controller-manager)"
sed -e 's/^  name: smollm2-kubectl-sft$/  name: smoke-gc/' "$SRC" >"$TMP/gc.yaml"
kubectl_ -n "$NS" delete ftj smoke-gc --ignore-not-found >/dev/null 2>&1
uid=""
if kubectl_ -n "$NS" create -f "$TMP/gc.yaml" >/dev/null 2>&1; then
    uid="$(kubectl_ -n "$NS" get ftj smoke-gc -o jsonpath='{.metadata.uid}')"
fi
if [ -n "$uid" ]; then
    cat >"$TMP/owned.yaml" <<EOF
apiVersion: v1
kind: ConfigMap
metadata:
  name: smoke-gc-owned
  ownerReferences:
  - apiVersion: finetune.dev/v1alpha1
    kind: FinetuneJob
    name: smoke-gc
    uid: $uid
    controller: true
    blockOwnerDeletion: true
data: {}
EOF
    run_ok "create ConfigMap owned by FinetuneJob smoke-gc" kubectl_ -n "$NS" apply -f "$TMP/owned.yaml"
    kubectl_ -n "$NS" delete ftj smoke-gc >/dev/null 2>&1
    run_ok "garbage collector deletes the owned ConfigMap" \
        kubectl_ -n "$NS" wait --for=delete configmap/smoke-gc-owned --timeout=60s
else
    ko "could not create FinetuneJob smoke-gc"
fi

section "kwok GPU nodes and scheduling"
run_ok "create 2 fake GPU nodes" "$CLUSTER_SRC/nodes.sh" 2
run_ok "kwok nodes Ready" kubectl_ wait --for=condition=Ready node/kwok-gpu-0 node/kwok-gpu-1 --timeout=90s
kubectl_ get nodes -l type=kwok -o custom-columns='NAME:.metadata.name,READY:.status.conditions[?(@.type=="Ready")].status,GPU:.status.allocatable.nvidia\.com/gpu,CPU:.status.allocatable.cpu,MEM:.status.allocatable.memory' >"$TMP/nodes" 2>&1
show "$TMP/nodes"
if [ "$(awk 'NR>1 && $3=="8"' "$TMP/nodes" | wc -l)" -ge 2 ]; then
    ok "nodes advertise nvidia.com/gpu: 8"
else
    ko "nodes do not advertise nvidia.com/gpu: 8"
fi

kubectl_ -n "$NS" delete pod smoke-gpu --ignore-not-found --wait=false >/dev/null 2>&1
cat >"$TMP/pod.yaml" <<'EOF'
apiVersion: v1
kind: Pod
metadata:
  name: smoke-gpu
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: registry.invalid/none:latest
    resources:
      limits:
        nvidia.com/gpu: 1
EOF
run_ok "create pod requesting nvidia.com/gpu: 1" kubectl_ -n "$NS" apply -f "$TMP/pod.yaml"
run_ok "pod scheduled" kubectl_ -n "$NS" wait --for=condition=PodScheduled pod/smoke-gpu --timeout=60s
node="$(kubectl_ -n "$NS" get pod smoke-gpu -o jsonpath='{.spec.nodeName}' 2>/dev/null)"
case "$node" in
kwok-gpu-*) ok "pod bound to a kwok GPU node ($node)" ;;
*)
    kubectl_ -n "$NS" describe pod smoke-gpu 2>&1 | tail -15 | show
    ko "pod not bound to a kwok GPU node (nodeName='$node')"
    ;;
esac
run_ok "kwok marks the pod Ready" kubectl_ -n "$NS" wait --for=condition=Ready pod/smoke-gpu --timeout=60s
run_ok "delete pod (kwok finalizes it)" kubectl_ -n "$NS" delete pod smoke-gpu --timeout=60s

echo
if [ "$FAIL" -gt 0 ]; then
    echo "failed checks:"
    printf '  - %s\n' "${FAILED[@]}"
fi
echo "$PASS passed, $FAIL failed"
[ "$FAIL" = 0 ]
