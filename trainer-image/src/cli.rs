//! Command-line interface. `generate`, `eval`, `merge`, `export-gguf`, `verify-adapter` and
//! `report` are the user-facing commands; `logits`, `tokenize`, `render-chat`, `nf4` and `bench-forward` are
//! developer commands used by the parity tests in `tests/reference/` and by `make bench-forward`.

use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};
use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::eval::{DataFormat, evaluate, load_examples};
use crate::generate::{Sampling, generate};
use crate::load::{LoadedModel, ModelSource, pick_device};

#[derive(Debug, Parser)]
#[command(
    name = "finetune-trainer",
    version,
    about = "Llama-family causal LM trainer (tch/libtorch)"
)]
pub struct Cli {
    /// Where to run: `auto` (CUDA in bfloat16 if present, else CPU in float32), `cpu` or `cuda`.
    #[arg(long, global = true, default_value = "auto")]
    pub device: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a FinetuneJob manifest to completion (SFT, LoRA or full), resuming from its newest
    /// checkpoint; exit codes follow the operator contract (0, 2, 3, 4, 143).
    Run(RunArgs),
    /// Start one `finetune-trainer` process per rank on this machine (as torchrun does), e.g.
    /// `launch --nproc-per-node 8 -- run job.yaml`: each gets WORLD_SIZE, RANK, LOCAL_RANK,
    /// MASTER_ADDR, MASTER_PORT, its own GPU and a share of the threads; the first rank to fail
    /// stops the others and its exit code is the launcher's.
    Launch(LaunchArgs),
    /// Generate a completion for a prompt (greedy unless --temperature is given; stops at EOS).
    Generate(GenerateArgs),
    /// Retention of a LoRA adapter on a part of the built-in general question set its run never
    /// saw (default: the held-out audit part): of the questions the base (adapter off) answers
    /// correctly, the share the adapter still answers correctly, with its 95 % interval, per
    /// category, and the lost answers; prints JSON.
    Audit(AuditArgs),
    /// Mean token loss, perplexity and token count of a model on a JSONL data set, as one JSON object.
    Eval(EvalArgs),
    /// Fold a PEFT LoRA adapter into its base model and write a Hugging Face layout model
    /// (config.json, float32 model.safetensors, tokenizer files with the chat template,
    /// generation_config.json). The base may be an HF directory or a GGUF file.
    Merge(MergeArgs),
    /// Check a PEFT LoRA adapter directory: its files (and their sha256 against --expect), its
    /// settings, and that it fits the base model (from its config, no weights loaded). Prints the
    /// report as JSON and writes it to the termination log; exits 0 when verified, 2 when not.
    VerifyAdapter(VerifyAdapterArgs),
    /// Write a model (HF directory, e.g. a merged one, or GGUF) as a GGUF v3 file for llama.cpp:
    /// 2-D weights as q8_0, f16 or f32, norms in f32.
    ExportGguf(ExportGgufArgs),
    /// Write OUTPUT_DIR/report.html from the run's training_summary.json (and adapter_config.json):
    /// loss, learning-rate and tokens/s curves, eval and retention before/after, changed retention
    /// answers, contamination findings. One self-contained file; `run` writes it too.
    Report(ReportArgs),
    /// Predict a job's peak memory from its model's config (no weights loaded): weights, adapter,
    /// gradients, optimizer, activations, logits, workspace; with --device-memory the largest
    /// micro-batch that fits, or what would make the job fit.
    Plan(PlanArgs),
    /// [developer] Write a checkpoint of random weights for a Llama-family config.json (Hugging
    /// Face layout, sharded with model.safetensors.index.json when large), for benchmarks.
    InitRandom(InitRandomArgs),
    /// [developer] Write the logits of one sequence to a safetensors file (key `logits`, [1, seq, vocab]).
    Logits(LogitsArgs),
    /// [developer] Print token ids as JSON for a string or a JSON array of strings.
    Tokenize(TokenizeArgs),
    /// [developer] Render conversations with the model's chat template; prints a JSON array of strings.
    RenderChat(RenderArgs),
    /// [developer] Time a forward pass over random tokens; prints JSON with tokens/s.
    BenchForward(BenchArgs),
    /// [developer] DPO loss, rewards and log-probs of one batch of preference pairs with a LoRA
    /// adapter (the reference is the adapter switched off); prints JSON and writes the adapter's
    /// gradients (PEFT names) to --grads.
    DpoLoss(DpoLossArgs),
    /// [developer] The self-distillation guard's term on chat samples: KL(adapter off ‖ adapter on)
    /// per answer token, averaged; prints JSON with the value and the samples' tokens.
    DistillKl(DistillKlArgs),
    /// [developer] NF4-quantize every float tensor of a safetensors file (blocks of 64, double-quantized
    /// absmax, as bitsandbytes) and write, per tensor NAME: NAME.packed, NAME.absmax (first level),
    /// NAME.absmax_codes, NAME.absmax_scale, NAME.offset and NAME.dequantized (float32); plus the
    /// 8-bit map as `dynamic_map`. Prints JSON with the bytes held per tensor.
    Nf4(Nf4Args),
    /// [developer] Forward of a QLoRA layer (NF4 base dequantized in x's dtype, float32 LoRA) on the
    /// tensors of a safetensors file: `weight` [out, in], optional `bias`, `lora_A` [r, in],
    /// `lora_B` [out, r], `x` [..., in]; writes `y`.
    Nf4Linear(Nf4LinearArgs),
    /// [developer] Row-wise int8-quantize every 2-D float tensor of a safetensors file (as
    /// bitsandbytes' Int8Params) and write, per tensor NAME: NAME.codes (int8), NAME.row_absmax
    /// and NAME.dequantized (float32). Prints JSON with the bytes held per tensor.
    Int8(Nf4Args),
}

