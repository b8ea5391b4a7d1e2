#!/usr/bin/env python3
"""`make gpu-check` (issue #19 part 6): the trainer on one GPU, against itself on the CPU and
against transformers+PEFT on the same GPU, in one run of under 10 minutes from a binary built
elsewhere (`make gpu-bundle` packs it with the reference's wheels into .gpu-bundle/).

Parts, each with its own time budget (a part that would not fit in what is left is skipped, and
the reason recorded):

(a) bf16 vs fp32 — the SmolLM2 example job (chat data, LoRA r16 on the seven projections, its
    batch, sequence length, learning rate and schedule) on SmolLM2-135M-shaped random weights (the
    real weights do not fit the 64 MiB transfer), N steps on CUDA in bf16 and on the CPU in fp32.
    Both start from one saved adapter (`adapter.initAdapter`): LoRA A is drawn by the device's own
    generator, and CUDA's draws differ from the CPU's for one seed. LoRA dropout is 0 for the same
    reason (masks). What is left is the precision. Tolerance: every step's loss within
    rtol 1.6e-2 of the fp32 loss, torch.testing's default for bfloat16 (bf16 keeps 8 significant
    bits: one rounding is up to 2^-9 = 0.2 %, and a loss passes through thousands).
(b) Llama-3.1-8B-shaped random weights (`finetune-trainer init-random`), LoRA r16 on all linear
    layers, sequence 2048, packing, 8 rows per optimizer step: tokens/s over the steps after the
    first (the first pays for allocator and kernel warm-up), MFU = tokens/s x 4N / 989e12 (N = every
    base parameter; 2N forward + 2N backward to the activations, no weight gradients for frozen
    weights; attention's own FLOPs left out; 989 TFLOP/s = H100/H200 SXM dense bf16 peak), peak
    GPU memory from `nvidia-smi` polled every 100 ms (it includes the CUDA context, ~0.5 GiB), and
    the same for transformers+PEFT on the same weights, rows and micro-batch in the same run
    (torch.cuda.max_memory_allocated beside it).
(c) The same with a 4-bit (NF4) base, QLoRA, and a 70B-shaped QLoRA run: fits or not, tokens/s.
    The trainer has no QLoRA yet: a manifest with `adapter.lora.baseQuantization` is tried and the
    trainer's refusal recorded, so this script needs no change once it lands.
(d) `finetune-trainer plan` (the memory planner) for every run: predicted total vs measured peak.

`--dry-run` proves the plumbing on a machine without a GPU: CPU instead of CUDA (bf16 on the CPU
for the "GPU" side of (a)), a tiny config instead of 8B (sequence 256), 2 steps, peak RSS instead
of nvidia-smi. Results: JSON and a table under $OUT (the device tool's folder), else
$GPU_CHECK_OUT, else $CARGO_TARGET_DIR/bench/gpu-check.

    python3 tests/gpu/gpu_check.py [--dry-run] [--budget-s 560]
"""

import argparse
import json
import lzma
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / ".gpu-bundle"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEAK_BF16_FLOPS = 989e12
BF16_RTOL = 1.6e-2
# What the reference needs at the versions the parity tests use; the bundle's other wheels are
# installed only where the machine lacks the package.
PINNED = ["transformers", "peft", "accelerate", "huggingface_hub", "tokenizers", "safetensors"]

# Llama-3.1-8B / 70B shapes. bos/eos are SmolLM2's: the tokenizer is SmolLM2's (ids < 49152 are
# valid rows of a 128256-row embedding), and Llama 3's special ids would not be in it.
LLAMA_31 = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
    "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "initializer_range": 0.02,
}
LLAMA_8B = dict(LLAMA_31, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8)
LLAMA_70B = dict(LLAMA_31, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                 num_attention_heads=64, num_key_value_heads=8)
TINY = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
    "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02,
}


def parameters(c):
    """Every base parameter of a Llama config (embeddings, norms and the head included)."""
    h, i, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    hd = c.get("head_dim") or h // c["num_attention_heads"]
    attn = h * c["num_attention_heads"] * hd * 2 + h * c["num_key_value_heads"] * hd * 2
    layer = attn + 3 * h * i + 2 * h
    head = 0 if c.get("tie_word_embeddings") else c["vocab_size"] * h
    return c["vocab_size"] * h + L * layer + h + head


def gib(b):
    return None if b is None else round(b / 2**30, 2)


def gib_text(b):
    return "-" if b is None else f"{b / 2**30:.2f} GiB"


# ------------------------------------------------------------------------------------ plumbing


class Budget:
    """The run's deadline: each part asks for its estimate before it starts."""

    def __init__(self, seconds):
        self.end = time.monotonic() + seconds

    def left(self):
        return self.end - time.monotonic()

    def allows(self, need):
        return self.left() >= need


class Log:
    """Children's output goes to one file (the device tool brings back at most 8)."""

    def __init__(self, path):
        self.fh = open(path, "w")

    def section(self, title, text):
        self.fh.write(f"\n===== {title}\n{text}\n")
        self.fh.flush()


def sh(cmd, **kw):
    r = subprocess.run(cmd, shell=isinstance(cmd, str), capture_output=True, text=True, **kw)
    return r.returncode, (r.stdout + r.stderr).strip()


class GpuPeak:
    """Peak `memory.used` of the GPU while the block runs (the whole device: CUDA context, every
    process), from nvidia-smi's own 100 ms loop."""

    def __init__(self, enabled):
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.peak_mib = None

    def __enter__(self):
        if self.enabled:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-lms", "100"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            try:
                v = int(line.strip().split()[0])
            except (ValueError, IndexError):
                continue
            self.peak_mib = v if self.peak_mib is None else max(self.peak_mib, v)

    def __exit__(self, *exc):
        if self.enabled:
            time.sleep(0.3)
            self.proc.terminate()
            self.proc.wait()
            self.thread.join(timeout=2)

    @property
    def peak_bytes(self):
        return None if self.peak_mib is None else self.peak_mib * 2**20


