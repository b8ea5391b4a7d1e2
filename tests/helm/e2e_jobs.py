#!/usr/bin/env python3
"""FinetuneJobs for the chart's e2e run, derived from examples/sft-lora-smollm2.yaml.

usage: e2e_jobs.py EXAMPLE.yaml MODEL.gguf NODE VOLUMES_DIR [quota]
Prints (YAML) in namespace e2e: `tiny-sft`, a short real run on the real node NODE (CPU, the
SmolLM2 GGUF from the `models` claim, 6 steps, eval and checkpoint every 3) and `bad-data`, whose
training file does not exist (the trainer exits with "invalid data", never retried), and `ttl`,
which fails the same way and is deleted 3 s later by `ttlSecondsAfterFinished` (under the chart's
RBAC, which must grant `delete` on FinetuneJobs). With
`quota`: only `refused` in namespace quota, whose pod the namespace's quota refuses. Each e2e job
gets a hostPath PersistentVolume under VOLUMES_DIR pre-bound to its storage claim, writable by the
trainer's UID; the model is copied into VOLUMES_DIR/models, the `models` claim's volume.
"""
import copy
import os
import shutil
import sys
from pathlib import Path

import yaml


TRAINER_UID = 65532
MODEL_URI = "pvc://models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny(example, name, namespace, node):
    job = copy.deepcopy(example)
    job["metadata"] = {"name": name, "namespace": namespace}
    spec = job["spec"]
    spec["baseModel"] = {"uri": MODEL_URI, "format": "gguf"}
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


def volume(namespace, claim, path):
    """A hostPath PersistentVolume pre-bound to a claim (no provisioner here)."""
    return {"apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": f"{namespace}-{claim}"},
            "spec": {"capacity": {"storage": "100Gi"}, "accessModes": ["ReadWriteOnce"],
                     "hostPath": {"path": str(path)}, "storageClassName": "",
                     "claimRef": {"namespace": namespace, "name": claim}}}


def storage(volumes, namespace, claim):
    """The storage claim's volume: a folder the trainer's UID owns."""
    path = volumes / f"{namespace}-{claim}"
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, TRAINER_UID, TRAINER_UID)
    return volume(namespace, claim, path)


def models(volumes, namespace, model):
    """The `models` claim and its volume, holding a copy of the GGUF (a container sees only what
    is inside the volume, not a link's target)."""
    folder = volumes / "models/smollm2"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(model, folder / Path(MODEL_URI).name)
    for path in [volumes, volumes / "models", folder]:
        path.chmod(0o755)
    claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
             "metadata": {"name": "models", "namespace": namespace},
             "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "",
                      "resources": {"requests": {"storage": "1Gi"}}}}
    return [volume(namespace, "models", volumes / "models"), claim]


def main():
    example, model, node, volumes = sys.argv[1:5]
    example = yaml.safe_load(open(example))
    volumes = Path(volumes)
    if sys.argv[5:] == ["quota"]:
        jobs = [tiny(example, "refused", "quota", node)]
    else:
        bad = tiny(example, "bad-data", "e2e", node)
        bad["spec"]["dataset"]["train"]["uri"] = "configmap://finetune-examples-data/missing.jsonl"
        bad["spec"]["runPolicy"] = {"backoffLimit": 0}
        ttl = copy.deepcopy(bad)
        ttl["metadata"]["name"] = "ttl"
        ttl["spec"]["output"] = {"adapterName": "ttl-adapter"}
        ttl["spec"]["runPolicy"] = {"backoffLimit": 0, "ttlSecondsAfterFinished": 3}
        jobs = [tiny(example, "tiny-sft", "e2e", node), bad, ttl, *models(volumes, "e2e", model),
                *(storage(volumes, "e2e", f"{job}-storage") for job in ("tiny-sft", "bad-data", "ttl"))]
    yaml.safe_dump_all(jobs, sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main()
