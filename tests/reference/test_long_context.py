"""Long-context fine-tuning: `finetune-trainer run` with `baseModel.ropeScaling` trains a tiny random
Llama (64 positions, SmolLM2 tokenizer) on ~200-token texts with `maxSeqLength: 256`. The merged
model it writes must reload in transformers with the scaling in its config and give our logits on a
200-token sequence; the adapter's `config_overrides.json` must give the same model on the base (ours
with `--adapter`, transformers with `from_pretrained(base, **overrides)` + PEFT); the eval loss on the
long samples must fall; a full fine-tune's own config.json must carry the scaling; and the same job
without ropeScaling (or with too small a factor) must be refused (exit 2)."""

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_trainer

BASE_CONTEXT = 64
MAX_SEQ = 256

# type → extra YAML keys; dynamic keeps max_position_embeddings at the original context (it is the
# length past which transformers grows the base), the others extend it to original × factor.
CASES = {
    "linear": ("linear", ""),
    "dynamic": ("dynamic", ""),
    "yarn": ("yarn", ", betaFast: 16"),
    "llama3": ("llama3", ", lowFreqFactor: 1.0, highFreqFactor: 4.0"),
}

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega").split()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, hf_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama-64")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(hf_tokenizer), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=BASE_CONTEXT, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      bos_token_id=hf_tokenizer.bos_token_id, eos_token_id=hf_tokenizer.eos_token_id)
    LlamaForCausalLM(cfg).eval().save_pretrained(str(path), safe_serialization=True)
    hf_tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory, hf_tokenizer):
    """Texts of ~200 tokens: the Greek alphabet in order from a varying start, so the next word is
    predictable from the previous one and a few steps lower the loss."""
    path = tmp_path_factory.mktemp("long-data")

    def text(start):
        return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(95))

    for name, starts in (("train", range(8)), ("eval", range(11, 15))):
        with open(path / f"{name}.jsonl", "w") as f:
            for s in starts:
                f.write(json.dumps({"text": text(s)}) + "\n")
    n = len(hf_tokenizer(text(0))["input_ids"])
    assert BASE_CONTEXT < n <= MAX_SEQ, n
    return path


def job_yaml(model, data, rope, adapter="{type: lora, lora: {rank: 8, alpha: 16, dropout: 0.0}}"):
    rope_line = f"\n  baseModel: {{uri: \"file://{model}\", ropeScaling: {rope}}}" if rope else \
        f"\n  baseModel: {{uri: \"file://{model}\"}}"
    return f"""apiVersion: finetune.dev/v1alpha1
kind: FinetuneJob
metadata: {{name: long-context}}
spec:{rope_line}
  dataset:
    train: {{uri: "file://{data / 'train.jsonl'}"}}
    eval: {{uri: "file://{data / 'eval.jsonl'}"}}
    format: text
  adapter: {adapter}
  hyperparameters: {{maxSteps: 8, learningRate: 2.0e-2, batchSize: 4, maxSeqLength: {MAX_SEQ}, seed: 3, scheduler: constant, precision: fp32}}
  forgettingGuard: {{disabled: true}}
  evaluation: {{everySteps: 4}}
  output: {{merge: true}}
  resources: {{gpus: 0}}
"""


