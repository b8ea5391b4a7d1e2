"""The forgetting workload shared by `make bench-forgetting` and test_forgetting.py.

Two narrow tasks, one epoch each on SmolLM2-135M-Instruct with LoRA r16 on all linear layers at
lr 1e-3 — ordinary settings under which a model learns its task and loses general answers:

* `reviews` (examples/data/narrow-*.jsonl): a review sentence → POSITIVE or NEGATIVE, with no cue
  in the prompt, 300 samples; unguarded, the model answers *every* request with a label.
* `dates` (examples/data/dates-*.jsonl): a date in one of four spellings, asked in one of five
  phrasings → the ISO date, 480 samples.

Each run reports the task metric (exact match of greedy answers on the task's eval file), the
run's own retention probe (the `probe` part of the general question set), wall time and peak RSS,
read from the trainer's training_summary.json; then `finetune-trainer audit` measures retention
on the held-out `audit` part, which neither the guard nor the probe ever saw.
"""

import json
import os
import subprocess
import time
from pathlib import Path

from conftest import GGUF_NAME

REPO = Path(__file__).resolve().parents[2]

JOB = """apiVersion: finetune.dev/v1alpha1
kind: FinetuneJob
metadata: {{name: forgetting-{task}-{name}}}
spec:
  baseModel: {{uri: pvc://models/smollm2/{gguf}, format: gguf}}
  dataset:
    train: {{uri: configmap://finetune-examples-data/{train}}}
    eval: {{uri: configmap://finetune-examples-data/{eval}}}
    format: chat
  adapter: {{type: lora, lora: {{rank: 16, alpha: 32, dropout: 0.0}}}}
  hyperparameters: {{epochs: 1, learningRate: 1.0e-3, batchSize: 8, maxSeqLength: 128, warmupSteps: 2, seed: 42, precision: fp32}}
  evaluation: {{retention: {{}}, generation: {{maxSamples: 50, maxNewTokens: {answer_tokens}}}}}
  checkpoint: {{everySteps: 1000, keepLast: 1}}
  resources: {{gpus: 0}}
{guard}"""

# The narrow tasks: training file, eval file, longest task answer in tokens.
TASKS = {
    "reviews": ("narrow-train.jsonl", "narrow-eval.jsonl", 8),
    "dates": ("dates-train.jsonl", "dates-eval.jsonl", 16),
}

# The guard settings compared. Without `forgettingGuard` LoRA SFT gets the default guard
# (selfDistillation at weight 1 on 16-token base answers, one request per scored conversation,
# 40 to 120, and layerAnchor at weight 3e4 sketched on the same conversations), so "off" has to
# say so; "self-replay" is the default before the layer anchor joined it, "replay-anchor" the
# default before self-distillation replaced replay.
GUARDS = {
    "off": "  forgettingGuard: {disabled: true}\n",
    "default": "",
    "replay-anchor": "  forgettingGuard: {selfReplay: {ratio: 0.125}, layerAnchor: {weight: 3.0e4}}\n",
    "self-replay": "  forgettingGuard: {selfReplay: {ratio: 0.125}}\n",
    "self-replay-0.25-48-w1": ("  forgettingGuard: {selfReplay: {ratio: 0.25, answerTokens: 48,"
                               " weight: 1.0}}\n"),
    "self-distillation": "  forgettingGuard: {selfDistillation: {weight: 1.0}}\n",
}


def volume(tmp: Path, gguf_path: Path) -> Path:
    vol = tmp / "vol"
    (vol / "pvc/models/smollm2").mkdir(parents=True, exist_ok=True)
    (vol / "configmap").mkdir(exist_ok=True)
    link = vol / "pvc/models/smollm2" / GGUF_NAME
    if not link.exists():
        os.symlink(gguf_path, link)
    data = vol / "configmap/finetune-examples-data"
    if not data.exists():
        os.symlink(REPO / "examples/data", data)
    return vol


def audit(bin_path: Path, gguf_path: Path, adapter: Path) -> dict:
    """`finetune-trainer audit` of an adapter on the held-out part of the general question set."""
    proc = subprocess.run([str(bin_path), "--device", "cpu", "audit", "--model", str(gguf_path),
                           "--adapter", str(adapter)], capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise AssertionError(f"audit of {adapter}: exit {proc.returncode}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


def train(bin_path: Path, gguf_path: Path, tmp: Path, task: str, name: str, guard: str,
          run_name: str | None = None) -> tuple[float, dict, Path]:
    """Trains one variant of one task as a fresh job (`run_name`, default `name`, names its output
    directory); returns its wall time, its training_summary.json and its output directory."""
    vol = volume(tmp, gguf_path)
    train_data, evaluation, answer_tokens = TASKS[task]
    job = tmp / f"{task}-{name}.yaml"
    job.write_text(JOB.format(task=task, name=name, gguf=GGUF_NAME, guard=guard, train=train_data,
                              eval=evaluation, answer_tokens=answer_tokens))
    out = tmp / f"out-{task}-{run_name or name}"
    env = dict(os.environ, FINETUNE_VOLUME_ROOT=str(vol), FINETUNE_STATUS_PORT="0")
    env.pop("FINETUNE_CHECKPOINT_DIR", None)
    start = time.perf_counter()
    proc = subprocess.run([str(bin_path), "--device", "cpu", "run", str(job), "--output", str(out)],
                          capture_output=True, text=True, timeout=3600, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise AssertionError(f"{name}: exit {proc.returncode}\n{proc.stderr[-4000:]}")
    return wall, json.loads((out / "training_summary.json").read_text()), out


def run(bin_path: Path, gguf_path: Path, tmp: Path, task: str, name: str, guard: str) -> dict:
    """Trains one variant of one task and audits it; returns its measured row."""
    wall, s, out = train(bin_path, gguf_path, tmp, task, name, guard)
    gen, ret = s["generation"], s["retention"]
    held_out = audit(bin_path, gguf_path, out)
    return {
        "task": task,
        "guard": name,
        "task_exact_match_before": gen["before"]["exact_match"],
        "task_exact_match": gen["after"]["exact_match"],
        "retention": ret["score"],
        "retention_basis": ret["basis"],
        "retention_kept": (f"{ret['kept']}/{ret['base_correct']}" if ret["basis"] == "answer-keys"
                           else f"{round(ret['verbatim'] * ret['questions'])}/{ret['questions']}"),
        "verbatim_kept": f"{round(ret['verbatim'] * ret['questions'])}/{ret['questions']}",
        "retention_interval_95": ret.get("interval_95"),
        "retention_loss_delta": ret["loss_delta"],
        "audit": held_out["score"],
        "audit_kept": f"{held_out['kept']}/{held_out['base_correct']}",
        "audit_interval_95": held_out["interval_95"],
        "audit_by_category": held_out["by_category"],
        "audit_lost": held_out["lost"][:10],
        "audit_seconds": held_out["seconds"],
        "wall_seconds": wall,
        "train_seconds": s["timings"]["train_seconds"],
        "peak_rss_mib": s["peak_rss_bytes"] / 2**20,
        "replayed_samples": s["dataset"].get("replayed_samples", 0),
        "guard_source": s["forgetting_guard_source"],
        "guards": sorted(s["forgetting_guard"]),
        "steps": s["steps"],
        "examples": gen["examples"][:2],
    }
