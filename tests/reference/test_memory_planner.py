"""The memory planner (`finetune-trainer plan`, crds/src/memory.rs) against real runs: for each
configuration a random model from `init-random`, a word-level tokenizer whose vocabulary matches
it, and text data, trained for a few steps by `finetune-trainer --device cpu run`; the plan's total
must be within ±15 % of the run's `peak_rss_training_bytes` (the resident high-water mark from the
first step on, which includes the weights, the optimizer and the process itself).

The configurations differ in what the plan models: LoRA vs full fine-tuning, checkpointing,
sequence length, micro-batch, no mask vs padding vs packing (the CPU math attention path), model
shape, grouped-query heads, tied or untied heads. Also the `init-random` checkpoint loads in
transformers, sharded, with the same logits as ours.

    ~/.cache/finetune-operator/venv/bin/python -m pytest tests/reference/test_memory_planner.py -s
    ~/.cache/finetune-operator/venv/bin/python tests/reference/test_memory_planner.py   # the table only
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import trainer_bin  # noqa: E402

TOLERANCE = 0.15
MIB = 2**20

# name, model shape, job settings. Sequences are rows of `seq` tokens (samples are longer and
# truncated) except with `short: True`, where lengths vary so that padded rows need a mask: the plan
# of a spec assumes a mask whenever a batch has several rows, so batched configurations pad.
CONFIGS = [
    ("lora-256", dict(hidden=512, layers=6, heads=8, kv=4, inter=1536, vocab=8192),
     dict(lora=True, batch=4, seq=256, short=True)),
    ("lora-1024-packed", dict(hidden=512, layers=6, heads=8, kv=4, inter=1536, vocab=8192),
     dict(lora=True, batch=1, seq=1024, packing=True)),
    ("lora-1024-ckpt-packed", dict(hidden=512, layers=6, heads=8, kv=4, inter=1536, vocab=8192),
     dict(lora=True, batch=1, seq=1024, packing=True, ckpt=True)),
    ("lora-512-padded", dict(hidden=256, layers=8, heads=4, kv=4, inter=768, vocab=4096, tied=True),
     dict(lora=True, batch=8, seq=512, short=True)),
    ("full-256", dict(hidden=768, layers=4, heads=12, kv=4, inter=2048, vocab=6000),
     dict(lora=False, batch=4, seq=256, short=True)),
    ("full-512-ckpt", dict(hidden=768, layers=4, heads=12, kv=4, inter=2048, vocab=6000),
     dict(lora=False, batch=2, seq=512, ckpt=True, short=True)),
    ("lora-1024-nomask", dict(hidden=1024, layers=4, heads=16, kv=8, inter=2816, vocab=4096),
     dict(lora=True, batch=1, seq=1024)),
]


def write_model(root, name, shape, seed=0):
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": shape["vocab"],
        "hidden_size": shape["hidden"], "intermediate_size": shape["inter"],
        "num_hidden_layers": shape["layers"], "num_attention_heads": shape["heads"],
        "num_key_value_heads": shape["kv"], "tie_word_embeddings": shape.get("tied", False),
        "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "rope_theta": 10000.0,
        "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02,
    }
    model = root / f"model-{name}"
    (root / f"{name}.config.json").write_text(json.dumps(cfg))
    subprocess.run([str(trainer_bin()), "init-random", "--config", str(root / f"{name}.config.json"),
                    "--out", str(model), "--dtype", "f32", "--seed", str(seed)], check=True,
                   capture_output=True)
    write_tokenizer(model, shape["vocab"])
    return model


def write_tokenizer(model, vocab):
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, vocab)]
    special = [{"id": i, "content": w, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for i, w in enumerate(words[:3])]
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
           "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
           "decoder": None, "model": {"type": "WordLevel", "vocab": {w: i for i, w in enumerate(words)},
                                      "unk_token": "<unk>"}}
    (model / "tokenizer.json").write_text(json.dumps(tok))
    (model / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>",
                                                            "unk_token": "<unk>"}))


def write_data(path, vocab, seq, rows, short):
    rng = random.Random(seq * 7 + rows)
    lines = []
    for i in range(rows):
        n = rng.randint(seq // 4, seq - 8) if short else seq + 16
        if short and i % 8 == 0:
            n = seq + 16  # the longest row of every batch reaches maxSeqLength
        lines.append(json.dumps({"text": " ".join(f"w{rng.randrange(3, vocab)}" for _ in range(n))}))
    path.write_text("\n".join(lines) + "\n")


def write_job(path, model, data, s, steps=3):
    adapter = ("{type: lora, lora: {rank: 16, alpha: 32, dropout: 0.05}}" if s["lora"] else "{type: full}")
    hyper = (f"{{maxSteps: {steps}, learningRate: 1.0e-4, batchSize: {s['batch']}, maxSeqLength: {s['seq']}, "
             f"warmupSteps: 0, seed: 1, packing: {str(s.get('packing', False)).lower()}, "
             f"gradientCheckpointing: {str(s.get('ckpt', False)).lower()}, precision: fp32}}")
    path.write_text(f"""apiVersion: finetune.dev/v1alpha1