def run_child(cmd, env, timeout, log, title):
    """Runs `cmd`; returns (rc, output, seconds, peak RSS of the child). rc 124 on timeout."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        timer = threading.Timer(max(timeout, 1), lambda: os.killpg(proc.pid, 9))
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        timed_out = not timer.is_alive()
        timer.cancel()
        out.seek(0)
        text = out.read().decode(errors="replace")
    rc = 124 if timed_out else os.waitstatus_to_exitcode(status)
    secs = time.perf_counter() - t0
    log.section(f"{title}: rc {rc}, {secs:.1f} s: {' '.join(map(str, cmd))}", text[-20000:])
    return rc, text, secs, usage.ru_maxrss * 1024


def tail(text, n=600):
    text = text.strip()
    return text if len(text) <= n else "..." + text[-n:]


def json_line(text):
    """The last line of a child's output that is a JSON object (warnings may follow it)."""
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no JSON in: {tail(text)}")


def last_line(text):
    lines = [l for l in str(text).strip().splitlines() if l.strip()]
    return lines[-1] if lines else ""


# ------------------------------------------------------------------------------------ setup


class Env:
    def __init__(self, args, work, log):
        self.args, self.work, self.log = args, work, log
        self.dry = args.dry_run
        self.device = "cpu" if self.dry else "cuda"
        self.python = sys.executable
        self.info = {}
        self.site = None
        self.reference = None
        self.prefetch = {}

    def machine(self):
        info = self.info
        info["dry_run"] = self.dry
        info["python"] = sys.version.split()[0]
        rc, out = sh("lscpu")
        keep = ("Model name", "CPU(s)", "Thread(s) per core", "Socket(s)")
        info["lscpu"] = {k.strip(): v.strip() for k, _, v in (l.partition(":") for l in out.splitlines())
                         if k.strip() in keep} if rc == 0 else out
        rc, out = sh("nvidia-smi -L")
        info["nvidia_smi_L"] = out if rc == 0 else f"nvidia-smi unavailable: {out}"
        rc, out = sh("nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader,nounits")
        if rc == 0 and out:
            name, mem, driver = [x.strip() for x in out.splitlines()[0].split(",")]
            info["gpu"] = {"name": name, "memory_total_mib": int(mem), "driver": driver}
            rc, used = sh("nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits")
            info["gpu"]["memory_used_before_mib"] = int(used.split()[0]) if rc == 0 else None
        rc, out = sh([self.python, "-c", "import torch,os,json;print(json.dumps({'torch':torch.__version__,"
                      "'cuda':torch.version.cuda,'cuda_available':torch.cuda.is_available(),"
                      "'lib':os.path.join(os.path.dirname(torch.__file__),'lib'),"
                      "'site':os.path.dirname(os.path.dirname(torch.__file__))}))"])
        if rc != 0:
            raise SystemExit(f"gpu-check: {self.python} cannot import torch:\n{out}")
        t = json_line(out)
        info["torch"] = {k: t[k] for k in ("torch", "cuda", "cuda_available")}
        if not self.dry and not t["cuda_available"]:
            raise SystemExit("gpu-check: torch sees no CUDA device (use --dry-run on a machine without a GPU)")
        self.torch_lib, self.torch_site = t["lib"], t["site"]
        rc, out = sh("df -Pk " + str(self.work))
        if rc == 0:
            info["work_disk_free_gib"] = round(int(out.splitlines()[-1].split()[3]) / 2**20, 1)
        info["cpu_count"] = os.cpu_count()

    def trainer(self):
        """The binary: $FINETUNE_TRAINER_BIN, else the bundle's, else (dry run) the local build."""
        explicit = os.environ.get("FINETUNE_TRAINER_BIN")
        packed = BUNDLE / "finetune-trainer.xz"
        if explicit:
            path = Path(explicit)
        elif packed.exists():
            path = self.work / "bin" / "finetune-trainer"
            path.parent.mkdir(parents=True, exist_ok=True)
            with lzma.open(packed) as src, open(path, "wb") as dst:
                shutil.copyfileobj(src, dst)
            path.chmod(0o755)
            self.info["trainer_bundle"] = (BUNDLE / "BINARY.txt").read_text().strip().splitlines() \
                if (BUNDLE / "BINARY.txt").exists() else None
        elif self.dry:
            cache = os.environ.get("FINETUNE_CACHE", os.path.expanduser("~/.cache/finetune-operator"))
            path = Path(os.environ.get("CARGO_TARGET_DIR", f"{cache}/target")) / "release/finetune-trainer"
        else:
            raise SystemExit("gpu-check: no trainer: run `make gpu-bundle` where it was built and carry .gpu-bundle")
        if not path.exists():
            raise SystemExit(f"gpu-check: {path} does not exist")
        self.bin = str(path)
        # The binary's RUNPATH names the build machine's venv; here libtorch and the CUDA libraries
        # are wherever this python's torch wheel put them: torch/lib and site-packages/nvidia/*/lib.
        dirs = [self.torch_lib]
        nv = Path(self.torch_site) / "nvidia"
        if nv.is_dir():
            dirs += sorted({str(p.parent) for p in nv.glob("**/lib/*.so*")})
        self.env = dict(os.environ, LD_LIBRARY_PATH=":".join(dirs + [os.environ.get("LD_LIBRARY_PATH", "")]).rstrip(":"),
                        FINETUNE_STATUS_PORT="0")
        rc, out = sh(["ldd", self.bin], env=self.env)
        missing = [l.strip() for l in out.splitlines() if "not found" in l]
        if missing:
            raise SystemExit("gpu-check: the trainer's libraries are not all found with LD_LIBRARY_PATH="
                             f"{self.env['LD_LIBRARY_PATH']}:\n  " + "\n  ".join(missing))
        rc, out = sh([self.bin, "--version"], env=self.env)
        if rc != 0:
            raise SystemExit(f"gpu-check: {self.bin} --version failed:\n{out}")
        self.info["trainer"] = out
        self.has_init_random = sh([self.bin, "init-random", "--help"], env=self.env)[0] == 0
        self.has_plan = sh([self.bin, "plan", "--help"], env=self.env)[0] == 0
        self.info["trainer_commands"] = {"init-random": self.has_init_random, "plan": self.has_plan}

    def packages(self):
        """transformers+PEFT for the reference: the bundle's pinned versions installed into a
        --target folder put first on PYTHONPATH (the machine's torch stays visible); a bundled
        dependency only where the machine lacks it. Falls back to the machine's own packages."""
        wheels = BUNDLE / "wheels"
        rec = self.info.setdefault("reference_packages", {})
        if wheels.is_dir():
            names = {re.split(r"-\d", w.name, maxsplit=1)[0].replace("_", "-").lower() for w in wheels.glob("*.whl")}
            pinned = {}
            for w in wheels.glob("*.whl"):
                n, v = w.name.split("-")[:2]
                pinned[n.replace("_", "-").lower()] = v
            check = ("import importlib.metadata as m,sys\nfor n in sys.argv[1:]:\n"
                     "  try: m.version(n)\n  except m.PackageNotFoundError: print(n)")
            pins = {p.replace("_", "-").lower() for p in PINNED}
            rc, out = sh([self.python, "-c", check, *sorted(names - pins)])
            missing = out.split() if rc == 0 else sorted(names - pins)
            want = [f"{n}=={pinned[n]}" for n in sorted(pins | set(missing)) if n in pinned]
            self.site = str(self.work / "site")
            rc, out = sh([self.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                          "--disable-pip-version-check", "--find-links", str(wheels), "--target", self.site, *want])
            rec["installed_from_bundle"] = want
            if rc != 0:
                rec["bundle_install_error"] = tail(out, 1500)
                self.site = None
        for site in ([self.site] if self.site else []) + [None]:
            env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1",
                       **({"PYTHONPATH": site} if site else {}))
            rc, out = sh([self.python, "-c", "import transformers,peft,accelerate,numpy,json;print(json.dumps("
                          "{'transformers':transformers.__version__,'peft':peft.__version__,"
                          "'accelerate':accelerate.__version__,'numpy':numpy.__version__}))"], env=env)
            if rc == 0:
                rec["versions"] = json_line(out)
                rec["source"] = "bundle" if site else "machine"
                self.site = site
                self.reference = env
                return
            rec[f"import_error_{'bundle' if site else 'machine'}"] = tail(out, 1500)
        rec["source"] = None


