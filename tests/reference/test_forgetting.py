"""The forgetting workload (forgetting.py: narrow tasks trained one epoch at lr 1e-3, LoRA r16 on all
linear layers of SmolLM2-135M-Instruct) trained on CPU with guarding turned off and with the
default guard LoRA SFT gets when the spec names none, then audited on the held-out part of the
general question set — questions neither the guard's replay nor the run's probe ever asked.

`make test` trains one task (reviews, the cheaper one) both ways; `make bench-forgetting` trains
both tasks both ways and times them. Unguarded, the model loses most of the general questions the
base model answered correctly (reviews: all 159 audit answers; dates: 137 of 159). The default
guard (self-distillation and the layer anchor) keeps the task (exact match >= 0.95) and nine in
ten of them (measured 2026-12-07 on this workload: reviews 144/159 = 0.906, 95 % 0.85-0.94, the
same in every run here; dates 145/159 = 0.91): the floor below is issue #23's 0.9, which reviews
clears by one answer on this machine.
Wall time against the unguarded run is make bench-forgetting's (a timed test would measure the
machine, not the code)."""

import pytest

from forgetting import GUARDS, run

# One task in `make test`, to keep it short: that forgetting happens under these settings and that
# the default guard holds it back are properties of the workload, shown here on the cheaper task and
# on both tasks by make bench-forgetting.
TASK = "reviews"


@pytest.fixture(scope="module")
def unguarded(bin_path, gguf_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"forgetting-{TASK}-off")
    return run(bin_path, gguf_path, tmp, TASK, "off", GUARDS["off"])


@pytest.fixture(scope="module")
def guarded(bin_path, gguf_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"forgetting-{TASK}")
    return run(bin_path, gguf_path, tmp, TASK, "default", GUARDS["default"])


def show(r):
    low, high = r["audit_interval_95"]
    return (f"{r['task']} / {r['guard']}: task {r['task_exact_match']:.3f}, probe {r['retention']:.3f} "
            f"({r['retention_kept']}), audit {r['audit']:.3f} ({r['audit_kept']}, 95% {low:.2f}-{high:.2f}), "
            f"retention loss Δ {r['retention_loss_delta']:+.3f}, {r['wall_seconds']:.0f} s, "
            f"{r['replayed_samples']} replayed samples; lost: "
            + "; ".join(f"{x['question']!r} -> {x['tuned']!r}" for x in r["audit_lost"][:4]))


def test_unguarded_run_learns_the_task_and_forgets(unguarded):
    off = unguarded
    print("\n" + show(off))
    assert off["retention_basis"] == "answer-keys"
    assert off["task_exact_match_before"] < 0.2 and off["task_exact_match"] >= 0.95
    assert off["replayed_samples"] == 0
    # Forgetting is measurable on the held-out questions: the guard's floor is not met for free.
    assert off["audit"] < 0.5


def test_default_guard_keeps_the_task_and_the_held_out_general_answers(guarded, unguarded):
    print("\n" + show(guarded))
    assert guarded["guard_source"] == "default"
    assert guarded["guards"] == ["layerAnchor", "selfDistillation"], guarded["guards"]
    assert guarded["task_exact_match"] >= 0.95
    assert int(guarded["audit_kept"].split("/")[1]) >= 100, "too few correct base answers to judge"
    assert guarded["audit"] >= 0.9
    assert guarded["audit"] >= unguarded["audit"] + 0.5
    # The loss on general texts is not asserted: on the dates task it rose more with the guard
    # (+0.119) than without (+0.090) while the guarded model kept 85 of 99 probe answers to 10.
