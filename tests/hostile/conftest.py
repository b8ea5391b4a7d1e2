"""The malformed-input suite: files an attacker or a careless user could hand the trainer.

Every case runs the real `finetune-trainer` binary on one broken input and must end with exit
status 2 (the contract's "invalid input"), a one-line message naming the file (and line or tensor),
within 5 s and under 1 GiB peak RSS. The valid bases the cases break are built here, small enough
that the limits measure the parser and not the model: a byte-level BPE tokenizer, a 1-layer Llama
in safetensors, the same model exported to GGUF by the trainer itself, and a chat data set.

Run: `make test-hostile` (part of `make test`), or with the project venv:
    python -m pytest -q tests/hostile
"""

import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

TIME_LIMIT_S = 5.0
RSS_LIMIT_MIB = 1024

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def trainer_bin() -> Path:
    explicit = os.environ.get("FINETUNE_TRAINER_BIN")
    if explicit:
        return Path(explicit)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/finetune-operator/target"))
    return Path(target) / "release" / "finetune-trainer"


@dataclass
class Outcome:
    code: int
    stderr: str
    stdout: str
    seconds: float
    peak_rss_mib: float


def run_measured(*args, timeout=TIME_LIMIT_S * 4) -> Outcome:
    """Runs the trainer on CPU; returns its status, output, wall time and peak RSS (from wait4).
    A run past `timeout` is killed, so a hang fails the time limit instead of the suite."""
    cmd = [str(trainer_bin()), "--device", "cpu", *map(str, args)]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = {}

    def drain(name, stream):
        out[name] = stream.read().decode("utf-8", "replace")

    readers = [threading.Thread(target=drain, args=(n, s)) for n, s in
               (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for r in readers:
        r.start()
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - start
    killer.cancel()
    for r in readers:
        r.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    outcome = Outcome(proc.returncode, out["stderr"], out["stdout"], seconds, usage.ru_maxrss / 1024)
    MEASURED.append((os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0], outcome))
    return outcome


MEASURED = []


def pytest_terminal_summary(terminalreporter):
    """The worst time and memory over every run, for the record."""
    if not MEASURED:
        return
    slow = max(MEASURED, key=lambda m: m[1].seconds)
    big = max(MEASURED, key=lambda m: m[1].peak_rss_mib)
    terminalreporter.write_line(
        f"hostile inputs: {len(MEASURED)} runs; slowest {slow[1].seconds:.2f} s ({slow[0]}); "
        f"largest peak RSS {big[1].peak_rss_mib:.0f} MiB ({big[0]})")


def assert_refused(outcome: Outcome, *names: str):
    """Exit 2, within the limits, with an `error:` line naming each of `names`; never a panic."""
    assert "internal error" not in outcome.stderr, outcome.stderr
    assert outcome.code == 2, f"exit {outcome.code}, stderr: {outcome.stderr[-2000:]}"
    assert outcome.seconds < TIME_LIMIT_S, f"took {outcome.seconds:.1f} s"
    assert outcome.peak_rss_mib < RSS_LIMIT_MIB, f"peak RSS {outcome.peak_rss_mib:.0f} MiB"
    lines = outcome.stderr.splitlines()
    first = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert first, outcome.stderr
    # The message proper: from its `error:` line to the end (a template error adds its context).
    message = "\n".join(lines[first[-1]:])
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"


def bytes_to_unicode():
    """GPT-2's byte → printable character table (byte-level BPE vocabularies use these symbols)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def byte_tokenizer_json(pre_tokenizer=None) -> dict:
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    vocab["<|im_start|>"] = 256
    vocab["<|im_end|>"] = 257
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for t, i in (("<|im_start|>", 256), ("<|im_end|>", 257))]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer or {"type": "ByteLevel", "add_prefix_space": False,
                                           "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": []},
    }


TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 258, "hidden_size": 16,
    "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": True, "eos_token_id": 257, "bos_token_id": 256,
}


def tiny_weights(cfg) -> dict:
    rng = np.random.default_rng(0)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    w = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        w.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                  p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                  p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                  p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                  p + "mlp.down_proj.weight": (h, i)})
    return {k: (rng.standard_normal(s) * 0.05).astype(np.float32) for k, s in w.items()}


def write_hf_model(d: Path, config=None, tokenizer=None, template=CHATML):
    from safetensors.numpy import save_file

    d.mkdir(parents=True, exist_ok=True)
    cfg = dict(TINY_CONFIG, **(config or {}))
    (d / "config.json").write_text(json.dumps(cfg))
    save_file(tiny_weights(TINY_CONFIG), str(d / "model.safetensors"))
    (d / "tokenizer.json").write_text(json.dumps(tokenizer or byte_tokenizer_json()))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}))
    return d


CHAT_LINES = [
    {"messages": [{"role": "user", "content": f"What is {a} plus {a}?"},
                  {"role": "assistant", "content": f"{2 * a}"}]}
    for a in range(6)
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def bases(tmp_path_factory):
    """Valid inputs, each checked to be accepted, so that every refusal below is the damage's doing."""
    root = tmp_path_factory.mktemp("bases")
    hf = write_hf_model(root / "hf")
    data = write_jsonl(root / "chat.jsonl", CHAT_LINES)
    gguf = root / "tiny.gguf"
    ok = run_measured("export-gguf", "--model", hf, "--output", gguf, "--type", "f32")
    assert ok.code == 0, ok.stderr
    for model in (hf, gguf):
        ok = run_measured("eval", "--model", model, "--data", data, "--format", "chat")
        assert ok.code == 0, ok.stderr
    return type("Bases", (), {"root": root, "hf": hf, "gguf": gguf, "data": data})
