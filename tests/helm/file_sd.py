#!/usr/bin/env python3
"""Target discovery for the test Prometheus, as the chart's ServiceMonitor and PodMonitor make the
Prometheus Operator configure it. (Debian's Prometheus is built without Kubernetes service
discovery, so this loop reads the same API objects and writes file_sd target files.)

usage: file_sd.py KUBECTL KUBECONFIG NAMESPACE SERVICE OUT_DIR
Every 2 s: OUT_DIR/operator.json from the Ready pods the Service selects (port "http-metrics";
labels namespace, pod, service) and OUT_DIR/trainers.json from Running trainer pods (port
"status"; labels namespace, pod, finetune_job, attempt). The Service's EndpointSlices would be
the faithful source, but the test executor's pod IPs are loopback addresses, which EndpointSlice
validation refuses, so the selector is applied here instead.
"""
import json
import os
import subprocess
import sys
import time


def kubectl(kubectl_bin, kubeconfig, *args):
    out = subprocess.run([kubectl_bin, "--kubeconfig", kubeconfig, *args, "-o", "json"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)["items"]


def write(path, groups):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(groups, f)
    os.replace(tmp, path)


def main():
    kubectl_bin, kubeconfig, namespace, service, out_dir = sys.argv[1:6]
    os.makedirs(out_dir, exist_ok=True)
    while True:
        try:
            operator = []
            services = kubectl(kubectl_bin, kubeconfig, "-n", namespace, "get", "services",
                               "--field-selector", f"metadata.name={service}")
            selector = ",".join(f"{k}={v}" for k, v in services[0]["spec"]["selector"].items()) if services else ""
            for p in kubectl(kubectl_bin, kubeconfig, "-n", namespace, "get", "pods", "-l", selector) if selector else []:
                ready = any(c["type"] == "Ready" and c["status"] == "True"
                            for c in p.get("status", {}).get("conditions") or [])
                ip = p.get("status", {}).get("podIP")
                if not ready or not ip:
                    continue
                for c in p["spec"]["containers"]:
                    for port in c.get("ports") or []:
                        if port.get("name") == "http-metrics":
                            operator.append({"targets": [f"{ip}:{port['containerPort']}"], "labels": {
                                "namespace": namespace, "service": service, "pod": p["metadata"]["name"]}})
            trainers = []
            for p in kubectl(kubectl_bin, kubeconfig, "get", "pods", "-A", "-l",
                             "app.kubernetes.io/name=finetune-trainer,app.kubernetes.io/managed-by=finetune-operator"):
                ip = p.get("status", {}).get("podIP")
                if p.get("status", {}).get("phase") != "Running" or not ip:
                    continue
                for c in p["spec"]["containers"]:
                    for port in c.get("ports") or []:
                        if port.get("name") != "status":
                            continue
                        labels = p["metadata"].get("labels", {})
                        trainers.append({"targets": [f"{ip}:{port['containerPort']}"], "labels": {
                            "namespace": p["metadata"]["namespace"], "pod": p["metadata"]["name"],
                            "finetune_job": labels.get("finetune.dev/job", ""),
                            "attempt": labels.get("finetune.dev/attempt", "")}})
            write(os.path.join(out_dir, "operator.json"), operator)
            write(os.path.join(out_dir, "trainers.json"), trainers)
        except (subprocess.CalledProcessError, json.JSONDecodeError, KeyError) as error:
            print(f"file_sd: {error}", file=sys.stderr)
        time.sleep(2)


if __name__ == "__main__":
    main()
