"""End to end on CPU: `finetune-trainer run` on a FinetuneJob with the example's pvc:// and
configmap:// URIs (mapped under FINETUNE_VOLUME_ROOT) trains a LoRA adapter on SmolLM2-135M-Instruct
(chat-train.jsonl, 20 steps, batch 4, seq 128) that lowers the eval loss on chat-eval.jsonl and
raises the exact-match rate of its greedy answers; the adapter, summary and termination message are
written, and `eval --adapter` agrees."""

import json
import os
import subprocess
from pathlib import Path

from conftest import GGUF_NAME, run_json

REPO = Path(__file__).resolve().parents[2]

JOB = """apiVersion: finetune.dev/v1alpha1
kind: FinetuneJob
metadata: {name: smollm2-e2e}
spec:
  baseModel: {uri: pvc://models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, format: gguf}
  dataset:
    train: {uri: configmap://finetune-examples-data/chat-train.jsonl}
    eval: {uri: configmap://finetune-examples-data/chat-eval.jsonl}
    format: chat
  adapter: {type: lora, lora: {rank: 16, alpha: 32, dropout: 0.05}}
  hyperparameters: {maxSteps: 20, learningRate: 1.0e-3, batchSize: 4, maxSeqLength: 128, warmupSteps: 2, seed: 42}
  forgettingGuard: {disabled: true}
  evaluation: {everySteps: 10, retention: {}, generation: {maxSamples: 12, maxNewTokens: 24}}
  forgettingGuard: {}
  checkpoint: {everySteps: 10, keepLast: 2}
  resources: {gpus: 0}
"""


def test_lora_run_lowers_eval_loss(tmp_path, gguf_path, bin_path):
    vol = tmp_path / "vol"
    (vol / "pvc/models/smollm2").mkdir(parents=True)
    (vol / "configmap").mkdir()
    os.symlink(gguf_path, vol / "pvc/models/smollm2" / GGUF_NAME)
    os.symlink(REPO / "examples/data", vol / "configmap/finetune-examples-data")
    job = tmp_path / "job.yaml"
    job.write_text(JOB)
    out, term = tmp_path / "out", tmp_path / "termination-log"
    env = dict(os.environ, FINETUNE_VOLUME_ROOT=str(vol), FINETUNE_STATUS_PORT="0",
               FINETUNE_TERMINATION_LOG=str(term))
    proc = subprocess.run([str(bin_path), "--device", "cpu", "run", str(job), "--output", str(out)],
                          capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "training_summary.json").read_text())
    before, after = summary["initial_eval_loss"], summary["metrics"]["evalLoss"]
    print(f"\neval loss {before:.4f} -> {after:.4f}; train tokens/s {summary['tokens_per_second']:.1f}; "
          f"retention delta {summary['retention']['loss_delta']:.4f}; peak RSS {summary['peak_rss_bytes'] / 2**20:.0f} MiB")
    assert after < before - 0.5
    message = json.loads(term.read_text())
    # Beyond loss: greedy answers to the eval prompts match the reference commands more often.
    gen = summary["generation"]
    print(f"generation exact match {gen['before']['exact']}/{gen['samples']} -> {gen['after']['exact']}/{gen['samples']}; "
          f"retention {summary['retention']['score']:.3f} of {summary['retention']['questions']} base answers kept; "
          f"timings {summary['timings']}")
    assert gen["samples"] == 12
    assert gen["after"]["exact_match"] > gen["before"]["exact_match"]
    assert message["metrics"]["evalExactMatch"] == gen["after"]["exact_match"]
    assert 0.0 <= summary["retention"]["score"] <= 1.0
    assert message["step"] == 20 and message["metrics"]["evalLoss"] == after
    assert {f["name"] for f in message["adapter"]["files"]} == {"adapter_config.json", "adapter_model.safetensors"}
    # The eval command with the adapter sees the improvement too (its own loss definition).
    data = REPO / "examples/data/chat-eval.jsonl"
    base = run_json("eval", "--model", gguf_path, "--data", data, "--format", "chat")
    tuned = run_json("eval", "--model", gguf_path, "--adapter", out, "--data", data, "--format", "chat")
    print(f"eval command: base {base['loss']:.4f}, with adapter {tuned['loss']:.4f}")
    assert tuned["loss"] < base["loss"] - 0.5
