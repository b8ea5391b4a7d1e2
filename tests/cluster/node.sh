#!/usr/bin/env bash
# Join a real node to the running test cluster (up.sh first): Debian's containerd with runc and
# the CNI bridge plugin, the kubelet built from the pinned k8s.io/kubernetes module, and the fake
# GPU device plugin (tests/cluster/k8s/fakegpu) advertising nvidia.com/gpu with nothing behind it.
# The images of `make images` (trainer, operator, pause) are imported into containerd: nothing is
# pulled. Pods get an address on a bridge of their own (10.89.0.0/24) that only this machine
# routes: no masquerade, no route off the machine; the `kubernetes` Service reaches the apiserver.
#
# What this sandbox needs, and why (each is a setting, not a patch):
#   containerd: restrict_oom_score_adj (no CAP_SYS_RESOURCE to lower a score), no rlimits raised;
#   kubelet:    cgroupfs driver on the cgroup v1 hierarchy (failCgroupV1: false), no QoS or
#               node-allocatable cgroups (cgroupsPerQOS: false), swap tolerated, disk-pressure
#               eviction thresholds at 1 % (the disk is shared with everything else here);
#               anonymous, AlwaysAllow access to its API (kubectl logs), bound to the bridge's
#               host-only address.
# The device-plugin socket directory is fixed by the kubelet at /var/lib/kubelet/device-plugins,
# so one real node runs on this machine at a time.
#
# Usage: tests/cluster/node.sh          Env: FINETUNE_REAL_NODE_NAME (real-node-0), REAL_NODE_GPUS (1),
#        REAL_NODE_TAINT (none; e.g. finetune.dev/real-node=true:NoSchedule)
set -euo pipefail
LOG_TAG=node
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

GPUS="${REAL_NODE_GPUS:-1}"
N="$NODE_STATE"
POD_SUBNET=10.89.0.0/24
BRIDGE=ftnode0
# up.sh's Service range and the `kubernetes` Service's ClusterIP in it.
SERVICE_CIDR=10.96.0.0/16
SERVICE_IP=10.96.0.1
# The node's address: the bridge's own (the kubelet refuses a loopback node IP). The apiserver
# reaches the kubelet there for logs; the operator reaches trainer pods through the same bridge.
NODE_IP=10.89.0.1

for b in containerd runc containerd-shim-runc-v2 ctr; do
    command -v "$b" >/dev/null || die "$b missing: apt-get install containerd runc"
done
[ -x /usr/lib/cni/bridge ] || die "/usr/lib/cni/bridge missing: apt-get install containernetworking-plugins"
for b in kubelet fake-gpu-plugin; do
    [ -x "$BIN/$b" ] || die "$BIN/$b missing: run tests/cluster/build.sh $b first"
done
for a in finetune-trainer finetune-operator pause; do
    [ -f "$IMAGES/$a.oci.tar" ] || die "$IMAGES/$a.oci.tar missing: run make images first"
done
[ -f "$STATE/kubelet.kubeconfig" ] || die "no $STATE/kubelet.kubeconfig: start the cluster with up.sh first"
if [ -e /var/lib/kubelet/device-plugins/kubelet.sock ] && pgrep -x kubelet >/dev/null; then
    die "a kubelet already runs on this machine (pid $(pgrep -x kubelet | head -1)): one real node at a time"
fi

start() { # name args...
    local name=$1
    shift
    log "starting $name (log: $LOGS/$name.log)"
    setsid "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
    echo $! >"$PIDS/$name.pid"
}
T0=$(date +%s)
mkdir -p "$N"/{containerd,cni/net.d,cni/ipam,kubelet,pod-logs} /var/lib/kubelet/device-plugins

# ---------------------------------------------------------------- containerd
cat >"$N/containerd.toml" <<TOML
version = 2
root = "$N/containerd/root"
state = "$N/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]
[grpc]
  address = "$CONTAINERD_SOCK"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/finetune-pause:3.10"
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$N/cni/net.d"
TOML
start containerd containerd --config "$N/containerd.toml"
WAIT_PROC=containerd wait_until 30 "containerd" "$LOGS/containerd.log" ctr_ version ||
    die "containerd did not start (log: $LOGS/containerd.log)"

