"""SmolLM2-135M-Instruct (Q4_1 GGUF): our loader, model, tokenizer and chat template against
transformers' GGUF loading of the same file."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_json, run_trainer

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a land far, far away, there lived a",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]

CORPUS = [
    "Hello world",
    "  leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\n\n\nand    runs     of spaces",
    "Unicode: naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어, العربية",
    "Emoji: 🤗🚀👩‍👩‍👧‍👦 ✨ 🇫🇷",
    "Code: fn main() { println!(\"{}\", x.iter().map(|v| v * 2).sum::<i32>()); }",
    "    def f(x):\n        return {'a': [1, 2, 3], \"b\": None}  # comment\n",
    "Numbers 1234567890 3.14159 1e-5 0xDEADBEEF",
    "<|im_start|>system\nYou are nice<|im_end|>\n<|im_start|>user\nhi<|im_end|>",
    "special tokens glued<|endoftext|>together<|im_end|>x",
    "I'm sure they'll say we've done it, haven't we? It's John's.",
    "",
    " ",
    "\u00a0non-breaking\u2009thin\u200bzero-width",
    "mixed 中文 and English words, 混合",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hello"}],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And times 3?"},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue.\n\nAlso  red."},
    ],
]

TEXT_DATA = [
    {"text": "The quick brown fox jumps over the lazy dog. It was a sunny day in the park."},
    {"text": "import numpy as np\nx = np.arange(10)\nprint(x.sum())\n"},
    {"text": "Paris is the capital and most populous city of France."},
]

CHAT_DATA = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "The capital of France is Paris."}]},
    {"messages": [{"role": "system", "content": "You are a math tutor."},
                  {"role": "user", "content": "What is 3*4?"},
                  {"role": "assistant", "content": "3*4 = 12."},
                  {"role": "user", "content": "And 12/4?"},
                  {"role": "assistant", "content": "12/4 = 3."}]},
]

INSTRUCTION_DATA = [
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    {"instruction": "Give a synonym for happy.", "output": "Joyful."},
]


def test_logits_match_transformers(hf_model, hf_tokenizer, gguf_path, tmp_path):
    worst = 0.0
    for i, prompt in enumerate(PROMPTS):
        ids = hf_tokenizer(prompt, add_special_tokens=False).input_ids
        out = tmp_path / f"logits{i}.safetensors"
        run_trainer("logits", "--model", gguf_path, "--ids", ",".join(map(str, ids)), "--out", out)
        ours = load_file(str(out))["logits"]
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits.float()
        assert ours.shape == ref.shape
        diff = (ours - ref).abs().max().item()
        worst = max(worst, diff)
        assert diff < 1e-3, f"prompt {i}: max abs logit diff {diff}"
    print(f"\nmax abs logit diff over {len(PROMPTS)} prompts: {worst:.3e}")


def test_greedy_generation_is_token_identical(hf_model, hf_tokenizer, gguf_path):
    for prompt in ["What is the capital of France?", "Write a haiku about the sea."]:
        ours = run_json("generate", "--model", gguf_path, "--prompt", prompt, "--chat",
                        "--max-new-tokens", "32", "--json")
        ids = hf_tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                               add_generation_prompt=True, tokenize=True, return_dict=False)
        assert ours["prompt_ids"] == list(ids)
        with torch.no_grad():
            gen = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)
        ref = gen[0, len(ids):].tolist()
        assert ours["ids"] == ref, f"{prompt!r}:\nours {ours['ids']}\nref  {ref}"


def test_tokenization_is_id_identical(hf_tokenizer, gguf_path, tmp_path):
    corpus = tmp_path / "corpus.json"
    corpus.write_text(json.dumps(CORPUS))
    for special in (False, True):
        args = ["tokenize", "--model", gguf_path, "--input", corpus]
        if special:
            args.append("--add-special-tokens")
        ours = run_json(*args)
        ref = [hf_tokenizer(s, add_special_tokens=special).input_ids for s in CORPUS]
        for text, a, b in zip(CORPUS, ours, ref):
            assert a == b, f"{text!r}: ours {a} ref {b}"


def test_chat_template_is_byte_identical(hf_tokenizer, gguf_path, tmp_path):
    items = [{"messages": c, "add_generation_prompt": agp} for c in CONVERSATIONS for agp in (False, True)]
    path = tmp_path / "chats.json"
    path.write_text(json.dumps(items))
    ours = run_json("render-chat", "--model", gguf_path, "--input", path)
    for item, rendered in zip(items, ours):
        ref = hf_tokenizer.apply_chat_template(item["messages"], tokenize=False,
                                               add_generation_prompt=item["add_generation_prompt"])
        assert rendered == ref


def _assistant_mask(tok, messages):
    """Reference implementation of the documented `eval` definition, with Python char offsets."""
    full = tok.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        assert upto.startswith(prefix) and full.startswith(upto)
        spans.append((len(prefix), len(upto)))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    flags = [any(a <= s < b for a, b in spans) for s, _ in enc.offset_mapping]
    return enc.input_ids, flags


def _reference_loss(model, examples):
    total, count = 0.0, 0
    for ids, flags in examples:
        labels = [t if f else -100 for t, f in zip(ids, flags)]
        n = sum(1 for label in labels[1:] if label != -100)
        if n == 0:
            continue
        with torch.no_grad():
            out = model(torch.tensor([ids]), labels=torch.tensor([labels]))
        total += out.loss.double().item() * n  # transformers' loss is the mean over targets
        count += n
    return total / count, count


@pytest.mark.parametrize("fmt", ["text", "chat", "instruction"])
def test_eval_loss_matches_transformers(fmt, hf_model, hf_tokenizer, gguf_path, tmp_path):
    data = {"text": TEXT_DATA, "chat": CHAT_DATA, "instruction": INSTRUCTION_DATA}[fmt]
    path = tmp_path / f"{fmt}.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in data))
    ours = run_json("eval", "--model", gguf_path, "--data", path, "--format", fmt)
    examples = []
    for x in data:
        if fmt == "text":
            ids = hf_tokenizer(x["text"]).input_ids
            examples.append((ids, [True] * len(ids)))
        else:
            if fmt == "instruction":
                user = x["instruction"] + ("\n\n" + x["input"] if x.get("input") else "")
                messages = [{"role": "user", "content": user}, {"role": "assistant", "content": x["output"]}]
            else:
                messages = x["messages"]
            examples.append(_assistant_mask(hf_tokenizer, messages))
    ref_loss, ref_count = _reference_loss(hf_model, examples)
    rel = abs(ours["loss"] - ref_loss) / ref_loss
    print(f"\n{fmt}: ours {ours['loss']:.6f} ref {ref_loss:.6f} rel diff {rel:.2e} tokens {ours['tokens']}")
    assert ours["tokens"] == ref_count
    assert rel < 1e-4
    assert abs(ours["perplexity"] - torch.tensor(ref_loss).exp().item()) / ours["perplexity"] < 1e-3


def test_bad_inputs_exit_2(gguf_path, tmp_path):
    missing = run_trainer("generate", "--model", tmp_path / "nope.gguf", "--prompt", "x", check=False)
    assert missing.returncode == 2 and "nope.gguf" in missing.stderr
    corrupt = tmp_path / "bad.gguf"
    corrupt.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 8)
    res = run_trainer("generate", "--model", corrupt, "--prompt", "x", check=False)
    assert res.returncode == 2 and "bad.gguf" in res.stderr and "panicked" not in res.stderr
    # A directory without adapter_config.json is not a PEFT adapter: the message names the file.
    adapter = run_trainer("generate", "--model", gguf_path, "--adapter", tmp_path, "--prompt", "x", check=False)
    assert adapter.returncode == 2 and "adapter_config.json" in adapter.stderr and "panicked" not in adapter.stderr