#[derive(Debug, Args)]
pub struct LaunchArgs {
    /// Ranks on this machine (default: one per visible GPU, else 1).
    #[arg(long)]
    pub nproc_per_node: Option<usize>,
    /// Machines in the group ($NNODES, else 1).
    #[arg(long, env = "NNODES", default_value_t = 1)]
    pub nnodes: usize,
    /// This machine's index ($NODE_RANK, else 0).
    #[arg(long, env = "NODE_RANK", default_value_t = 0)]
    pub node_rank: usize,
    /// Rank 0's machine ($MASTER_ADDR, else 127.0.0.1).
    #[arg(long, env = "MASTER_ADDR", default_value = "127.0.0.1")]
    pub master_addr: String,
    /// The rendezvous port ($MASTER_PORT, else 29500).
    #[arg(long, env = "MASTER_PORT", default_value_t = 29500)]
    pub master_port: u16,
    /// libtorch threads per rank (default: this machine's CPUs divided by the ranks).
    #[arg(long)]
    pub threads_per_rank: Option<usize>,
    /// Seconds the other ranks get to stop after one failed, before SIGKILL.
    #[arg(long, default_value_t = 30)]
    pub grace_seconds: u64,
    /// The trainer command each rank runs, after `--` (e.g. `-- run job.yaml`).
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The FinetuneJob manifest (default: $FINETUNE_JOB_FILE, else /etc/finetune/job.yaml).
    pub job: Option<PathBuf>,
    /// Output directory for the adapter and training_summary.json (default: $FINETUNE_OUTPUT_DIR,
    /// else ./finetune-output/NAME).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Checkpoint directory (default: $FINETUNE_CHECKPOINT_DIR, else OUTPUT/checkpoints).
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
    /// The PEFT adapter directory that `spec.adapter.initAdapter` stands for (default:
    /// $FINETUNE_INIT_ADAPTER_DIR).
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The FinetuneJob manifest.
    pub job: PathBuf,
    /// Memory of the device (GPU memory, or the pod's memory limit on CPU), e.g. 80Gi, 141G.
    #[arg(long)]
    pub device_memory: Option<String>,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct InitRandomArgs {
    /// A Hugging Face config.json of a Llama-family model.
    #[arg(long)]
    pub config: PathBuf,
    /// Output directory (created).
    #[arg(long)]
    pub out: PathBuf,
    /// Weight dtype.
    #[arg(long, value_parser = ["bf16", "f32"], default_value = "bf16")]
    pub dtype: String,
    /// Largest shard, e.g. 2GiB, 500MB.
    #[arg(long, default_value = "2GiB")]
    pub shard_size: String,
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
}

#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A .gguf file or a Hugging Face model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user turn with the model's chat template (and the generation prompt).
    #[arg(long)]
    pub chat: bool,
    /// With --chat: a system message before the user turn (e.g. the one the adapter was trained with).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Sample with this temperature instead of greedy decoding.
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Nucleus sampling mass (only with --temperature).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Seed for sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print `{"ids": [...], "text": ...}` instead of the bare text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// JSONL data set.
    #[arg(long)]
    pub data: PathBuf,
    /// Line format; see the crate's `eval` module for exactly which tokens are scored.
    #[arg(long, value_enum)]
    pub format: DataFormat,
    /// Truncate each example to this many tokens (default: the model's max_position_embeddings).
    #[arg(long)]
    pub max_length: Option<usize>,
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The base model: a .gguf file or a Hugging Face model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// The PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors; a
    /// long-context adapter's config_overrides.json sets the rope scaling of the result).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output directory (created).
    #[arg(long)]
    pub output: PathBuf,
}

