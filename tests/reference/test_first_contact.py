"""First contact: every `make` command the README's quick start gives reaches, on a machine with
nothing cached, every build step that what it runs depends on, before it runs it.

CI keeps its machine's caches, so a target that only works because an earlier run built something
(as `make demo` once did: it ran the control plane without building it) passes CI and fails a new
user. This test sees that without building anything: `make -n TARGET` with CACHE pointing at an
empty directory prints every recipe the target would run, in order.
"""

import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# What each step needs built first, and the recipe line that builds it. Keep in step with the
# scripts: e.g. tests/cluster/up.sh dies with "missing: run tests/cluster/build.sh first".
VENV = "scripts/setup-venv.sh"
BINARIES = "cargo build --release --workspace --bins"
CLUSTER = "tests/cluster/build.sh"
IMAGES = "scripts/images.sh"
NEEDS = {
    # The control plane and its real node, the operator/trainer binaries and their images, and
    # the SmolLM2 GGUF in the venv.
    "scripts/demo.sh": [CLUSTER, BINARIES, VENV, IMAGES],
    # podman, mmdebstrap, containerd ... from Debian, and the binaries the images carry.
    IMAGES: ["scripts/ensure-node-tools.sh", BINARIES],
    "tests/cluster/up.sh": [CLUSTER],
    "tests/cluster/smoke.sh": [CLUSTER],
    "--test control_plane": [CLUSTER, BINARIES, VENV],
    "tests/helm/run.sh": [CLUSTER, BINARIES, IMAGES],
    "-m pytest -q tests/node": [CLUSTER, BINARIES, VENV, IMAGES],
    "tests/cluster/node.sh": [CLUSTER, IMAGES],
    # Parity tests: the release trainer and the reference libraries.
    "-m pytest -q tests/reference": [BINARIES, VENV],
    # tch links the libtorch inside the venv's torch wheel.
    "cargo fmt": [],
    "cargo clippy": [VENV],
    "cargo test --workspace": [VENV],
    BINARIES: [VENV],
}


def readme_targets():
    """The `make` targets in the README's quick-start code block."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```(?:sh|bash|shell)?\n(.*?)```", text, re.S)
    assert block, "README.md has no code block"
    return re.findall(r"^make ([\w-]+)", block.group(1), re.M)


def dry_run(target, cache):
    env = {k: v for k, v in os.environ.items()}
    for var in ("FINETUNE_CACHE", "CARGO_TARGET_DIR", "FINETUNE_CLUSTER_DIR", "MAKEFLAGS"):
        env.pop(var, None)
    proc = subprocess.run(
        ["make", "-n", target, f"CACHE={cache}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def missing_prerequisites(out):
    """(step, prerequisite) pairs where the dry run `out` runs the step before, or without,
    building the prerequisite."""
    missing = []
    for step, needs in NEEDS.items():
        at = out.find(step)
        if at < 0:
            continue
        missing += [(step, need) for need in needs if not 0 <= out.find(need) < at]
    return missing


def test_the_readme_gives_demo_and_test():
    assert readme_targets()[:2] == ["demo", "test"]


@pytest.mark.parametrize("target", readme_targets())
def test_each_readme_target_builds_what_it_runs_from_an_empty_cache(target):
    with tempfile.TemporaryDirectory() as cache:
        out = dry_run(target, cache)
        # Everything the target builds or runs lives in the empty cache, none in the caller's.
        home_cache = os.path.expanduser("~/.cache/finetune-operator")
        assert home_cache not in out, f"make -n {target} still names {home_cache}:\n{out}"
    assert any(step in out for step in NEEDS), f"make -n {target} runs no step this test knows:\n{out}"
    missing = missing_prerequisites(out)
    assert not missing, f"`make {target}` on an empty cache runs (step, without building first): {missing}\n{out}"


def test_the_check_catches_a_demo_that_skips_the_cluster_build(tmp_path):
    """The bug this guards against, recreated in a copy of the Makefile."""
    makefile = (ROOT / "Makefile").read_text()
    broken = makefile.replace("demo: cluster-build build", "demo: build")
    assert broken != makefile, "the demo rule changed: update this test"
    (tmp_path / "Makefile").write_text(broken)
    proc = subprocess.run(
        ["make", "-n", "-f", str(tmp_path / "Makefile"), "demo", f"CACHE={tmp_path}/cache"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert missing_prerequisites(proc.stdout) == [("scripts/demo.sh", CLUSTER)]
