"""Vocabulary expansion (`spec.vocabulary.addTokens`): a tiny random Llama with the SmolLM2
tokenizer learns a few words of an imaginary language with LoRA. The added words encode to single
ids (ours and transformers' AutoTokenizer on the saved tokenizer), their embedding rows move away
from the mean initialisation while the old rows stay put, PEFT loads the adapter (trainable token
rows) on the base resized to `len(tokenizer)` with logits matching ours, and the merged model
(`output.merge`) loads in transformers with the larger vocabulary and matches too. Both a tied and
an untied LM head are covered (PEFT's layout differs: one row set vs `embed_tokens` + `lm_head`)."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_json, run_trainer

WORDS = ["ŋgalaŋ", "tɔkɔrɔ", "mbɛlɛwu", "ʃikaŋa"]
PEFT_PREFIX = "base_model.model."
EMBED_DELTA = "model.embed_tokens.token_adapter.trainable_tokens_delta"
HEAD_DELTA = "lm_head.token_adapter.trainable_tokens_delta"


def tiny_llama(path, hf_tokenizer, tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(hf_tokenizer), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=tied,
                      bos_token_id=hf_tokenizer.bos_token_id, eos_token_id=hf_tokenizer.eos_token_id)
    LlamaForCausalLM(cfg).eval().save_pretrained(str(path), safe_serialization=True)
    hf_tokenizer.save_pretrained(str(path))
    return path


def write_data(path):
    a, b, c, d = WORDS
    rows = []
    for i in range(24):
        x, y = WORDS[i % 4], WORDS[(i + 1) % 4]
        rows.append({"messages": [
            {"role": "user", "content": f"Say {x} {y} in the old tongue."},
            {"role": "assistant", "content": f"{x} {y} {a} {b} {c} {d} {y} {x}"},
        ]})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=["tied", "untied"])
def trained(request, tmp_path_factory, hf_tokenizer, bin_path):
    tied = request.param == "tied"
    root = tmp_path_factory.mktemp(f"vocab-{request.param}")
    base = tiny_llama(root / "base", hf_tokenizer, tied)
    data = write_data(root / "train.jsonl")
    job = root / "job.yaml"
    words = ", ".join(f'"{w}"' for w in WORDS)
    job.write_text(f"""apiVersion: finetune.dev/v1alpha1
kind: FinetuneJob
metadata: {{name: vocab}}
spec:
  baseModel: {{uri: "file://{base}"}}
  dataset:
    train: {{uri: "file://{data}"}}
    format: chat
  vocabulary: {{addTokens: [{words}, "hello"]}}
  adapter: {{type: lora, lora: {{rank: 8, alpha: 16, dropout: 0.0}}}}
  hyperparameters: {{maxSteps: 6, learningRate: 5.0e-2, batchSize: 4, maxSeqLength: 128, seed: 3, scheduler: constant, precision: fp32}}
  forgettingGuard: {{disabled: true}}
  output: {{merge: true}}
  resources: {{gpus: 0}}