def run_job(bin_path, tmp_path, text):
    job = tmp_path / "job.yaml"
    job.write_text(text)
    out = tmp_path / "out"
    env = dict(os.environ, FINETUNE_STATUS_PORT="0")
    proc = subprocess.run([str(bin_path), "--device", "cpu", "run", str(job), "--output", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    return proc, out


def our_logits(tmp_path, model, ids, *extra):
    f = tmp_path / f"logits-{len(list(tmp_path.iterdir()))}.safetensors"
    run_trainer("logits", "--model", model, *extra, "--ids", ",".join(map(str, ids)), "--out", f)
    return load_file(str(f))["logits"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_rope_scaled_finetune_reloads_in_transformers(case, tiny_model, data, tmp_path, bin_path):
    from transformers import AutoModelForCausalLM

    kind, extra = CASES[case]
    proc, out = run_job(bin_path, tmp_path, job_yaml(tiny_model, data, f"{{type: {kind}, factor: 4{extra}}}"))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "training_summary.json").read_text())
    assert "baseModel.ropeScaling" not in summary["ignored"]
    assert summary["rope_scaling"]["rope_parameters"]["rope_type"] == kind
    assert summary["rope_scaling"]["context_length"] == MAX_SEQ

    # (a) the merged config carries the scaling in transformers' own layout.
    merged = out / "merged"
    cfg = json.loads((merged / "config.json").read_text())
    expect_max_pos = BASE_CONTEXT if kind == "dynamic" else MAX_SEQ
    assert cfg["max_position_embeddings"] == expect_max_pos
    assert cfg["rope_parameters"]["rope_type"] == kind and cfg["rope_parameters"]["factor"] == 4
    if kind in ("yarn", "llama3"):
        assert cfg["rope_parameters"]["original_max_position_embeddings"] == BASE_CONTEXT
    hf = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    assert hf.config.rope_parameters["rope_type"] == kind
    assert hf.config.max_position_embeddings == expect_max_pos

    # (b) transformers and we agree on the merged model past the base context.
    torch.manual_seed(1)
    ids = torch.randint(0, hf.config.vocab_size, (1, 200)).tolist()[0]
    ours = our_logits(tmp_path, merged, ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits
    diff = (ours - ref).abs().max().item()
    # The scaling must matter at these positions, or agreement would prove nothing.
    unscaled = AutoModelForCausalLM.from_pretrained(
        str(merged), dtype=torch.float32, max_position_embeddings=MAX_SEQ,
        rope_parameters={"rope_type": "default", "rope_theta": cfg["rope_parameters"]["rope_theta"]}).eval()
    with torch.no_grad():
        moved = (unscaled(torch.tensor([ids])).logits - ref).abs().max().item()

    # The adapter alone: its config_overrides.json restores the trained rope on the base model.
    overrides = json.loads((out / "config_overrides.json").read_text())
    assert overrides == {k: cfg[k] for k in ("max_position_embeddings", "rope_parameters")}
    ours_adapter = our_logits(tmp_path, tiny_model, ids, "--adapter", out)
    adapter_diff = (ours_adapter - ref).abs().max().item()

    # (c) the eval loss on the long samples went down.
    before = summary["initial_eval_loss"]
    after = summary["evals"][-1]["eval_loss"]
    print(f"\n{case}: eval loss {before:.4f} -> {after:.4f}; max logit diff ours vs transformers "
          f"{diff:.2e}, base+adapter vs merged {adapter_diff:.2e}; scaling moves logits by {moved:.2e}")
    assert moved > 1e-2
    assert diff < 1e-3
    assert adapter_diff < 1e-3
    assert after < before - 0.05, (before, after)


def test_adapter_overrides_load_with_peft(tiny_model, data, tmp_path, bin_path):
    """What a transformers user does with the adapter: base + overrides, then PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    proc, out = run_job(bin_path, tmp_path, job_yaml(tiny_model, data, "{type: linear, factor: 4}"))
    assert proc.returncode == 0, proc.stderr
    overrides = json.loads((out / "config_overrides.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32, **overrides)
    assert base.config.rope_parameters["rope_type"] == "linear"
    peft_model = PeftModel.from_pretrained(base.eval(), str(out)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"), dtype=torch.float32).eval()
    torch.manual_seed(2)
    ids = torch.tensor([torch.randint(0, base.config.vocab_size, (200,)).tolist()])
    with torch.no_grad():
        diff = (peft_model(ids).logits - merged(ids).logits).abs().max().item()
    print(f"\nPEFT(base + overrides) vs merged: max logit diff {diff:.2e}")
    assert diff < 1e-4

    # `finetune-trainer merge` of the adapter alone writes the same config and weights.
    cli = tmp_path / "cli-merged"
    run_trainer("merge", "--model", tiny_model, "--adapter", out, "--output", cli)
    cli_cfg = json.loads((cli / "config.json").read_text())
    job_cfg = json.loads((out / "merged" / "config.json").read_text())
    for k in ("max_position_embeddings", "rope_parameters"):
        assert cli_cfg[k] == job_cfg[k], k
    a, b = load_file(str(cli / "model.safetensors")), load_file(str(out / "merged" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_finetune_writes_the_scaling(tiny_model, data, tmp_path, bin_path):
    """Full fine-tuning: the output directory itself is the model, its config.json scaled."""
    from transformers import AutoModelForCausalLM

    proc, out = run_job(bin_path, tmp_path, job_yaml(tiny_model, data, "{type: linear, factor: 4}",
                                                     adapter="{type: full}"))
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["max_position_embeddings"] == MAX_SEQ
    assert cfg["rope_parameters"]["rope_type"] == "linear" and cfg["rope_parameters"]["factor"] == 4
    assert not (out / "config_overrides.json").exists()
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    torch.manual_seed(3)
    ids = torch.randint(0, hf.config.vocab_size, (1, 200)).tolist()[0]
    ours = our_logits(tmp_path, out, ids)
    with torch.no_grad():
        diff = (ours - hf(torch.tensor([ids])).logits).abs().max().item()
    summary = json.loads((out / "training_summary.json").read_text())
    before, after = summary["initial_eval_loss"], summary["evals"][-1]["eval_loss"]
    print(f"\nfull: eval loss {before:.4f} -> {after:.4f}; max logit diff ours vs transformers {diff:.2e}")
    assert diff < 1e-3
    assert after < before


def test_max_seq_length_past_the_context_is_refused(tiny_model, data, tmp_path, bin_path):
    proc, _ = run_job(bin_path, tmp_path, job_yaml(tiny_model, data, None))
    assert proc.returncode == 2, proc.stderr
    assert "spec.hyperparameters.maxSeqLength" in proc.stderr, proc.stderr
    assert "ropeScaling" in proc.stderr


def test_factor_too_small_for_max_seq_length_is_refused(tiny_model, data, tmp_path, bin_path):
    proc, _ = run_job(bin_path, tmp_path, job_yaml(tiny_model, data, "{type: linear, factor: 2}"))
    assert proc.returncode == 2, proc.stderr
    assert "spec.hyperparameters.maxSeqLength" in proc.stderr, proc.stderr
