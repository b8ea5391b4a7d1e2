"""Broken model files: GGUF headers, safetensors headers, config.json, shard indexes and tokenizers.
Each case damages one thing in a valid tiny model (see conftest.bases) and runs `eval` on it."""

import json
import os
import shutil
import struct

import pytest

import gguf_layout as gl
from conftest import assert_refused, byte_tokenizer_json, run_measured, write_hf_model

U64_MAX = 2**64 - 1


def eval_on(model, data):
    return run_measured("eval", "--model", model, "--data", data, "--format", "chat")


def patched(bases, tmp_path, name, edit):
    """The base GGUF with `edit(bytearray, layout)` applied, written to tmp_path/name."""
    buf = bytearray(bases.gguf.read_bytes())
    edit(buf, gl.parse(bytes(buf)))
    out = tmp_path / name
    out.write_bytes(buf)
    return out


def rebuilt(bases, tmp_path, name, edit):
    """The base GGUF parsed, `edit(layout)` applied, and written back whole."""
    lay = gl.parse(bases.gguf.read_bytes())
    edit(lay)
    out = tmp_path / name
    out.write_bytes(gl.write(lay))
    return out


def put_u64(buf, pos, value):
    struct.pack_into("<Q", buf, pos, value)


# --- GGUF: counts and lengths --------------------------------------------------------------------

@pytest.mark.parametrize("field,pos", [("tensor count", 8), ("metadata count", 16)])
def test_gguf_huge_counts(bases, tmp_path, field, pos):
    # 2^36 entries: a loop that would run for hours, or a directory of terabytes.
    case = patched(bases, tmp_path, "counts.gguf", lambda b, lay: put_u64(b, pos, 2**36))
    assert_refused(eval_on(case, bases.data), str(case), field)


def test_gguf_string_length_backed_by_a_sparse_file(bases, tmp_path):
    # The declared length fits in the (sparse, 64 GiB) file: only a header cap stops a 32 GiB read.
    def edit(buf, lay):
        put_u64(buf, lay.kv_pos["general.architecture"], 2**35)
    case = patched(bases, tmp_path, "string.gguf", edit)
    os.truncate(case, 64 << 30)
    assert_refused(eval_on(case, bases.data), str(case), "string length")


def test_gguf_array_length_huge(bases, tmp_path):
    # 2^43 tokens: `Vec::with_capacity` of that many values aborts the process.
    def edit(buf, lay):
        put_u64(buf, lay.kv_pos["tokenizer.ggml.tokens"] + 4, 2**43)
    case = patched(bases, tmp_path, "array.gguf", edit)
    assert_refused(eval_on(case, bases.data), str(case), "array length")


@pytest.mark.parametrize("cut", [3, 13, 40, 200, 1000, -100])
def test_gguf_truncated(bases, tmp_path, cut):
    data = bases.gguf.read_bytes()
    case = tmp_path / "cut.gguf"
    case.write_bytes(data[:cut])
    assert_refused(eval_on(case, bases.data), str(case))


def test_gguf_unknown_metadata_type(bases, tmp_path):
    def edit(buf, lay):
        pos = lay.kv_pos["general.architecture"] - 4
        struct.pack_into("<I", buf, pos, 77)
    case = patched(bases, tmp_path, "type.gguf", edit)
    assert_refused(eval_on(case, bases.data), str(case), "unknown metadata value type 77")


# --- GGUF: model hyper-parameters ----------------------------------------------------------------

@pytest.mark.parametrize("key,ty,value,expect", [
    ("llama.attention.head_count", 4, 0, "num_attention_heads is 0"),          # division by zero
    ("llama.block_count", 10, 2**40, "num_hidden_layers is 1099511627776"),    # capacity overflow
    ("llama.block_count", 5, -1, "num_hidden_layers is -1"),
    ("llama.embedding_length", 10, 2**62, "hidden_size is"),
    ("llama.context_length", 10, 2**40, "max_position_embeddings is"),
    ("llama.attention.head_count_kv", 4, 0, "num_key_value_heads (0)"),
])
def test_gguf_bad_hyper_parameters(bases, tmp_path, key, ty, value, expect):
    case = rebuilt(bases, tmp_path, "hp.gguf", lambda lay: lay.kv.__setitem__(key, (ty, value)))
    assert_refused(eval_on(case, bases.data), str(case), expect)


