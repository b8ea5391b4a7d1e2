"""End to end on CPU: `finetune-trainer run` on a FinetuneJob with the example's pvc:// and
configmap:// URIs (mapped under FINETUNE_VOLUME_ROOT) trains a LoRA adapter on SmolLM2-135M-Instruct
(chat-train.jsonl, 20 steps, batch 4, seq 128) that lowers the eval loss on chat-eval.jsonl and
raises the exact-match rate of its greedy answers; the adapter, summary and termination message are
written, and `eval --adapter` agrees. The run is conftest's `smollm2_lora_run`, shared with
test_report.py."""

import json

from conftest import REPO, run_json


def test_lora_run_lowers_eval_loss(smollm2_lora_run, gguf_path):
    out, term = smollm2_lora_run.out, smollm2_lora_run.termination_log
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
