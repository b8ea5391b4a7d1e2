"""NF4 with double-quantized absmax (trainer-image/src/model/nf4.rs, via the `nf4` developer command)
against bitsandbytes 0.50.2 (scripts/python-requirements-bnb.txt) on random tensors and on real
SmolLM2-135M weights.

bitsandbytes runs its 8-bit step (quantizing the absmax) through a C kernel on CPU and through pure
torch ops in its default backend (`backends/default/ops.py`, also what its CUDA kernel computes:
nearest midpoint). Ours equals the default backend bit for bit; the C kernel's binary search picks
another code for a few absmax values, and the test prints how many and by how much that moves the
weights.
"""

import importlib.util
import os

import bitsandbytes.functional as F
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import GGUF_NAME, run_json

# Dispatching a bitsandbytes op below CPU reaches the kernel registered for "default".
DEFAULT_BACKEND = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
OPS = torch.ops.bitsandbytes


def random_tensors():
    g = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    with_zero_block = randn(40 * 64)
    with_zero_block[128:192] = 0  # one whole block of zeros
    with_zero_block[5:9] = 0
    with_zero_block[-3:] = 0
    heavy_tailed = randn(512, 300) * torch.exp(2 * randn(512, 300))
    return {
        "one_block": randn(64),
        "single": randn(1),
        "short": randn(63),
        "block_and_one": randn(65),
        "odd_3d": randn(3, 5, 7),
        "one_absmax_block": randn(256 * 64),
        "one_absmax_block_and_one": randn(256 * 64 + 1),
        "many_absmax_blocks_with_tails": randn(1000, 333) * 0.02,  # odd count, 5204 blocks
        "not_a_multiple": randn(300, 129),
        "with_zero_block": with_zero_block,
        "zero_tail_block": torch.cat([randn(128), torch.zeros(10)]),
        "heavy_tailed": heavy_tailed,
        "bf16": randn(257, 64, dtype=torch.bfloat16),
    }


REAL = [
    "token_embd.weight",  # Q8_0 in the file: the closest to the trained weights
    "blk.0.attn_q.weight",
    "blk.0.attn_k.weight",
    "blk.7.attn_v.weight",
    "blk.15.attn_output.weight",
    "blk.15.ffn_gate.weight",
    "blk.29.ffn_down.weight",
    "blk.29.attn_norm.weight",
]


@pytest.fixture(scope="module")
def real_tensors(gguf_dir):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(gguf_dir / GGUF_NAME))
    by_name = {t.name: t for t in reader.tensors}
    out = {}
    for name in REAL:
        t = by_name[name]
        out[name] = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()
    return out


def ours(tmp_path, tensors):
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(src))
    report = run_json("nf4", "--in", src, "--out", dst)
    return report, load_file(str(dst))


def bnb_default(x):
    """bitsandbytes' quantize_4bit(nf4, 64, compress_statistics=True) and dequantize_4bit with every
    kernel from its default backend."""
    packed, state = F.quantize_4bit(x, blocksize=64, compress_statistics=False, quant_type="nf4")
    absmax = state.absmax
    code = F.create_dynamic_map()
    offset = absmax.mean()
    qabsmax, absmax2 = OPS.quantize_blockwise.default.redispatch(DEFAULT_BACKEND, absmax - offset, code, 256)
    absmax_dq = OPS.dequantize_blockwise.default.redispatch(
        DEFAULT_BACKEND, qabsmax, absmax2, code, 256, torch.float32)
    absmax_dq += offset
    out = OPS.dequantize_4bit.default.redispatch(
        DEFAULT_BACKEND, packed, absmax_dq, 64, "nf4", x.shape, torch.float32)
    return dict(packed=packed.reshape(-1), absmax=absmax, offset=offset, absmax_codes=qabsmax,
                absmax_scale=absmax2, dequantized=out)


def bnb_cpu(x):
    """The public functions as they run on CPU: the 8-bit steps and the 4-bit dequantization
    through bitsandbytes' C kernels."""
    packed, state = F.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
    state.dtype = torch.float32
    return dict(packed=packed.reshape(-1), offset=state.offset, absmax_codes=state.absmax,
                absmax_scale=state.state2.absmax, dequantized=F.dequantize_4bit(packed, state))


