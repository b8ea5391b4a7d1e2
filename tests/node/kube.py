"""Helpers shared by the real node's tests and its benchmark: kubectl, waiting, the example job
shortened for a test, and hostPath volumes the trainer's UID can write."""

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache/finetune-operator"))
STATE = Path(os.environ.get("FINETUNE_CLUSTER_DIR", CACHE / "cluster/run"))
KUBECTL = str(CACHE / "cluster/bin/kubectl")
OPERATOR = os.environ.get(
    "FINETUNE_OPERATOR_BIN", str(Path(os.environ.get("CARGO_TARGET_DIR", CACHE / "target")) / "release/finetune-operator"))
TRAINER_UID = 65532
# Where the example's base model (pvc://models/...) lies in the `models` claim's volume.
MODEL_IN_CLAIM = "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NODE = os.environ.get("FINETUNE_REAL_NODE_NAME", "real-node-0")


def kubectl(*args, input=None, check=True):
    proc = subprocess.run([KUBECTL, *args], input=input, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)}: {proc.stderr}")
    return proc.stdout


def get(kind, name, ns):
    out = kubectl("get", kind, name, "-n", ns, "-o", "json", check=False)
    return json.loads(out) if out.strip() else None


def apply(obj):
    kubectl("apply", "-f", "-", input=json.dumps(obj))


def wait_for(what, timeout, probe, interval=1.0):
    """Polls `probe` until it returns something truthy; fails naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def host_path_volume(name, path, ns, claim):
    return {
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
        "spec": {
            "capacity": {"storage": "100Gi"}, "accessModes": ["ReadWriteOnce"],
            "hostPath": {"path": str(path)}, "storageClassName": "",
            "claimRef": {"namespace": ns, "name": claim},
        },
    }


def trainer_storage(path):
    """A folder for a job's storage claim, owned by the trainer's UID, which writes there."""
    path.mkdir(parents=True)
    os.chown(path, TRAINER_UID, TRAINER_UID)
    return path


def model_claim(volumes, ns, gguf):
    """The `models` claim of namespace `ns` and its hostPath volume `volumes`/models, holding a
    copy of `gguf` at MODEL_IN_CLAIM that the trainer's UID can read."""
    volumes.mkdir(parents=True, exist_ok=True)
    volumes.chmod(0o755)
    model = volumes / "models" / MODEL_IN_CLAIM
    model.parent.mkdir(parents=True)
    # A copy: the container sees only what is inside the volume, not a link's target.
    shutil.copy(gguf, model)
    for p in [model.parent.parent, model.parent]:
        p.chmod(0o755)
    model.chmod(0o644)
    claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "models", "namespace": ns},
             "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "",
                      "resources": {"requests": {"storage": "1Gi"}}}}
    return [host_path_volume(f"{ns}-models", volumes / "models", ns, "models"), claim]


def example_job(name, steps, checkpoint_every=4):
    """The SFT example, as written but for its name, length and guard: `steps` optimizer steps
    of batch 2 at sequence 128, checkpoints and evaluations every `checkpoint_every`."""
    job = yaml.safe_load((ROOT / "examples/sft-lora-smollm2.yaml").read_text())
    job["metadata"]["name"] = name
    spec = job["spec"]
    hp = spec["hyperparameters"]
    hp.pop("epochs", None)
    hp.pop("warmupRatio", None)
    hp.update({"maxSteps": steps, "batchSize": 2, "gradientAccumulationSteps": 1, "maxSeqLength": 128})
    spec["evaluation"] = {"everySteps": checkpoint_every}
    spec["forgettingGuard"] = {"disabled": True}
    spec["checkpoint"] = {"everySteps": checkpoint_every, "keepLast": 2}
    spec["output"] = {"adapterName": name}
    spec["resources"].pop("memory", None)
    return job


class Bed:
    """A namespace with an operator watching it, the example data and the model volume."""

    def __init__(self, ns, volumes, operator):
        self.ns, self.volumes, self.operator = ns, volumes, operator

    def close(self):
        self.operator.terminate()
        self.operator.wait(timeout=30)
        kubectl("delete", "namespace", self.ns, "--wait=true", "--timeout=120s", check=False)
        for pv in kubectl("get", "pv", "-o", "name").split():
            if pv.startswith(f"persistentvolume/{self.ns}-"):
                kubectl("delete", pv, "--wait=false", check=False)

    def storage_volume(self, job):
        """The hostPath PV the job's storage claim binds to, writable by the trainer's UID."""
        path = trainer_storage(self.volumes / f"{job}-storage")
        apply(host_path_volume(f"{self.ns}-{job}", path, self.ns, f"{job}-storage"))
        return path

    def job(self, name):
        return get("finetunejob", name, self.ns)

    def status(self, name):
        return (self.job(name) or {}).get("status") or {}

    def pod(self, name):
        return get("pod", name, self.ns)



def open_bed(volumes, operator_args=()):
    """A namespace (Pod Security `restricted`), the example data, the SmolLM2 GGUF on a hostPath
    volume under `volumes`, and an operator on this machine watching only that namespace."""
    assert Path(KUBECTL).exists(), f"{KUBECTL} missing: make cluster-build"
    crds = subprocess.run([OPERATOR, "crd"], capture_output=True, text=True, check=True).stdout
    kubectl("apply", "-f", "-", input=crds)
    kubectl("wait", "--for=condition=Established", "crd/finetunejobs.finetune.dev", "crd/adapters.finetune.dev",
            "--timeout=60s")
    ns = f"node-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", ns)
    kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted",
            "pod-security.kubernetes.io/enforce-version=latest")
    kubectl("apply", "-n", ns, "-k", str(ROOT / "examples/data"))
    for obj in model_claim(volumes, ns, smollm2_gguf()):
        apply(obj)
    log = open(STATE / "logs" / f"operator-{ns}.log", "w")
    operator = subprocess.Popen(
        [OPERATOR, "run", "--namespace", ns, "--http-addr", "127.0.0.1:0", "--progress-interval", "1",
         "--termination-grace", "60", *operator_args],
        stdout=log, stderr=subprocess.STDOUT)
    return Bed(ns, volumes, operator)


def smollm2_gguf():
    return subprocess.run([str(ROOT / "scripts/smollm2-path.sh")], capture_output=True, text=True,
                          check=True).stdout.strip()
