#!/usr/bin/env bash
# Start a local control plane on 127.0.0.1 for integration tests:
#   etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok
# plus N fake GPU nodes managed by kwok (no kubelet, no containers).
#
# Binaries come from tests/cluster/build.sh (run it first). State (certs,
# etcd data, logs, pids, kubeconfigs) lives in
#   ${FINETUNE_CLUSTER_DIR:-${FINETUNE_CACHE:-$HOME/.cache/finetune-operator}/cluster/run}
# Each `up.sh` after a `down.sh` starts a fresh cluster (new etcd data, new
# certs, new random free ports). If the cluster is already up, it just prints
# the connection info.
#
# Env: FINETUNE_CLUSTER_NODES (default 2) fake GPU nodes to create,
#      CLUSTER_TIMEOUT (default 180) seconds to wait for the apiserver.
set -euo pipefail
LOG_TAG=up
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

NODES="${FINETUNE_CLUSTER_NODES:-2}"
API_TIMEOUT="${CLUSTER_TIMEOUT:-180}"
SERVICE_CIDR=10.96.0.0/16
SERVICE_IP=10.96.0.1
POD_CIDR=10.244.0.1/16

for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok; do
    [ -x "$BIN/$b" ] || die "$BIN/$b missing: run tests/cluster/build.sh first"
done
command -v openssl >/dev/null || die "openssl not found (apt-get install openssl)"
command -v curl >/dev/null || die "curl not found (apt-get install curl)"

print_info() {
    echo
    echo "cluster is up (state: $STATE)"
    echo "  kubeconfig: $KUBECONFIG_FILE"
    echo "  apiserver:  $(cat "$STATE/apiserver-url")"
    echo "  logs:       $LOGS/<component>.log"
    echo "  stop with:  tests/cluster/down.sh"
    echo
    echo "export KUBECONFIG=$KUBECONFIG_FILE"
}

# Already running?
running=0
for c in "${COMPONENTS[@]}"; do alive "$c" && running=$((running + 1)); done
if [ "$running" = "${#COMPONENTS[@]}" ] && [ -f "$KUBECONFIG_FILE" ] &&
    kubectl_ get --raw /readyz >/dev/null 2>&1; then
    log "already running"
    print_info
    exit 0
fi
if [ "$running" -gt 0 ]; then
    log "found a partial cluster ($running/${#COMPONENTS[@]} components alive); stopping it first"
    "$CLUSTER_SRC/down.sh"
fi

T0=$(date +%s)
rm -rf "$STATE"
mkdir -p "$STATE" "$PIDS" "$LOGS" "$STATE/pki"
PKI="$STATE/pki"

# ---------------------------------------------------------------- ports
ETCD_PORT=$(free_port)
ETCD_PEER_PORT=$(free_port)
API_PORT=$(free_port)
KCM_PORT=$(free_port)
SCHED_PORT=$(free_port)
KWOK_PORT=$(free_port)
API_URL="https://127.0.0.1:$API_PORT"
echo "$API_URL" >"$STATE/apiserver-url"
cat >"$STATE/ports" <<EOF
etcd=$ETCD_PORT etcd-peer=$ETCD_PEER_PORT kube-apiserver=$API_PORT
kube-controller-manager=$KCM_PORT kube-scheduler=$SCHED_PORT kwok=$KWOK_PORT
EOF
log "ports: $(tr '\n' ' ' <"$STATE/ports")"

# ---------------------------------------------------------------- certs
log "generating certificates and tokens in $PKI"
(
    cd "$PKI"
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -keyout ca.key -out ca.crt \
        -subj "/CN=finetune-test-ca" -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
    cat >apiserver.ext <<EOF
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:$SERVICE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
EOF
    openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr \
        -subj "/CN=kube-apiserver" 2>/dev/null
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
        -days 30 -extfile apiserver.ext -out apiserver.crt 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
) || die "openssl failed"