# ------------------------------------------------------------------------------------ models & data


def smollm2_dir(env):
    """SmolLM2's config and tokenizer files: the bundle's, else (a dry run in a checkout without
    `make gpu-bundle`) made once under the work folder from the venv's GGUF, as the bundle does."""
    bundled = BUNDLE / "smollm2"
    if bundled.is_dir():
        return bundled
    made = env.work / "smollm2-files"
    if not (made / "config.json").exists():
        gguf = subprocess.run([str(ROOT / "scripts/smollm2-path.sh")], capture_output=True, text=True,
                              check=True).stdout.strip()
        subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "smollm2_files.py"), gguf, str(made)], check=True,
                       capture_output=True)
    return made


def write_model(env, config, out, dtype, tokenizer_dir, budget_s):
    """A random checkpoint with the trainer's `init-random`, else (a binary without it) with
    transformers; then the tokenizer files. Returns (seconds, how)."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = out.parent / f"{out.name}-config.json"
    cfg.write_text(json.dumps(config, indent=2))
    t0 = time.perf_counter()
    if env.has_init_random:
        cmd = [env.bin, "init-random", "--config", str(cfg), "--out", str(out), "--dtype", dtype]
        rc, text, _, _ = run_child(cmd, env.env, budget_s, env.log, f"init-random {out.name}")
        how = "finetune-trainer init-random"
    elif env.reference is not None:
        cmd = [env.python, __file__, "--worker", "init-model", "--config", str(cfg), "--model", str(out),
               "--dtype", dtype]
        rc, text, _, _ = run_child(cmd, env.reference, budget_s, env.log, f"init-model (python) {out.name}")
        how = "transformers LlamaForCausalLM(config).save_pretrained (this binary has no init-random)"
    else:
        raise RuntimeError("neither init-random nor transformers is available to write random weights")
    if rc != 0:
        raise RuntimeError(f"writing {out.name} failed (rc {rc}): {tail(text)}")
    for f in tokenizer_dir.iterdir():
        if f.name != "config.json":
            shutil.copy(f, out / f.name)
    return time.perf_counter() - t0, how


def text_documents(seq, rows_needed, seed=0):
    """Deterministic text documents of seq to 6 x seq characters (about 0.3 to 1.8 x seq tokens at
    ~3.3 characters per token, so a row holds one long document, truncated, or several short ones:
    packing with real document boundaries) from the repo's own sources; 1.5 x the rows the run
    consumes, counting one document per row (the least a row takes)."""
    files = sorted(p for p in ROOT.rglob("*") if p.suffix in {".rs", ".md", ".py"} and p.is_file()
                   and not any(part.startswith(".") or part == "target" for part in p.relative_to(ROOT).parts))
    rng = random.Random(seed)
    docs, text = [], ""
    for p in files:
        text += p.read_text(errors="replace") + "\n"
        while len(text) > 6 * seq:
            n = rng.randint(seq, 6 * seq)
            chunk, text = text[:n].strip(), text[n:]
            if chunk:
                docs.append(chunk)
        if len(docs) >= 1.5 * rows_needed:
            break
    if len(docs) < rows_needed:
        raise RuntimeError(f"only {len(docs)} documents in the repo's sources for {rows_needed} rows")
    return docs


def volume(work, models, data_files):
    """FINETUNE_VOLUME_ROOT: pvc://models/NAME and configmap://gpu-check/FILE."""
    vol = work / "vol"
    (vol / "pvc/models").mkdir(parents=True, exist_ok=True)
    (vol / "configmap/gpu-check").mkdir(parents=True, exist_ok=True)
    for name, path in models.items():
        link = vol / "pvc/models" / name
        if not link.exists():
            os.symlink(path, link)
    for name, path in data_files.items():
        link = vol / "configmap/gpu-check" / name
        if not link.exists():
            os.symlink(path, link)
    return vol


def job_yaml(name, model, data, fmt, hp, lora, extra_adapter="", gpus=1, sft=""):
    hp_text = ", ".join(f"{k}: {json.dumps(v)}" for k, v in hp.items())
    targets = ", ".join(TARGETS)
    return f"""apiVersion: finetune.dev/v1alpha1
kind: FinetuneJob
metadata: {{name: {name}}}
spec:
  baseModel: {{uri: pvc://models/{model}, format: safetensors}}
  dataset:
    train: {{uri: configmap://gpu-check/{data}}}
    format: {fmt}
  method: {{type: sft{sft}}}
  adapter: {{type: lora{extra_adapter}, lora: {{rank: {lora['rank']}, alpha: {lora['alpha']}, dropout: {lora['dropout']}, targetModules: [{targets}]{lora.get('more', '')}}}}}
  hyperparameters: {{{hp_text}}}
  forgettingGuard: {{disabled: true}}
  checkpoint: {{everySteps: 1000000}}
  resources: {{gpus: {gpus}}}
"""


