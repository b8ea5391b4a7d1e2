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
import sys
from pathlib import Path

import yaml

# The real node's volume helpers, shared with its tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "node"))
from kube import MODEL_IN_CLAIM, host_path_volume, model_claim, trainer_storage  # noqa: E402

MODEL_URI = f"pvc://models/{MODEL_IN_CLAIM}"


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
    # The default guard would spend the short run scoring general answers: not what this tests.
    spec["forgettingGuard"] = {"disabled": True}
    spec["checkpoint"] = {"everySteps": 3, "keepLast": 2}
    spec["output"] = {"adapterName": f"{name}-adapter"}
    return job


def storage(volumes, namespace, claim):
    """A hostPath PersistentVolume pre-bound to the job's storage claim (no provisioner here)."""
    path = trainer_storage(volumes / f"{namespace}-{claim}")
    return host_path_volume(f"{namespace}-{claim}", path, namespace, claim)


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
        jobs = [tiny(example, "tiny-sft", "e2e", node), bad, ttl, *model_claim(volumes, "e2e", model),
                *(storage(volumes, "e2e", f"{job}-storage") for job in ("tiny-sft", "bad-data", "ttl"))]
    yaml.safe_dump_all(jobs, sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main()