#[derive(Debug, Args)]
pub struct VerifyAdapterArgs {
    /// The adapter directory (adapter_config.json + adapter_model.safetensors), or
    /// `s3://BUCKET/PREFIX` holding a job's uploaded results (credentials and endpoint from the
    /// `AWS_*` variables), downloaded into --scratch first.
    #[arg(long)]
    pub adapter: PathBuf,
    /// Where an `s3://` adapter is downloaded to.
    #[arg(long, default_value = "/tmp/finetune-verify")]
    pub scratch: PathBuf,
    /// The base model the adapter must fit: a .gguf file or a Hugging Face model directory
    /// (without it the fit is not checked, and the report says so).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// What the adapter must be, as JSON: `{"lora": {"rank", "alpha", "targetModules",
    /// "rslora"}, "expectedSha256": {"FILE": "HEX"}}` (both optional).
    #[arg(long, default_value = "{}")]
    pub expect: String,
    /// How to name the adapter in messages (e.g. its pvc:// URI); default the directory.
    #[arg(long)]
    pub shown_as: Option<String>,
    /// Where to write the report for the kubelet (default: $FINETUNE_TERMINATION_LOG, if set).
    #[arg(long)]
    pub termination_log: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ExportGgufArgs {
    /// A Hugging Face model directory (e.g. the output of `merge`) or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// The GGUF file to write.
    #[arg(long)]
    pub output: PathBuf,
    /// Tensor type of the 2-D weights.
    #[arg(long = "type", value_enum)]
    pub ty: crate::export::gguf::GgufType,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// A finished run's output directory (the one holding training_summary.json).
    pub output_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Comma-separated token ids.
    #[arg(long, conflicts_with = "prompt")]
    pub ids: Option<String>,
    /// Text to tokenize (with the tokenizer's special tokens).
    #[arg(long)]
    pub prompt: Option<String>,
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct DpoLossArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Preference JSONL (`prompt` or `messages`, `chosen`, `rejected`); all lines form one batch.
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
    /// `sigmoid` or `ipo`.
    #[arg(long, default_value = "sigmoid")]
    pub loss: String,
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f64,
    /// Safetensors file for the gradients.
    #[arg(long)]
    pub grads: PathBuf,
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// The base model (a .gguf file or a Hugging Face model directory).
    #[arg(long)]
    pub model: PathBuf,
    /// The PEFT LoRA adapter directory to audit.
    #[arg(long)]
    pub adapter: PathBuf,
    /// Which part of the general question set.
    #[arg(long, value_enum, default_value = "audit")]
    pub split: crate::train::general::Split,
    /// Longest answer, in tokens (the retention probe's length by default).
    #[arg(long, default_value_t = crate::train::trainer::RETENTION_TOKENS)]
    pub max_new_tokens: usize,
}

#[derive(Debug, Args)]
pub struct DistillKlArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Chat JSONL (`messages` ending with an assistant turn); all lines form one batch.
    #[arg(long)]
    pub data: PathBuf,
}