for a in pause finetune-trainer finetune-operator; do
    log "importing $IMAGES/$a.oci.tar"
    ctr_ images import --snapshotter overlayfs --no-unpack=false "$IMAGES/$a.oci.tar" >/dev/null ||
        die "ctr images import $a failed"
done

# ---------------------------------------------------------------- pod network
# The bridge exists before the first pod, so the kubelet can listen on its address; the CNI
# bridge plugin adopts it by name.
ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
ip addr replace "$NODE_IP/24" dev "$BRIDGE"
ip link set "$BRIDGE" up
cat >"$N/cni/net.d/10-finetune.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "finetune-node",
  "plugins": [
    {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "dataDir": "$N/cni/ipam",
              "ranges": [[{"subnet": "$POD_SUBNET"}]],
              "routes": [{"dst": "$POD_SUBNET"}, {"dst": "$SERVICE_CIDR"}]}},
    {"type": "loopback"}
  ]
}
JSON

# The `kubernetes` Service for pods on this node (an operator pod's in-cluster config): what
# kube-proxy would do for this one Service, a DNAT of its ClusterIP to the apiserver on
# 127.0.0.1 for packets that arrive over the bridge (route_localnet lets them reach loopback).
# The apiserver's certificate names the ClusterIP. down.sh deletes the rule.
api_port=$(sed 's|.*:||' "$STATE/apiserver-url")
sysctl -qw "net.ipv4.conf.$BRIDGE.route_localnet=1"
printf '%s\n' "-i $BRIDGE -d $SERVICE_IP/32 -p tcp --dport 443 -j DNAT --to-destination 127.0.0.1:$api_port" >"$N/service-dnat"
# shellcheck disable=SC2046
iptables -t nat -A PREROUTING $(cat "$N/service-dnat")

# ---------------------------------------------------------------- kubelet
KUBELET_PORT=$(free_port)
KUBELET_HEALTHZ_PORT=$(free_port)
cat >"$N/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failCgroupV1: false
failSwapOn: false
podLogsDir: $N/pod-logs
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
registerNode: true
registerWithTaints: []
serializeImagePulls: false
syncFrequency: 10s
fileCheckFrequency: 10s
nodeStatusUpdateFrequency: 5s
YAML
if [ -n "${REAL_NODE_TAINT:-}" ]; then
    key=${REAL_NODE_TAINT%%=*} rest=${REAL_NODE_TAINT#*=}
    printf 'registerWithTaints:\n- {key: "%s", value: "%s", effect: "%s"}\n' \
        "$key" "${rest%%:*}" "${rest#*:}" >>"$N/kubelet.yaml"
    sed -i '/^registerWithTaints: \[\]$/d' "$N/kubelet.yaml"
fi
start kubelet "$BIN/kubelet" \
    --config="$N/kubelet.yaml" \
    --kubeconfig="$STATE/kubelet.kubeconfig" \
    --root-dir="$N/kubelet" \
    --cert-dir="$N/kubelet/pki" \
    --hostname-override="$REAL_NODE_NAME" \
    --node-ip=$NODE_IP \
    --node-labels="type=real,finetune.dev/fake-gpu=true,nvidia.com/gpu.present=true,nvidia.com/gpu.count=$GPUS" \
    --v=1
node_ready() {
    [ "$(kubectl_ get node "$REAL_NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]
}
WAIT_PROC=kubelet wait_until 90 "node $REAL_NODE_NAME Ready" "$LOGS/kubelet.log" node_ready ||
    die "the kubelet did not register a Ready node (log: $LOGS/kubelet.log)"

# ---------------------------------------------------------------- fake GPUs
start fake-gpu-plugin "$BIN/fake-gpu-plugin" --count "$GPUS"
gpus_allocatable() {
    [ "$(kubectl_ get node "$REAL_NODE_NAME" -o jsonpath='{.status.allocatable.nvidia\.com/gpu}')" = "$GPUS" ]
}
WAIT_PROC=fake-gpu-plugin wait_until 60 "$GPUS nvidia.com/gpu allocatable" "$LOGS/fake-gpu-plugin.log" gpus_allocatable ||
    die "the device plugin's GPUs did not reach the node (logs: $LOGS/fake-gpu-plugin.log, $LOGS/kubelet.log)"
log "node $REAL_NODE_NAME up in $(($(date +%s) - T0))s (containerd: $CONTAINERD_SOCK)"