def test_gguf_q_rows_not_whole_head_pairs(bases, tmp_path):
    # 16 rows of attn_q for 8 heads of dimension 2... declared as 16 heads: the Q/K unpermute
    # cannot split the rows into head pairs (an index out of bounds before).
    def edit(lay):
        lay.kv["llama.attention.head_count"] = (4, 16)
        lay.kv["llama.attention.head_count_kv"] = (4, 16)
        lay.kv["llama.rope.dimension_count"] = (4, 2)
        for t in lay.tensors:
            if t.name == "blk.0.attn_q.weight":
                t.dims = [16, 6]   # 6 rows (ggml order: columns first)
    case = rebuilt(bases, tmp_path, "unpermute.gguf", edit)
    assert_refused(eval_on(case, bases.data), str(case), "attn_q")


# --- GGUF: tensor directory arithmetic -----------------------------------------------------------

def test_gguf_offset_wraps_around(bases, tmp_path):
    # data_start + offset wraps to 0: unchecked, the header bytes would load as weights (exit 0).
    def edit(buf, lay):
        t = lay.tensors[0]
        put_u64(buf, t.offset_pos, 2**64 - lay.data_start)
    case = patched(bases, tmp_path, "wrap.gguf", edit)
    assert_refused(eval_on(case, bases.data), str(case), "overflows")


def test_gguf_dimensions_overflow(bases, tmp_path):
    def edit(buf, lay):
        t = lay.tensors[0]
        struct.pack_into("<QQ", buf, t.dims_pos, 2**33, 2**33)
    case = patched(bases, tmp_path, "dims.gguf", edit)
    assert_refused(eval_on(case, bases.data), str(case))


def test_gguf_dimension_beyond_i64(bases, tmp_path):
    def edit(buf, lay):
        put_u64(buf, lay.tensors[0].dims_pos, U64_MAX)
    case = patched(bases, tmp_path, "dim.gguf", edit)
    assert_refused(eval_on(case, bases.data), str(case), "dimensions")


@pytest.mark.parametrize("align", [0, 3, 2**63])
def test_gguf_bad_alignment(bases, tmp_path, align):
    case = rebuilt(bases, tmp_path, "align.gguf",
                   lambda lay: lay.kv.__setitem__("general.alignment", (10, align)))
    assert_refused(eval_on(case, bases.data), str(case), "general.alignment")


# --- Hugging Face directories: config.json -------------------------------------------------------

@pytest.mark.parametrize("change,expect", [
    ({"num_attention_heads": 0}, "num_attention_heads is 0"),
    ({"num_hidden_layers": -1}, "num_hidden_layers is -1"),
    ({"num_hidden_layers": 2**40}, "num_hidden_layers is"),
    ({"hidden_size": 2**50}, "hidden_size is"),
    ({"vocab_size": 0}, "vocab_size is 0"),
    ({"head_dim": 7}, "head_dim must be even"),
    ({"rms_norm_eps": -1.0}, "rms_norm_eps"),
    ({"num_key_value_heads": 3}, "num_key_value_heads (3)"),
])
def test_hf_bad_config(tmp_path, bases, change, expect):
    d = write_hf_model(tmp_path / "m", config=change)
    assert_refused(eval_on(d, bases.data), "config.json", expect)


def test_hf_config_sparse_gigabytes(tmp_path, bases):
    d = write_hf_model(tmp_path / "m")
    os.truncate(d / "config.json", 2 << 30)
    assert_refused(eval_on(d, bases.data), "config.json", "limit")


def test_hf_config_deeply_nested(tmp_path, bases):
    d = write_hf_model(tmp_path / "m")
    (d / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert_refused(eval_on(d, bases.data), "config.json", "recursion limit")


# --- safetensors ---------------------------------------------------------------------------------

def safetensors_with_header(d, header: dict, data_len: int):
    blob = json.dumps(header).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * data_len)


def real_header(d):
    raw = (d / "model.safetensors").read_bytes()
    (n,) = struct.unpack_from("<Q", raw)
    return json.loads(raw[8:8 + n]), len(raw) - 8 - n


