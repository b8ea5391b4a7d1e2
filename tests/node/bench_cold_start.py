"""`make bench-node`: the images' sizes, and cold start on the real node against the executor
stand-in, in the same run on the same control plane.

Cold start is the trainer pod's creation to the job's first optimizer step (status.progress.step
reaching 1, polled by the operator every second), split at the container's start as the node
reports it (startedAt). The same short example job (6 steps) runs on each node in turn, ROUNDS
times. The real node runs it from the image through containerd and runc; the executor starts
the same trainer binary as a local process. Writes a table and JSON ($CARGO_TARGET_DIR/bench/node.json).
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from kube import CACHE, NODE, STATE, apply, example_job, kubectl, open_bed, wait_for


def ts(text):
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def cold_start(bed, name, node):
    """(pod created → container started, → first step) in seconds for one job pinned to `node`."""
    # Long enough that the operator's 1 s polls see the first steps while they happen.
    job = example_job(name, steps=6, checkpoint_every=6)
    job["metadata"]["namespace"] = bed.ns
    job["spec"]["resources"]["nodeSelector"] = {"kubernetes.io/hostname": node}
    bed.storage_volume(name)
    apply(job)
    pod = f"{name}-attempt-0"
    wait_for(f"{name} first step", 600,
             lambda: (bed.status(name).get("progress") or {}).get("step", 0) >= 1, interval=0.2)
    seen = time.time()
    p = bed.pod(pod)
    created = ts(p["metadata"]["creationTimestamp"])
    state = p["status"]["containerStatuses"][0]["state"]
    started = ts((state.get("running") or state.get("terminated"))["startedAt"])
    wait_for(f"{name} done", 600, lambda: bed.status(name).get("phase") in ("Succeeded", "Failed"), interval=1)
    kubectl("delete", "finetunejob", name, "-n", bed.ns, "--wait=true", "--timeout=120s")
    return started - created, seen - created


def cpu_flags():
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Flags")), [])
    return model, [f for f in flags if f.startswith(("avx", "amx"))]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    executor_bin, trainer_bin = os.environ["FINETUNE_EXECUTOR_BIN"], os.environ["FINETUNE_TRAINER_BIN"]
    with tempfile.TemporaryDirectory() as tmp:
        bed = open_bed(Path(tmp) / "volumes")
        work = Path(tmp) / "executor"
        # The executor's claims are folders under its work dir: the model goes there too.
        model_dir = work / "pvc" / bed.ns / "models/smollm2"
        model_dir.mkdir(parents=True)
        os.link(bed.volumes / "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                model_dir / "SmolLM2-135M-Instruct.Q4_1.gguf")
        executor = subprocess.Popen(
            [executor_bin, "--node-name", "executor-bench", "--work-dir", str(work),
             "--default-binary", trainer_bin, "--gpus", "1"],
            stdout=open(STATE / "logs/executor-bench.log", "w"), stderr=subprocess.STDOUT)
        try:
            kubectl("wait", "--for=condition=Ready", "node/executor-bench", "--timeout=60s")
            rows = {NODE: [], "executor-bench": []}
            for r in range(args.rounds):
                for node in rows:
                    rows[node].append(cold_start(bed, f"cold-{'real' if node == NODE else 'exec'}-{r}", node))
                    print(f"round {r} {node}: started {rows[node][-1][0]:.1f}s, first step {rows[node][-1][1]:.1f}s",
                          flush=True)
        finally:
            executor.terminate()
            executor.wait(timeout=30)
            bed.close()
    sizes = json.loads((CACHE / "images/sizes.json").read_text())
    model, flags = cpu_flags()
    result = {
        "cpu": model, "cpu_flags": flags, "rounds": args.rounds, "image_bytes": sizes,
        "cold_start_s": {
            node: {"container_started": [round(a, 2) for a, _ in runs],
                   "first_step": [round(b, 2) for _, b in runs],
                   "first_step_median": round(statistics.median(b for _, b in runs), 2)}
            for node, runs in rows.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nCPU: {model}; flags: {' '.join(flags)}")
    print(f"{'image':45} {'unpacked MB':>12} {'archive MB':>11}")
    for image, size in sizes.items():
        print(f"{image:45} {size['unpacked'] / 1e6:>12.0f} {size['archive'] / 1e6:>11.0f}")
    print(f"\n{'node':16} {'pod → container started (s)':>30} {'pod → first step (s)':>24}")
    for node, runs in rows.items():
        started = ", ".join(f"{a:.1f}" for a, _ in runs)
        first = ", ".join(f"{b:.1f}" for _, b in runs)
        print(f"{node:16} {started:>30} {first:>24}")
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
