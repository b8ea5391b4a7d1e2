"""QLoRA (`adapter.lora.baseQuantization`) on SmolLM2-135M-Instruct's GGUF, whose decoder linears
are Q4_1 blocks: the frozen layers are held quantized while the adapter trains in float32.

- `nf4`: the run lowers the eval loss, holds the quantized layers in about an eighth of their
  float32 bytes (measured from the log), and its adapter is a normal PEFT adapter: PEFT loads it
  onto transformers' full-precision base (from the same GGUF) and lowers that model's loss too.
- `gguf`: the file's own Q4_1 blocks are kept, never expanded, and dequantized per layer; the run
  ends with the same adapter as a plain LoRA run on the expanded GGUF, in less memory.
- `int8`: bitsandbytes' row-wise int8 storage; the run lowers the eval loss.

A QLoRA job that asks for a merged export is refused naming the field."""

import json
import os
import re
import subprocess

import torch

from safetensors.torch import load_file

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
  adapter: {{type: lora, lora: {{rank: 16, alpha: 32, dropout: 0.05{quantization}}}}}
  hyperparameters: {{maxSteps: 8, learningRate: 1.0e-3, batchSize: 4, maxSeqLength: 128, warmupSteps: 2, seed: 42{hp}, precision: fp32}}
  forgettingGuard: {{disabled: true}}
  evaluation: {{everySteps: 8}}
  checkpoint: {{everySteps: 8}}
  resources: {{gpus: 0}}
{extra}"""


def run_job(tmp_path, gguf_path, bin_path, extra="", quantization="nf4", checkpointing=False):
    tmp_path.mkdir(parents=True, exist_ok=True)
    vol = example_volume(tmp_path, gguf_path)
    job = tmp_path / "job.yaml"
    how = f", baseQuantization: {quantization}" if quantization else ""
    hp = ", gradientCheckpointing: true" if checkpointing else ""
    job.write_text(JOB.format(gguf=GGUF_NAME, extra=extra, quantization=how, hp=hp))
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
    quantized = re.search(r"quantized \(Nf4\): ([\d.]+) MiB -> ([\d.]+) MiB \(Nf4 × 210\)", proc.stderr)
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


def quantized_bytes(proc, how):
    """(float32 MiB, held MiB, storage) from the run's log line."""
    found = re.search(rf"quantized \({how}\): ([\d.]+) MiB -> ([\d.]+) MiB \((.*)\)", proc.stderr)
    assert found, proc.stderr[-4000:]
    return float(found[1]), float(found[2]), found[3]


def test_a_gguf_base_trains_on_its_own_blocks_to_the_adapter_of_the_expanded_base(tmp_path, gguf_path, bin_path):
    # Both checkpointed: QLoRA runs are by default (as PEFT's prepare_model_for_kbit_training does),
    # and without it autograd keeps every layer's dequantized weight for backward, so the peaks
    # would be alike; the expanded base is asked for it explicitly.
    plain, plain_out = run_job(tmp_path / "plain", gguf_path, bin_path, quantization=None, checkpointing=True)
    assert plain.returncode == 0, plain.stderr[-4000:]
    kept, kept_out = run_job(tmp_path / "gguf", gguf_path, bin_path, quantization="gguf", checkpointing=True)
    assert kept.returncode == 0, kept.stderr[-4000:]
    before, after, storage = quantized_bytes(kept, "Gguf")
    print(f"decoder linears: {before:.1f} MiB float32 -> {after:.1f} MiB kept as the file's {storage}")
    assert storage == "Q4_1 × 210"
    assert abs(after / before - 20 / 32 / 4) < 0.002, (before, after)  # 20 bytes per 32 weights
    ours = load_file(str(kept_out / "adapter_model.safetensors"))
    ref = load_file(str(plain_out / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(ref) and len(ours) == 30 * 7 * 2
    diff = max((ours[k] - ref[k]).abs().max().item() for k in ours)
    moved = max(ref[k].abs().max().item() for k in ref if "lora_B" in k)
    print(f"adapter vs LoRA on the expanded GGUF: max |diff| {diff:.3g} (lora_B up to {moved:.3g})")
    assert diff <= 1e-6 and moved > 1e-3
    s_kept = json.loads((kept_out / "training_summary.json").read_text())
    s_plain = json.loads((plain_out / "training_summary.json").read_text())
    assert s_kept["initial_eval_loss"] == s_plain["initial_eval_loss"]
    rss_kept, rss_plain = s_kept["peak_rss_bytes"] / 2**20, s_plain["peak_rss_bytes"] / 2**20
    print(f"peak RSS: {rss_kept:.0f} MiB on the kept blocks, {rss_plain:.0f} MiB expanded")
    assert rss_kept < rss_plain - 0.5 * (before - after), (rss_kept, rss_plain)


def test_an_int8_base_lowers_the_loss_in_a_quarter_of_the_float32_bytes(tmp_path, gguf_path, bin_path):
    proc, out = run_job(tmp_path, gguf_path, bin_path, quantization="int8")
    assert proc.returncode == 0, proc.stderr[-4000:]
    before, after, storage = quantized_bytes(proc, "Int8")
    print(f"decoder linears: {before:.1f} MiB float32 -> {after:.1f} MiB int8")
    assert storage == "Int8 × 210"
    assert 0.25 < after / before < 0.26, (before, after)  # 1 byte per weight, 4 per row
    summary = json.loads((out / "training_summary.json").read_text())
    first, last = summary["initial_eval_loss"], summary["evals"][-1]["eval_loss"]
    print(f"our eval loss (int8 base): {first:.4f} -> {last:.4f}")
    assert last < first - 0.05, (first, last)
