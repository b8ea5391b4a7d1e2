"""PEFT parity: `finetune-trainer run` trains a LoRA adapter (a few steps, on a tiny random Llama
written by transformers with the SmolLM2 tokenizer and chat template); PEFT loads that adapter onto
transformers' model and its logits must match ours (`logits --adapter`) within 1e-3, and the
adapter must really change the logits."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_trainer

REPO = Path(__file__).resolve().parents[2]

CASES = {
    "all-linear": "{rank: 8, alpha: 16, dropout: 0.1}",
    "rslora-qv": "{rank: 4, alpha: 8, dropout: 0.0, rslora: true, targetModules: [q_proj, v_proj]}",
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, hf_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(hf_tokenizer), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      bos_token_id=hf_tokenizer.bos_token_id, eos_token_id=hf_tokenizer.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(str(path), safe_serialization=True)
    hf_tokenizer.save_pretrained(str(path))
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_loads_our_adapter_with_matching_logits(case, tiny_model, tmp_path, bin_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    job = tmp_path / "job.yaml"
    job.write_text(f"""apiVersion: finetune.dev/v1alpha1
kind: FinetuneJob
metadata: {{name: peft-parity}}
spec:
  baseModel: {{uri: "file://{tiny_model}"}}
  dataset:
    train: {{uri: "file://{REPO / 'examples/data/chat-train.jsonl'}"}}
    format: chat
  adapter: {{type: lora, lora: {CASES[case]}}}
  hyperparameters: {{maxSteps: 4, learningRate: 2.0e-2, batchSize: 4, maxSeqLength: 128, seed: 3, scheduler: constant, precision: fp32}}
  forgettingGuard: {{disabled: true}}
  resources: {{gpus: 0}}
""")
    out = tmp_path / "out"
    env = dict(os.environ, FINETUNE_STATUS_PORT="0")
    proc = subprocess.run([str(bin_path), "--device", "cpu", "run", str(job), "--output", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    names = sorted(load_file(str(out / "adapter_model.safetensors")))
    assert names[0].startswith("base_model.model.model.layers.0."), names[:3]

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    torch.manual_seed(1)
    ids = torch.randint(0, base.config.vocab_size, (1, 40)).tolist()[0]
    logits_file = tmp_path / "logits.safetensors"
    run_trainer("logits", "--model", tiny_model, "--adapter", out, "--ids", ",".join(map(str, ids)),
                "--out", logits_file)
    ours = load_file(str(logits_file))["logits"]

    with torch.no_grad():
        base_logits = base(torch.tensor([ids])).logits
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        ref = peft_model(torch.tensor([ids])).logits
    diff = (ours - ref).abs().max().item()
    moved = (ref - base_logits).abs().max().item()
    print(f"\n{case}: max abs logit diff ours vs PEFT {diff:.2e}; adapter moves logits by {moved:.2e}")
    assert moved > 1e-2, "the adapter barely changes the logits: the comparison would prove nothing"
    assert diff < 1e-3
