"""`hf://` base models and dataset files against a real Hub-compatible server: olah serving
SmolLM2 and a dataset of the example chat data through the Hub's API, behind an nginx gateway that
wants a bearer token (see server.py). Each case runs the real `finetune-trainer run` for one
optimizer step and reads the contract's termination message.

Run: `make test-hub` (part of `make test`), or with the project venv:
    python -m pytest -q tests/hub
"""

import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from server import DATASET_ID, REPO_ID, Hub, dataset_dir, repo_dir

TOKEN = "hf_test_0123456789abcdef"
# Loads an adapter directory with PEFT, which downloads its base from HF_ENDPOINT.
PEFT_LOAD = """
import sys
from peft import AutoPeftModelForCausalLM
AutoPeftModelForCausalLM.from_pretrained(sys.argv[1])
"""
ROOT = Path(__file__).resolve().parents[2]


def trainer_bin() -> Path:
    explicit = os.environ.get("FINETUNE_TRAINER_BIN")
    if explicit:
        return Path(explicit)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/finetune-operator/target"))
    return Path(target) / "release" / "finetune-trainer"


@pytest.fixture(scope="module")
def hub():
    with Hub(TOKEN) as h:
        yield h


def job_yaml(tmp: Path, uri: str, secret: bool = True, fmt: str = "auto") -> Path:
    secret_ref = "\n    tokenSecretRef:\n      name: hf-token" if secret else ""
    path = tmp / "job.yaml"
    path.write_text(f"""apiVersion: finetune.dev/v1alpha1
kind: FinetuneJob
metadata:
  name: hub-test
spec:
  baseModel:
    uri: {uri}
    format: {fmt}{secret_ref}
  dataset:
    train:
      uri: file://{ROOT}/examples/data/chat-train.jsonl
    format: chat
  adapter:
    type: lora
  forgettingGuard:
    disabled: true
  hyperparameters:
    maxSteps: 1
    batchSize: 2
    maxSeqLength: 64
""")
    return path


class Run:
    """One `finetune-trainer run`, its stderr read as it comes (a test may act on a line)."""

    def __init__(self, tmp: Path, job: Path, endpoint: str, cache: Path, token: str | None,
                 wait_for: str | None = None):
        env = dict(os.environ, HF_ENDPOINT=endpoint, FINETUNE_MODEL_CACHE_DIR=str(cache),
                   FINETUNE_TERMINATION_LOG=str(tmp / "termination-log"), FINETUNE_STATUS_PORT="0")
        env.pop("HF_TOKEN", None)
        if token is not None:
            env["HF_TOKEN"] = token
        self.tmp = tmp
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [str(trainer_bin()), "--device", "cpu", "run", str(job), "--output", str(tmp / "out")],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.seen = threading.Event()
        self.pattern = wait_for
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            if self.pattern and self.pattern in line:
                self.seen.set()

    def wait(self, timeout: float = 600) -> int:
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        self.seconds = time.monotonic() - self.started
        return code

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def termination(self) -> dict:
        return json.loads((self.tmp / "termination-log").read_text())


def run(tmp, job, hub, cache, token=TOKEN, wait_for=None) -> Run:
    return Run(tmp, job, hub.endpoint, cache, token, wait_for)


