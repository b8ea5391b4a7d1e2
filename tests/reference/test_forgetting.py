"""The forgetting guard on CPU (issue #9): on the narrow task of tests/reference/forgetting.py the
unguarded run collapses the base model's general answers, and the trainer's default guard for LoRA
SFT keeps them while the task is still learned, at a bounded extra cost in wall time."""

import pytest

from forgetting import GUARDS, run


@pytest.fixture(scope="module")
def runs(tmp_path_factory, bin_path, gguf_path):
    tmp = tmp_path_factory.mktemp("forgetting")
    rows = {name: run(bin_path, gguf_path, tmp, name, GUARDS[name]) for name in ("off", "default")}
    for r in rows.values():
        print(f"\n{r['guard']}: task {r['task_exact_match']:.3f} (before {r['task_exact_match_before']:.3f}), "
              f"retention {r['retention']:.3f} ({r['retention_kept']}), wall {r['wall_seconds']:.0f} s, "
              f"examples {r['examples']}")
    return rows


def test_unguarded_run_collapses_general_answers(runs):
    off = runs["off"]
    assert off["task_exact_match"] >= 0.95
    assert off["retention"] <= 0.3


def test_default_guard_keeps_general_answers_and_learns_the_task(runs):
    off, guarded = runs["off"], runs["default"]
    assert guarded["task_exact_match"] >= 0.95
    assert guarded["retention"] >= 0.9
    assert guarded["wall_seconds"] <= 1.3 * off["wall_seconds"]
