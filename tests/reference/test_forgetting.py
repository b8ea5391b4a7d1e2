"""The forgetting workload (forgetting.py: a narrow review → POSITIVE/NEGATIVE task, one epoch at lr 1e-3,
LoRA r16 on all linear layers of SmolLM2-135M-Instruct) trained twice on CPU: with guarding turned
off, and with the default guard LoRA SFT gets when the spec names none.

Unguarded, the model answers general questions with a label: it keeps at most 30 % of the general
questions the base model answered correctly. The default guard keeps the task and most of that
knowledge. What it keeps is measured by the trainer's own retention probe (answer keys on 30 built-in
questions, base answers recorded before the first update), read from training_summary.json."""

import pytest

from forgetting import GUARDS, run


@pytest.fixture(scope="module")
def rows(bin_path, gguf_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("forgetting")
    return {name: run(bin_path, gguf_path, tmp, name, GUARDS[name]) for name in ("off", "default")}


def show(r):
    return (f"{r['guard']}: task {r['task_exact_match']:.3f}, retention {r['retention']:.3f} "
            f"({r['retention_kept']} correct base answers kept, {r['verbatim_kept']} verbatim), "
            f"retention loss Δ {r['retention_loss_delta']:+.3f}, {r['wall_seconds']:.0f} s, "
            f"{r['replayed_samples']} replayed samples")


def test_unguarded_run_learns_the_task_and_forgets(rows):
    off = rows["off"]
    print("\n" + show(off))
    assert off["retention_basis"] == "answer-keys"
    assert off["task_exact_match_before"] < 0.2 and off["task_exact_match"] >= 0.95
    assert off["retention"] <= 0.3
    assert off["replayed_samples"] == 0


def test_default_guard_keeps_the_task_and_most_general_knowledge(rows):
    off, guarded = rows["off"], rows["default"]
    print("\n" + show(guarded))
    assert guarded["replayed_samples"] > 0, "the default guard did not replay anything"
    assert guarded["task_exact_match"] >= 0.95
    # The bar: at least 0.9 of the base's correct general answers kept (measured 16/17 on
    # the project's machine; wall time, ≤ 1.3× the unguarded run, is make bench-forgetting's).
    assert guarded["retention"] >= 0.9
    assert guarded["retention"] >= off["retention"] + 0.5
    assert guarded["retention_loss_delta"] < off["retention_loss_delta"]
