"""Forgetting guards that add a loss term: the self-distillation KL (the model with its LoRA adapter
switched off as the teacher) against transformers + PEFT `disable_adapter()`, and short runs with
`selfDistillation` (LoRA), `layerAnchor` (LoRA) and `l2ToInit` (full fine-tuning) that must record
their term and, for the anchor and L2, keep the model measurably closer to where it started (the
anchor also resumes bit for bit). Guards paired with the wrong adapter
type end with exit 2 naming the field."""

import json
import os
import re
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_trainer, trainer_bin
from test_dpo import tiny_llama

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]
CHAT = REPO / "examples" / "data" / "chat-train.jsonl"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, hf_tokenizer):
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"), hf_tokenizer)


@pytest.fixture(scope="module")
def random_adapter(tmp_path_factory, tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(2)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    path = tmp_path_factory.mktemp("random-adapter")
    model.save_pretrained(str(path))
    return path


def test_distillation_kl_matches_peft_disable_adapter(tiny_model, random_adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(CHAT.read_text().splitlines(keepends=True)[:4]))
    ours = json.loads(run_trainer("distill-kl", "--model", tiny_model, "--adapter", random_adapter,
                                  "--data", data).stdout)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, str(random_adapter)).eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for s in ours["samples"]:
            ids = torch.tensor([s["ids"]])
            # Token t is a target when supervised (t > 0); it is predicted at position t − 1.
            at = [t - 1 for t in range(1, len(s["ids"])) if s["supervised"][t]]
            student = torch.log_softmax(model(ids).logits[0, at].float(), -1)
            with model.disable_adapter():
                teacher = torch.log_softmax(model(ids).logits[0, at].float(), -1)
            total += (teacher.exp() * (teacher - student)).sum().item()
            n += len(at)
    reference = total / n
    print(f"\nKL(base || tuned) per answer token: ours {ours['kl']:.8f}, transformers+PEFT {reference:.8f} "
          f"over {n} tokens")
    assert reference > 1e-3, "the adapter barely changes the model: the comparison would prove nothing"
    assert abs(ours["kl"] - reference) < 1e-5


def job(tmp_path, model, adapter, guard, steps=6, lr="2.0e-3"):
    path = tmp_path / "job.yaml"
    path.write_text(f"""apiVersion: finetune.dev/v1alpha1
kind: FinetuneJob
metadata: {{name: guard-test}}
spec:
  baseModel: {{uri: "file://{model}"}}
  dataset:
    train: {{uri: "file://{CHAT}"}}
    format: chat
  adapter: {adapter}
  hyperparameters: {{maxSteps: {steps}, learningRate: {lr}, batchSize: 4, maxSeqLength: 128, seed: 3, scheduler: constant, precision: fp32}}
  resources: {{gpus: 0}}
{guard}""")
    return path


def run(path, out):
    env = dict(os.environ, FINETUNE_STATUS_PORT="0")
    return subprocess.run([str(trainer_bin()), "--device", "cpu", "run", str(path), "--output", str(out)],
                          capture_output=True, text=True, timeout=900, env=env)


def give_answers(cache):
    """Writes answers into a guard's cache of base answers, the file a resumed attempt reads."""
    base = json.loads(cache.read_text())
    base["answers"] = [f"Here is a short answer about: {q}" for q in base["prompts"]]
    cache.write_text(json.dumps(base))


# Over an NF4 base the teacher is the quantized base the adapter trains on (its log-probabilities
# are recorded after quantization): KL 0 before the first update there too.
@pytest.mark.parametrize("quantization", ["", ", baseQuantization: nf4"], ids=["float", "nf4"])
def test_self_distillation_adds_its_term_every_step(tiny_model, tmp_path, quantization):
    out = tmp_path / "out"
    guarded = job(tmp_path, tiny_model, f"{{type: lora, lora: {{rank: 8, alpha: 16, dropout: 0.0{quantization}}}}}",
                  "  forgettingGuard: {selfDistillation: {weight: 1.0}}\n")
    # The random tiny model answers every general request with blank lines: a guard with nothing to
    # anchor is refused rather than silently doing nothing.
    proc = run(guarded, out)
    assert proc.returncode == 2, proc.stderr
    assert "spec.forgettingGuard.selfDistillation" in proc.stderr and "nothing to anchor" in proc.stderr
    # Give it answers (the cache of base answers is what a resumed attempt reads) and run again.
    give_answers(out / "checkpoints" / "self_distillation.json")
    proc = run(guarded, out)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "training_summary.json").read_text())
    guard = [h["guard_loss"] for h in summary["history"]]
    print(f"\nKL to the base per step: {[round(g, 6) for g in guard]}")
    # KL ≥ 0, up to float rounding: the base's log-probabilities come from a packed forward, the
    # tuned model's from a padded batch of two.
    assert len(guard) == 6 and all(g > -1e-7 for g in guard)
    # Before the first update the adapter is zero: tuned == base, KL 0; afterwards it is not.
    assert abs(guard[0]) < 1e-6 and max(guard[1:]) > 1e-6
    assert "self-distillation: 40 base answers" in proc.stderr


