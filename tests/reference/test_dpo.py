"""DPO: our loss, rewards and gradients against TRL's `DPOTrainer` on the same tiny model and batch;
short runs (LoRA with the adapter switched off as the reference, full fine-tuning with precomputed
reference log-probs, starting from an SFT adapter) that must raise preference accuracy on held-out
pairs; bad preference data and a mismatched starting adapter end with exit 2 and a message naming
the line or field.

The tiny model is a random Llama written by transformers with the SmolLM2 tokenizer and chat
template, so the pairs go through the real template on both sides."""

import json
import os
import random
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_trainer, trainer_bin

PROMPTS = [
    "List the pods in namespace {ns}.", "Show the logs of pod {name}.", "Delete the job {name}.",
    "Describe the node {name}.", "Scale deployment {name} to three replicas.",
    "Get the services in namespace {ns}.", "Restart the deployment {name}.",
    "Show the events in namespace {ns}.",
]
NAMES = ["web", "trainer", "api", "db", "cache", "queue", "gpu-7", "edge", "ml", "batch"]


def preference_lines(n, seed):
    """Pairs where the chosen reply is a bare command and the rejected one a chatty paragraph."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        name, ns = rng.choice(NAMES), rng.choice(NAMES)
        prompt = rng.choice(PROMPTS).format(name=name, ns=ns)
        command = f"kubectl get {name} -n {ns}"
        lines.append({
            "prompt": prompt,
            "chosen": command,
            "rejected": f"Sure! I would be glad to help you with that. You can run `{command}` and it should work."
                        f" Let me know if you need anything else!",
        })
    return lines


def write_jsonl(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def tiny_llama(path, tokenizer, hidden=64, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, hf_tokenizer):
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"), hf_tokenizer)


@pytest.fixture(scope="module")
def random_adapter(tmp_path_factory, tiny_model):
    """A LoRA adapter with non-zero B, so the policy differs from the reference (adapter off)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                     init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    path = tmp_path_factory.mktemp("random-adapter")
    model.save_pretrained(str(path))
    return path


def trl_terms(tiny_model, adapter, report, tokenizer, loss_type, beta, tmp_path):
    """Loss, mean rewards/log-probs and LoRA gradients from TRL's DPOTrainer loss on our tokens."""
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter), is_trainable=True)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[loss_type], report_to=[],
                     per_device_train_batch_size=len(report["pairs"]), use_cpu=True, max_length=None,
                     logging_steps=1)
    train = Dataset.from_list([{"prompt": "x", "chosen": "y", "rejected": "z"}])
    trainer = DPOTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    # Handed a PeftModel, TRL keeps a copy of its adapter as the reference ("ref", what our
    # initAdapter runs do too); drop it so the reference is the adapter switched off, as for a
    # fresh adapter.
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    if "ref" in unwrapped.peft_config:
        unwrapped.delete_adapter("ref")
    assert unwrapped.active_adapter == "default"
    examples = []
    for p in report["pairs"]:
        ex = {"prompt_ids": p["prompt_ids"]}
        for side in ("chosen", "rejected"):
            sup = p[side]["supervised"]
            k = sum(sup)
            # Our supervised span must be exactly the first k completion tokens for TRL's mask to match.
            assert sup[:k] == [True] * k and not any(sup[k:]), sup
            ex[f"{side}_ids"] = p[side]["ids"][:k]
        examples.append(ex)
    batch = trainer.data_collator(examples)
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, batch, False)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    grads = {n.replace(".default", ""): p.grad.detach().clone()
             for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.item(), metrics, grads


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_rewards_and_gradients_match_trl(loss_type, tiny_model, random_adapter, hf_tokenizer, tmp_path):
    beta = 0.1 if loss_type == "sigmoid" else 0.5
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_lines(4, seed=7))
    grads_file = tmp_path / "grads.safetensors"
    out = run_trainer("dpo-loss", "--model", tiny_model, "--adapter", random_adapter, "--data", data,
                      "--beta", beta, "--loss", loss_type, "--grads", grads_file)
    ours = json.loads(out.stdout)
    trl_loss, metrics, trl_grads = trl_terms(tiny_model, random_adapter, ours, hf_tokenizer, loss_type, beta,
                                             tmp_path)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"\n{loss_type}: loss ours {ours['loss']:.6f} TRL {trl_loss:.6f}; rewards chosen "
          f"{mean(ours['chosen_rewards']):.6f}/{metrics['rewards/chosen']:.6f} rejected "
          f"{mean(ours['rejected_rewards']):.6f}/{metrics['rewards/rejected']:.6f}")
    # The adapter moves the policy away from the reference, so the rewards are not trivially 0.
    assert max(abs(r) for r in ours["chosen_rewards"] + ours["rejected_rewards"]) > 1e-3
    assert abs(ours["loss"] - trl_loss) < 1e-4
    assert abs(mean(ours["chosen_rewards"]) - metrics["rewards/chosen"]) < 1e-4
    assert abs(mean(ours["rejected_rewards"]) - metrics["rewards/rejected"]) < 1e-4
    assert abs(mean(ours["chosen_logps"]) - metrics["logps/chosen"]) < 1e-4 * max(1, abs(metrics["logps/chosen"]))
    margins = [c - r for c, r in zip(ours["chosen_rewards"], ours["rejected_rewards"])]
    assert abs(mean(margins) - metrics["rewards/margins"]) < 1e-4

    our_grads = load_file(str(grads_file))
    assert sorted(our_grads) == sorted(trl_grads), (sorted(our_grads)[:3], sorted(trl_grads)[:3])
    worst = max((our_grads[n] - trl_grads[n]).abs().max().item() for n in our_grads)
    scale = max(g.abs().max().item() for g in trl_grads.values())
    print(f"{loss_type}: {len(our_grads)} gradient tensors, max abs diff {worst:.2e} (largest gradient {scale:.2e})")
    assert scale > 1e-4, "gradients vanish: the comparison would prove nothing"
    assert worst < 1e-4