#[derive(Debug, Args)]
pub struct Nf4Args {
    /// A safetensors file; its non-float tensors are skipped.
    #[arg(long = "in")]
    pub input: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct Nf4LinearArgs {
    #[arg(long = "in")]
    pub input: PathBuf,
    /// LoRA's alpha / rank.
    #[arg(long)]
    pub scaling: f64,
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct TokenizeArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, conflicts_with = "input")]
    pub text: Option<String>,
    /// JSON file holding an array of strings; prints an array of id arrays.
    #[arg(long)]
    pub input: Option<PathBuf>,
    #[arg(long)]
    pub add_special_tokens: bool,
}

#[derive(Debug, Args)]
pub struct RenderArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// JSON file: an array of `{"messages": [...], "add_generation_prompt": bool}`.
    #[arg(long)]
    pub input: PathBuf,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value_t = 4)]
    pub batch: i64,
    #[arg(long, default_value_t = 512)]
    pub seq: i64,
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
}

fn load(args: &ModelArgs, device: &str) -> Result<LoadedModel> {
    let (device, kind) = pick_device(device)?;
    let mut m = ModelSource::open(&args.model)?.load(kind, device)?;
    if let Some(dir) = &args.adapter {
        crate::export::apply_peft_adapter(&mut m.model, dir)?;
        // An adapter with an extended vocabulary brings its tokenizer.
        if m.model.added_vocab.is_some() {
            m.tokenizer = crate::text::TextTokenizer::from_hf_dir(dir)?;
        }
    }
    Ok(m)
}

fn read_json(path: &std::path::Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::format(path, format!("invalid JSON: {e}")))
}

/// Runs one command, writing its result to stdout.
pub fn run(cli: Cli) -> Result<()> {
    let device = cli.device.as_str();
    match cli.command {
        Command::Run(a) => run_training_job(a, device),
        Command::Launch(a) => run_launch(a, device),
        Command::Generate(a) => run_generate(a, device),
        Command::Audit(a) => run_audit(a, device),
        Command::Eval(a) => run_eval(a, device),
        Command::Merge(a) => run_merge(a),
        Command::VerifyAdapter(a) => run_verify_adapter(a),
        Command::ExportGguf(a) => run_export_gguf(a),
        Command::Report(a) => run_report(a),
        Command::Plan(a) => run_plan(a, device),
        Command::InitRandom(a) => run_init_random(a),
        Command::Logits(a) => run_logits(a, device),
        Command::DpoLoss(a) => run_dpo_loss(a, device),
        Command::DistillKl(a) => run_distill_kl(a, device),
        Command::Nf4(a) => run_nf4(a),
        Command::Nf4Linear(a) => run_nf4_linear(a),
        Command::Int8(a) => run_int8(a),
        Command::Tokenize(a) => run_tokenize(a),
        Command::RenderChat(a) => run_render_chat(a),
        Command::BenchForward(a) => run_bench_forward(a, device),
    }
}