def run_ours(env, vol, job_text, name, device, timeout, init_adapter=None, watch_gpu=True, launch=False):
    d = env.work / "runs" / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    job = d / "job.yaml"
    job.write_text(job_text)
    cmd = [env.bin, "--device", device]
    if launch:  # one rank through the launcher: a c10d group of one (NCCL on a GPU, Gloo on the CPU)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd += ["launch", "--nproc-per-node", "1", "--master-port", str(port), "--"]
    cmd += ["run", str(job), "--output", str(d / "out")]
    if init_adapter:
        cmd += ["--init-adapter", str(init_adapter)]
    e = dict(env.env, FINETUNE_VOLUME_ROOT=str(vol), FINETUNE_TERMINATION_LOG=str(d / "termination-log"))
    with GpuPeak(watch_gpu and device == "cuda") as gpu:
        rc, text, secs, rss = run_child(cmd, e, timeout, env.log, f"ours {name} ({device})")
    res = {"rc": rc, "process_seconds": round(secs, 1), "peak_rss_bytes": rss, "peak_gpu_bytes": gpu.peak_bytes,
           "job": str(job), "plan_env": {"FINETUNE_VOLUME_ROOT": str(vol)}}
    if init_adapter:
        res["plan_env"]["FINETUNE_INIT_ADAPTER_DIR"] = str(init_adapter)
    summary = d / "out" / "training_summary.json"
    res["group_ready"] = "rank 0 of 1: group ready" in text
    if rc != 0 or not summary.exists():
        res["error"] = tail(text)
        return res
    s = json.loads(summary.read_text())
    hist = s["history"]
    res.update({
        "dtype": s.get("dtype"), "device": s.get("device"), "steps": len(hist),
        "losses": [h["loss"] for h in hist], "tokens_per_step": [h["tokens"] for h in hist],
        "step_seconds": [round(h["seconds"], 4) for h in hist], "grad_norms": [h["grad_norm"] for h in hist],
        "load_seconds": s.get("timings", {}).get("load_seconds"),
        "metrics": s.get("metrics"),
    })
    rest = hist[1:]
    if rest:
        res["tokens_per_s"] = sum(h["tokens"] for h in rest) / sum(h["seconds"] for h in rest)
    return res


def plan(env, job, device, device_memory=None, extra_env=None):
    """`finetune-trainer plan` as JSON, or why there is none."""
    if not env.has_plan:
        return {"missing": "this trainer binary has no `plan` command (branch planner, not yet on main)"}
    cmd = [env.bin, "--device", device, "plan", str(job), "--json"]
    if device_memory:
        cmd += ["--device-memory", device_memory]
    rc, out = sh(cmd, env=dict(env.env, **(extra_env or {})), timeout=120)
    if rc != 0:
        return {"error": tail(out)}
    try:
        return json.loads(out[out.index("{"):])
    except ValueError:
        return {"error": tail(out)}


def run_reference(env, args_list, timeout, name):
    if env.reference is None:
        return {"skipped": "transformers/peft not importable (see machine.reference_packages)"}
    out = env.work / "runs" / f"{name}.json"
    cmd = [env.python, __file__, "--worker", "hf-train", "--result", str(out), *map(str, args_list)]
    with GpuPeak(env.device == "cuda") as gpu:
        rc, text, secs, rss = run_child(cmd, env.reference, timeout, env.log, f"reference {name}")
    if rc != 0 or not out.exists():
        return {"rc": rc, "error": tail(text)}
    res = json.loads(out.read_text())
    res.update({"rc": rc, "process_seconds": round(secs, 1), "peak_rss_bytes": rss, "peak_gpu_bytes": gpu.peak_bytes})
    return res


# ------------------------------------------------------------------------------------ parts


def part_a(env, budget, results):
    a = env.args
    steps = a.steps_a
    config = dict(TINY) if env.dry else json.loads((smollm2_dir(env) / "config.json").read_text())
    model = env.work / "models" / "smollm2-random"
    secs, how = write_model(env, config, model, "f32", smollm2_dir(env), budget.left() - 30)
    data = ROOT / "examples/data/chat-train.jsonl"
    vol = volume(env.work, {"smollm2-random": model}, {"chat-train.jsonl": data})
    init = env.work / "runs" / "a-init-adapter"
    rc, text, _, _ = run_child([env.python, __file__, "--worker", "init-adapter", "--model", str(model),
                                "--result", str(init)], env.reference or env.env, 120, env.log, "init adapter")
    init_note = "both runs start from one PEFT-initialised adapter (adapter.initAdapter)"
    extra = ", initAdapter: start"
    if rc != 0:  # without PEFT: each device draws its own LoRA A, a looser comparison
        init, extra = None, ""
        init_note = f"no shared initial adapter ({last_line(text)}): each device drew its own LoRA A"
    lora = {"rank": 16, "alpha": 32, "dropout": 0.0}
    hp = {"maxSteps": steps, "learningRate": 2.0e-4, "scheduler": "cosine", "warmupRatio": 0.05,
          "batchSize": 8, "gradientAccumulationSteps": 2, "maxSeqLength": 256, "seed": 42}
    gpu_prec = "bf16" if env.dry else "auto"  # auto is bf16 on CUDA; the dry run forces it on the CPU
    jobs = {
        "bf16": job_yaml("gpu-check-a-bf16", "smollm2-random", "chat-train.jsonl", "chat",
                         dict(hp, precision=gpu_prec), lora, extra, sft=", sft: {assistantOnlyLoss: true}"),
        "fp32": job_yaml("gpu-check-a-fp32", "smollm2-random", "chat-train.jsonl", "chat",
                         dict(hp, precision="fp32"), lora, extra, gpus=0,
                         sft=", sft: {assistantOnlyLoss: true}"),
    }
    timeout = budget.left() - 20
    # Both at once: the CPU run takes the cores, the GPU run one; only their losses are compared.
    box = {}
    th = threading.Thread(target=lambda: box.update(fp32=run_ours(env, vol, jobs["fp32"], "a-fp32", "cpu", timeout, init)))
    th.start()
    box["bf16"] = run_ours(env, vol, jobs["bf16"], "a-bf16", env.device, timeout, init)
    th.join()
    r = {"model": f"SmolLM2-135M shape, random weights ({how}, {secs:.0f} s)" if not env.dry else f"tiny config, random weights ({how})",
         "config": config, "steps": steps, "init": init_note, "bf16_run": box["bf16"], "fp32_run": box["fp32"],
         "tolerance": f"every step: |loss_bf16 - loss_fp32| <= {BF16_RTOL} x loss_fp32 (torch.testing's bfloat16 rtol)"}
    lb, lf = box["bf16"].get("losses"), box["fp32"].get("losses")
    if lb and lf and len(lb) == len(lf):
        rel = [abs(x - y) / abs(y) for x, y in zip(lb, lf)]
        r.update(max_rel_diff=max(rel), mean_rel_diff=sum(rel) / len(rel), within_tolerance=max(rel) <= BF16_RTOL,
                 rel_diff_per_step=rel)
        # Random weights give near-zero logits, so the loss sits near ln(vocab) whatever the
        # precision: the differences are also put against the fp32 curve's own drop, and the
        # gradient norms (more sensitive) compared step by step.
        drop = abs(lf[0] - lf[-1])
        r["max_abs_diff_over_fp32_drop"] = max(abs(x - y) for x, y in zip(lb, lf)) / drop if drop else None
        gb, gf = box["bf16"].get("grad_norms"), box["fp32"].get("grad_norms")
        if gb and gf:
            r["grad_norm_max_rel_diff"] = max(abs(x - y) / abs(y) for x, y in zip(gb, gf) if y)
    else:
        r["within_tolerance"] = None
    for k, dev in (("bf16", env.device), ("fp32", "cpu")):
        run = box[k]
        p = plan(env, run["job"], dev, extra_env=run.get("plan_env"))
        measured = run.get("peak_gpu_bytes") if dev == "cuda" else run.get("peak_rss_bytes")
        results["d"].append(plan_row(f"(a) {k} {dev}", p, measured, "nvidia-smi" if dev == "cuda" else "peak RSS"))
    results["a"] = r