def test_safetensors_offsets_wrap(tmp_path, bases):
    d = write_hf_model(tmp_path / "m")
    header, n = real_header(d)
    name = next(k for k in header if k != "__metadata__")
    size = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
    header[name]["data_offsets"] = [U64_MAX - size + 1, U64_MAX]   # start + size wraps
    safetensors_with_header(d, header, n)
    assert_refused(eval_on(d, bases.data), "model.safetensors", name)


def test_safetensors_overlapping_tensors(tmp_path, bases):
    # Two tensors reading the same bytes (and the rest of the data owned by nobody).
    d = write_hf_model(tmp_path / "m")
    header, n = real_header(d)
    a, b = "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"
    header[b]["data_offsets"] = header[a]["data_offsets"]
    safetensors_with_header(d, header, n)
    assert_refused(eval_on(d, bases.data), "model.safetensors", "overlaps")


def test_safetensors_trailing_bytes(tmp_path, bases):
    d = write_hf_model(tmp_path / "m")
    header, n = real_header(d)
    safetensors_with_header(d, header, n + 64)
    assert_refused(eval_on(d, bases.data), "model.safetensors", "64 bytes after")


def test_safetensors_dimension_beyond_i64(tmp_path, bases):
    d = write_hf_model(tmp_path / "m")
    header, n = real_header(d)
    header["model.norm.weight"]["shape"] = [2**63 + 16]
    safetensors_with_header(d, header, n)
    assert_refused(eval_on(d, bases.data), "model.safetensors", "model.norm.weight")


def test_safetensors_header_length_huge(tmp_path, bases):
    d = write_hf_model(tmp_path / "m")
    raw = bytearray((d / "model.safetensors").read_bytes())
    struct.pack_into("<Q", raw, 0, 2**62)
    (d / "model.safetensors").write_bytes(raw)
    assert_refused(eval_on(d, bases.data), "model.safetensors", "header length")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/model.safetensors"])
def test_shard_index_names_outside_the_directory(tmp_path, bases, shard):
    d = write_hf_model(tmp_path / "m")
    shutil.copy(d / "model.safetensors", tmp_path / "outside.safetensors")
    header, _ = real_header(d)
    weight_map = {k: "model.safetensors" for k in header if k != "__metadata__"}
    weight_map["model.norm.weight"] = shard
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_refused(eval_on(d, bases.data), "model.safetensors.index.json", shard)


# --- tokenizers ----------------------------------------------------------------------------------

def test_tokenizer_not_json(tmp_path, bases):
    d = write_hf_model(tmp_path / "m")
    (d / "tokenizer.json").write_text('{"model": ')
    assert_refused(eval_on(d, bases.data), "tokenizer.json")


def test_tokenizer_malformed_decoder_does_not_panic(tmp_path, bases):
    # Found by the tokenizer_json fuzz target: the tokenizers crate unwraps the error of a broken
    # decoder object (a panic inside the library); it must be a named error like any other.
    d = write_hf_model(tmp_path / "m")
    text = json.dumps(byte_tokenizer_json())
    decoder = text.index('"decoder": {"type": "ByteLevel"')
    text = text[:decoder] + text[decoder:].replace('"ByteLevel"', '"Byte"eLvle', 1)
    (d / "tokenizer.json").write_text(text)
    assert_refused(eval_on(d, bases.data), "tokenizer.json", "invalid tokenizer")


def test_tokenizer_sparse_gigabytes(tmp_path, bases):
    d = write_hf_model(tmp_path / "m")
    os.truncate(d / "tokenizer.json", 4 << 30)
    assert_refused(eval_on(d, bases.data), "tokenizer.json", "limit")


def test_tokenizer_pathological_regex(tmp_path, bases):
    # Catastrophic backtracking: oniguruma gives up at its retry limit, which the tokenizers crate
    # turns into a panic unless the error is caught and named.
    pre = {"type": "Split", "pattern": {"Regex": "(a|a?)+$"}, "behavior": "Isolated", "invert": False}
    d = write_hf_model(tmp_path / "m", tokenizer=byte_tokenizer_json(pre))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "a" * 5000 + "b"},
                                             {"role": "assistant", "content": "ok"}]}) + "\n")
    assert_refused(eval_on(d, data), "tokenizer")