rand_token() { openssl rand -hex 16; }
ADMIN_TOKEN=$(rand_token)
KCM_TOKEN=$(rand_token)
SCHED_TOKEN=$(rand_token)
KWOK_TOKEN=$(rand_token)
NODE_TOKEN=$(rand_token)
# token,user,uid,"group1,group2"
cat >"$PKI/tokens.csv" <<EOF
$ADMIN_TOKEN,admin,admin,"system:masters"
$KCM_TOKEN,system:kube-controller-manager,kcm,
$SCHED_TOKEN,system:kube-scheduler,scheduler,
$KWOK_TOKEN,kwok,kwok,"system:masters"
$NODE_TOKEN,system:node:$REAL_NODE_NAME,$REAL_NODE_NAME,"system:nodes"
EOF
chmod 600 "$PKI"/*.key "$PKI/tokens.csv"

write_kubeconfig() { # file user token
    local ca
    ca=$(base64 -w0 <"$PKI/ca.crt")
    cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: finetune-test
  cluster:
    server: $API_URL
    certificate-authority-data: $ca
users:
- name: $2
  user:
    token: $3
contexts:
- name: finetune-test
  context:
    cluster: finetune-test
    user: $2
    namespace: default
current-context: finetune-test
EOF
    chmod 600 "$1"
}
write_kubeconfig "$KUBECONFIG_FILE" admin "$ADMIN_TOKEN"
write_kubeconfig "$STATE/kcm.kubeconfig" system:kube-controller-manager "$KCM_TOKEN"
write_kubeconfig "$STATE/scheduler.kubeconfig" system:kube-scheduler "$SCHED_TOKEN"
write_kubeconfig "$STATE/kwok.kubeconfig" kwok "$KWOK_TOKEN"
# The real node's kubelet (node.sh), authorised by the Node authorizer as system:node:NAME.
write_kubeconfig "$STATE/kubelet.kubeconfig" "system:node:$REAL_NODE_NAME" "$NODE_TOKEN"

start() { # name args...
    local name="$1"
    shift
    log "starting $name (log: $LOGS/$name.log)"
    setsid "$BIN/$name" "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
    echo $! >"$PIDS/$name.pid"
}
fail() {
    echo >&2
    echo "cluster start FAILED: $*" >&2
    echo "state and logs kept in $STATE; run tests/cluster/down.sh to clean up" >&2
    exit 1
}

# ---------------------------------------------------------------- etcd
start etcd \
    --name finetune-test --data-dir "$STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "finetune-test=http://127.0.0.1:$ETCD_PEER_PORT" \
    --unsafe-no-fsync --log-level warn
WAIT_PROC=etcd wait_until 30 "etcd /health" "$LOGS/etcd.log" \
    curl -fsS "http://127.0.0.1:$ETCD_PORT/health" || fail "etcd did not become healthy (log: $LOGS/etcd.log)"

# ---------------------------------------------------------------- apiserver
start kube-apiserver \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$API_PORT" \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --cert-dir="$PKI" --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
    --client-ca-file="$PKI/ca.crt" \
    --token-auth-file="$PKI/tokens.csv" \
    --authorization-mode=Node,RBAC \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$PKI/sa.pub" \
    --service-account-signing-key-file="$PKI/sa.key" \
    --allow-privileged=true \
    --endpoint-reconciler-type=none \
    --kubelet-preferred-address-types=InternalIP,Hostname \
    --v=1
WAIT_PROC=kube-apiserver wait_until "$API_TIMEOUT" "kube-apiserver /readyz" "$LOGS/kube-apiserver.log" \
    curl -fsS --cacert "$PKI/ca.crt" -H "Authorization: Bearer $ADMIN_TOKEN" "$API_URL/readyz" ||
    fail "kube-apiserver not ready (log: $LOGS/kube-apiserver.log)"

# ---------------------------------------------------------------- controller-manager
start kube-controller-manager \
    --kubeconfig="$STATE/kcm.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$KCM_PORT" \
    --controllers='*,-nodeipam' \
    --leader-elect=false \
    --use-service-account-credentials=true \
    --service-account-private-key-file="$PKI/sa.key" \
    --root-ca-file="$PKI/ca.crt" \
    --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --v=1

# ---------------------------------------------------------------- scheduler
start kube-scheduler \
    --kubeconfig="$STATE/scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$SCHED_PORT" \
    --leader-elect=false \
    --v=1

WAIT_PROC=kube-controller-manager wait_until 60 "kube-controller-manager /healthz" "$LOGS/kube-controller-manager.log" \
    curl -fsSk "https://127.0.0.1:$KCM_PORT/healthz" || fail "kube-controller-manager not healthy (log: $LOGS/kube-controller-manager.log)"
WAIT_PROC=kube-scheduler wait_until 60 "kube-scheduler /healthz" "$LOGS/kube-scheduler.log" \
    curl -fsSk "https://127.0.0.1:$SCHED_PORT/healthz" || fail "kube-scheduler not healthy (log: $LOGS/kube-scheduler.log)"

# ---------------------------------------------------------------- kwok
STAGES=$(ls "$CLUSTER_SRC"/kwok/stages/*.yaml | paste -sd, -)
# An empty HOME-relative kwok config dir, so a developer's ~/.kwok/kwok.yaml is not picked up.
mkdir -p "$STATE/kwok-home"
HOME="$STATE/kwok-home" start kwok \
    --kubeconfig="$STATE/kwok.kubeconfig" \
    --config="$STAGES" \
    --manage-all-nodes=false \
    --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
    --server-address="127.0.0.1:$KWOK_PORT" \
    --node-ip=127.0.0.1 \
    --cidr="$POD_CIDR"
WAIT_PROC=kwok wait_until 60 "kwok /healthz" "$LOGS/kwok.log" \
    curl -fsS "http://127.0.0.1:$KWOK_PORT/healthz" || fail "kwok not healthy (log: $LOGS/kwok.log)"

# ---------------------------------------------------------------- nodes
wait_until 60 "default service account" - kubectl_ -n default get serviceaccount default ||
    fail "no default ServiceAccount (kube-controller-manager's serviceaccount controller; log: $LOGS/kube-controller-manager.log)"
if [ "$NODES" -gt 0 ]; then
    "$CLUSTER_SRC/nodes.sh" "$NODES" || fail "creating fake nodes failed"
    # One list call per poll (`kubectl wait` checks nodes one by one and would need a timeout
    # that grows with the node count).
    all_kwok_nodes_ready() {
        local ready
        ready=$(kubectl_ get nodes -l type=kwok \
            -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' |
            grep -c '^True$')
        [ "$ready" -ge "$NODES" ]
    }
    wait_until $((60 + NODES)) "$NODES kwok node(s) Ready" "$LOGS/kwok.log" all_kwok_nodes_ready ||
        fail "kwok nodes not Ready (log: $LOGS/kwok.log)"
fi

log "up in $(($(date +%s) - T0))s"
print_info