def part_e(env, budget, results):
    """(e) The c10d binding on this device: part (a)'s bf16 job again through `launch` as a group of
    one rank (NCCL on a GPU); its losses must equal the plain run's."""
    a = results.get("a") or {}
    first = a.get("bf16_run") or {}
    if "job" not in first:
        results["e"] = {"skipped": "part (a) did not run"}
        return
    job = Path(first["job"])
    vol = Path(first["plan_env"]["FINETUNE_VOLUME_ROOT"])
    init = first["plan_env"].get("FINETUNE_INIT_ADAPTER_DIR")
    r = run_ours(env, vol, job.read_text(), "e-launch", env.device, budget.left() - 10,
                 Path(init) if init else None, launch=True)
    backend = "NCCL" if env.device == "cuda" else "Gloo"
    e = {"backend": backend, "run": r, "group_ready": r.get("group_ready")}
    la, lb = first.get("losses"), r.get("losses")
    if la and lb and len(la) == len(lb):
        e["max_abs_loss_diff_vs_plain"] = max(abs(x - y) for x, y in zip(la, lb))
    results["e"] = e


def plan_row(name, p, measured, how):
    row = {"run": name, "measured_bytes": measured, "measured_by": how}
    if "total" in p:
        row.update(predicted_bytes=p["total"], plan=p.get("plan"), largest_micro_batch=p.get("largest_micro_batch"))
        if measured:
            row["measured_over_predicted"] = measured / p["total"]
    else:
        row["plan"] = p
    return row


def bench_settings(env):
    a = env.args
    if env.dry:
        return {"config": dict(TINY), "seq": 256, "rows": 2, "steps": a.steps_b, "label": "tiny config"}
    return {"config": dict(LLAMA_8B), "seq": 2048, "rows": 8, "steps": a.steps_b, "label": "Llama-3.1-8B shape"}