def dpo_job(tmp_path, model, train, *, adapter="{type: lora, lora: {rank: 8, alpha: 16, dropout: 0.0}}",
            steps=24, lr="5.0e-3", eval_file=None, beta=0.1, extra=""):
    eval_line = f'\n    eval: {{uri: "file://{eval_file}"}}' if eval_file else ""
    job = tmp_path / "job.yaml"
    job.write_text(f"""apiVersion: finetune.dev/v1alpha1
kind: FinetuneJob
metadata: {{name: dpo-test}}
spec:
  baseModel: {{uri: "file://{model}"}}
  dataset:
    train: {{uri: "file://{train}"}}{eval_line}
    format: preference
  method: {{type: dpo, dpo: {{beta: {beta}}}}}
  adapter: {adapter}
  hyperparameters: {{maxSteps: {steps}, learningRate: {lr}, batchSize: 4, maxSeqLength: 128, seed: 5, scheduler: constant, precision: fp32}}
  evaluation: {{everySteps: {steps}}}
  resources: {{gpus: 0}}
{extra}""")
    return job


def run_job(job, out, *extra_args, env_extra=None):
    env = dict(os.environ, FINETUNE_STATUS_PORT="0", FINETUNE_TERMINATION_LOG=str(out.parent / "term.json"),
               **(env_extra or {}))
    cmd = [str(trainer_bin()), "--device", "cpu", "run", str(job), "--output", str(out), *map(str, extra_args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    return write_jsonl(d / "train.jsonl", preference_lines(48, seed=1)), \
        write_jsonl(d / "eval.jsonl", preference_lines(12, seed=2))


def check_learned(out, proc):
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "training_summary.json").read_text())
    pref = summary["preference"]
    before, after = pref["before"], pref["after"]
    print(f"\nreference {pref['reference']}: eval reward accuracy {before['reward_accuracy']:.2f} -> "
          f"{after['reward_accuracy']:.2f}, logp accuracy {before['logp_accuracy']:.2f} -> "
          f"{after['logp_accuracy']:.2f}, margin {after['reward_margin']:.3f}, eval loss {before['loss']:.4f} -> "
          f"{after['loss']:.4f}")
    assert after["reward_accuracy"] >= 0.9
    assert after["reward_margin"] > 0
    assert after["loss"] < before["loss"]
    # Independent of the reference: the tuned policy itself now prefers the chosen replies.
    assert after["logp_accuracy"] > before["logp_accuracy"]
    assert summary["metrics"]["preferenceAccuracy"] == after["reward_accuracy"]
    term = json.loads((out.parent / "term.json").read_text())
    assert term["metrics"]["preferenceAccuracy"] == after["reward_accuracy"]
    return summary