def distance_from_start(model_dir, out):
    start = load_file(str(model_dir / "model.safetensors"))
    end = load_file(str(out / "model.safetensors"))
    return sum(((end[k] - start[k]) ** 2).sum().item() for k in start if k in end) ** 0.5


def test_l2_to_init_keeps_full_finetuning_closer_to_the_start(tiny_model, tmp_path):
    free, anchored = tmp_path / "free", tmp_path / "anchored"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    p = run(job(tmp_path / "a", tiny_model, "{type: full}", ""), free)
    assert p.returncode == 0, p.stderr
    p = run(job(tmp_path / "b", tiny_model, "{type: full}", "  forgettingGuard: {l2ToInit: {weight: 50.0}}\n"),
            anchored)
    assert p.returncode == 0, p.stderr
    d_free, d_anchored = distance_from_start(tiny_model, free), distance_from_start(tiny_model, anchored)
    penalty = [h["guard_loss"] for h in json.loads((anchored / "training_summary.json").read_text())["history"]]
    print(f"\n||theta - theta0||: unguarded {d_free:.4f}, l2ToInit 50 {d_anchored:.4f}; penalties {penalty}")
    assert penalty[0] == 0 and penalty[-1] > 0
    assert d_anchored < 0.8 * d_free


@pytest.mark.parametrize("adapter,guard,field", [
    ("{type: full}", "{selfDistillation: {weight: 1.0}}", "spec.forgettingGuard.selfDistillation"),
    ("{type: lora}", "{l2ToInit: {weight: 1.0}}", "spec.forgettingGuard.l2ToInit"),
    ("{type: full}", "{layerAnchor: {weight: 1.0}}", "spec.forgettingGuard.layerAnchor"),
])
def test_guard_for_the_other_adapter_type_exits_2(adapter, guard, field, tiny_model, tmp_path):
    proc = run(job(tmp_path, tiny_model, adapter, f"  forgettingGuard: {guard}\n"), tmp_path / "out")
    assert proc.returncode == 2, proc.stderr
    assert field in proc.stderr


def anchor_job(tmp_path, tiny_model, weight):
    return job(tmp_path, tiny_model, "{type: lora, lora: {rank: 8, alpha: 16, dropout: 0.0}}",
               f"  forgettingGuard: {{layerAnchor: {{weight: {weight}}}}}\n"
               "  checkpoint: {everySteps: 3, keepLast: 2}\n")


