#!/usr/bin/env python3
"""FinetuneJobs for the chart's e2e run, derived from examples/sft-lora-smollm2.yaml.

usage: e2e_jobs.py EXAMPLE.yaml MODEL.gguf EXECUTOR_NODE [quota]
Prints (YAML) in namespace e2e: `tiny-sft`, a short real run on the executor node (CPU, the
SmolLM2 GGUF from a local path, 6 steps, eval and checkpoint every 3) and `bad-data`, whose
training file does not exist (the trainer exits with "invalid data", never retried), and `ttl`,
which fails the same way and is deleted 3 s later by `ttlSecondsAfterFinished` (under the chart's
RBAC, which must grant `delete` on FinetuneJobs). With
`quota`: only `refused` in namespace quota, whose pod the namespace's quota refuses. Each e2e job
gets a PersistentVolume pre-bound to its storage claim.
"""
import copy
import sys

import yaml


def tiny(example, name, namespace, model, node):
    job = copy.deepcopy(example)
    job["metadata"] = {"name": name, "namespace": namespace}
    spec = job["spec"]
    spec["baseModel"] = {"uri": f"file://{model}", "format": "gguf"}
    spec["resources"] = {"gpus": 0, "nodeSelector": {"kubernetes.io/hostname": node}}
    hp = spec["hyperparameters"]
    hp.pop("epochs", None)
    hp.pop("warmupRatio", None)
    hp.update(maxSteps=6, batchSize=2, gradientAccumulationSteps=1, maxSeqLength=128)
    spec["evaluation"] = {"everySteps": 3}
    # The default guard would spend the short run replaying general answers: not what this tests.
    spec["forgettingGuard"] = {"disabled": True}
    spec["checkpoint"] = {"everySteps": 3, "keepLast": 2}
    spec["output"] = {"adapterName": f"{name}-adapter"}
    return job


def volume(namespace, claim):
    """A PersistentVolume pre-bound to the operator's storage claim (no provisioner here)."""
    return {"apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": f"{namespace}-{claim}"},
            "spec": {"capacity": {"storage": "100Gi"}, "accessModes": ["ReadWriteOnce"],
                     "hostPath": {"path": f"/tmp/{namespace}-{claim}"}, "storageClassName": "",
                     "claimRef": {"namespace": namespace, "name": claim}}}


def main():
    example, model, node = sys.argv[1:4]
    example = yaml.safe_load(open(example))
    if sys.argv[4:] == ["quota"]:
        jobs = [tiny(example, "refused", "quota", model, node)]
    else:
        bad = tiny(example, "bad-data", "e2e", model, node)
        bad["spec"]["dataset"]["train"]["uri"] = "configmap://finetune-examples-data/missing.jsonl"
        bad["spec"]["runPolicy"] = {"backoffLimit": 0}
        ttl = copy.deepcopy(bad)
        ttl["metadata"]["name"] = "ttl"
        ttl["spec"]["output"] = {"adapterName": "ttl-adapter"}
        ttl["spec"]["runPolicy"] = {"backoffLimit": 0, "ttlSecondsAfterFinished": 3}
        jobs = [tiny(example, "tiny-sft", "e2e", model, node), bad, ttl,
                volume("e2e", "tiny-sft-storage"), volume("e2e", "bad-data-storage"),
                volume("e2e", "ttl-storage")]
    yaml.safe_dump_all(jobs, sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main()