def part_b(env, budget, results, quant=None, config=None, label=None, key="b"):
    """One LoRA (or, with `quant`, QLoRA) benchmark, ours then the reference."""
    s = bench_settings(env)
    config = config or s["config"]
    label = label or s["label"]
    seq, rows, steps = s["seq"], s["rows"], s["steps"]
    r = {"model": label, "parameters": parameters(config), "seq": seq, "rows_per_step": rows, "steps": steps,
         "lora": "r16 alpha 32 dropout 0.05 on q,k,v,o,gate,up,down", "packing": True,
         "mfu_formula": "tokens/s x 4 x parameters / 989e12"}
    results[key] = r
    name, model = bench_model(env, config)
    prefetch = env.prefetch.pop(name, None)
    if prefetch:  # started beside part (a)
        prefetch["thread"].join()
        if "error" in prefetch:
            raise prefetch["error"]
        r["init_seconds"], r["init_with"] = prefetch["result"]
        r["init_ran_beside_part_a"] = True
    elif not (model / "config.json").exists():
        need = parameters(config) * 2 * 1.1 / 2**30
        free = shutil.disk_usage(env.work).free / 2**30
        if free < need:
            r["skipped"] = f"the bf16 checkpoint needs {need:.0f} GiB, {env.work} has {free:.0f} GiB free"
            return r
        r["init_seconds"], r["init_with"] = write_model(env, config, model, "bf16", smollm2_dir(env),
                                                         budget.left() - 60)
    data = env.work / "text.jsonl"
    if not data.exists():
        docs = text_documents(seq, steps * rows)
        data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    vol = volume(env.work, {name: model}, {"text.jsonl": data})
    lora = {"rank": 16, "alpha": 32, "dropout": 0.05}
    if quant:
        lora["more"] = f", baseQuantization: {quant}"
    hp = {"maxSteps": steps, "learningRate": 1.0e-4, "batchSize": rows, "gradientAccumulationSteps": 1,
          "maxSeqLength": seq, "packing": True, "seed": 42, "warmupSteps": 0}
    if env.dry:
        hp["precision"] = "bf16"
    # The micro-batch: the planner's largest that fits this GPU (rows per optimizer step kept by
    # gradient accumulation); without a planner, all rows at once and the trainer's own OOM halving.
    mem = device_memory_mib(env)
    probe = env.work / "runs" / f"{key}-probe.yaml"
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text(job_yaml(f"gpu-check-{key}", name, "text.jsonl", "text", hp, lora))
    p = plan(env, probe, env.device, f"{mem}Mi" if mem else None, {"FINETUNE_VOLUME_ROOT": str(vol)})
    largest = p.get("largest_micro_batch")
    micro = rows
    if largest is not None:
        micro = max(m for m in (1, 2, 4, 8, 16) if m <= max(1, min(largest, rows)) and rows % m == 0)
    r["micro_batch"] = micro
    r["micro_batch_from"] = "planner" if largest is not None else (
        "planner: not even one row fits" if "total" in p and mem else "no plan: all rows, the trainer halves on OOM")
    hp.update(batchSize=micro, gradientAccumulationSteps=rows // micro)
    job = job_yaml(f"gpu-check-{key}", name, "text.jsonl", "text", hp, lora)
    ours = run_ours(env, vol, job, key, env.device, max(budget.left() - args_reserve(env, key), 30))
    r["ours"] = ours
    if quant and ours.get("rc") == 2 and "baseQuantization" in ours.get("error", ""):
        r["status"] = "not implemented: the trainer refuses adapter.lora.baseQuantization"
        return r
    if "tokens_per_s" in ours:
        ours["mfu"] = ours["tokens_per_s"] * 4 * r["parameters"] / PEAK_BF16_FLOPS
    used_micro = (ours.get("metrics") or {}).get("microBatchSize") or micro
    if ours.get("job"):
        pj = Path(ours["job"])
        if used_micro != micro:  # the trainer halved it: plan what ran
            pj = pj.with_name("job-as-run.yaml")
            pj.write_text(job.replace(f"batchSize: {micro}", f"batchSize: {used_micro}", 1))
        pr = plan(env, pj, env.device, f"{mem}Mi" if mem else None, ours["plan_env"])
        measured = ours.get("peak_gpu_bytes") if env.device == "cuda" else ours.get("peak_rss_bytes")
        results["d"].append(plan_row(f"({key}) ours {label}{' ' + quant if quant else ''}", pr, measured,
                                     "nvidia-smi" if env.device == "cuda" else "peak RSS"))
    if quant:
        r["reference"] = {"skipped": "QLoRA reference (bitsandbytes) not bundled"}
        return r
    if not budget.allows(90 if not env.dry else 20):
        r["reference"] = {"skipped": f"out of time ({budget.left():.0f} s left)"}
        return r
    ref = run_reference(env, ["--model", model, "--data", data, "--seq", seq, "--micro", micro,
                              "--accum", rows // micro, "--steps", steps, "--device", env.device],
                        max(budget.left() - 15, 20), key)
    if "tokens_per_s" in ref:
        ref["mfu"] = ref["tokens_per_s"] * 4 * r["parameters"] / PEAK_BF16_FLOPS
    r["reference"] = ref
    for run in (ours, ref):  # real tokens over row capacity: how full packing left the rows
        if run.get("tokens_per_step"):
            run["row_fill"] = sum(run["tokens_per_step"]) / (len(run["tokens_per_step"]) * rows * seq)
    if "tokens_per_s" in ours and "tokens_per_s" in ref:
        r["speedup"] = ours["tokens_per_s"] / ref["tokens_per_s"]
    return r


def bench_model(env, config):
    name = "bench-" + ("tiny" if env.dry else f"{parameters(config) / 1e9:.0f}b")
    return name, env.work / "models" / name


def start_prefetch(env, budget):
    """Writes (b)'s checkpoint in a thread while part (a) runs: init-random draws on one core and
    writes 16 GB, about a minute or two that (a)'s runs leave mostly idle."""
    config = bench_settings(env)["config"]
    name, model = bench_model(env, config)
    need = parameters(config) * 2 * 1.1 / 2**30
    if shutil.disk_usage(env.work).free / 2**30 < need:
        return  # part (b) records the reason
    box = {}

    def work():
        try:
            box["result"] = write_model(env, config, model, "bf16", smollm2_dir(env), budget.left() - 120)
        except Exception as e:  # re-raised in part (b)
            box["error"] = e

    box["thread"] = threading.Thread(target=work, daemon=True)
    box["thread"].start()
    env.prefetch[name] = box


def device_memory_mib(env):
    """What the planner plans against: the GPU's memory, or in the dry run the machine's RAM."""
    if not env.dry:
        return env.info.get("gpu", {}).get("memory_total_mib")
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return None


def args_reserve(env, key):
    """Seconds kept back for the reference after our run."""
    return 0 if key != "b" else (30 if env.dry else 150)


def part_c(env, budget, results):
    c = {}
    results["c"] = c
    s = bench_settings(env)
    if not budget.allows(40):
        c["qlora_8b"] = {"skipped": f"out of time ({budget.left():.0f} s left)"}
    else:
        results["c_8b"] = {}
        r = part_b(env, budget, results, quant="nf4", key="c_8b")
        c["qlora_8b"] = r
    results.pop("c_8b", None)
    # 70B: its bf16 checkpoint (141 GB) exceeds the machine's disk (64 GB), so a measured run needs
    # a trainer that writes (or draws) a 4-bit base itself; the planner answers from the config.
    big = dict(LLAMA_70B) if not env.dry else dict(TINY, num_hidden_layers=4)
    r = {"model": "Llama-3.1-70B shape" if not env.dry else "tiny config (4 layers)", "parameters": parameters(big)}
    c["qlora_70b"] = r
    d = env.work / "models" / "config-70b"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(big, indent=2))
    for f in (smollm2_dir(env)).iterdir():
        if f.name != "config.json":
            shutil.copy(f, d / f.name)
    vol = volume(env.work, {"config-70b": d}, {})
    lora = {"rank": 16, "alpha": 32, "dropout": 0.05, "more": ", baseQuantization: nf4"}
    hp = {"maxSteps": s["steps"], "learningRate": 1.0e-4, "batchSize": 1, "maxSeqLength": s["seq"], "packing": True,
          "seed": 42, "gradientCheckpointing": True}
    job = env.work / "runs" / "c-70b.yaml"
    job.write_text(job_yaml("gpu-check-70b", "config-70b", "text.jsonl", "text", hp, lora))
    mem = device_memory_mib(env)
    p = plan(env, job, env.device, f"{mem}Mi" if mem else None, {"FINETUNE_VOLUME_ROOT": str(vol)})
    r["plan"] = p
    if "error" in p and "baseQuantization" in p["error"]:
        r["predicted"] = "the planner refuses adapter.lora.baseQuantization (QLoRA not implemented)"
    elif "total" in p:
        r["predicted_fits"] = p.get("largest_micro_batch") is not None if mem else None
    qlora_8b = c.get("qlora_8b", {})
    if "not implemented" in str(qlora_8b.get("status", "")):
        r["measured"] = "not run: QLoRA not implemented in the trainer"
    else:
        r["measured"] = ("not run: a 70B base must be written on disk first (141 GB in bf16; the GPU machine has "
                         f"{env.info.get('work_disk_free_gib')} GiB free) and init-random writes bf16/f32 only")


# ------------------------------------------------------------------------------------ workers


def worker_init_model(a):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**json.loads(Path(a.config).read_text()))
    model = LlamaForCausalLM(cfg).to(torch.bfloat16 if a.dtype == "bf16" else torch.float32)
    model.save_pretrained(a.model, safe_serialization=True)