def run_anchored(tmp_path, tiny_model, weight):
    """A layer-anchored run of the tiny model, given general answers to sketch on (the random model
    answers every request with blank lines, which the guard refuses: exit 2 naming the field)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "out"
    path = anchor_job(tmp_path, tiny_model, weight)
    proc = run(path, out)
    assert proc.returncode == 2, proc.stderr
    assert "spec.forgettingGuard.layerAnchor" in proc.stderr and "no general text" in proc.stderr
    give_answers(out / "checkpoints" / "layer_anchor.json")
    proc = run(path, out)
    assert proc.returncode == 0, proc.stderr
    assert "layer anchor: 14 layers sketched on 40 general conversations" in proc.stderr, proc.stderr
    return path, out, json.loads((out / "training_summary.json").read_text())


def test_the_default_guard_steps_aside_when_the_base_cannot_answer(tiny_model, tmp_path):
    # The random tiny model answers every general request with blank lines: named, each guard is
    # refused (above); as the default, the run trains without them and says why.
    out = tmp_path / "out"
    path = job(tmp_path, tiny_model, "{type: lora, lora: {rank: 8, alpha: 16, dropout: 0.0}}", "")
    proc = run(path, out)
    assert proc.returncode == 0, proc.stderr
    assert "forgetting guard: default selfDistillation" in proc.stderr, proc.stderr
    for field in ("spec.forgettingGuard.selfDistillation", "spec.forgettingGuard.layerAnchor"):
        assert f"the default guard trains without it ({field})" in proc.stderr, proc.stderr
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["forgetting_guard_source"] == "default"
    assert summary["forgetting_guard"] == {}, "the summary names a guard that did not run"
    assert all(h.get("guard_loss") is None for h in summary["history"])


def test_layer_anchor_beside_self_distillation_sketches_the_distilled_answers(tiny_model, tmp_path):
    out = tmp_path / "out"
    both = job(tmp_path, tiny_model, "{type: lora, lora: {rank: 8, alpha: 16, dropout: 0.0}}",
               "  forgettingGuard: {selfDistillation: {weight: 1.0}, layerAnchor: {weight: 1.0e4}}\n"
               "  checkpoint: {everySteps: 3, keepLast: 2}\n")
    proc = run(both, out)
    assert proc.returncode == 2 and "spec.forgettingGuard.selfDistillation" in proc.stderr, proc.stderr
    give_answers(out / "checkpoints" / "self_distillation.json")
    proc = run(both, out)
    assert proc.returncode == 0, proc.stderr
    # The anchor reads the conversations self-distillation already asked for: the base model is
    # not asked a second set of general requests.
    assert "layer anchor: 14 layers sketched on 40 general conversations" in proc.stderr, proc.stderr
    assert not (out / "checkpoints" / "layer_anchor.json").exists()
    # The base's log-probabilities on those answers come from the anchor's forwards (no second pass).
    assert ("self-distillation: the base's log-probabilities on its 40 answers, from the layer anchor's"
            in proc.stderr), proc.stderr
    summary = json.loads((out / "training_summary.json").read_text())
    assert set(summary["forgetting_guard"]) == {"selfDistillation", "layerAnchor"}
    # Step 0: the adapter is zero, so the tuned model is the base (KL 0) and nothing has moved.
    guard = [h["guard_loss"] for h in summary["history"]]
    assert abs(guard[0]) < 1e-6 and all(g > 0 for g in guard[1:]), guard
    # Resumed from step 3, the base's log-probabilities are recorded again from the base, not from
    # the trained adapter: the run ends on the same adapter, bit for bit.
    assert_resumes_exactly(both, out)


def test_layer_anchor_beside_self_replay_sketches_the_replayed_answers(tiny_model, tmp_path):
    out = tmp_path / "out"
    both = job(tmp_path, tiny_model, "{type: lora, lora: {rank: 8, alpha: 16, dropout: 0.0}}",
               "  forgettingGuard: {selfReplay: {ratio: 0.125}, layerAnchor: {weight: 1.0e4}}\n")
    proc = run(both, out)
    assert proc.returncode == 2, proc.stderr
    give_answers(out / "checkpoints" / "self_replay.json")
    (out / "checkpoints" / "layer_anchor.json").unlink(missing_ok=True)
    proc = run(both, out)
    assert proc.returncode == 0, proc.stderr
    replayed = re.search(r"self-replay: (\d+) base answers", proc.stderr)
    assert replayed and int(replayed[1]) > 0, proc.stderr
    # The anchor reads the replayed conversations; the base is not asked a set of its own.
    assert (f"layer anchor: 14 layers sketched on {replayed[1]} general conversations"
            in proc.stderr), proc.stderr
    assert not (out / "checkpoints" / "layer_anchor.json").exists()


def test_layer_anchor_holds_each_layer_on_general_text_and_resumes_exactly(tiny_model, tmp_path):
    _, _, loose = run_anchored(tmp_path / "loose", tiny_model, 1.0)
    path, out, held = run_anchored(tmp_path / "held", tiny_model, 1.0e4)
    # The guard column is weight × drift: the mean squared relative change of each adapted layer's
    # output on the sketched general conversations.
    drift_loose = [h["guard_loss"] / 1.0 for h in loose["history"]]
    drift_held = [h["guard_loss"] / 1.0e4 for h in held["history"]]
    print(f"\nlayer drift per step: weight 1 {[f'{d:.2e}' for d in drift_loose]}; "
          f"weight 1e4 {[f'{d:.2e}' for d in drift_held]}")
    # A fresh adapter (B = 0) has moved nothing; then the layers move, far less when anchored.
    assert drift_loose[0] == 0 and drift_held[0] == 0
    assert drift_loose[-1] > 1e-6
    assert drift_held[-1] < 0.2 * drift_loose[-1]
    # Resume from the step-3 checkpoint: the sketch is drawn again from the seeded generator, so
    # the resumed run ends on the same adapter, bit for bit.
    assert_resumes_exactly(path, out)


def assert_resumes_exactly(path, out):
    """Runs the 6-step job at `path` again from its step-3 checkpoint (step 6's removed) and
    asserts it ends on the same adapter as the straight run in `out`, bit for bit."""
    straight = load_file(str(out / "adapter_model.safetensors"))
    for p in (out / "checkpoints").iterdir():
        if p.name.startswith("step-6"):
            shutil.rmtree(p)
    (out / "adapter_model.safetensors").unlink()
    proc = run(path, out)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "training_summary.json").read_text())["resumed_from_step"] == 3
    resumed = load_file(str(out / "adapter_model.safetensors"))
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
