"""`finetune-trainer merge` and `export-gguf` against transformers, PEFT and gguf-py.

* merge: a LoRA adapter made by PEFT with a non-zero B (`init_lora_weights=False`) on a tiny random
  Llama (untied head) and on SmolLM2-135M-Instruct's GGUF; our merged directory, loaded by
  transformers, gives the logits of PEFT's base + adapter and of our `logits --adapter` (≤ 1e-3).
* export-gguf: the merged models written as f32, f16 and q8_0 GGUF; gguf-py reads back the
  metadata and tensor shapes, our loader and transformers' GGUF loader give the HF model's logits.
  Tolerances (max abs logit difference against the f32 HF model), chosen from measurement with a
  margin of about 2-4x, recorded here (CPU, float32 compute; tiny logits span about ±4, SmolLM2's
  merged model about ±36):
    - f32: 1e-4 (measured 0: a lossless round trip through llama.cpp's Q/K permutation; also
      through transformers' GGUF loader).
    - f16: tiny 2e-2 (measured 4.7e-3), SmolLM2 0.15 (measured 3.9e-2); top-1 38/38 on both.
    - q8_0: tiny 0.4 (measured 0.118, top-1 35/38 — a random model has many near-ties), SmolLM2 3.0
      (measured 1.36, top-1 37/38); top-1 agreement must stay ≥ 85 % (tiny) / ≥ 90 % (SmolLM2).
    The q8_0 bytes of a weight are identical to gguf-py's reference quantizer.
* bad input: an adapter made for another base (hidden size, layer count, target modules) → exit 2
  with a message naming the file and what differs.
"""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_json, run_trainer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "all-linear": dict(r=8, lora_alpha=16, target_modules=TARGETS),
    "rslora-qv-down": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
}
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]
# See the module docstring for the measurements behind these.
TOL = {
    "tiny": {"f32": 1e-4, "f16": 2e-2, "q8_0": 0.4},
    "smollm2": {"f32": 1e-4, "f16": 0.15, "q8_0": 3.0},
}
# Top-1 agreement with the f32 model; the random tiny model has many near-ties.
MIN_TOP1 = {"tiny": 0.85, "smollm2": 0.9}


