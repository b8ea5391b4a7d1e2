"""Hugging Face layout (config.json + safetensors): tiny random Llama/Qwen2 checkpoints written by
transformers, covering every supported rope_scaling type, untied embeddings, attention biases and a
sharded checkpoint; logits must match transformers within 1e-4."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_json, run_trainer

BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, tie_word_embeddings=True)

CASES = {
    "llama-default": ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    "llama-linear": ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}),
    # max_position_embeddings below the sequence length, so the NTK base really grows.
    "llama-dynamic": ("llama", {"max_position_embeddings": 16,
                                "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}),
    "llama-llama3": ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                                   "rope_theta": 500000.0}}),
    "llama-yarn": ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                                 "original_max_position_embeddings": 16, "rope_theta": 10000.0}}),
    "llama-untied-bias": ("llama", {"tie_word_embeddings": False, "attention_bias": True, "mlp_bias": True,
                                    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    "llama-sharded": ("llama", {"tie_word_embeddings": False, "num_hidden_layers": 3,
                                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    "qwen2": ("qwen2", {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}),
    "qwen2-yarn-untied": ("qwen2", {"tie_word_embeddings": False,
                                    "rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0,
                                                        "original_max_position_embeddings": 32}}),
}

# A template exercising what stock templates use: namespace, loops with loop.last, .strip(),
# .startswith(), raise_exception, tojson, is defined, whitespace control with trim/lstrip blocks.
RICH_TEMPLATE = """{%- set ns = namespace(system='') -%}
{%- if messages[0].role == 'system' -%}
    {%- set ns.system = messages[0].content.strip() -%}
    {%- set messages = messages[1:] -%}
{%- endif -%}
{{ bos_token }}
{% if ns.system %}<<SYS>>{{ ns.system }}<</SYS>>
{% endif %}
{% for message in messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message.role == 'user' %}
[INST] {{ message.content | trim }} [/INST]
    {% elif message.content.startswith('{') %}
{{ message.content | tojson }}{{ eos_token }}
    {% else %}
 {{ message.content }}{{ eos_token }}{% if not loop.last %}

{% endif %}
    {% endif %}
{% endfor %}
{% if add_generation_prompt is defined and add_generation_prompt %}ASSISTANT:{% endif %}
"""


@pytest.fixture(scope="module")
def tokenizer_for_tiny(hf_tokenizer):
    return hf_tokenizer


def _make(kind, overrides, path, tokenizer, seed):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    kwargs = dict(BASE, **overrides)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kwargs)).eval()
    with torch.no_grad():  # larger than the init's std=0.02 so that differences would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    shard = {"max_shard_size": "200KB"} if "num_hidden_layers" in overrides else {}
    model.save_pretrained(str(path), safe_serialization=True, **shard)
    tokenizer.save_pretrained(str(path))
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match(case, tmp_path, tokenizer_for_tiny):
    kind, overrides = CASES[case]
    model = _make(kind, overrides, tmp_path, tokenizer_for_tiny, seed=sum(map(ord, case)))
    if case == "llama-sharded":
        assert (tmp_path / "model.safetensors.index.json").exists(), "expected a sharded checkpoint"
    torch.manual_seed(1)
    ids = torch.randint(0, BASE["vocab_size"], (1, 24)).tolist()[0]
    out = tmp_path / "logits.safetensors"
    run_trainer("logits", "--model", tmp_path, "--ids", ",".join(map(str, ids)), "--out", out)
    ours = load_file(str(out))["logits"]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits
    diff = (ours - ref).abs().max().item()
    print(f"\n{case}: max abs logit diff {diff:.2e} (logit scale {ref.abs().max().item():.2f})")
    assert diff < 1e-4
    rope = overrides.get("rope_parameters", {})
    if rope.get("rope_type", "default") != "default":
        # The scaling must matter for this input, or the comparison above would prove nothing.
        plain = _with_default_rope(model, kind, overrides)
        with torch.no_grad():
            moved = (plain(torch.tensor([ids])).logits - ref).abs().max().item()
        assert moved > 1e-3, f"{case}: rope scaling has no effect on this input"


def _with_default_rope(model, kind, overrides):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    theta = overrides["rope_parameters"]["rope_theta"]
    kwargs = dict(BASE, **dict(overrides, rope_parameters={"rope_type": "default", "rope_theta": theta}))
    plain = model_cls(cfg_cls(**kwargs)).eval()
    plain.load_state_dict(model.state_dict())
    return plain


def test_rich_chat_template_matches(tmp_path, tokenizer_for_tiny):
    _make("llama", CASES["llama-default"][1], tmp_path, tokenizer_for_tiny, seed=0)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = RICH_TEMPLATE
    cfg["bos_token"], cfg["eos_token"] = "<s>", "</s>"
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    convs = [
        [{"role": "user", "content": "  hi  "}],
        [{"role": "system", "content": " sys \n"}, {"role": "user", "content": "a"},
         {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
        [{"role": "user", "content": "json?"}, {"role": "assistant", "content": '{"k": "<v>"}'}],
    ]
    items = [{"messages": c, "add_generation_prompt": g} for c in convs for g in (False, True)]
    path = tmp_path / "chats.json"
    path.write_text(json.dumps(items))
    ours = run_json("render-chat", "--model", tmp_path, "--input", path)
    for item, rendered in zip(items, ours):
        ref = tok.apply_chat_template(item["messages"], tokenize=False,
                                      add_generation_prompt=item["add_generation_prompt"])
        assert rendered == ref
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"messages": [{"role": "assistant", "content": "x"}]}]))
    res = run_trainer("render-chat", "--model", tmp_path, "--input", bad, check=False)
    assert res.returncode == 2 and "must alternate" in res.stderr
