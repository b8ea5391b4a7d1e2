#!/usr/bin/env python3
"""The rendered operator Deployment has the chart's secure defaults: non-root, read-only root
filesystem, no privilege escalation, all capabilities dropped, seccomp RuntimeDefault, resource
requests, probes, and the leader-election flags with 2 replicas; and RBAC whose verbs are exactly
the calls the operator's code makes (the table below names them: change both together)."""
import sys

import yaml

docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
deployment = next(d for d in docs if d["kind"] == "Deployment")
pod = deployment["spec"]["template"]["spec"]
container = pod["containers"][0]
sc = container["securityContext"]
problems = []
expect = {
    "replicas == 2": deployment["spec"]["replicas"] == 2,
    "runAsNonRoot": pod["securityContext"].get("runAsNonRoot") is True,
    "seccomp RuntimeDefault": pod["securityContext"].get("seccompProfile", {}).get("type") == "RuntimeDefault",
    "readOnlyRootFilesystem": sc.get("readOnlyRootFilesystem") is True,
    "allowPrivilegeEscalation false": sc.get("allowPrivilegeEscalation") is False,
    "capabilities drop ALL": sc.get("capabilities", {}).get("drop") == ["ALL"],
    "resource requests": bool(container.get("resources", {}).get("requests")),
    "liveness and readiness probes": "livenessProbe" in container and "readinessProbe" in container,
    "--leader-elect": "--leader-elect" in container["args"],
    "no trainer API access via the chart (no Secret, no wildcard RBAC)": all(
        "*" not in r.get("verbs", []) and "secrets" not in r.get("resources", [])
        for d in docs if d["kind"] in ("ClusterRole", "Role") for r in d["rules"]
    ),
}
# (group, resource) -> verbs, from the operator's API calls:
CALLS = {
    # controller watch (list, watch); init_adapter producer lookup (get); ttlSecondsAfterFinished (delete)
    ("finetune.dev", "finetunejobs"): {"get", "list", "watch", "delete"},
    # adapter controller watch; register_adapter get_opt + server-side apply (patch, create when new)
    ("finetune.dev", "adapters"): {"get", "list", "watch", "create", "patch"},
    # api::patch_status (server-side apply of status)
    ("finetune.dev", "finetunejobs/status"): {"patch"},
    ("finetune.dev", "adapters/status"): {"patch"},
    # blockOwnerDeletion on children's owner references
    ("finetune.dev", "finetunejobs/finalizers"): {"update"},
    ("finetune.dev", "adapters/finalizers"): {"update"},
    # ours::create (create; get on a name conflict), watches, pruning/suspend/preemption deletes
    ("", "pods"): {"get", "list", "watch", "create", "delete"},
    # ours::create_or_update (create, get, then server-side apply), metadata watches
    ("", "configmaps"): {"get", "list", "watch", "create", "patch"},
    ("", "persistentvolumeclaims"): {"get", "list", "watch", "create", "patch"},
    # dereference::kueue_admission (the Workload of a gated gang attempt)
    ("kueue.x-k8s.io", "workloads"): {"get"},
    # event_queue (kube Recorder: create, patch for a series)
    ("events.k8s.io", "events"): {"create", "patch"},
    # leader::Lease (get_opt, create, replace)
    ("coordination.k8s.io", "leases"): {"get", "create", "update"},
}
granted = {}
for d in docs:
    if d["kind"] in ("ClusterRole", "Role"):
        for r in d["rules"]:
            for group in r.get("apiGroups", []):
                for resource in r.get("resources", []):
                    granted.setdefault((group, resource), set()).update(r.get("verbs", []))
expect["RBAC verbs are exactly the calls the code makes"] = granted == CALLS
if granted != CALLS:
    for key in sorted(set(granted) | set(CALLS)):
        if granted.get(key) != CALLS.get(key):
            print(f"RBAC {key}: granted {sorted(granted.get(key, []))}, code calls {sorted(CALLS.get(key, []))}")
policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
expect["a NetworkPolicy lets only the operator and Prometheus reach trainer pods"] = bool(policies) and all(
    p["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/name") == "finetune-trainer"
    and p["spec"]["policyTypes"] == ["Ingress"]
    and len(p["spec"]["ingress"]) == 1
    and all("podSelector" in peer for peer in p["spec"]["ingress"][0]["from"])
    for p in policies
)
for name, ok in expect.items():
    if not ok:
        problems.append(name)
        print(f"missing: {name}")
sys.exit(1 if problems else 0)
