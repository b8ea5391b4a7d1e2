# The one entry point: setup, demo, test, crds. Heavy one-time builds live in $(CACHE) and are
# reused when present, so a clean clone on a machine that built them once is fast.

CACHE ?= $(or $(FINETUNE_CACHE),$(HOME)/.cache/finetune-operator)
# The scripts (venv, cluster, demo) read the cache from FINETUNE_CACHE: one cache for all.
export FINETUNE_CACHE := $(CACHE)
VENV := $(CACHE)/venv
export CARGO_TARGET_DIR ?= $(CACHE)/target
# tch builds against the libtorch inside the venv's torch wheel.
export LIBTORCH_USE_PYTORCH := 1
export PATH := $(VENV)/bin:$(PATH)
TRAINER := $(CARGO_TARGET_DIR)/release/finetune-trainer
OPERATOR := $(CARGO_TARGET_DIR)/release/finetune-operator

.PHONY: prune-target setup build images crds demo test test-rust test-node s3-server test-reference test-hub test-hostile test-fuzz fuzz test-cluster test-helm lint bench-forward bench-trainer bench-checkpointing bench-distributed bench-forgetting bench-dpo bench-node cluster-build cluster-up cluster-down bench-operator clean-cache help

help:
	@echo "make setup          create the cached Python venv (torch 2.11.0 for tch 0.24, reference libraries, SmolLM2 GGUF)"
	@echo "make demo           the main job (see README)"
	@echo "make images         the trainer and operator images (podman, Debian base from mmdebstrap; sizes printed)"
	@echo "make test           every test: formatting, clippy, Rust tests, parity tests, control-plane and e2e tests"
	@echo "make test-hub       hf:// base models through a local Hub mirror (olah behind a token-checking nginx)"
	@echo "make test-hostile   the malformed-input suite: broken model files, tokenizers, templates, data, manifests"
	@echo "make fuzz           coverage-guided fuzzing of every parser, FUZZ_SECONDS (300) per target (make test runs 10 s each)"
	@echo "make test-node      the operator's pods under a real kubelet with containerd and runc, from the images"
	@echo "make test-helm      the Helm chart, alerts and dashboards, installed and scraped on a local control plane"
	@echo "make crds           regenerate crds/*.yaml from the Rust types"
	@echo "make cluster-up     start the local control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok GPU nodes, the real node)"
	@echo "make cluster-down   stop it"
	@echo "make bench-node     image sizes and cold start (pod created -> first step) on the real node vs the executor (JSON)"
	@echo "make bench-forward  forward-pass tokens/s: ours vs transformers (JSON in \$$CARGO_TARGET_DIR/bench)"
	@echo "make bench-forgetting narrow-task LoRA SFT with each forgetting guard: task score, retention, wall time, memory (JSON); FORGETTING_ARGS=\"--guards off,default --repeat 3\" for the median of 3 timed rounds"
	@echo "make bench-dpo      DPO steps/s and peak RSS: ours vs TRL DPOTrainer + PEFT on the same pairs (JSON)"
	@echo "make bench-trainer  LoRA chat-SFT tokens/s and peak RSS: ours vs transformers+PEFT fp32/bf16 (JSON in \$$CARGO_TARGET_DIR/bench)"
	@echo "make bench-checkpointing  activation checkpointing at sequence 1024: step time and activation memory, ours and transformers+PEFT"
	@echo "make bench-distributed  data parallel on this machine: tokens/s with 1 and 2 ranks (ours via launch, and DDP+PEFT), scaling, all-reduce bytes per step"
	@echo "make bench-operator 1000 FinetuneJobs against 50 kwok GPU nodes: latency, RSS, CPU; then 1000 run to the end with 10% failing or evicted: drain time, retries (JSON in \$$CARGO_TARGET_DIR/bench)"
	@echo "make gpu-bundle     pack the release trainer and the reference's wheels into .gpu-bundle/ for a GPU machine (sizes checked)"
	@echo "make gpu-check      on a GPU machine: bf16 vs fp32 loss, 8B LoRA tokens/s, MFU and memory vs transformers+PEFT, QLoRA, planner vs peak (JSON; tests/gpu/README.md)"

setup:
	@scripts/setup-venv.sh >/dev/null

build: setup
	cargo build --release --workspace --bins

crds:
	cargo run -q -p finetune-crds --bin crdgen
	cp crds/finetune.dev_*.yaml charts/finetune-operator/files/crds/

# The trainer and operator images from their Dockerfiles, on a Debian base made by mmdebstrap
# (no registry is reached); podman, mmdebstrap, containerd ... come from Debian when missing.
images: build
	@scripts/ensure-node-tools.sh
	@scripts/images.sh

# The demo runs on the local control plane and its real node (kubelet, containerd, the images),
# so those are built (once) first.
demo: cluster-build build images
	@scripts/demo.sh