""", encoding="utf-8")
    out = root / "out"
    env = dict(os.environ, FINETUNE_STATUS_PORT="0")
    proc = subprocess.run([str(bin_path), "--device", "cpu", "run", str(job), "--output", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    return {"tied": tied, "base": base, "out": out, "stderr": proc.stderr}


def test_added_words_encode_to_single_ids(trained, hf_tokenizer):
    from transformers import AutoTokenizer

    out = trained["out"]
    summary = json.loads((out / "training_summary.json").read_text())["vocabulary"]
    n0 = len(hf_tokenizer)
    assert summary["vocab_size_before"] == n0 and summary["vocab_size"] == n0 + len(WORDS)
    assert summary["skipped_tokens"] == ["hello"], "an existing token is skipped"
    assert [t["token"] for t in summary["added_tokens"]] == WORDS
    ours = run_json("tokenize", "--model", out, "--input", _json_file(out.parent / "w.json", WORDS))
    assert ours == [[n0 + i] for i in range(len(WORDS))]
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == n0 + len(WORDS)
    assert [tok.encode(w, add_special_tokens=False) for w in WORDS] == ours
    sentence = f"Say {WORDS[0]} and {WORDS[2]}, then {WORDS[3]}{WORDS[1]}."
    ours_sentence = run_json("tokenize", "--model", out, "--text", sentence)
    assert ours_sentence == tok.encode(sentence, add_special_tokens=False)
    # The merged model carries the same tokenizer.
    assert AutoTokenizer.from_pretrained(str(out / "merged")).encode(sentence, add_special_tokens=False) \
        == ours_sentence


def test_new_rows_are_trained_and_old_rows_unchanged(trained):
    out, base = trained["out"], trained["base"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    n0 = json.loads((base / "config.json").read_text())["vocab_size"]
    ids = list(range(n0, n0 + len(WORDS)))
    adapter = load_file(str(out / "adapter_model.safetensors"))
    base_sd = load_file(str(base / "model.safetensors"))
    checks = [("model.embed_tokens.weight", EMBED_DELTA)]
    if trained["tied"]:
        assert cfg["trainable_token_indices"] == ids
        assert PEFT_PREFIX + HEAD_DELTA not in adapter
    else:
        assert cfg["trainable_token_indices"] == {"embed_tokens": ids, "lm_head": ids}
        checks.append(("lm_head.weight", HEAD_DELTA))
    size = (out / "adapter_model.safetensors").stat().st_size
    print(f"\n{'tied' if trained['tied'] else 'untied'}: adapter_model.safetensors {size} bytes")
    merged = load_file(str(out / "merged" / "model.safetensors"))
    for name, delta in checks:
        rows = adapter[PEFT_PREFIX + delta]
        assert rows.shape == (len(WORDS), 64)
        mean = base_sd[name].float().mean(0)
        moved = (rows - mean).abs().max(dim=1).values
        print(f"{name}: trained rows moved from the mean by {moved.tolist()}")
        assert (moved > 1e-3).all(), "every added row is trained"
        assert torch.cdist(rows, rows).fill_diagonal_(1.0).min() > 1e-3, "rows differ from each other"
        # Merged: the old rows are the base rows exactly, the new rows the trained ones.
        assert torch.equal(merged[name][:n0], base_sd[name])
        assert torch.equal(merged[name][n0:], rows)


def _json_file(path, value):
    path.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
    return path


def _ids(tok):
    text = f"{WORDS[0]} {WORDS[1]} hello {WORDS[2]} world {WORDS[3]}{WORDS[0]}"
    return tok.encode(text, add_special_tokens=False)


def test_peft_loads_the_adapter_with_matching_logits(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = trained["out"]
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = _ids(tok)
    assert max(ids) >= len(tok) - len(WORDS), "the sequence holds added tokens"
    base = AutoModelForCausalLM.from_pretrained(str(trained["base"]), dtype=torch.float32).eval()
    base.resize_token_embeddings(len(tok))
    with torch.no_grad():
        before = base(torch.tensor([ids])).logits
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        ref = peft_model(torch.tensor([ids])).logits
    f = tmp_path / "logits.safetensors"
    run_trainer("logits", "--model", trained["base"], "--adapter", out,
                "--ids", ",".join(map(str, ids)), "--out", f)
    ours = load_file(str(f))["logits"]
    assert ours.shape == ref.shape == (1, len(ids), len(tok))
    diff = (ours - ref).abs().max().item()
    moved = (ref - before).abs().max().item()
    moved_new = (ref - before)[0, :, len(tok) - len(WORDS):].abs().max().item()
    print(f"\nmax abs logit diff ours vs PEFT (resized vocab {len(tok)}): {diff:.2e}; "
          f"the adapter moves logits by {moved:.2e} (new-token columns {moved_new:.2e})")
    assert moved > 1e-2 and moved_new > 1e-2, "the comparison would prove nothing"
    assert diff < 1e-3


def test_merged_model_loads_with_the_larger_vocab(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = trained["out"]
    tok = AutoTokenizer.from_pretrained(str(out / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"), dtype=torch.float32).eval()
    assert merged.config.vocab_size == len(tok)
    assert merged.get_input_embeddings().weight.shape[0] == len(tok)
    ids = _ids(tok)
    with torch.no_grad():
        ref = merged(torch.tensor([ids])).logits
    f = tmp_path / "logits.safetensors"
    run_trainer("logits", "--model", trained["base"], "--adapter", out,
                "--ids", ",".join(map(str, ids)), "--out", f)
    diff = (load_file(str(f))["logits"] - ref).abs().max().item()
    # And `finetune-trainer merge` writes the same model as `output.merge`.
    run_json("merge", "--model", trained["base"], "--adapter", out, "--output", tmp_path / "m")
    a = load_file(str(tmp_path / "m" / "model.safetensors"))
    b = load_file(str(out / "merged" / "model.safetensors"))
    wdiff = max((a[k] - b[k]).abs().max().item() for k in b)
    print(f"\nmerged: max abs logit diff vs ours with the adapter {diff:.2e}; merge CLI vs output.merge {wdiff:.2e}")
    assert diff < 1e-3 and wdiff < 1e-6
    assert json.loads((tmp_path / "m" / "config.json").read_text())["vocab_size"] == len(tok)


def test_resume_restores_the_token_rows_exactly(tmp_path, hf_tokenizer, bin_path):
    """Checkpoints carry the trainable rows and their optimizer state: a run resumed from step 3
    ends with exactly the adapter of an uninterrupted run."""
    base = tiny_llama(tmp_path / "base", hf_tokenizer, True)
    data = write_data(tmp_path / "train.jsonl")
    words = ", ".join(f'"{w}"' for w in WORDS)
    job = tmp_path / "job.yaml"
    job.write_text(f"""apiVersion: finetune.dev/v1alpha1
