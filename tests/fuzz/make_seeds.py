"""Writes the fuzz seeds that are binary (a tiny GGUF, safetensors files) and the regression
input of the tokenizers crate's decoder panic, so that none of them lives in the repository.
They are built from the same tiny model as the malformed-input suite (tests/hostile).

usage: python make_seeds.py OUT_DIR   (writes OUT_DIR/<target>/...)
"""

import json
import struct
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hostile"))
import gguf_layout as gl  # noqa: E402
from conftest import CHATML, TINY_CONFIG, byte_tokenizer_json, tiny_weights  # noqa: E402

U32, F32, STR, BOOL, ARR = 4, 6, 8, 7, 9


def gguf_name(hf: str) -> str:
    """The GGUF tensor name of a Hugging Face parameter (the inverse of the trainer's `hf_name`)."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if hf in fixed:
        return fixed[hf]
    modules = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
               "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    layer, rest = hf.removeprefix("model.layers.").split(".", 1)
    module, param = rest.rsplit(".", 1)
    return f"blk.{layer}.{modules[module]}.{param}"


def tiny_gguf() -> bytes:
    cfg = TINY_CONFIG
    tok = byte_tokenizer_json()
    tokens = sorted(tok["model"]["vocab"], key=tok["model"]["vocab"].get)
    lay = gl.Layout(version=3)
    lay.kv = {
        "general.architecture": (STR, "llama"),
        "llama.context_length": (U32, cfg["max_position_embeddings"]),
        "llama.embedding_length": (U32, cfg["hidden_size"]),
        "llama.block_count": (U32, cfg["num_hidden_layers"]),
        "llama.feed_forward_length": (U32, cfg["intermediate_size"]),
        "llama.attention.head_count": (U32, cfg["num_attention_heads"]),
        "llama.attention.head_count_kv": (U32, cfg["num_key_value_heads"]),
        "llama.rope.freq_base": (F32, cfg["rope_theta"]),
        "llama.attention.layer_norm_rms_epsilon": (F32, cfg["rms_norm_eps"]),
        "llama.vocab_size": (U32, cfg["vocab_size"]),
        "tokenizer.ggml.model": (STR, "gpt2"),
        "tokenizer.ggml.pre": (STR, "gpt-2"),
        "tokenizer.ggml.tokens": (ARR, (STR, tokens)),
        "tokenizer.ggml.token_type": (ARR, (5, [1] * 256 + [3, 3])),
        "tokenizer.ggml.merges": (ARR, (STR, [])),
        "tokenizer.ggml.bos_token_id": (U32, cfg["bos_token_id"]),
        "tokenizer.ggml.eos_token_id": (U32, cfg["eos_token_id"]),
        "tokenizer.ggml.add_bos_token": (BOOL, False),
        "tokenizer.chat_template": (STR, CHATML),
    }
    data = bytearray()
    for name, w in tiny_weights(cfg).items():
        data += b"\0" * (-len(data) % 32)
        lay.tensors.append(gl.Tensor(gguf_name(name), list(reversed(w.shape)), 0, len(data)))
        data += w.astype("<f4").tobytes()
    lay.data = bytes(data)
    return gl.write(lay)


def main(out: Path):
    from safetensors.numpy import save_file

    for target in ("gguf_header", "safetensors_header", "tokenizer_json"):
        (out / target).mkdir(parents=True, exist_ok=True)
    (out / "gguf_header/tiny-llama.gguf").write_bytes(tiny_gguf())
    save_file({"a": np.ones((2, 2), np.float32), "b": np.zeros((3,), np.float16)},
              str(out / "safetensors_header/two-tensors.safetensors"), metadata={"format": "pt"})
    # Found by tokenizer_json: a decoder object broken mid-name made tokenizers 0.23.2 panic.
    text = json.dumps(byte_tokenizer_json())
    decoder = text.index('"decoder": {"type": "ByteLevel"')
    broken = text[:decoder] + text[decoder:].replace('"ByteLevel"', '"Byte"eLvle', 1)
    (out / "tokenizer_json/regression-decoder-panic.json").write_text(broken)
    assert struct.unpack_from("<4s", (out / "gguf_header/tiny-llama.gguf").read_bytes())[0] == b"GGUF"


if __name__ == "__main__":
    main(Path(sys.argv[1]))