# Superseded test binaries from other checkouts (CI clones a fresh one per run).
prune-target:
	@scripts/prune-target.sh

lint: setup
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

# The s3:// tests run the trainer against versitygw, built once into the cache.
test-rust: setup s3-server
	cargo test --workspace

s3-server:
	@tests/cluster/build.sh versitygw

# test_report.py renders report.html in headless Chromium: installed here when missing.
test-reference: build
	scripts/ensure-chromium.sh
	FINETUNE_TRAINER_BIN=$(TRAINER) python -m pytest -q tests/reference

# hf:// base models against olah (a Hub mirror from PyPI, in its own cached venv) serving SmolLM2
# through the Hub's API behind nginx checking a bearer token: download, cache reuse, refusals,
# a corrupted byte on the server. nginx comes from Debian when missing.
test-hub: build
	scripts/ensure-nginx.sh
	FINETUNE_TRAINER_BIN=$(TRAINER) python -m pytest -q tests/hub

# Broken and hostile inputs to the real binary: each must exit 2 within 5 s and 1 GiB peak RSS.
test-hostile: build
	FINETUNE_TRAINER_BIN=$(TRAINER) python -m pytest -q tests/hostile

# libFuzzer (cargo-fuzz, nightly) on the GGUF, safetensors, tokenizer, chat-template, dataset and
# manifest parsers; a crash, a run over 5 s or over 1 GiB fails. The corpus grows in $(CACHE)/fuzz.
test-fuzz: setup
	scripts/fuzz.sh 10

fuzz: setup
	scripts/fuzz.sh $(or $(FUZZ_SECONDS),300)

# On a real kube-apiserver with kwok GPU nodes: the CRDs and examples (CEL rules, printer
# columns, GC, GPU scheduling), then the operator's control-plane tests, ending with the real
# trainer run by the test-only executor node under the real operator.
# FINETUNE_CLUSTER_DIR lets several checkouts run their own clusters side by side.
export FINETUNE_CLUSTER_DIR ?= $(CACHE)/cluster/run
KUBECONFIG_TEST := $(FINETUNE_CLUSTER_DIR)/kubeconfig
test-cluster: cluster-build build
	@scripts/ensure-nginx.sh
	@tests/cluster/down.sh >/dev/null 2>&1 || true
	@tests/cluster/up.sh && { \
	  tests/cluster/kueue.sh && tests/cluster/smoke.sh && \
	  KUBECONFIG=$(KUBECONFIG_TEST) FINETUNE_TRAINER_BIN=$(TRAINER) \
	  FINETUNE_EXECUTOR_BIN=$(CARGO_TARGET_DIR)/release/finetune-executor \
	  FINETUNE_SMOLLM2_GGUF=$$(scripts/smollm2-path.sh) \
	  cargo test -p finetune-operator --test control_plane -- --ignored; \
	  status=$$?; tests/cluster/down.sh; exit $$status; }

test: prune-target lint test-rust test-reference test-hub test-hostile test-fuzz test-cluster test-node test-helm

# On a real node: the control plane (no kwok nodes) and a kubelet with containerd and runc running
# the operator's pods from the trainer image (tests/cluster/node.sh): non-root, read-only root,
# termination message, probes, SIGTERM and resume, OOMKilled. Its own cluster directory; the
# kubelet's device-plugin directory is the machine's, so one real node runs at a time.
NODE_CLUSTER_DIR := $(CACHE)/cluster/run-node
test-node: cluster-build build images
	@FINETUNE_CLUSTER_DIR=$(NODE_CLUSTER_DIR) tests/cluster/down.sh >/dev/null 2>&1 || true
	@export FINETUNE_CLUSTER_DIR=$(NODE_CLUSTER_DIR); \
	FINETUNE_CLUSTER_NODES=0 tests/cluster/up.sh && REAL_NODE_GPUS=2 tests/cluster/node.sh && { \
	  KUBECONFIG=$(NODE_CLUSTER_DIR)/kubeconfig FINETUNE_OPERATOR_BIN=$(OPERATOR) \
	  python -m pytest -q tests/node; \
	  status=$$?; tests/cluster/down.sh; exit $$status; }

# The Helm chart: lint/template/schema checks, promtool rule tests, hadolint; then on its own
# control plane (cluster/run-helm) install/upgrade/uninstall with the operator running as a
# container from its image on the real node, and a real Prometheus checking every dashboard
# panel's query after an e2e run.
test-helm: cluster-build build images
	@FINETUNE_CLUSTER_DIR=$(CACHE)/cluster/run-helm tests/helm/run.sh

cluster-build:
	@tests/cluster/build.sh

