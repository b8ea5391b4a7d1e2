"""What a real node enforces, checked on the pods the operator builds, unchanged, run by the
kubelet from the trainer image: the user and filesystem the trainer gets, its termination message,
its probes, SIGTERM within the grace period, and a memory limit the run does not fit in."""

import json
import subprocess
from pathlib import Path

from kube import NODE, STATE, TRAINER_UID, apply, example_job, kubectl, wait_for

CONTAINERD_SOCK = STATE / "node/containerd.sock"


def container_pid(pod):
    """The host PID of the pod's trainer container, from containerd."""
    cid = pod["status"]["containerStatuses"][0]["containerID"].removeprefix("containerd://")
    out = subprocess.run(["ctr", "--address", str(CONTAINERD_SOCK), "-n", "k8s.io", "tasks", "ls"],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines()[1:]:
        task, pid, status = line.split()
        if task == cid and status == "RUNNING":
            return int(pid)
    return None


def proc_status(pid):
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    return fields


def root_mount_options(pid):
    """The mount options of the container's `/`, from its mountinfo."""
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == "/":
            return fields[5].split(",")
    raise AssertionError(f"no / in /proc/{pid}/mountinfo")


def running_pod(bed, name):
    def probe():
        pod = bed.pod(name)
        statuses = (pod or {}).get("status", {}).get("containerStatuses") or []
        return pod if statuses and "running" in statuses[0].get("state", {}) else None
    return wait_for(f"{name} running", 300, probe)


def phase(bed, job, wanted, timeout=900):
    def probe():
        status = bed.status(job)
        if status.get("phase") in ("Succeeded", "Failed") and status.get("phase") != wanted:
            raise AssertionError(f"{job} ended {status.get('phase')}: {json.dumps(status, indent=1)}")
        return status if status.get("phase") == wanted else None
    return wait_for(f"{job} {wanted}", timeout, probe, interval=2)


def test_the_trainer_runs_as_non_root_on_a_read_only_root_and_reports_through_its_termination_message(bed):
    job = "locked-down"
    storage = bed.storage_volume(job)
    apply(_namespaced(bed, example_job(job, steps=8)))
    pod = running_pod(bed, f"{job}-attempt-0")
    assert pod["spec"]["nodeName"] == NODE
    pid = wait_for("the container's process", 60, lambda: container_pid(bed.pod(f"{job}-attempt-0")))
    status = proc_status(pid)
    assert status["Uid"] == [str(TRAINER_UID)] * 4, status["Uid"]
    assert status["Gid"][0] == str(TRAINER_UID), status["Gid"]
    # No capability at all, no way to gain one, and a seccomp filter (mode 2).
    assert int(status["CapEff"][0], 16) == 0 and int(status["CapBnd"][0], 16) == 0, status["CapBnd"]
    assert status["NoNewPrivs"] == ["1"] and status["Seccomp"] == ["2"], (status["NoNewPrivs"], status["Seccomp"])
    assert "ro" in root_mount_options(pid), root_mount_options(pid)
    # The probes pass while it trains: Ready, and never restarted.
    ready = wait_for("the trainer pod Ready", 120, lambda: _condition(bed.pod(f"{job}-attempt-0"), "Ready"))
    assert ready["status"] == "True"

    final = phase(bed, job, "Succeeded")
    pod = bed.pod(f"{job}-attempt-0")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 0 and pod["status"]["containerStatuses"][0]["restartCount"] == 0
    message = json.loads(terminated["message"])
    # The message the kubelet read from /dev/termination-log is what the job's status shows.
    assert message["step"] == 8 and message["adapter"]
    assert final["metrics"]["trainLoss"] == message["metrics"]["trainLoss"]
    assert final["latestCheckpoint"]["step"] == message["checkpointStep"]
    # Everything the trainer wrote is on its volume, owned by its UID.
    written = [p for p in storage.rglob("*")]
    assert any(p.name == "adapter_model.safetensors" for p in written), written
    assert {p.stat().st_uid for p in written} == {TRAINER_UID}


def test_sigterm_checkpoints_within_the_grace_period_and_the_job_resumes_from_there(bed):
    job = "preempted"
    bed.storage_volume(job)
    apply(_namespaced(bed, example_job(job, steps=24)))
    running_pod(bed, f"{job}-attempt-0")
    wait_for("a checkpoint", 600, lambda: (bed.status(job).get("progress") or {}).get("step", 0) >= 5, interval=2)
    # What a node drain or a preemption does: the kubelet sends SIGTERM and waits the grace period.
    kubectl("delete", "pod", "-n", bed.ns, f"{job}-attempt-0", "--wait=false")
    final = phase(bed, job, "Succeeded")
    first, second = final["attempts"][0], final["attempts"][1]
    assert first["exitCode"] == 143, first
    assert final["preemptions"] == 1 and final["failedAttempts"] == 0, final
    assert second["resumedFromStep"] >= 4, second
    assert len(final["attempts"]) == 2


def test_a_memory_limit_below_the_peak_ends_in_oomkilled_and_an_out_of_memory_attempt(bed):
    job = "too-small"
    bed.storage_volume(job)
    manifest = example_job(job, steps=8)
    manifest["spec"]["resources"]["memory"] = "300Mi"
    manifest["spec"]["runPolicy"]["backoffLimit"] = 0
    apply(_namespaced(bed, manifest))
    final = phase(bed, job, "Failed", timeout=300)
    pod = bed.pod(f"{job}-attempt-0")
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["reason"] == "OOMKilled"
    assert final["attempts"][0]["reason"] == "OutOfMemory", final["attempts"]
    # The kernel leaves the trainer no word; the operator names the fix.
    assert "spec.resources.memory" in final["attempts"][0]["message"], final["attempts"]
    failed = next(c for c in final["conditions"] if c["status"] == "True")
    assert "spec.resources.memory" in failed["message"], failed
    assert final["failedAttempts"] == 1


def _namespaced(bed, obj):
    obj["metadata"]["namespace"] = bed.ns
    return obj


def _condition(pod, kind):
    for c in (pod or {}).get("status", {}).get("conditions") or []:
        if c["type"] == kind and c["status"] == "True":
            return c
    return None