def worker_init_adapter(a):
    """PEFT's own initialisation (A kaiming-uniform from torch's CPU generator, B zeros), saved once
    so the bf16 and fp32 runs of (a) start from the same adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(AutoConfig.from_pretrained(a.model))
    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                            task_type="CAUSAL_LM"))
    peft.save_pretrained(a.result)


def worker_hf_train(a):
    """transformers+PEFT on the same weights, rows and micro-batch: a plain loop (what a PEFT user
    writes, without Trainer's bookkeeping), bf16 weights, sdpa, AdamW, packed rows with per-document
    position ids (transformers then masks across documents, as our trainer does)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = a.device
    dtype = torch.bfloat16
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation="sdpa", device_map=dev)
    load_s = time.perf_counter() - t0
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    model.train()
    tok = AutoTokenizer.from_pretrained(a.model)
    eos = tok.eos_token_id
    docs = []
    for line in Path(a.data).read_text().splitlines():
        ids = tok(json.loads(line)["text"])["input_ids"]
        if eos is not None and ids[-1:] != [eos]:
            ids.append(eos)
        docs.append(ids[:a.seq])
    # First-fit packing in a seeded order, as the trainer does (data/batch.rs).
    order = list(range(len(docs)))
    random.Random(42).shuffle(order)
    rows = []
    for i in order:
        for row in rows:
            if sum(map(len, row)) + len(docs[i]) <= a.seq:
                row.append(docs[i])
                break
        else:
            rows.append([docs[i]])
    random.Random(43).shuffle(rows)

    def micro_batch(chunk):
        t = max(sum(map(len, r)) for r in chunk)
        ids, pos, labels = [], [], []
        for r in chunk:
            i_, p_, l_ = [], [], []
            for d in r:
                i_ += d
                p_ += list(range(len(d)))
                l_ += [-100] + d[1:]
            pad = t - len(i_)
            ids.append(i_ + [0] * pad)
            pos.append(p_ + [0] * pad)
            labels.append(l_ + [-100] * pad)
        return [torch.tensor(x, device=dev) for x in (ids, pos, labels)]

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    per_step = a.micro * a.accum
    if len(rows) < per_step * a.steps:
        raise SystemExit(f"only {len(rows)} packed rows for {a.steps} steps of {per_step}")
    cuda = dev == "cuda"
    micro, oom_halvings = a.micro, 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    hist = []
    for step in range(a.steps):
        step_rows = rows[step * per_step:(step + 1) * per_step]
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        n_targets = sum(sum(len(d) - 1 for d in r) for r in step_rows)
        while True:
            try:
                total = 0.0
                for m in range(0, per_step, micro):
                    ids, pos, labels = micro_batch(step_rows[m:m + micro])
                    logits = model(input_ids=ids, position_ids=pos).logits
                    loss = torch.nn.functional.cross_entropy(
                        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
                        reduction="sum") / n_targets
                    loss.backward()
                    total += loss.item()
                    del logits, loss
                break
            except torch.OutOfMemoryError:
                # As our trainer does: drop the step's partial gradients, halve the micro-batch, redo.
                if micro == 1:
                    raise
                opt.zero_grad(set_to_none=True)
                logits = loss = None
                micro //= 2
                oom_halvings += 1
                if cuda:
                    torch.cuda.empty_cache()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        hist.append({"loss": total, "seconds": time.perf_counter() - t,
                     "tokens": sum(sum(map(len, r)) for r in step_rows)})
    rest = hist[1:]
    res = {"impl": "transformers+PEFT", "load_seconds": load_s, "steps": len(hist), "micro_batch": micro,
           "micro_batch_asked": a.micro, "oom_halvings": oom_halvings, "losses": [h["loss"] for h in hist], "step_seconds": [h["seconds"] for h in hist],
           "tokens_per_step": [h["tokens"] for h in hist],
           "tokens_per_s": sum(h["tokens"] for h in rest) / sum(h["seconds"] for h in rest) if rest else None}
    if cuda:
        res["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
        res["max_memory_reserved_bytes"] = torch.cuda.max_memory_reserved()
    Path(a.result).write_text(json.dumps(res))


# ------------------------------------------------------------------------------------ report


def table(results):
    lines = []
    m = results["machine"]
    lines.append(f"machine: {m.get('nvidia_smi_L')} | CPU {m.get('lscpu', {}).get('Model name', '?')} x "
                 f"{m.get('cpu_count')} | torch {m['torch']['torch']} (CUDA {m['torch']['cuda']})"
                 f"{' | DRY RUN (CPU, tiny model)' if m['dry_run'] else ''}")
    a = results.get("a")
    if isinstance(a, dict) and "bf16_run" in a:
        lines.append(f"\n(a) {a['model']}: {a['steps']} steps, bf16 vs fp32 (CPU)")
        lb, lf = a["bf16_run"].get("losses"), a["fp32_run"].get("losses")
        if lb and lf:
            lines.append("  step  loss bf16   loss fp32   rel diff")
            for i, (x, y) in enumerate(zip(lb, lf)):
                lines.append(f"  {i + 1:>4}  {x:>9.5f}   {y:>9.5f}   {abs(x - y) / abs(y):.2e}")
            lines.append(f"  max rel diff {a['max_rel_diff']:.2e} (tolerance {BF16_RTOL}): "
                         f"{'WITHIN' if a['within_tolerance'] else 'OUTSIDE'}; max |diff| / fp32 loss drop "
                         f"{a.get('max_abs_diff_over_fp32_drop') or float('nan'):.3f}; grad-norm max rel diff "
                         f"{a.get('grad_norm_max_rel_diff') or float('nan'):.2e}")
        else:
            lines.append(f"  failed: bf16 {a['bf16_run'].get('error', 'ok')} | fp32 {a['fp32_run'].get('error', 'ok')}")
    elif a:
        lines.append(f"\n(a) {a}")
    for key, title in (("b", "(b) LoRA"), ):
        b = results.get(key)
        if b is None:
            continue
        if "ours" not in b:
            lines.append(f"\n{title}: {last_line(b.get('skipped') or b.get('error') or b)}")
            continue
        lines.append(f"\n{title} {b['model']} ({b['parameters'] / 1e9:.2f} B params), seq {b['seq']}, packing, "
                     f"{b['rows_per_step']} rows/step, micro-batch {b['micro_batch']} ({b['micro_batch_from']})")
        lines.append(f"  {'impl':<22} {'tokens/s':>10} {'MFU':>7} {'peak GPU (smi)':>15} {'peak alloc':>11} "
                     f"{'peak RSS':>9} {'load s':>7}")
        for label, r in (("ours (finetune-trainer)", b["ours"]), ("transformers+PEFT", b.get("reference", {}))):
            if "tokens_per_s" not in r or r.get("tokens_per_s") is None:
                lines.append(f"  {label:<22} {last_line(r.get('skipped') or r.get('error') or r.get('status') or 'no result')}")
                continue
            lines.append(f"  {label:<22} {r['tokens_per_s']:>10.0f} {100 * r['mfu']:>6.1f}% "
                         f"{gib_text(r.get('peak_gpu_bytes')):>15} "
                         f"{gib_text(r.get('max_memory_allocated_bytes')):>11} "
                         f"{gib_text(r.get('peak_rss_bytes')):>9} {r.get('load_seconds') or 0:>7.1f}")
        if "speedup" in b:
            lines.append(f"  ours / reference: {b['speedup']:.2f}x tokens/s (target >= 1.5x); ours MFU "
                         f"{100 * b['ours']['mfu']:.1f}% (target >= 45 % on H200)")
    c = results.get("c", {})
    if c:
        q8 = c.get("qlora_8b", {})
        lines.append(f"\n(c) QLoRA 8B: {q8.get('status') or q8.get('skipped') or ('%.0f tokens/s' % q8['ours']['tokens_per_s'] if 'tokens_per_s' in q8.get('ours', {}) else q8.get('ours', {}).get('error'))}")
        q70 = c.get("qlora_70b", {})
        lines.append(f"    QLoRA 70B: planner: {q70.get('predicted') or q70.get('predicted_fits') or q70.get('plan')}; "
                     f"measured: {q70.get('measured')}")
    e = results.get("e")
    if e:
        if "run" in e:
            diff = e.get("max_abs_loss_diff_vs_plain")
            lines.append(f"\n(e) c10d {e['backend']}, a group of one rank through `launch`: rc {e['run'].get('rc')}, "
                         f"group ready {e.get('group_ready')}, losses vs the plain run: max |diff| "
                         f"{'%.2e' % diff if diff is not None else 'n/a'}")
        else:
            lines.append(f"\n(e) {e}")
    if results.get("d"):
        lines.append("\n(d) planner prediction vs measured peak")
        for row in results["d"]:
            if "predicted_bytes" in row:
                ratio = row.get("measured_over_predicted")
                lines.append(f"  {row['run']:<40} predicted {gib(row['predicted_bytes'])} GiB, measured "
                             f"{gib(row['measured_bytes'])} GiB ({row['measured_by']})"
                             + (f", measured/predicted {ratio:.2f}" if ratio else ""))
            else:
                lines.append(f"  {row['run']:<40} {next(iter(row['plan'].values()))}")
    for k, v in results.get("skipped", {}).items():
        lines.append(f"\nskipped {k}: {v}")
    lines.append(f"\ntotal {results['seconds']:.0f} s")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU and a tiny model: the plumbing, not the numbers")
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S", 560)))
    ap.add_argument("--steps-a", type=int, default=None)
    ap.add_argument("--steps-b", type=int, default=None)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    ap.add_argument("--worker", choices=["init-model", "init-adapter", "hf-train"], help=argparse.SUPPRESS)
    for flag in ("--config", "--model", "--dtype", "--result", "--data", "--device"):
        ap.add_argument(flag, help=argparse.SUPPRESS)
    for flag in ("--seq", "--micro", "--accum", "--steps"):
        ap.add_argument(flag, type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        {"init-model": worker_init_model, "init-adapter": worker_init_adapter, "hf-train": worker_hf_train}[a.worker](a)
        return
    a.steps_a = a.steps_a or (2 if a.dry_run else 10)
    a.steps_b = a.steps_b or (3 if a.dry_run else 6)
    start = time.monotonic()
    budget = Budget(a.budget_s)
    out_dir = Path(os.environ.get("OUT") or os.environ.get("GPU_CHECK_OUT") or
                   Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "bench" / "gpu-check")
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    log = Log(out_dir / "gpu-check.log")
    env = Env(a, work, log)
    results = {"machine": env.info, "d": [], "skipped": {}}
    try:
        env.machine()
        env.trainer()
        env.packages()
        print(f"gpu-check: {env.info.get('nvidia_smi_L')}; trainer {env.info['trainer']}; reference "
              f"{env.info['reference_packages'].get('versions')}; {budget.left():.0f} s budget left", flush=True)
        if env.has_init_random or env.reference is not None:
            start_prefetch(env, budget)
        # Estimates (H200, 16 cores) of what each part needs before it is worth starting.
        for key, need, fn in (("a", 20 if a.dry_run else 100, part_a), ("e", 10 if a.dry_run else 40, part_e),
                              ("b", 30 if a.dry_run else 240, part_b), ("c", 10, part_c)):
            if not budget.allows(need):
                results["skipped"][key] = f"{budget.left():.0f} s left, part needs ~{need} s"
                continue
            t = time.monotonic()
            print(f"gpu-check: part ({key}) ...", flush=True)
            try:
                fn(env, budget, results)
            except Exception as e:  # a broken part is recorded; the next one still runs
                results[key] = {"error": f"{type(e).__name__}: {e}"}
            results.setdefault("part_seconds", {})[key] = round(time.monotonic() - t, 1)
    finally:
        results["seconds"] = time.monotonic() - start
        (out_dir / "gpu-check.json").write_text(json.dumps(results, indent=2, default=str))
        text = table(results) if "torch" in env.info else json.dumps(results, indent=2, default=str)
        (out_dir / "gpu-check.txt").write_text(text + "\n")
        print(text)
        print(f"gpu-check: JSON {out_dir / 'gpu-check.json'}, table {out_dir / 'gpu-check.txt'}, "
              f"logs {out_dir / 'gpu-check.log'}")
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