kind: FinetuneJob
metadata: {{name: memory-planner}}
spec:
  baseModel: {{uri: "file://{model}"}}
  dataset:
    train: {{uri: "file://{data}"}}
    format: text
  adapter: {adapter}
  hyperparameters: {hyper}
  forgettingGuard: {{disabled: true}}
  checkpoint: {{everySteps: 1000000}}
  output: {{merge: false}}
  resources: {{gpus: 0}}
""")


def measure(root, name, shape, settings):
    """(predicted plan JSON, training_summary.json) for one configuration."""
    model = write_model(root, name, shape)
    rows = settings["batch"] * 4 * (4 if settings.get("packing") else 1)
    data = root / f"{name}.jsonl"
    write_data(data, shape["vocab"], settings["seq"], rows, settings.get("short", False))
    job = root / f"{name}.yaml"
    write_job(job, model, data, settings)
    # The plan is the live set: without a fixed mmap threshold glibc keeps freed activation blocks
    # in a fragmenting heap and the resident peak is 13-58 % higher (crds/src/memory.rs).
    env = dict(os.environ, FINETUNE_STATUS_PORT="0", FINETUNE_TERMINATION_LOG=str(root / f"{name}.term"),
               MALLOC_MMAP_THRESHOLD_="65536")
    planned = subprocess.run([str(trainer_bin()), "--device", "cpu", "plan", str(job), "--json"],
                             capture_output=True, text=True, env=env)
    assert planned.returncode == 0, planned.stderr
    out = root / f"out-{name}"
    proc = subprocess.run([str(trainer_bin()), "--device", "cpu", "run", str(job), "--output", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(planned.stdout), json.loads((out / "training_summary.json").read_text())


def table(results):
    lines = [f"{'config':24} {'predicted MiB':>14} {'measured MiB':>13} {'ratio':>6}   "
             f"{'weights':>8} {'optim':>7} {'activ':>7} {'logits':>7} {'wkspace':>8}"]
    for name, plan, summary in results:
        p, measured = plan["plan"], summary["peak_rss_training_bytes"]
        lines.append(f"{name:24} {plan['total'] / MIB:14.0f} {measured / MIB:13.0f} {plan['total'] / measured:6.3f}   "
                     f"{p['weights'] / MIB:8.0f} {(p['optimizer'] + p['gradients'] + p['adapter']) / MIB:7.0f} "
                     f"{p['activations'] / MIB:7.0f} {p['logits'] / MIB:7.0f} {p['workspace'] / MIB:8.0f}")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def results(tmp_path_factory, bin_path):
    root = tmp_path_factory.mktemp("memory-planner")
    out = [(name, *measure(root, name, shape, s)) for name, shape, s in CONFIGS]
    print("\n" + table(out))
    return out


def test_predicted_peak_is_within_15_percent_of_the_measured_one(results):
    off = []
    for name, plan, summary in results:
        measured = summary["peak_rss_training_bytes"]
        assert measured, f"{name}: the run recorded no training peak"
        if abs(plan["total"] / measured - 1) > TOLERANCE:
            off.append(f"{name}: predicted {plan['total'] / MIB:.0f} MiB, measured {measured / MIB:.0f} MiB")
    assert not off, "\n".join(off) + "\n" + table(results)


def test_the_configurations_differ_in_what_the_plan_models(results):
    runs = [plan["run"] for _, plan, _ in results]
    assert {r["lora_rank"] is None for r in runs} == {True, False}
    assert {r["gradient_checkpointing"] for r in runs} == {True, False}
    assert {r["attention_mask"] for r in runs} == {True, False}
    assert len({r["seq_len"] for r in runs}) >= 3
    assert len({r["micro_batch"] for r in runs}) >= 3
    assert len({plan["model"]["hidden_size"] for _, plan, _ in results}) >= 3


def test_init_random_checkpoints_load_in_transformers_sharded_with_our_logits(tmp_path, bin_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    shape = dict(hidden=128, layers=3, heads=4, kv=2, inter=256, vocab=512)
    cfg = tmp_path / "config.json"
    write_model(tmp_path, "probe", shape)  # for the config file it writes
    cfg.write_text((tmp_path / "probe.config.json").read_text())
    model = tmp_path / "sharded"
    subprocess.run([str(bin_path), "init-random", "--config", str(cfg), "--out", str(model), "--dtype", "f32",
                    "--shard-size", "300KiB", "--seed", "7"], check=True, capture_output=True)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1
    first = load_file(str(model / files[0]))
    assert first["model.embed_tokens.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    norm_file = model / index["weight_map"]["model.norm.weight"]
    assert torch.all(load_file(str(norm_file))["model.norm.weight"] == 1)
    write_tokenizer(model, shape["vocab"])
    hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    ids = [5, 17, 300, 42, 7, 99]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits
    out = tmp_path / "logits.safetensors"
    subprocess.run([str(bin_path), "--device", "cpu", "logits", "--model", str(model),
                    "--ids", ",".join(map(str, ids)), "--out", str(out)], check=True, capture_output=True)
    ours = load_file(str(out))["logits"]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        only = sys.argv[1:]
        res = [(n, *measure(Path(tmp), n, shape, s)) for n, shape, s in CONFIGS if not only or n in only]
        print(table(res))