def _tiny_llama(path, tokenizer, seed, hidden=64, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      rope_theta=10000.0, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger than the init's std=0.02 so that differences would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return model


def _peft_adapter(base, path, seed, **kwargs):
    """A PEFT LoRA with random (non-zero) A and B, saved to `path`; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(base, LoraConfig(init_lora_weights=False, lora_dropout=0.0, **kwargs))
    peft_model.eval()
    peft_model.save_pretrained(str(path))
    return peft_model


def _logits(model_path, ids, out, adapter=None):
    args = ["logits", "--model", model_path, "--ids", ",".join(map(str, ids)), "--out", out]
    if adapter is not None:
        args += ["--adapter", adapter]
    run_trainer(*args)
    return load_file(str(out))["logits"]


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, hf_tokenizer):
    path = tmp_path_factory.mktemp("tiny-base")
    _tiny_llama(path, hf_tokenizer, seed=0)
    return path


@pytest.fixture(scope="module")
def tiny_ids(hf_tokenizer):
    return [hf_tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def merged_tiny(tiny_base, tmp_path_factory):
    """The all-linear adapter merged into the tiny base by our `merge`."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("merged-tiny")
    base = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    _peft_adapter(base, root / "adapter", seed=5, **ADAPTERS["all-linear"])
    run_json("merge", "--model", tiny_base, "--adapter", root / "adapter", "--output", root / "merged")
    return root / "merged"


@pytest.mark.parametrize("case", sorted(ADAPTERS))
def test_merge_matches_peft_and_ours(case, tiny_base, tiny_ids, tmp_path):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    base_logits = [_hf_logits(base, ids) for ids in tiny_ids]
    peft_model = _peft_adapter(base, tmp_path / "adapter", seed=11, **ADAPTERS[case])
    ref = [_hf_logits(peft_model, ids) for ids in tiny_ids]

    summary = run_json("merge", "--model", tiny_base, "--adapter", tmp_path / "adapter",
                       "--output", tmp_path / "merged")
    files = set(summary["files"])
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= files, files
    n_targets = len(ADAPTERS[case]["target_modules"]) * base.config.num_hidden_layers
    assert summary["merged_layers"] == n_targets
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    assert merged.config.tie_word_embeddings is False

    # The merged weights equal PEFT's own merge_and_unload.
    peft_merged = peft_model.merge_and_unload().state_dict()
    ours_sd = load_file(str(tmp_path / "merged" / "model.safetensors"))
    wdiff = max((ours_sd[k] - peft_merged[k]).abs().max().item() for k in ours_sd)

    worst_peft = worst_ours = worst_ours_merged = moved = 0.0
    for i, ids in enumerate(tiny_ids):
        m = _hf_logits(merged, ids)
        ours_adapter = _logits(tiny_base, ids, tmp_path / f"a{i}.safetensors", adapter=tmp_path / "adapter")
        ours_merged = _logits(tmp_path / "merged", ids, tmp_path / f"m{i}.safetensors")
        worst_peft = max(worst_peft, (m - ref[i]).abs().max().item())
        worst_ours = max(worst_ours, (m - ours_adapter).abs().max().item())
        worst_ours_merged = max(worst_ours_merged, (ours_merged - ours_adapter).abs().max().item())
        moved = max(moved, (ref[i] - base_logits[i]).abs().max().item())
    print(f"\n{case}: merged weights vs PEFT merge_and_unload {wdiff:.2e}; merged (transformers) vs "
          f"PEFT base+adapter {worst_peft:.2e}; vs ours base+adapter {worst_ours:.2e}; ours merged vs "
          f"ours base+adapter {worst_ours_merged:.2e}; adapter moves logits by {moved:.2e}")
    assert moved > 1e-2, "the adapter barely changes the logits: the comparison would prove nothing"
    assert wdiff < 1e-5
    assert worst_peft < 1e-3
    assert worst_ours < 1e-3
    assert worst_ours_merged < 1e-3


def test_merge_gguf_base_matches_peft(hf_model, hf_tokenizer, gguf_path, tmp_path):
    """SmolLM2 Q4_1 GGUF as the base: PEFT runs on transformers' dequantized model."""
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = copy.deepcopy(hf_model)
    peft_model = _peft_adapter(base, tmp_path / "adapter", seed=3, r=4, lora_alpha=8,
                               target_modules=["q_proj", "k_proj", "v_proj", "down_proj"])
    run_json("merge", "--model", gguf_path, "--adapter", tmp_path / "adapter", "--output", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    assert merged.config.tie_word_embeddings is True
    worst = worst_ours = moved = 0.0
    for i, p in enumerate(PROMPTS):
        ids = hf_tokenizer(p, add_special_tokens=False).input_ids
        ref = _hf_logits(peft_model, ids)
        m = _hf_logits(merged, ids)
        ours = _logits(gguf_path, ids, tmp_path / f"a{i}.safetensors", adapter=tmp_path / "adapter")
        worst = max(worst, (m - ref).abs().max().item())
        worst_ours = max(worst_ours, (m - ours).abs().max().item())
        moved = max(moved, (ref - _hf_logits(hf_model, ids)).abs().max().item())
    print(f"\nSmolLM2 GGUF base: merged (transformers) vs PEFT {worst:.2e}; vs ours base+adapter "
          f"{worst_ours:.2e}; adapter moves logits by {moved:.2e}")
    assert moved > 1e-2
    assert worst < 1e-3
    assert worst_ours < 1e-3

    # The tokenizer files rebuilt from GGUF metadata tokenize and render chats like the GGUF.
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "merged"))
    for text in PROMPTS + ["Unicode: naïve café, 日本語 🤗", "special<|endoftext|>glued<|im_end|>x"]:
        assert tok(text, add_special_tokens=False).input_ids == hf_tokenizer(text, add_special_tokens=False).input_ids
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == \
        hf_tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert tok.eos_token == hf_tokenizer.eos_token and tok.bos_token == hf_tokenizer.bos_token

    # Exported to GGUF: the realistic model for the f16 / q8_0 tolerances.
    _check_gguf_exports("smollm2", tmp_path / "merged", merged, [hf_tokenizer(p, add_special_tokens=False).input_ids
                                                                 for p in PROMPTS], tmp_path,
                        types=("f16", "q8_0"), transformers_types=())


