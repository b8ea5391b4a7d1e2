"""`make gpu-check` runs only on a GPU machine, which CI never has: this runs its CPU dry run
(`--dry-run`: a tiny random model, two steps per part) so the script's plumbing — the random
checkpoint, both trainers, the planner, the JSON — keeps working between GPU sessions."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_gpu_check_dry_run_fills_every_part(tmp_path, bin_path):
    env = dict(os.environ, GPU_CHECK_OUT=str(tmp_path / "out"), FINETUNE_TRAINER_BIN=str(bin_path))
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, str(REPO / "tests/gpu/gpu_check.py"), "--dry-run",
                           "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert results["machine"]["dry_run"] is True
    assert not results["skipped"], results["skipped"]
    a = results["a"]
    assert len(a["rel_diff_per_step"]) == a["steps"] >= 2, a
    assert a["within_tolerance"] is True, a
    # (e): the same job through `launch` as a c10d group of one (Gloo here, NCCL on a GPU).
    e = results["e"]
    assert e["backend"] == "Gloo" and e["group_ready"] is True and e["run"]["rc"] == 0, e
    assert e["max_abs_loss_diff_vs_plain"] <= 1e-4, e
    text = json.dumps(results["b"])
    assert "ours" in text and "transformers" in text, text[:2000]
    for part in ("(a)", "(b)", "(c)", "(d)", "(e)"):
        assert part in (tmp_path / "out" / "gpu-check.txt").read_text(), part
