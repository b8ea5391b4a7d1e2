"""QLoRA (`adapter.lora.baseQuantization: nf4`) on SmolLM2-135M-Instruct's GGUF: the decoder's
linear layers are held as NF4 while the adapter trains in float32. The run lowers the eval loss,
holds the quantized layers in about an eighth of their float32 bytes (measured from the log),
and its adapter is a normal PEFT adapter: PEFT loads it onto transformers' full-precision base
(from the same GGUF) and lowers that model's loss on the eval conversations too. A QLoRA job that
asks for a merged export is refused naming the field."""

import json
import os
import re
import subprocess

import torch

from conftest import GGUF_NAME, REPO, example_volume

JOB = """apiVersion: finetune.dev/v1alpha1
kind: FinetuneJob
metadata: {{name: qlora}}
spec:
  baseModel: {{uri: pvc://models/smollm2/{gguf}, format: gguf}}
  dataset:
    train: {{uri: configmap://finetune-examples-data/chat-train.jsonl}}
    eval: {{uri: configmap://finetune-examples-data/chat-eval.jsonl}}
    format: chat
  adapter: {{type: lora, lora: {{rank: 16, alpha: 32, dropout: 0.05, baseQuantization: nf4}}}}
  hyperparameters: {{maxSteps: 8, learningRate: 1.0e-3, batchSize: 4, maxSeqLength: 128, warmupSteps: 2, seed: 42}}
  forgettingGuard: {{disabled: true}}
  evaluation: {{everySteps: 8}}
  checkpoint: {{everySteps: 8}}
  resources: {{gpus: 0}}
{extra}"""


def run_job(tmp_path, gguf_path, bin_path, extra=""):
    vol = example_volume(tmp_path, gguf_path)
    job = tmp_path / "job.yaml"
    job.write_text(JOB.format(gguf=GGUF_NAME, extra=extra))
    out = tmp_path / "out"
    env = dict(os.environ, FINETUNE_VOLUME_ROOT=str(vol), FINETUNE_STATUS_PORT="0",
               FINETUNE_TERMINATION_LOG=str(tmp_path / "term"))
    proc = subprocess.run([str(bin_path), "--device", "cpu", "run", str(job), "--output", str(out)],
                          capture_output=True, text=True, timeout=1200, env=env)
    return proc, out


def eval_loss(model, tok):
    """Mean token loss of the eval conversations' assistant turns, with the chat template."""
    total, count = 0.0, 0
    for line in (REPO / "examples/data/chat-eval.jsonl").read_text().splitlines():
        msgs = json.loads(line)["messages"]
        prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(msgs, tokenize=False)
        ids = tok(full, add_special_tokens=False, return_tensors="pt")["input_ids"]
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        labels = ids.clone()
        labels[:, :n_prompt] = -100
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())
        total += float(loss) * n
        count += n
    return total / count


def test_qlora_on_the_gguf_base_lowers_the_loss_and_its_adapter_loads_in_peft(
        tmp_path, gguf_path, bin_path, hf_model, hf_tokenizer):
    from peft import PeftModel

    proc, out = run_job(tmp_path, gguf_path, bin_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    quantized = re.search(r"quantized \(Nf4\): ([\d.]+) MiB -> ([\d.]+) MiB", proc.stderr)
    assert quantized, proc.stderr[-4000:]
    before, after = map(float, quantized.groups())
    print(f"decoder linears: {before:.1f} MiB float32 -> {after:.1f} MiB NF4")
    assert 0.12 < after / before < 0.14, (before, after)  # ~0.52 of 4 bytes per weight
    summary = json.loads((out / "training_summary.json").read_text())
    first, last = summary["initial_eval_loss"], summary["evals"][-1]["eval_loss"]
    print(f"our eval loss (NF4 base): {first:.4f} -> {last:.4f}")
    assert last < first - 0.05, (first, last)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16
    base_loss = eval_loss(hf_model, hf_tokenizer)
    tuned = PeftModel.from_pretrained(hf_model, str(out)).eval()
    try:
        tuned_loss = eval_loss(tuned, hf_tokenizer)
    finally:
        tuned.unload()
    print(f"PEFT on the full-precision base: eval loss {base_loss:.4f} -> {tuned_loss:.4f}")
    assert tuned_loss < base_loss - 0.05, (base_loss, tuned_loss)


def test_a_qlora_job_asking_for_a_merged_model_is_refused_naming_the_field(tmp_path, gguf_path, bin_path):
    proc, _ = run_job(tmp_path, gguf_path, bin_path, extra="  output: {merge: true}\n")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "spec.output.merge" in proc.stderr and "finetune-trainer merge" in proc.stderr, proc.stderr