def compare(name, x, got, report):
    ref = bnb_default(x)
    n = x.numel()
    assert report[name]["numel"] == n
    assert list(got[f"{name}.dequantized"].shape) == list(x.shape)
    assert torch.equal(got[f"{name}.packed"], ref["packed"]), f"{name}: 4-bit codes differ"
    assert torch.equal(got[f"{name}.absmax"], ref["absmax"]), f"{name}: first-level absmax differs"
    assert torch.equal(got[f"{name}.offset"], ref["offset"].reshape(1)), f"{name}: offset differs"
    assert torch.equal(got[f"{name}.absmax_codes"], ref["absmax_codes"]), f"{name}: absmax codes differ"
    assert torch.equal(got[f"{name}.absmax_scale"], ref["absmax_scale"]), f"{name}: absmax scale differs"
    diff = (got[f"{name}.dequantized"] - ref["dequantized"]).abs().max().item()
    assert torch.equal(got[f"{name}.dequantized"], ref["dequantized"]), f"{name}: dequantized differs by {diff}"
    # Memory: half a byte per value, one byte per 64 values, 4 bytes per 64·256 values, the offset.
    blocks = -(-n // 64)
    assert report[name]["bytes"] == -(-n // 2) + blocks + 4 * -(-blocks // 256) + 4

    cpu = bnb_cpu(x)
    assert torch.equal(got[f"{name}.packed"], cpu["packed"])
    codes_differ = (got[f"{name}.absmax_codes"] != cpu["absmax_codes"])
    weights_differ = got[f"{name}.dequantized"] != cpu["dequantized"]
    worst = (got[f"{name}.dequantized"] - cpu["dequantized"]).abs().max().item()
    code_steps = (got[f"{name}.absmax_codes"].int() - cpu["absmax_codes"].int()).abs().max().item()
    print(f"{name}: vs bnb's CPU C kernel: {int(codes_differ.sum())}/{blocks} absmax codes differ "
          f"(up to {code_steps} codes apart), {int(weights_differ.sum())}/{n} weights differ, "
          f"max |diff| {worst:.3g}")
    # Where the absmax code agrees, the C kernels dequantize to the same floats.
    same_block = ~codes_differ.repeat_interleave(64)[:n]
    assert torch.equal(got[f"{name}.dequantized"].reshape(-1)[same_block], cpu["dequantized"].reshape(-1)[same_block])


def test_the_8bit_map_is_bitsandbytes_dynamic_map(tmp_path, bin_path):
    _, got = ours(tmp_path, {"x": torch.ones(3)})
    assert torch.equal(got["dynamic_map"], F.create_dynamic_map())


def test_random_tensors_quantize_and_dequantize_as_bitsandbytes(tmp_path, bin_path):
    tensors = random_tensors()
    report, got = ours(tmp_path, tensors)
    for name, x in tensors.items():
        compare(name, x, got, report)
    zeros = tensors["with_zero_block"] == 0
    assert (got["with_zero_block.dequantized"][zeros] == 0).all()


def test_smollm2_weights_quantize_and_dequantize_as_bitsandbytes(tmp_path, bin_path, real_tensors):
    report, got = ours(tmp_path, real_tensors)
    for name, x in real_tensors.items():
        compare(name, x, got, report)
    # Sanity of the test itself: NF4 is lossy, and the error is what 4 bits give.
    w = real_tensors["blk.0.attn_q.weight"]
    rel = ((got["blk.0.attn_q.weight.dequantized"] - w).norm() / w.norm()).item()
    print(f"blk.0.attn_q.weight: NF4 relative error {rel:.4f}")
    assert 0.02 < rel < 0.2


def test_non_float_tensors_are_skipped(tmp_path, bin_path):
    report, got = ours(tmp_path, {"ids": torch.arange(10), "w": torch.randn(70)})
    assert list(report) == ["w"]
    assert not any(k.startswith("ids") for k in got)


def test_a_qlora_layer_computes_as_peft_over_bitsandbytes_linear4bit(tmp_path, bin_path, real_tensors):
    """`nf4-linear` (our NF4 base dequantized per forward plus a float32 LoRA) vs PEFT's LoRA over
    `bnb.nn.Linear4bit(nf4, compress_statistics=True, quant_storage=uint8)`, float32 on CPU."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    from conftest import run_trainer

    w = real_tensors["blk.7.attn_v.weight"]  # [192, 576]
    out_f, in_f = w.shape
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(out_f, generator=g) * 0.1
    x = torch.randn(2, 7, in_f, generator=g)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = bnb.nn.Linear4bit(in_f, out_f, bias=True, compute_dtype=torch.float32,
                                          compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8)

        def forward(self, h):
            return self.proj(h)

    block = Block()
    block.proj.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=True,
                                          quant_type="nf4", quant_storage=torch.uint8)
    block.proj.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    block = block.to("cpu")  # quantizes
    # Linear4bit quantized its absmax with the CPU C kernel; give it the default backend's codes
    # (which ours equal, test above) so that the comparison is of the layer's computation alone.
    state, ref = block.proj.weight.quant_state, bnb_default(w)
    state.absmax, state.state2.absmax = ref["absmax_codes"], ref["absmax_scale"]
    assert torch.equal(block.proj.weight.data.reshape(-1), ref["packed"])
    assert torch.equal(F.dequantize_4bit(block.proj.weight.data, state), ref["dequantized"])

    model = get_peft_model(block, LoraConfig(r=8, lora_alpha=16, target_modules=["proj"], lora_dropout=0.0))
    lora = model.base_model.model.proj
    with torch.no_grad():
        lora.lora_A["default"].weight.copy_(torch.randn(8, in_f, generator=g) * 0.05)
        lora.lora_B["default"].weight.copy_(torch.randn(out_f, 8, generator=g) * 0.05)
        expected = model(x)
    assert lora.scaling["default"] == 2.0

    src, dst = tmp_path / "layer.safetensors", tmp_path / "y.safetensors"
    save_file({"weight": w.contiguous(), "bias": bias, "x": x,
               "lora_A": lora.lora_A["default"].weight.detach().contiguous(),
               "lora_B": lora.lora_B["default"].weight.detach().contiguous()}, str(src))
    run_trainer("nf4-linear", "--in", src, "--scaling", 2.0, "--out", dst)
    y = load_file(str(dst))["y"]
    diff = (y - expected).abs().max().item()
    print(f"QLoRA layer vs PEFT + bnb Linear4bit: max |diff| {diff:.3g} (|y| up to {expected.abs().max():.3g})")
    assert y.shape == expected.shape
    assert diff < 1e-5
    # The LoRA term is not negligible here, so a wrong adapter path would show.
    assert (lora.lora_B["default"](lora.lora_A["default"](x)) * 2.0).abs().max() > 1e-2


def test_int8_rows_quantize_and_dequantize_as_bitsandbytes(tmp_path, bin_path, real_tensors):
    """`baseQuantization: int8` (model/int8.rs, via the `int8` developer command) against
    bitsandbytes' `int8_vectorwise_quant` on the float16 weight, as `Int8Params` stores a
    `Linear8bitLt` base, and its `int8_vectorwise_dequant`: codes, row absmax and dequantized
    values bit for bit, on random and real SmolLM2 weights. A row of zeros, where bitsandbytes
    divides by zero, stays zero in ours."""
    g = torch.Generator().manual_seed(2)
    tensors = {name: x for name, x in random_tensors().items() if x.dim() == 2}
    tensors["heavy_rows"] = torch.randn(64, 96, generator=g) * torch.exp(2 * torch.randn(64, 1, generator=g))
    tensors.update({name: x for name, x in real_tensors.items() if x.dim() == 2})
    with_zero_row = torch.randn(8, 40, generator=g)
    with_zero_row[3] = 0
    tensors["with_zero_row"] = with_zero_row
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(src))
    report = run_json("int8", "--in", src, "--out", dst)
    got = load_file(str(dst))
    assert sorted(report) == sorted(tensors)
    for name, x in tensors.items():
        codes, stats, _ = F.int8_vectorwise_quant(x.to(torch.float16))
        rows = stats != 0
        assert torch.equal(got[f"{name}.row_absmax"], stats), f"{name}: row absmax differs"
        assert torch.equal(got[f"{name}.codes"][rows], codes[rows]), f"{name}: int8 codes differ"
        dequantized = F.int8_vectorwise_dequant(codes, stats)
        assert torch.equal(got[f"{name}.dequantized"][rows], dequantized[rows]), f"{name}: dequantized differs"
        assert (got[f"{name}.codes"][~rows] == 0).all() and (got[f"{name}.dequantized"][~rows] == 0).all()
        assert report[name]["bytes"] == x.numel() + 4 * x.shape[0]
    w = real_tensors["blk.0.attn_q.weight"]
    rel = ((got["blk.0.attn_q.weight.dequantized"] - w).norm() / w.norm()).item()
    print(f"blk.0.attn_q.weight: int8 relative error {rel:.5f}")
    assert 1e-4 < rel < 0.02
