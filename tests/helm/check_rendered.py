#!/usr/bin/env python3
"""The rendered operator Deployment has the chart's secure defaults: non-root, read-only root
filesystem, no privilege escalation, all capabilities dropped, seccomp RuntimeDefault, resource
requests, probes, and the leader-election flags with 2 replicas."""
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
for name, ok in expect.items():
    if not ok:
        problems.append(name)
        print(f"missing: {name}")
sys.exit(1 if problems else 0)