def test_lora_dpo_raises_preference_accuracy(tiny_model, pair_files, tmp_path):
    train, held_out = pair_files
    out = tmp_path / "out"
    proc = run_job(dpo_job(tmp_path, tiny_model, train, eval_file=held_out), out)
    summary = check_learned(out, proc)
    assert summary["preference"]["reference"] == "adapter-off"
    assert (out / "adapter_model.safetensors").exists()
    assert "reward margin" in proc.stderr and "reward accuracy" in proc.stderr


def test_full_dpo_precomputes_the_reference(tiny_model, pair_files, tmp_path):
    train, held_out = pair_files
    out = tmp_path / "out"
    proc = run_job(dpo_job(tmp_path, tiny_model, train, adapter="{type: full}", lr="1.0e-3", eval_file=held_out),
                   out)
    summary = check_learned(out, proc)
    assert summary["preference"]["reference"] == "precomputed"
    cache = json.loads((out / "checkpoints" / "dpo_reference_logps.json").read_text())
    assert len(cache["train"]) == 2 * 48 and len(cache["eval"]) == 2 * 12
    assert "dpo reference log-probs computed" in proc.stderr


def test_dpo_starts_from_an_sft_adapter(tiny_model, random_adapter, pair_files, tmp_path):
    train, held_out = pair_files
    out = tmp_path / "out"
    job = dpo_job(tmp_path, tiny_model, train, eval_file=held_out,
                  adapter="{type: lora, initAdapter: sft-adapter}")
    proc = run_job(job, out, "--init-adapter", random_adapter)
    summary = check_learned(out, proc)
    # The reference is the starting adapter, not the bare base: its log-probs were precomputed.
    assert summary["preference"]["reference"] == "precomputed"
    assert summary["preference"]["before"]["reward_margin"] == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16


def test_dpo_without_the_init_adapter_directory_is_refused(tiny_model, pair_files, tmp_path):
    train, _ = pair_files
    job = dpo_job(tmp_path, tiny_model, train, adapter="{type: lora, initAdapter: sft-adapter}")
    proc = run_job(job, tmp_path / "out")
    assert proc.returncode == 2, proc.stderr
    assert "initAdapter" in proc.stderr and "FINETUNE_INIT_ADAPTER_DIR" in proc.stderr


def test_adapter_for_another_base_model_is_refused(tiny_model, pair_files, hf_tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    other = tiny_llama(tmp_path / "other", hf_tokenizer, hidden=32)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(str(other)),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    peft.save_pretrained(str(tmp_path / "other-adapter"))
    train, _ = pair_files
    job = dpo_job(tmp_path, tiny_model, train, adapter="{type: lora, initAdapter: other}")
    proc = run_job(job, tmp_path / "out", "--init-adapter", tmp_path / "other-adapter")
    assert proc.returncode == 2, proc.stderr
    assert "adapter for another base model" in proc.stderr, proc.stderr
    assert "hidden_size 64" in proc.stderr

    # Settings in the spec that contradict the adapter's own config are named too.
    job = dpo_job(tmp_path, tiny_model, train,
                  adapter="{type: lora, initAdapter: other, lora: {rank: 16, alpha: 32}}")
    proc = run_job(job, tmp_path / "out2", "--init-adapter", tmp_path / "other-adapter")
    assert proc.returncode == 2, proc.stderr
    assert "spec.adapter.lora" in proc.stderr


@pytest.mark.parametrize("case,line,message", [
    ("missing-rejected", {"prompt": "Delete pod web.", "chosen": "kubectl delete pod web"}, "rejected"),
    ("same-reply", {"prompt": "Delete pod web.", "chosen": "kubectl delete pod web",
                    "rejected": "kubectl delete pod web"}, "same reply"),
    ("empty-chosen", {"prompt": "Delete pod web.", "chosen": " ", "rejected": "no"}, "`chosen` is empty"),
])
def test_bad_preference_lines_exit_2_naming_the_line(case, line, message, tiny_model, tmp_path):
    lines = preference_lines(5, seed=3)
    lines.insert(3, line)
    train = write_jsonl(tmp_path / "train.jsonl", lines)
    proc = run_job(dpo_job(tmp_path, tiny_model, train), tmp_path / "out")
    assert proc.returncode == 2, proc.stderr
    assert f"{train}:4" in proc.stderr, proc.stderr
    assert message in proc.stderr, proc.stderr
    term = json.loads((tmp_path / "term.json").read_text())
    assert message in term["error"]["message"], term
