#!/usr/bin/env bash
# Start Kueue (built by build.sh from its Go module) against the running local control plane, as
# a host process the way up.sh runs the other components: its CRDs, a webhook server on
# 127.0.0.1 with a self-signed certificate (the apiserver calls URL webhooks directly, so no
# Service or DNS is needed), and the plain-pod integration that admits our gangs. down.sh stops it.
#
# Kueue manages only namespaces labelled finetune.dev/kueue=enabled, and only pods there that
# carry its queue label reach its pod webhooks: the other tests' pods never depend on it (the
# full-finetune example names a queue, which their namespaces do not have). Prints
# `export KUEUE_READY=1` when ready.
set -euo pipefail
LOG_TAG=kueue
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[ -x "$BIN/kueue" ] || die "$BIN/kueue missing: run tests/cluster/build.sh kueue"
[ -f "$KUBECONFIG_FILE" ] || die "no cluster at $STATE: run tests/cluster/up.sh first"
KUEUE_VERSION=$(sed -n 's/^require sigs.k8s.io\/kueue \(v[0-9.]*\)$/\1/p' "$CLUSTER_SRC/kueue/go.mod")
MODULE="$(go env GOMODCACHE)/sigs.k8s.io/kueue@$KUEUE_VERSION/config/components"
[ -d "$MODULE" ] || die "Kueue's manifests are not in the module cache ($MODULE): run build.sh kueue"
DIR="$STATE/kueue"
mkdir -p "$DIR/certs" "$PIDS" "$LOGS"

# A CA and a serving certificate for 127.0.0.1, once per cluster.
if [ ! -f "$DIR/certs/tls.crt" ]; then
    (
        cd "$DIR/certs"
        openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=kueue-test-ca \
            -keyout ca.key -out ca.crt 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout tls.key -out tls.csr 2>/dev/null
        printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >ext
        openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
            -extfile ext -out tls.crt 2>/dev/null
    )
fi
# Without its internal certificate management Kueue's main always watches this fixed path (even
# with metrics off) and exits when it is missing.
install -d /etc/kueue/metrics/certs
install -m 600 "$DIR/certs/tls.crt" "$DIR/certs/tls.key" /etc/kueue/metrics/certs/

log "CRDs from $MODULE/crd/bases"
kubectl_ apply --server-side --force-conflicts -f "$MODULE/crd/bases" >/dev/null
kubectl_ wait --for=condition=Established crd --all --timeout=60s >/dev/null
kubectl_ create namespace kueue-system --dry-run=client -o yaml | kubectl_ apply -f - >/dev/null

# free_port runs in a subshell here, so the first pick is passed on for the second to avoid.
WEBHOOK_PORT=$(free_port)
HEALTH_PORT=$(USED_PORTS="$WEBHOOK_PORT" free_port)
cat >"$DIR/config.yaml" <<EOF
apiVersion: config.kueue.x-k8s.io/v1beta2
kind: Configuration
namespace: kueue-system
leaderElection: {leaderElect: false}
health: {healthProbeBindAddress: "127.0.0.1:$HEALTH_PORT"}
metrics: {bindAddress: "0"}
webhook: {host: 127.0.0.1, port: $WEBHOOK_PORT, certDir: $DIR/certs}
internalCertManagement: {enable: false}
manageJobsWithoutQueueName: false
managedJobsNamespaceSelector:
  matchLabels: {finetune.dev/kueue: enabled}
integrations: {frameworks: ["pod"]}
waitForPodsReady: {timeout: 10m}
featureGates: {VisibilityOnDemand: false}
EOF

# The webhook configurations Kueue ships, pointed at our server, for pods and Kueue's own kinds.
python3 - "$MODULE/webhook/manifests.yaml" "$DIR/webhooks.yaml" "$WEBHOOK_PORT" "$DIR/certs/ca.crt" <<'EOF'
import base64, sys, yaml
source, target, port, ca = sys.argv[1:]
bundle = base64.b64encode(open(ca, "rb").read()).decode()
kept = {"pod", "workload", "clusterqueue", "resourceflavor", "cohort"}
docs = []
for doc in yaml.safe_load_all(open(source)):
    if not doc:
        continue
    hooks = []
    for hook in doc["webhooks"]:
        kind = hook["name"].split(".")[0][1:]
        if kind not in kept:
            continue
        path = hook["clientConfig"]["service"]["path"]
        hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}", "caBundle": bundle}
        if kind == "pod":
            hook["objectSelector"] = {"matchExpressions": [
                {"key": "kueue.x-k8s.io/queue-name", "operator": "Exists"}]}
            hook["namespaceSelector"] = {"matchLabels": {"finetune.dev/kueue": "enabled"}}
        hooks.append(hook)
    doc["metadata"]["name"] = "kueue-" + doc["metadata"]["name"]
    doc["webhooks"] = hooks
    docs.append(doc)
yaml.safe_dump_all(docs, open(target, "w"))
EOF

if alive kueue; then kill "$(pid_of kueue)" 2>/dev/null || true; sleep 1; fi
log "starting kueue $KUEUE_VERSION (webhook 127.0.0.1:$WEBHOOK_PORT)"
"$BIN/kueue" --config="$DIR/config.yaml" --kubeconfig="$KUBECONFIG_FILE" --zap-log-level=2 \
    >"$LOGS/kueue.log" 2>&1 &
echo $! >"$PIDS/kueue.pid"
WAIT_PROC=kueue wait_until 120 "kueue ready" "$LOGS/kueue.log" \
    curl -fsS "http://127.0.0.1:$HEALTH_PORT/readyz"
# Registered only once the server answers, so no admission waits on a server still starting.
kubectl_ apply -f "$DIR/webhooks.yaml" >/dev/null
echo "export KUEUE_READY=1"