kind: FinetuneJob
metadata: {{name: vocab-resume}}
spec:
  baseModel: {{uri: "file://{base}"}}
  dataset:
    train: {{uri: "file://{data}"}}
    format: chat
  vocabulary: {{addTokens: [{words}]}}
  adapter: {{type: lora, lora: {{rank: 4, alpha: 8, dropout: 0.0}}}}
  hyperparameters: {{maxSteps: 6, learningRate: 5.0e-2, batchSize: 4, maxSeqLength: 128, seed: 3, precision: fp32}}
  forgettingGuard: {{disabled: true}}
  checkpoint: {{everySteps: 3, keepLast: 5}}
  resources: {{gpus: 0}}
""", encoding="utf-8")
    env = dict(os.environ, FINETUNE_STATUS_PORT="0")

    def run(out, ckpt):
        proc = subprocess.run([str(bin_path), "--device", "cpu", "run", str(job), "--output", str(out),
                               "--checkpoint-dir", str(ckpt)], capture_output=True, text=True,
                              timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr
        return proc.stderr

    ckpt = tmp_path / "ckpt"
    run(tmp_path / "a", ckpt)
    steps = sorted(p for p in ckpt.iterdir() if p.is_dir())
    assert len(steps) >= 2, steps
    import shutil
    for p in steps[1:]:
        shutil.rmtree(p)
    log = run(tmp_path / "b", ckpt)
    assert "resumed from" in log
    a = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert PEFT_PREFIX + EMBED_DELTA in a
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_finetune_writes_the_larger_vocab(tmp_path, hf_tokenizer, bin_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_llama(tmp_path / "base", hf_tokenizer, True)
    data = write_data(tmp_path / "train.jsonl")
    words = ", ".join(f'"{w}"' for w in WORDS)
    job = tmp_path / "job.yaml"
    job.write_text(f"""apiVersion: finetune.dev/v1alpha1
kind: FinetuneJob
metadata: {{name: vocab-full}}
spec:
  baseModel: {{uri: "file://{base}"}}
  dataset:
    train: {{uri: "file://{data}"}}
    format: chat
  vocabulary: {{addTokens: [{words}]}}
  adapter: {{type: full}}
  hyperparameters: {{maxSteps: 3, learningRate: 1.0e-2, batchSize: 4, maxSeqLength: 128, seed: 3, precision: fp32}}
  resources: {{gpus: 0}}
""", encoding="utf-8")
    out = tmp_path / "out"
    env = dict(os.environ, FINETUNE_STATUS_PORT="0")
    proc = subprocess.run([str(bin_path), "--device", "cpu", "run", str(job), "--output", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert model.config.vocab_size == len(tok) == len(hf_tokenizer) + len(WORDS)
    assert all(len(tok.encode(w, add_special_tokens=False)) == 1 for w in WORDS)
    rows = model.get_input_embeddings().weight[len(hf_tokenizer):].detach()
    assert torch.cdist(rows, rows).fill_diagonal_(1.0).min() > 1e-4, "the new rows were trained"


def test_bad_vocabulary_input_exits_2(tmp_path, hf_tokenizer, bin_path):
    base = tiny_llama(tmp_path / "base", hf_tokenizer, True)
    data = write_data(tmp_path / "train.jsonl")
    junk = tmp_path / "junk.json"
    junk.write_text("{not a tokenizer")
    job = tmp_path / "job.yaml"
    job.write_text(f"""apiVersion: finetune.dev/v1alpha1
kind: FinetuneJob
metadata: {{name: vocab-bad}}
spec:
  baseModel: {{uri: "file://{base}"}}
  dataset:
    train: {{uri: "file://{data}"}}
    format: chat
  vocabulary: {{tokenizer: {{uri: "file://{junk}"}}}}
  adapter: {{type: lora}}
  hyperparameters: {{maxSteps: 1, maxSeqLength: 128, precision: fp32}}
  resources: {{gpus: 0}}
""", encoding="utf-8")
    env = dict(os.environ, FINETUNE_STATUS_PORT="0")
    proc = subprocess.run([str(bin_path), "--device", "cpu", "run", str(job), "--output", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "spec.vocabulary.tokenizer.uri" in proc.stderr and "junk.json" in proc.stderr