def head_commit() -> str:
    return subprocess.run(["git", "-C", str(repo_dir()), "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()


def test_a_token_downloads_only_the_format_and_a_second_run_reuses_the_cache(hub, tmp_path):
    cache = tmp_path / "cache"
    job = job_yaml(tmp_path, f"hf://{REPO_ID}@main", fmt="safetensors")
    before = len(hub.downloads())
    first = run(tmp_path, job, hub, cache)
    assert first.wait() == 0, first.stderr
    commit = head_commit()
    assert first.termination()["baseModelCommit"] == commit
    got = [path.rsplit("/", 1)[-1] for _, path, _, _ in hub.downloads()[before:]]
    assert "model.safetensors" in got and "config.json" in got and "tokenizer.json" in got
    assert not any(name.endswith(".gguf") for name in got), got  # another format: left alone
    model_dir = cache / "hf" / "models" / REPO_ID / f"{commit}.safetensors"
    weights = model_dir / "model.safetensors"
    assert not weights.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    assert not list(model_dir.parent.glob(".*.partial")), "the partial directory was published"
    # The adapter names its base as PEFT does: the repository and the commit trained on; PEFT's
    # own AutoPeftModel then fetches that base through huggingface_hub from the same mirror.
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == (REPO_ID, commit)
    load = subprocess.run(
        [sys.executable, "-c", PEFT_LOAD, str(tmp_path / "out")], capture_output=True, text=True,
        env=dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_TOKEN=TOKEN,
                 HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_XET="1"), timeout=600)
    assert load.returncode == 0, load.stderr[-3000:]
    snapshots = tmp_path / "hf-home" / "hub" / f"models--{REPO_ID.replace('/', '--')}" / "snapshots"
    assert [p.name for p in snapshots.iterdir()] == [commit]
    # A second job on the same base: the revision is resolved again, no file is downloaded.
    mid = len(hub.requests())
    second_tmp = tmp_path / "second"
    second_tmp.mkdir()
    second = run(second_tmp, job_yaml(second_tmp, f"hf://{REPO_ID}@main"), hub, cache)
    assert second.wait() == 0, second.stderr
    assert second.termination()["baseModelCommit"] == commit
    new = hub.requests()[mid:]
    assert [r for r in new if "/resolve/" in r[1]] == [], new
    assert "from the cache" in second.stderr
    # The same commit as GGUF is another entry: only the .gguf file is downloaded, and loaded.
    mid = len(hub.requests())
    third_tmp = tmp_path / "third"
    third_tmp.mkdir()
    third = run(third_tmp, job_yaml(third_tmp, f"hf://{REPO_ID}@main", fmt="gguf"), hub, cache)
    assert third.wait() == 0, third.stderr
    new = [r[1].rsplit("/", 1)[-1] for r in hub.requests()[mid:] if "/resolve/" in r[1]]
    assert new == ["SmolLM2-135M-Instruct.Q4_1.gguf"], new
    gguf = cache / "hf" / "models" / REPO_ID / f"{commit}.gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert f"model {gguf}" in third.stderr, third.stderr


def test_two_jobs_at_once_download_once_and_the_second_waits(hub, tmp_path):
    cache = tmp_path / "shared-cache"
    before = len(hub.downloads("model.safetensors"))
    runs = []
    for name in ("a", "b"):
        d = tmp_path / name
        d.mkdir()
        runs.append(run(d, job_yaml(d, f"hf://{REPO_ID}@main", fmt="safetensors"), hub, cache))
    for r in runs:
        assert r.wait() == 0, r.stderr
    assert len(hub.downloads("model.safetensors")) - before == 1
    waited = [r for r in runs if "another job is downloading it" in r.stderr]
    assert len(waited) == 1, [r.stderr for r in runs]
    assert all(r.termination()["baseModelCommit"] == head_commit() for r in runs)


def test_a_commit_already_cached_needs_no_network(hub, tmp_path):
    cache = tmp_path / "cache"
    commit = head_commit()
    first = run(tmp_path, job_yaml(tmp_path, f"hf://{REPO_ID}@{commit}"), hub, cache)
    assert first.wait() == 0, first.stderr
    # The endpoint now points nowhere: the pinned commit still loads.
    second_tmp = tmp_path / "second"
    second_tmp.mkdir()
    job = job_yaml(second_tmp, f"hf://{REPO_ID}@{commit}")
    offline = Run(second_tmp, job, "http://127.0.0.1:9", cache, TOKEN)
    assert offline.wait() == 0, offline.stderr
    assert offline.termination()["baseModelCommit"] == commit


def test_a_wrong_token_fails_fast_naming_the_secret_and_never_showing_the_token(hub, tmp_path):
    wrong = "hf_wrong_token_value_42"
    r = run(tmp_path, job_yaml(tmp_path, f"hf://{REPO_ID}@main"), hub, tmp_path / "cache", token=wrong)
    assert r.wait() == 2, r.stderr
    assert r.seconds < 15, r.seconds
    error = r.termination()["error"]
    assert error["param"] == "spec.baseModel.tokenSecretRef"
    assert "Secret `hf-token`" in error["message"] and "401" in error["message"], error
    for text in (r.stderr, (tmp_path / "termination-log").read_text()):
        assert wrong not in text and TOKEN not in text


def test_no_token_is_refused_with_the_field_to_set(hub, tmp_path):
    r = run(tmp_path, job_yaml(tmp_path, f"hf://{REPO_ID}@main", secret=False), hub,
            tmp_path / "cache", token=None)
    assert r.wait() == 2, r.stderr
    error = r.termination()["error"]
    assert error["param"] == "spec.baseModel.uri"
    assert "tokenSecretRef" in error["message"], error


def test_a_missing_repository_is_refused_naming_it(hub, tmp_path):
    r = run(tmp_path, job_yaml(tmp_path, f"hf://{REPO_ID}-nope@main"), hub, tmp_path / "cache")
    assert r.wait() == 2, r.stderr
    assert f"{REPO_ID}-nope" in r.termination()["error"]["message"]


def test_a_byte_flipped_on_the_server_is_caught_by_its_hash_and_fetched_again(hub, tmp_path):
    """The mirror serves tokenizer.json with one byte flipped; the trainer must refuse those
    bytes, say so, and fetch again; the test repairs the server's copy once it has."""
    commit = head_commit()
    info = subprocess.run(["git", "-C", str(repo_dir()), "show", f"{commit}:tokenizer.json"],
                          check=True, capture_output=True, text=True).stdout
    oid = info.split("oid sha256:")[1].split()[0]
    obj = repo_dir() / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
    original = obj.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01
    obj.write_bytes(bytes(flipped))
    try:
        before = len(hub.downloads("tokenizer.json"))
        r = run(tmp_path, job_yaml(tmp_path, f"hf://{REPO_ID}@main"), hub, tmp_path / "cache",
                wait_for="sha256 mismatch")
        assert r.seen.wait(120), r.stderr
    finally:
        obj.write_bytes(original)
    assert r.wait() == 0, r.stderr
    assert "fetching tokenizer.json again" in r.stderr
    assert len(hub.downloads("tokenizer.json")) - before >= 2
    cached = tmp_path / "cache" / "hf" / "models" / REPO_ID / f"{commit}.safetensors" / "tokenizer.json"
    assert cached.read_bytes() == original


def dataset_run(tmp: Path, hub, train: str, eval_: str, token: str | None) -> subprocess.CompletedProcess:
    """One optimizer step on the local SmolLM2 GGUF with these data URIs; the token, if any,
    as the operator passes `dataset.tokenSecretRef` (Secret `hf-data`)."""
    from make_repo import gguf_path
    secret = "\n    tokenSecretRef: {name: hf-data}" if token else ""
    job = tmp / "job.yaml"
    job.write_text(f"""apiVersion: finetune.dev/v1alpha1
kind: FinetuneJob
metadata: {{name: hub-dataset}}
spec:
  baseModel: {{uri: "file://{gguf_path()}"}}
  dataset:
    train: {{uri: "{train}"}}
    eval: {{uri: "{eval_}"}}
    format: chat{secret}
  adapter: {{type: lora}}
  forgettingGuard: {{disabled: true}}
  hyperparameters: {{maxSteps: 1, batchSize: 2, maxSeqLength: 64}}
""")
    env = dict(os.environ, HF_ENDPOINT=hub.endpoint, FINETUNE_TERMINATION_LOG=str(tmp / "termination-log"),
               FINETUNE_STATUS_PORT="0")
    env.pop("HF_TOKEN", None)
    env.pop("FINETUNE_HF_DATASET_TOKEN", None)
    if token:
        env["FINETUNE_HF_DATASET_TOKEN"] = token
    return subprocess.run([str(trainer_bin()), "--device", "cpu", "run", str(job), "--output", str(tmp / "out")],
                          env=env, capture_output=True, text=True, timeout=600)


def test_a_dataset_file_from_the_hub_trains_like_the_same_file_and_a_wrong_token_is_refused(hub, tmp_path):
    data = ROOT / "examples" / "data"
    local_dir, hub_dir = tmp_path / "local", tmp_path / "hub"
    local_dir.mkdir()
    hub_dir.mkdir()
    local = dataset_run(local_dir, hub, f"file://{data}/chat-train.jsonl", f"file://{data}/chat-eval.jsonl", None)
    assert local.returncode == 0, local.stderr
    base = f"hf://datasets/{DATASET_ID}@main/data"
    remote = dataset_run(hub_dir, hub, f"{base}/train.jsonl", f"{base}/eval.jsonl", TOKEN)
    assert remote.returncode == 0, remote.stderr
    # The same bytes (train.jsonl through LFS and its sha256, eval.jsonl as a git blob): the same
    # data digest, and the commit the revision resolved to in the log.
    digest = lambda d: json.loads((d / "termination-log").read_text())["datasetDigest"]
    assert digest(local_dir) == digest(hub_dir)
    commit = subprocess.run(["git", "-C", str(dataset_dir()), "rev-parse", "HEAD"], check=True,
                            capture_output=True, text=True).stdout.strip()
    assert f"dataset {base}/train.jsonl: commit {commit}" in remote.stderr, remote.stderr

    wrong_dir = tmp_path / "wrong"
    wrong_dir.mkdir()
    wrong = dataset_run(wrong_dir, hub, f"{base}/train.jsonl", f"{base}/eval.jsonl", "hf_not_the_token")
    assert wrong.returncode == 2, wrong.stderr
    error = json.loads((wrong_dir / "termination-log").read_text())["error"]
    assert error["param"] == "spec.dataset.tokenSecretRef", error
    assert "Secret `hf-data`" in error["message"]
    assert "hf_not_the_token" not in error["message"] + wrong.stderr

    missing_dir = tmp_path / "missing"
    missing_dir.mkdir()
    missing = dataset_run(missing_dir, hub, f"{base}/absent.jsonl", f"{base}/eval.jsonl", TOKEN)
    assert missing.returncode == 2, missing.stderr
    error = json.loads((missing_dir / "termination-log").read_text())["error"]
    assert error["param"] == "spec.dataset.train.uri", error
    assert "absent.jsonl" in error["message"]