def _check_gguf_exports(label, merged_dir, merged_model, ids_list, tmp_path, types=("f32", "f16", "q8_0"),
                        transformers_types=("f32",)):
    import gguf

    cfg = merged_model.config
    ref = [_hf_logits(merged_model, ids) for ids in ids_list]
    hf_shapes = {k: tuple(v.shape) for k, v in load_file(str(merged_dir / "model.safetensors")).items()}
    results = {}
    for ty in types:
        out = tmp_path / f"{label}-{ty}.gguf"
        summary = run_json("export-gguf", "--model", merged_dir, "--output", out, "--type", ty)
        assert summary["f16_fallback"] == []

        reader = gguf.GGUFReader(str(out))
        field = lambda k: reader.fields[k].contents()  # noqa: E731
        assert field("general.architecture") == "llama"
        assert field("llama.block_count") == cfg.num_hidden_layers
        assert field("llama.embedding_length") == cfg.hidden_size
        assert field("llama.feed_forward_length") == cfg.intermediate_size
        assert field("llama.attention.head_count") == cfg.num_attention_heads
        assert field("llama.attention.head_count_kv") == cfg.num_key_value_heads
        assert field("llama.context_length") == cfg.max_position_embeddings
        assert field("llama.rope.dimension_count") == cfg.head_dim
        assert field("llama.vocab_size") == cfg.vocab_size
        assert abs(field("llama.rope.freq_base") - cfg.rope_parameters["rope_theta"]) < 1e-3 * cfg.rope_parameters["rope_theta"]
        assert abs(field("llama.attention.layer_norm_rms_epsilon") - cfg.rms_norm_eps) < 1e-9
        assert field("tokenizer.ggml.model") == "gpt2"
        assert len(field("tokenizer.ggml.tokens")) == cfg.vocab_size
        assert len(field("tokenizer.ggml.token_type")) == cfg.vocab_size
        assert len(field("tokenizer.ggml.merges")) > 1000
        assert field("tokenizer.ggml.eos_token_id") == cfg.eos_token_id
        assert "<|im_start|>" in field("tokenizer.chat_template")
        names = {t.name: t for t in reader.tensors}
        assert ("output.weight" in names) == (not cfg.tie_word_embeddings)
        assert len(names) == len(hf_shapes)
        want_type = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[ty]
        for hf_name, shape in hf_shapes.items():
            g = _gguf_name(hf_name)
            t = names[g]
            assert tuple(int(d) for d in reversed(t.shape)) == shape, (g, t.shape, shape)
            assert t.tensor_type.name == (want_type if len(shape) == 2 else "F32"), (g, t.tensor_type.name)
        # gguf-py dequantizes what we quantized back to the HF weights (checked on one Q weight,
        # after undoing llama.cpp's permutation, to see that the permutation is the right one).
        wq = torch.from_numpy(np.array(gguf.dequantize(names["blk.0.attn_q.weight"].data,
                                                       names["blk.0.attn_q.weight"].tensor_type)))
        wq = _unpermute(wq.reshape(hf_shapes["model.layers.0.self_attn.q_proj.weight"]), cfg.num_attention_heads)
        hf_wq = load_file(str(merged_dir / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
        wdiff = (wq - hf_wq).abs().max().item()
        if ty == "q8_0":  # byte-identical to gguf-py's reference quantizer
            ref_bytes = gguf.quants.quantize(_permute(hf_wq, cfg.num_attention_heads).numpy(),
                                             gguf.GGMLQuantizationType.Q8_0)
            assert np.array_equal(np.asarray(names["blk.0.attn_q.weight"].data).reshape(-1).view(np.uint8),
                                  ref_bytes.reshape(-1).view(np.uint8))
        assert wdiff <= {"f32": 0, "f16": 1e-3, "q8_0": 1e-2}[ty] * max(1.0, hf_wq.abs().max().item())

        worst, agree, total = 0.0, 0, 0
        for i, ids in enumerate(ids_list):
            ours = _logits(out, ids, tmp_path / f"{label}-{ty}-{i}.safetensors")
            worst = max(worst, (ours - ref[i]).abs().max().item())
            agree += (ours.argmax(-1) == ref[i].argmax(-1)).sum().item()
            total += len(ids)
        results[ty] = (worst, agree / total)
        print(f"\n{label} {ty}: {out.stat().st_size / 1e6:.1f} MB; our loader vs HF f32 model: max abs logit "
              f"diff {worst:.2e} (logit scale {max(r.abs().max().item() for r in ref):.1f}), top-1 agreement {agree}/{total}; gguf-py q_proj weight diff {wdiff:.2e}")
        assert worst < TOL[label][ty], (ty, worst)
        assert agree / total >= MIN_TOP1[label]

        if ty in transformers_types:
            from transformers import AutoModelForCausalLM

            tm = AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name, dtype=torch.float32).eval()
            tdiff = max((_hf_logits(tm, ids) - ref[i]).abs().max().item() for i, ids in enumerate(ids_list))
            print(f"{label} {ty}: transformers' GGUF loader vs HF f32 model: max abs logit diff {tdiff:.2e}")
            assert tdiff < TOL[label][ty]
    return results


def _gguf_name(hf):
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    parts = hf.split(".")
    layer, module, param = parts[2], ".".join(parts[3:-1]), parts[-1]
    g = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}[module]
    return f"blk.{layer}.{g}.{param}"