/// Starts the ranks and exits with the group's code.
fn run_launch(a: LaunchArgs, device: &str) -> Result<()> {
    let gpu_count = if device == "cpu" {
        0
    } else {
        tch::Cuda::device_count().max(0) as usize
    };
    let gpus = crate::launch::visible_gpus(std::env::var("CUDA_VISIBLE_DEVICES").ok(), gpu_count);
    let gpus = if gpu_count == 0 { Vec::new() } else { gpus };
    let nproc = a.nproc_per_node.unwrap_or(gpus.len().max(1));
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let plan = crate::launch::LaunchPlan {
        nproc_per_node: nproc,
        nnodes: a.nnodes,
        node_rank: a.node_rank,
        master_addr: a.master_addr,
        master_port: a.master_port,
        gpus,
        threads_per_rank: a.threads_per_rank.unwrap_or((cpus / nproc.max(1)).max(1)),
        grace: std::time::Duration::from_secs(a.grace_seconds),
    };
    let mut args = vec![format!("--device={device}")];
    args.extend(a.command);
    let code = crate::launch::launch(&plan, &args)?;
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

/// Trains a manifest; exits with the contract's code when training did not succeed.
fn run_training_job(a: RunArgs, device: &str) -> Result<()> {
    let job = a
        .job
        .or_else(|| std::env::var_os(crate::train::job::JOB_FILE_ENV).map(PathBuf::from))
        .unwrap_or_else(|| {
            PathBuf::from(finetune_crds::contract::paths::JOB_DIR)
                .join(finetune_crds::contract::paths::JOB_FILE_NAME)
        });
    let code = crate::train::run_job(&crate::train::RunOptions {
        job,
        output: a.output,
        checkpoint_dir: a.checkpoint_dir,
        device: device.to_string(),
        init_adapter: a.init_adapter,
    });
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

/// The memory plan of a job, as a table or JSON.
fn run_plan(a: PlanArgs, device: &str) -> Result<()> {
    let report = crate::memory_plan::plan_job(a.job, device, a.device_memory.as_deref())?;
    if a.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

fn run_init_random(a: InitRandomArgs) -> Result<()> {
    let shard = finetune_crds::memory::parse_quantity(&a.shard_size)
        .map_err(|e| Error::Usage(format!("--shard-size: {e}")))?;
    let kind = if a.dtype == "f32" {
        Kind::Float
    } else {
        Kind::BFloat16
    };
    let files = crate::init_random::init_random(&a.config, &a.out, kind, shard, a.seed)?;
    for f in files {
        println!("{}", f.display());
    }
    Ok(())
}

/// One completion for a prompt.
fn run_audit(a: AuditArgs, device: &str) -> Result<()> {
    let model = ModelArgs {
        model: a.model,
        adapter: Some(a.adapter),
    };
    let mut m = load(&model, device)?;
    let report = crate::audit::audit(&mut m, a.split, a.max_new_tokens)?;
    println!(
        "{}",
        serde_json::to_string_pretty(&report).expect("the report serializes")
    );
    Ok(())
}

fn run_generate(a: GenerateArgs, device: &str) -> Result<()> {
    let m = load(&a.model, device)?;
    let prompt_ids = if a.chat {
        let t = m
            .chat_template
            .as_ref()
            .ok_or_else(|| Error::Usage("--chat: the model has no chat template".into()))?;
        let mut messages = Vec::new();
        if let Some(system) = &a.system {
            messages.push(json!({"role": "system", "content": system}));
        }
        messages.push(json!({"role": "user", "content": a.prompt}));
        let text = t.render(&Value::Array(messages), true)?;
        m.tokenizer.encode(&text, false)?
    } else {
        m.tokenizer.encode(&a.prompt, true)?
    };
    let sampling = Sampling {
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
    };
    let ids = generate(
        &m.model,
        &prompt_ids,
        a.max_new_tokens,
        &m.eos_ids,
        &sampling,
    );
    let text = m.tokenizer.decode(&ids, true)?;
    if a.json {
        println!(
            "{}",
            json!({"prompt_ids": prompt_ids, "ids": ids, "text": text})
        );
    } else {
        println!("{text}");
    }
    Ok(())
}

/// Loss and perplexity on a dataset.
fn run_eval(a: EvalArgs, device: &str) -> Result<()> {
    let m = load(&a.model, device)?;
    let max_length = a
        .max_length
        .unwrap_or(m.model.config.max_position_embeddings as usize);
    let examples = load_examples(
        &a.data,
        a.format,
        &m.tokenizer,
        m.chat_template.as_ref(),
        max_length,
    )?;
    let report = evaluate(&m.model, &examples);
    println!("{}", serde_json::to_string(&report).unwrap_or_default());
    Ok(())
}

/// Folds a LoRA adapter into an HF-layout model.
fn run_merge(a: MergeArgs) -> Result<()> {
    let summary = crate::export::merge::merge(&a.model, &a.adapter, &a.output)?;
    println!("{}", serde_json::to_string(&summary).unwrap_or_default());
    Ok(())
}

/// Checks a registered adapter; exits 2 when it is not verified.
fn run_verify_adapter(a: VerifyAdapterArgs) -> Result<()> {
    let expect: finetune_crds::contract::AdapterExpectations = serde_json::from_str(&a.expect)
        .map_err(|e| Error::Usage(format!("--expect: invalid JSON: {e}")))?;
    let shown_as = a
        .shown_as
        .unwrap_or_else(|| a.adapter.display().to_string());
    let remote = a.adapter.to_str().filter(|s| s.starts_with("s3://"));
    let dir = match remote {
        Some(uri) => crate::verify::fetch_adapter(uri, &a.scratch, &expect),
        None => Ok(a.adapter.clone()),
    };
    let report = match dir {
        Ok(dir) => crate::verify::verify_adapter(&dir, a.model.as_deref(), &expect, &shown_as),
        Err(failed) => failed,
    };
    let json = report.to_bounded_json();
    println!("{json}");
    let log = a.termination_log.or_else(|| {
        std::env::var_os(finetune_crds::contract::env::TERMINATION_LOG)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    if let Some(path) = log {
        std::fs::write(&path, &json).map_err(|e| Error::io(&path, e))?;
    }
    if !report.verified {
        eprintln!("not verified ({:?}): {}", report.reason, report.message);
        std::process::exit(2);
    }
    Ok(())
}

/// Writes a model as a GGUF file.
fn run_export_gguf(a: ExportGgufArgs) -> Result<()> {
    let summary = crate::export::gguf::export_gguf(&a.model, &a.output, a.ty)?;
    println!("{}", serde_json::to_string(&summary).unwrap_or_default());
    Ok(())
}

/// Writes report.html into a run's output directory; prints where, its size and the time taken.
fn run_report(a: ReportArgs) -> Result<()> {
    let started = Instant::now();
    let written = crate::report::write_report(&a.output_dir)?;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"report": written.path, "bytes": written.bytes, "steps": written.steps, "seconds": seconds})
    );
    Ok(())
}

/// The logits of one sequence, to a safetensors file.
fn run_logits(a: LogitsArgs, device: &str) -> Result<()> {
    let m = load(&a.model, device)?;
    let ids: Vec<i64> = match (&a.ids, &a.prompt) {
        (Some(s), _) => s
            .split(',')
            .map(|x| x.trim().parse::<i64>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::Usage(format!("--ids: {e}")))?,
        (None, Some(p)) => m.tokenizer.encode(p, true)?,
        (None, None) => return Err(Error::Usage("give --ids or --prompt".into())),
    };
    if let Some(bad) = ids
        .iter()
        .find(|&&i| i < 0 || i >= m.model.config.vocab_size)
    {
        return Err(Error::Usage(format!(
            "--ids: {bad} is outside the vocabulary"
        )));
    }
    let input = Tensor::from_slice(&ids)
        .to_device(m.model.device)
        .unsqueeze(0);
    let logits = tch::no_grad(|| m.model.forward(&input, None, None))
        .to_kind(Kind::Float)
        .to_device(tch::Device::Cpu);
    Tensor::write_safetensors(
        &[
            ("logits", &logits),
            ("input_ids", &input.to_device(tch::Device::Cpu)),
        ],
        &a.out,
    )?;
    println!("{}", json!({"ids": ids, "out": a.out}));
    Ok(())
}

/// The DPO loss and the adapter's gradients on preference pairs.
fn run_dpo_loss(a: DpoLossArgs, device: &str) -> Result<()> {
    if a.model.adapter.is_none() {
        return Err(Error::Usage(
            "dpo-loss needs --adapter (the reference is the adapter switched off)".into(),
        ));
    }
    let loss = match a.loss.as_str() {
        "sigmoid" => finetune_crds::training::DpoLoss::Sigmoid,
        "ipo" => finetune_crds::training::DpoLoss::Ipo,
        other => {
            return Err(Error::Usage(format!(
                "--loss: `{other}` is not sigmoid or ipo"
            )));
        }
    };
    let mut m = load(&a.model, device)?;
    m.model.set_lora_trainable();
    let enc = crate::data::Encoder {
        tokenizer: &m.tokenizer,
        template: m.chat_template.as_ref(),
        options: crate::data::LoadOptions::sft(),
    };
    let pairs = crate::data::load_preference(&a.data, &enc)?;
    let cfg = crate::train::dpo::DpoConfig {
        beta: a.beta,
        loss,
        label_smoothing: a.label_smoothing,
    };
    let (report, grads) = crate::train::dpo::batch_report(&mut m.model, &pairs, &cfg);
    Tensor::write_safetensors(&grads, &a.grads)?;
    println!("{report}");
    Ok(())
}

/// The self-distillation term on chat samples.
fn run_distill_kl(a: DistillKlArgs, device: &str) -> Result<()> {
    if a.model.adapter.is_none() {
        return Err(Error::Usage(
            "distill-kl needs --adapter (the base is the adapter switched off)".into(),
        ));
    }
    let mut m = load(&a.model, device)?;
    let enc = crate::data::Encoder {
        tokenizer: &m.tokenizer,
        template: m.chat_template.as_ref(),
        options: crate::data::LoadOptions::sft(),
    };
    let samples = crate::data::load_samples(&a.data, crate::data::DataFormat::Chat, &enc)?;
    let rows: Vec<Vec<usize>> = (0..samples.len()).map(|i| vec![i]).collect();
    let batch = crate::data::build_batch(&samples, &rows);
    let teacher = crate::train::anchor::teacher_log_probs(&mut m.model, &samples);
    m.model.set_training(false);
    let kl = tch::no_grad(|| {
        crate::train::anchor::distillation_kl(&m.model, &batch, &Tensor::cat(&teacher, 0))
    });
    let tokens: Vec<Value> = samples
        .iter()
        .map(|s| json!({"ids": s.ids, "supervised": s.supervised}))
        .collect();
    println!("{}", json!({"kl": kl.double_value(&[]), "samples": tokens}));
    Ok(())
}

/// Token ids of texts.
/// NF4 codes, absmax and dequantized values of every float tensor, for comparison with bitsandbytes.
fn run_nf4(a: Nf4Args) -> Result<()> {
    use crate::model::nf4::{Nf4, dynamic_map, quantize_4bit};
    let mut out: Vec<(String, Tensor)> =
        vec![("dynamic_map".into(), Tensor::from_slice(&dynamic_map()))];
    let mut report = serde_json::Map::new();
    for (name, x) in Tensor::read_safetensors(&a.input)? {
        if !x.is_floating_point() {
            continue;
        }
        let q = Nf4::quantize(&x);
        let (_, first_level_absmax) = quantize_4bit(&x);
        report.insert(
            name.clone(),
            json!({"shape": q.shape, "numel": q.numel(), "bytes": q.bytes()}),
        );
        out.push((format!("{name}.dequantized"), q.dequantize(Kind::Float)));
        out.push((format!("{name}.absmax"), first_level_absmax));
        out.push((format!("{name}.offset"), Tensor::from_slice(&[q.offset])));
        out.push((format!("{name}.packed"), q.packed));
        out.push((format!("{name}.absmax_codes"), q.absmax_codes));
        out.push((format!("{name}.absmax_scale"), q.absmax_scale));
    }
    crate::export::write_safetensors(&a.out, &out)?;
    println!("{}", Value::Object(report));
    Ok(())
}

/// Int8 codes, row absmax and dequantized values of every 2-D float tensor, for comparison with
/// bitsandbytes.
fn run_int8(a: Nf4Args) -> Result<()> {
    use crate::model::int8::Int8Rows;
    let mut out: Vec<(String, Tensor)> = Vec::new();
    let mut report = serde_json::Map::new();
    for (name, x) in Tensor::read_safetensors(&a.input)? {
        if !x.is_floating_point() || x.dim() != 2 {
            continue;
        }
        let q = Int8Rows::quantize(&x);
        report.insert(
            name.clone(),
            json!({"shape": q.shape(), "bytes": q.bytes()}),
        );
        out.push((format!("{name}.dequantized"), q.dequantize(Kind::Float)));
        out.push((format!("{name}.codes"), q.codes));
        out.push((format!("{name}.row_absmax"), q.row_absmax));
    }
    crate::export::write_safetensors(&a.out, &out)?;
    println!("{}", Value::Object(report));
    Ok(())
}

/// One QLoRA layer's output, for comparison with PEFT over bitsandbytes' Linear4bit.
fn run_nf4_linear(a: Nf4LinearArgs) -> Result<()> {
    use crate::model::linear::{Linear, Lora};
    let mut t: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(&a.input)?.into_iter().collect();
    let mut take = |name: &str| {
        t.remove(name)
            .ok_or_else(|| Error::Usage(format!("{}: no tensor `{name}`", a.input.display())))
    };
    let (weight, x, lora_a, lora_b) = (
        take("weight")?,
        take("x")?,
        take("lora_A")?,
        take("lora_B")?,
    );
    let mut layer = Linear::new(weight, take("bias").ok());
    layer.quantize_base(finetune_crds::training::BaseQuantization::Nf4);
    layer.lora = Some(Lora {
        a: lora_a.to_kind(Kind::Float),
        b: lora_b.to_kind(Kind::Float),
        scaling: a.scaling,
        dropout: 0.0,
        enabled: true,
        training: false,
        input_sketch: None,
    });
    let y = tch::no_grad(|| layer.forward(&x));
    Tensor::write_safetensors(&[("y", &y)], &a.out)?;
    println!(
        "{}",
        json!({"shape": y.size(), "weight_bytes": layer.quantized.as_ref().map(|q| q.bytes())})
    );
    Ok(())
}

fn run_tokenize(a: TokenizeArgs) -> Result<()> {
    // A directory with a tokenizer but no model (e.g. an adapter with added tokens).
    let tok = if a.model.join("tokenizer.json").exists() && !a.model.join("config.json").exists() {
        crate::text::TextTokenizer::from_hf_dir(&a.model)?
    } else {
        ModelSource::open(&a.model)?.tokenizer()?
    };
    match (&a.text, &a.input) {
        (Some(t), _) => println!("{}", json!(tok.encode(t, a.add_special_tokens)?)),
        (None, Some(p)) => {
            let v = read_json(p)?;
            let texts = v
                .as_array()
                .ok_or_else(|| Error::format(p, "expected a JSON array of strings"))?;
            let mut out = Vec::new();
            for t in texts {
                let s = t
                    .as_str()
                    .ok_or_else(|| Error::format(p, "expected a JSON array of strings"))?;
                out.push(tok.encode(s, a.add_special_tokens)?);
            }
            println!("{}", json!(out));
        }
        (None, None) => return Err(Error::Usage("give --text or --input".into())),
    }
    Ok(())
}

/// Chat-template renderings.
fn run_render_chat(a: RenderArgs) -> Result<()> {
    let src = ModelSource::open(&a.model)?;
    let tok = src.tokenizer()?;
    let t = src
        .chat_template(&tok)?
        .ok_or_else(|| Error::Usage("the model has no chat template".into()))?;
    let v = read_json(&a.input)?;
    let items = v
        .as_array()
        .ok_or_else(|| Error::format(&a.input, "expected a JSON array"))?;
    let mut out = Vec::new();
    for item in items {
        let messages = item.get("messages").cloned().unwrap_or(Value::Null);
        let agp = item
            .get("add_generation_prompt")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        out.push(t.render(&messages, agp)?);
    }
    println!("{}", json!(out));
    Ok(())
}

/// Forward-pass tokens/s on random ids.
fn run_bench_forward(a: BenchArgs, device: &str) -> Result<()> {
    let m = load(
        &ModelArgs {
            model: a.model.clone(),
            adapter: None,
        },
        device,
    )?;
    let _guard = tch::no_grad_guard();
    tch::manual_seed(0);
    let input = Tensor::randint(
        m.model.config.vocab_size,
        [a.batch, a.seq],
        (Kind::Int64, m.model.device),
    );
    let sync = || {
        if let tch::Device::Cuda(i) = m.model.device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    for _ in 0..a.warmup {
        let _ = m.model.forward(&input, None, None);
    }
    sync();
    let start = Instant::now();
    for _ in 0..a.iters {
        let _ = m.model.forward(&input, None, None);
    }
    sync();
    let secs = start.elapsed().as_secs_f64() / a.iters.max(1) as f64;
    println!(
        "{}",
        json!({
            "impl": "finetune-trainer (tch)",
            "batch": a.batch, "seq": a.seq, "iters": a.iters,
            "seconds_per_forward": secs,
            "tokens_per_s": (a.batch * a.seq) as f64 / secs,
            "device": format!("{:?}", m.model.device),
            "dtype": format!("{:?}", m.model.kind),
            "threads": tch::get_num_threads(),
        })
    );
    Ok(())
}