# The control plane with FINETUNE_CLUSTER_NODES (2) kwok GPU nodes and, unless FINETUNE_REAL_NODE=0,
# the real node (kubelet, containerd, runc, the images of `make images`) beside them.
FINETUNE_REAL_NODE ?= 1
cluster-up: cluster-build $(if $(filter 1,$(FINETUNE_REAL_NODE)),images)
	@tests/cluster/up.sh
	@if [ "$(FINETUNE_REAL_NODE)" = 1 ]; then tests/cluster/node.sh; fi

cluster-down:
	@tests/cluster/down.sh

# Image sizes and cold start (pod created -> first training step) on the real node against the
# executor stand-in, in one run (JSON in $(CARGO_TARGET_DIR)/bench/node.json).
bench-node: cluster-build build images
	@FINETUNE_CLUSTER_DIR=$(NODE_CLUSTER_DIR) tests/cluster/down.sh >/dev/null 2>&1 || true
	@export FINETUNE_CLUSTER_DIR=$(NODE_CLUSTER_DIR); \
	FINETUNE_CLUSTER_NODES=0 tests/cluster/up.sh && tests/cluster/node.sh && { \
	  KUBECONFIG=$(NODE_CLUSTER_DIR)/kubeconfig FINETUNE_OPERATOR_BIN=$(OPERATOR) FINETUNE_TRAINER_BIN=$(TRAINER) \
	  FINETUNE_EXECUTOR_BIN=$(CARGO_TARGET_DIR)/release/finetune-executor \
	  python tests/node/bench_cold_start.py --out $(CARGO_TARGET_DIR)/bench/node.json; \
	  status=$$?; tests/cluster/down.sh; exit $$status; }

bench-forward: build
	FINETUNE_TRAINER_BIN=$(TRAINER) python tests/reference/bench_forward.py --out $(CARGO_TARGET_DIR)/bench/forward.json

bench-forgetting: build
	FINETUNE_TRAINER_BIN=$(TRAINER) python tests/reference/bench_forgetting.py --out $(CARGO_TARGET_DIR)/bench/forgetting.json $(FORGETTING_ARGS)

bench-dpo: build
	FINETUNE_TRAINER_BIN=$(TRAINER) python tests/reference/bench_dpo.py --out $(CARGO_TARGET_DIR)/bench/dpo.json

bench-trainer: build
	FINETUNE_TRAINER_BIN=$(TRAINER) python tests/reference/bench_trainer.py --out $(CARGO_TARGET_DIR)/bench/trainer.json

bench-checkpointing: build
	FINETUNE_TRAINER_BIN=$(TRAINER) python tests/reference/bench_checkpointing.py --out $(CARGO_TARGET_DIR)/bench/checkpointing.json

bench-distributed: build
	FINETUNE_TRAINER_BIN=$(TRAINER) python tests/reference/bench_distributed.py --out $(CARGO_TARGET_DIR)/bench/distributed.json

# 1000 FinetuneJobs against 50 kwok nodes x 8 GPUs on the real control plane, twice, each on a fresh
# cluster: creates paced at BENCH_RATE jobs/s (the operator's own latency), then a burst (the
# backlog a 2-core apiserver builds). JSON in $(CARGO_TARGET_DIR)/bench/operator-{paced,burst}.json.
BENCH_RATE ?= 20
bench-operator: cluster-build build
	@mkdir -p $(CARGO_TARGET_DIR)/bench
	@FINETUNE_CACHE=$(CACHE) FINETUNE_OPERATOR_BIN=$(OPERATOR) tests/cluster/bench.sh operator_scale $(CARGO_TARGET_DIR)/bench/operator-paced.json $(BENCH_RATE)
	@FINETUNE_CACHE=$(CACHE) FINETUNE_OPERATOR_BIN=$(OPERATOR) tests/cluster/bench.sh operator_scale $(CARGO_TARGET_DIR)/bench/operator-burst.json 0
	@# Churn: every job runs to the end while 10% of first attempts fail or are evicted.
	@FINETUNE_CACHE=$(CACHE) FINETUNE_OPERATOR_BIN=$(OPERATOR) tests/cluster/bench.sh operator_churn $(CARGO_TARGET_DIR)/bench/operator-churn.json $(BENCH_RATE)

# The GPU benchmark runs where there is no cargo and no network: gpu-bundle packs, here, the
# release binary as built (run `make build` first if it is stale) and the wheels the reference
# needs; gpu-check runs there with the machine's python3 and torch (tests/gpu/README.md).
# GPU_CHECK_ARGS=--dry-run runs the same plumbing here on the CPU with a tiny model.
.PHONY: gpu-bundle gpu-check
gpu-bundle:
	@tests/gpu/bundle.sh

gpu-check:
	python3 tests/gpu/gpu_check.py $(GPU_CHECK_ARGS)

clean-cache:
	rm -rf $(CACHE)