def _permute(w, n_head):
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w, n_head):
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_export_gguf_tiny(merged_tiny, tiny_ids, tmp_path):
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(merged_tiny), dtype=torch.float32).eval()
    _check_gguf_exports("tiny", merged_tiny, merged, tiny_ids, tmp_path, transformers_types=("f32", "f16", "q8_0"))

    # Our GGUF tokenizer (rebuilt from tokenizer.ggml.*) encodes like the HF directory's tokenizer.
    texts = PROMPTS + ["Unicode: naïve café, 日本語 🤗", "  spaces\tand\nnewlines  ", "x<|im_end|>y"]
    path = tmp_path / "texts.json"
    path.write_text(json.dumps(texts))
    ours_dir = run_json("tokenize", "--model", merged_tiny, "--input", path)
    ours_gguf = run_json("tokenize", "--model", tmp_path / "tiny-q8_0.gguf", "--input", path)
    assert ours_gguf == ours_dir


def test_adapter_for_another_base_is_rejected(tiny_base, hf_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    # Hidden size 96 instead of 64.
    other = _tiny_llama(tmp_path / "other", hf_tokenizer, seed=1, hidden=96)
    _peft_adapter(other, tmp_path / "wide", seed=2, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    res = run_trainer("merge", "--model", tiny_base, "--adapter", tmp_path / "wide", "--output",
                      tmp_path / "out1", check=False)
    print("\n" + res.stderr.strip())
    assert res.returncode == 2, res.stderr
    assert "adapter_model.safetensors" in res.stderr and "shape mismatch" in res.stderr
    assert "96" in res.stderr and "64" in res.stderr and "another base model" in res.stderr
    assert "internal error" not in res.stderr
    assert not (tmp_path / "out1" / "model.safetensors").exists()
    # The same check guards `logits --adapter`.
    res = run_trainer("logits", "--model", tiny_base, "--adapter", tmp_path / "wide", "--ids", "1,2",
                      "--out", tmp_path / "l.safetensors", check=False)
    assert res.returncode == 2 and "shape mismatch" in res.stderr, res.stderr

    # Three layers instead of two (same widths).
    deeper = _tiny_llama(tmp_path / "deeper", hf_tokenizer, seed=1, layers=3)
    _peft_adapter(deeper, tmp_path / "deep", seed=2, r=4, lora_alpha=8, target_modules=["q_proj"])
    res = run_trainer("merge", "--model", tiny_base, "--adapter", tmp_path / "deep", "--output",
                      tmp_path / "out2", check=False)
    print(res.stderr.strip())
    assert res.returncode == 2 and "layer 2 does not exist" in res.stderr and "2 layers" in res.stderr

    # A target module the architecture does not have (e.g. an adapter for a GPT-2 style model).
    base = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    _peft_adapter(base, tmp_path / "renamed", seed=2, r=4, lora_alpha=8, target_modules=["q_proj"])
    cfg_path = tmp_path / "renamed" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["target_modules"] = ["q_proj", "c_attn"]
    cfg_path.write_text(json.dumps(cfg))
    res = run_trainer("merge", "--model", tiny_base, "--adapter", tmp_path / "renamed", "--output",
                      tmp_path / "out3", check=False)
    print(res.stderr.strip())
    assert res.returncode == 2 and "adapter_config.json" in res.stderr and "`c_attn`" in res.stderr

    # Missing adapter directory.
    res = run_trainer("merge", "--model", tiny_base, "--adapter", tmp_path / "nope", "--output",
                      tmp_path / "out4", check=False)
    assert res.returncode == 2 and "nope" in res.stderr
