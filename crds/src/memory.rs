//! The memory planner: the peak memory of a training run predicted from the model's config and the
//! job's settings alone, before any weight is loaded (`finetune-trainer plan`, and the operator
//! before it creates a pod on a node whose GPU memory it knows).
//!
//! The terms follow what OUR trainer keeps alive, not a generic transformer formula, because a
//! formula for another implementation is off by the tensors this one does or does not save:
//!
//! - **weights**: every base parameter in the compute dtype (`weight_bytes`); the frozen base of a
//!   LoRA run is not copied.
//! - **adapter**: LoRA `A`/`B` are float32 whatever the compute dtype (`model/linear.rs`), so that
//!   AdamW's updates are not rounded away.
//! - **gradients**: one per trainable tensor, in that tensor's dtype; allocated by the first
//!   backward and kept (zeroed, not freed) between steps, so they are part of every later peak.
//! - **optimizer**: AdamW's `m` and `v`, float32 for every trainable scalar (`train/optim.rs`).
//! - **activations**: the tensors autograd saved for backward, counted op by op from the forward
//!   code (see [`layer_saved_bytes`]). An op saves an input only when the gradient of ANOTHER input
//!   needs it, so a frozen projection saves nothing while a LoRA one saves its dropout mask and the
//!   dropped copy of its input (each adapted projection draws its own), and the first layer of a
//!   LoRA run saves less because the frozen embedding's output needs no gradient. RMSNorm works
//!   on a float32 copy, so it saves 4 bytes per element even in bfloat16. Attention runs in
//!   libtorch's fused kernels on both devices, also with a mask (torch 2.11's CPU SDPA takes the
//!   flash kernel for a boolean mask: `ScaledDotProductFlashAttentionForCpuBackward0`), so no
//!   `[batch, heads, seq, seq]` softmax is kept; they save their inputs, output and log-sum-exp,
//!   and with a mask the compute-dtype copy of it that SDPA makes from the boolean one, per layer.
//!   Grouped-query heads are repeated into full-size copies before attention (`repeat_kv`), and
//!   those copies are what attention saves. With activation
//!   checkpointing only each layer's input is kept, plus one layer's graph while it is recomputed.
//! - **logits**: only the supervised positions reach the LM head (`train/step.rs`), as float32.
//!   The head's peak is during its backward: the saved log-probabilities plus the gradient of the
//!   loss and of the log-softmax, three `[targets, vocab]` float32 tensors at once.
//! - **workspace**: what one decoder layer's backward allocates on top of the saved tensors: the
//!   SwiGLU gradients, three `[tokens, intermediate]` alive at once around `silu`'s backward. It
//!   happens after the head's backward has freed the logits, so the total takes the larger of the
//!   two, not their sum.
//! - **runtime**: on the CPU, the trainer process's resident set before any model is loaded
//!   (libtorch's code and its thread pools, the tokenizer, the status server):
//!   [`CPU_RUNTIME_BYTES`], measured. On CUDA nothing: `max_memory_allocated` does not count the
//!   CUDA context; [`largest_micro_batch`] keeps [`CUDA_RESERVE_BYTES`] free for it instead.
//!
//! The plan is the live set. On the CPU glibc's malloc keeps freed blocks in its heap once its
//! dynamic mmap threshold has risen past the activations' size (up to 32 MiB after the first
//! large free), and the heap fragments: with the default allocator the measured peak was 13–58 %
//! above the live set on the validation runs of 2026-12-06 (`tests/reference/test_memory_planner.py`), with
//! `MALLOC_MMAP_THRESHOLD_=65536` in the environment it is the live set (within ±15 %).

use crate::FinetuneJobSpec;
use crate::training::{AdapterType, BaseQuantization, MethodType, Precision};

/// Resident memory of `finetune-trainer run` during training that is not the model, its optimizer
/// or its activations: libtorch's code and thread pools, the tokenizer, the data, the status
/// server. Measured as `peak_rss_training_bytes` of a run on a tiny model (hidden 64, 2 layers,
/// vocab 512, LoRA r16, 1 × 32 tokens: 416.4 MB, three runs within 0.3 MB) minus that model's
/// planned terms (1.7 MB). Its `rss_before_training_bytes` is 16.8 MB lower: the autograd engine's
/// worker and OpenMP's pool come up with the first backward, so the floor is taken from the
/// training peak. 2026-12-06, the project's 2-core AMD EPYC (x86-64, avx2), libtorch of the torch
/// 2.11.0 wheel, debug trainer build.
pub const CPU_RUNTIME_BYTES: u64 = 396 * MIB;

/// GPU memory left free by [`largest_micro_batch`] on CUDA for the CUDA context and the caching
/// allocator's fragmentation, which `max_memory_allocated` does not see. Not measured here (no
/// GPU): the context of a CUDA 12 libtorch is about 500 MiB on an H100.
pub const CUDA_RESERVE_BYTES: u64 = GIB;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const F32: f64 = 4.0;

/// The linear layers of a decoder layer, by the name LoRA targets them with, and which of the
/// layer's widths they read.
const ATTENTION_INPUT: [&str; 3] = ["q_proj", "k_proj", "v_proj"];
const MLP_INPUT: [&str; 2] = ["gate_proj", "up_proj"];

/// The shape of a Llama-family model, from its `config.json` (or GGUF metadata).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelShape {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_layers: i64,
    pub num_heads: i64,
    pub num_kv_heads: i64,
    pub head_dim: i64,
    pub tie_word_embeddings: bool,
}

/// Bounds far above any released model, low enough that no product of them overflows `i64`.
const MAX_VOCAB: i64 = 1 << 24;
const MAX_WIDTH: i64 = 1 << 20;
const MAX_LAYERS: i64 = 4096;
const MAX_HEADS: i64 = 1 << 14;

impl ModelShape {
    /// Reads a Hugging Face `config.json` value. `num_key_value_heads` defaults to the number of
    /// heads and `head_dim` to `hidden_size / num_attention_heads`, as in `LlamaConfig`. Errors
    /// name the key.
    pub fn from_config_json(v: &serde_json::Value) -> Result<Self, String> {
        let int = |key: &str, max: i64| -> Result<Option<i64>, String> {
            match v.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(x) => match x.as_i64() {
                    Some(n) if (1..=max).contains(&n) => Ok(Some(n)),
                    _ => Err(format!("`{key}` must be an integer in 1..={max}, not {x}")),
                },
            }
        };
        let need =
            |key: &str, max: i64| int(key, max)?.ok_or_else(|| format!("`{key}` is missing"));
        let hidden_size = need("hidden_size", MAX_WIDTH)?;
        let num_heads = need("num_attention_heads", MAX_HEADS)?;
        let num_kv_heads = int("num_key_value_heads", MAX_HEADS)?.unwrap_or(num_heads);
        if num_heads % num_kv_heads != 0 {
            return Err(format!(
                "`num_attention_heads` ({num_heads}) must be a multiple of `num_key_value_heads` ({num_kv_heads})"
            ));
        }
        let head_dim = match int("head_dim", MAX_WIDTH)? {
            Some(d) => d,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => {
                return Err(format!(
                    "`hidden_size` ({hidden_size}) is not a multiple of `num_attention_heads` ({num_heads}) and there is no `head_dim`"
                ));
            }
        };
        let tie_word_embeddings = match v.get("tie_word_embeddings") {
            None | Some(serde_json::Value::Null) => false,
            Some(x) => x
                .as_bool()
                .ok_or_else(|| format!("`tie_word_embeddings` must be true or false, not {x}"))?,
        };
        Ok(ModelShape {
            vocab_size: need("vocab_size", MAX_VOCAB)?,
            hidden_size,
            intermediate_size: need("intermediate_size", MAX_WIDTH)?,
            num_layers: need("num_hidden_layers", MAX_LAYERS)?,
            num_heads,
            num_kv_heads,
            head_dim,
            tie_word_embeddings,
        })
    }

    /// Width of the query projection's output (`num_heads · head_dim`).
    fn q_width(&self) -> i64 {
        self.num_heads * self.head_dim
    }

    fn kv_width(&self) -> i64 {
        self.num_kv_heads * self.head_dim
    }

    /// `(in, out)` of a decoder layer's linear layer by its LoRA target name.
    pub fn linear_shape(&self, name: &str) -> Option<(i64, i64)> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        Some(match name {
            "q_proj" => (h, self.q_width()),
            "k_proj" | "v_proj" => (h, self.kv_width()),
            "o_proj" => (self.q_width(), h),
            "gate_proj" | "up_proj" => (h, i),
            "down_proj" => (i, h),
            _ => return None,
        })
    }

    /// The weights of the decoder layers' linear layers (what QLoRA quantizes).
    pub fn linear_parameters(&self) -> i64 {
        let per_layer: i64 = crate::training::LLAMA_LINEAR_MODULES
            .iter()
            .filter_map(|n| self.linear_shape(n))
            .map(|(i, o)| i * o)
            .sum();
        per_layer * self.num_layers
    }

    /// Every parameter (biases, which few Llama-family models have, left out).
    pub fn parameters(&self) -> i64 {
        let linears: i64 = crate::training::LLAMA_LINEAR_MODULES
            .iter()
            .filter_map(|n| self.linear_shape(n))
            .map(|(i, o)| i * o)
            .sum();
        let layer = linears + 2 * self.hidden_size;
        let heads = if self.tie_word_embeddings { 1 } else { 2 };
        heads * self.vocab_size * self.hidden_size + self.num_layers * layer + self.hidden_size
    }
}

/// Where the run's tensors live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

/// What a run does with the model, as far as memory is concerned.
#[derive(Debug, Clone, PartialEq)]
pub struct RunShape {
    /// Rows per forward pass (DPO: chosen and rejected rows together).
    pub micro_batch: i64,
    /// Rows one example takes ([`rows_per_example`]): a micro-batch is a whole number of them.
    pub rows_per_example: i64,
    /// Tokens per row (the longest row of a batch; `maxSeqLength` at worst).
    pub seq_len: i64,
    pub gradient_checkpointing: bool,
    /// `(rank, target modules)`; `None` = full fine-tuning.
    pub lora: Option<(i64, Vec<String>)>,
    /// LoRA dropout above zero (each adapted projection then saves a mask and a dropped copy).
    pub lora_dropout: bool,
    /// Bytes per base weight.
    pub weight_bytes: i64,
    /// Bytes per activation element (the compute dtype).
    pub compute_bytes: i64,
    pub device: DeviceKind,
    /// Share of positions that are targets (reach the LM head); 1 for plain text.
    pub supervised_fraction: f64,
    /// Batches carry an attention mask (padding to the longest row, or packing).
    pub attention_mask: bool,
    /// QLoRA: how the decoder's linear layers are held (`adapter.lora.baseQuantization`).
    pub base_quantization: Option<BaseQuantization>,
}

/// Rows one training example takes in a forward pass: DPO runs a pair's chosen and rejected
/// answers together.
pub fn rows_per_example(spec: &FinetuneJobSpec) -> i64 {
    if spec.method.kind == MethodType::Dpo {
        2
    } else {
        1
    }
}

impl RunShape {
    /// The run a FinetuneJob spec describes on `device`. The worst case of what the data can do:
    /// every row `maxSeqLength` long and every position supervised; a mask whenever packing or
    /// padding can need one (packing, or more than one row per batch).
    pub fn from_spec(spec: &FinetuneJobSpec, device: DeviceKind) -> Self {
        let hp = &spec.hyperparameters;
        // A CPU's native bfloat16 is the trainer's to know: it resolves `Auto` before planning.
        let on_cuda = device == DeviceKind::Cuda;
        let bytes = match hp.precision.resolve(on_cuda, spec.adapter.kind, false) {
            Precision::Bf16 => 2,
            _ => 4,
        };
        let lora_settings = spec.adapter.lora.clone().unwrap_or_default();
        let lora = (spec.adapter.kind == AdapterType::Lora).then(|| {
            (
                i64::from(lora_settings.rank),
                lora_settings.target_modules.clone(),
            )
        });
        let rows = rows_per_example(spec);
        let base_quantization = lora.as_ref().and(lora_settings.base_quantization);
        let rows_per_pass = hp.micro_batch_size.unwrap_or(hp.batch_size);
        let micro_batch = i64::from(rows_per_pass.max(1)) * rows;
        RunShape {
            micro_batch,
            rows_per_example: rows,
            seq_len: i64::from(hp.max_seq_length.max(1)),
            gradient_checkpointing: hp.checkpointing(base_quantization.is_some()),
            lora_dropout: lora.is_some() && lora_settings.dropout > 0.0,
            lora,
            weight_bytes: bytes,
            compute_bytes: bytes,
            device,
            supervised_fraction: 1.0,
            attention_mask: hp.packing || micro_batch > 1,
            base_quantization,
        }
    }

    fn adapted(&self, name: &str) -> bool {
        self.lora
            .as_ref()
            .is_some_and(|(_, targets)| targets.iter().any(|t| t == name))
    }

    /// Whether the weight of linear layer `name` gets a gradient (itself or through its adapter).
    fn trains(&self, name: &str) -> bool {
        self.lora.is_none() || self.adapted(name)
    }

    fn tokens(&self) -> f64 {
        (self.micro_batch as f64) * (self.seq_len as f64)
    }
}

/// Predicted peak memory of a run, by term (see the module docs), in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct MemoryPlan {
    pub weights: u64,
    pub adapter: u64,
    pub gradients: u64,
    pub optimizer: u64,
    pub activations: u64,
    pub logits: u64,
    pub workspace: u64,
    pub runtime: u64,
    /// Activation bytes per token without checkpointing, at this sequence length.
    pub per_token_plain: u64,
    /// Activation bytes per token with checkpointing, at this sequence length.
    pub per_token_checkpointed: u64,
}

impl MemoryPlan {
    /// The peak: the head's backward (logits) and a layer's backward (workspace) never overlap.
    pub fn total(&self) -> u64 {
        // Saturating: absurd shapes (a million rows of a million tokens) plan as "never fits".
        [
            self.weights,
            self.adapter,
            self.gradients,
            self.optimizer,
            self.activations,
            self.logits.max(self.workspace),
            self.runtime,
        ]
        .into_iter()
        .fold(0, u64::saturating_add)
    }

    /// Activation bytes per token with or without activation checkpointing.
    pub fn activation_bytes_per_token(&self, checkpointing: bool) -> u64 {
        if checkpointing {
            self.per_token_checkpointed
        } else {
            self.per_token_plain
        }
    }
}

/// The predicted peak of `run` on `model`.
pub fn plan(model: &ModelShape, run: &RunShape) -> MemoryPlan {
    let (adapter, trainable_bytes) = trainable(model, run);
    let plain = plain_activations(model, run);
    let checkpointed = checkpointed_activations(model, run);
    let per_token = |bytes: f64| (bytes / run.tokens()).round() as u64;
    let activations = if run.gradient_checkpointing {
        checkpointed
    } else {
        plain
    };
    MemoryPlan {
        weights: weight_bytes(model, run) as u64,
        adapter: adapter as u64,
        gradients: trainable_bytes as u64,
        optimizer: (2.0 * F32 * trainable_scalars(model, run)) as u64,
        activations: activations as u64,
        logits: head_peak(model, run) as u64,
        workspace: layer_workspace(model, run) as u64,
        runtime: match run.device {
            DeviceKind::Cpu => CPU_RUNTIME_BYTES,
            DeviceKind::Cuda => 0,
        },
        per_token_plain: per_token(plain),
        per_token_checkpointed: per_token(checkpointed),
    }
}

/// Bytes of NF4 per weight: half a byte of code, one byte of double-quantized scale per 64
/// weights and a float32 second-level scale per 256 of those (`model/nf4.rs`).
pub const NF4_BYTES_PER_WEIGHT: f64 = 0.5 + (1.0 + 4.0 / 256.0) / 64.0;

/// Bytes of row-wise int8 per weight (`model/int8.rs`); the float32 absmax per row is left out.
pub const INT8_BYTES_PER_WEIGHT: f64 = 1.0;

/// Bytes per weight of the largest GGUF block type a `gguf` base may hold (Q8_0: 34 bytes per 32
/// weights); Q4_1 takes 20 and Q4_0 18. The operator cannot see the file's types from a spec, so
/// it plans for the largest.
pub const GGUF_BYTES_PER_WEIGHT: f64 = 34.0 / 32.0;

/// Bytes per decoder linear weight held by a QLoRA base.
pub fn quantized_bytes_per_weight(q: BaseQuantization) -> f64 {
    match q {
        BaseQuantization::Nf4 => NF4_BYTES_PER_WEIGHT,
        BaseQuantization::Int8 => INT8_BYTES_PER_WEIGHT,
        BaseQuantization::Gguf => GGUF_BYTES_PER_WEIGHT,
    }
}

/// The base weights: the decoder's linear layers quantized on a QLoRA run, everything else in
/// the compute dtype.
fn weight_bytes(model: &ModelShape, run: &RunShape) -> f64 {
    let all = model.parameters() as f64;
    match run.base_quantization {
        Some(q) => {
            let linear = model.linear_parameters() as f64;
            linear * quantized_bytes_per_weight(q) + (all - linear) * run.weight_bytes as f64
        }
        None => all * run.weight_bytes as f64,
    }
}

/// The largest micro-batch, in examples as `hyperparameters.microBatchSize` counts them (DPO:
/// pairs), whose plan fits in `device_memory` (less [`CUDA_RESERVE_BYTES`] on CUDA); `None` when
/// not even one example fits. The plan grows with the batch, so a binary search.
pub fn largest_micro_batch(model: &ModelShape, run: &RunShape, device_memory: u64) -> Option<i64> {
    let budget = match run.device {
        DeviceKind::Cpu => device_memory,
        DeviceKind::Cuda => device_memory.saturating_sub(CUDA_RESERVE_BYTES),
    };
    let fits = |b: i64| {
        let r = RunShape {
            micro_batch: b.saturating_mul(run.rows_per_example.max(1)),
            ..run.clone()
        };
        plan(model, &r).total() <= budget
    };
    if !fits(1) {
        return None;
    }
    let (mut lo, mut hi) = (1i64, 2i64);
    while hi <= 1 << 20 && fits(hi) {
        lo = hi;
        hi *= 2;
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(lo)
}

/// Float32 scalars AdamW updates: the LoRA matrices, or every parameter.
fn trainable_scalars(model: &ModelShape, run: &RunShape) -> f64 {
    match &run.lora {
        None => model.parameters() as f64,
        Some((rank, targets)) => {
            let per_layer: i64 = targets
                .iter()
                .filter_map(|t| model.linear_shape(t))
                .map(|(i, o)| rank * (i + o))
                .sum();
            (per_layer * model.num_layers) as f64
        }
    }
}

/// `(adapter bytes, gradient bytes)`: LoRA weights and their gradients are float32; full
/// fine-tuning's gradients have the weights' dtype.
fn trainable(model: &ModelShape, run: &RunShape) -> (f64, f64) {
    let n = trainable_scalars(model, run);
    match run.lora {
        Some(_) => (n * F32, n * F32),
        None => (0.0, n * run.weight_bytes as f64),
    }
}

/// Everything saved for backward by a plain forward pass: every layer's graph, the rotary tables
/// the layers share, the masks.
fn plain_activations(model: &ModelShape, run: &RunShape) -> f64 {
    // The embedding's output needs a gradient only when the embedding trains (full fine-tuning).
    let first = layer_saved_bytes(model, run, run.lora.is_none());
    let rest = layer_saved_bytes(model, run, true);
    first + (model.num_layers - 1) as f64 * rest + shared_bytes(model, run)
}

/// Checkpointing keeps every layer's input and the last layer's output, then recomputes one layer
/// at a time with its input requiring a gradient, while the gradient from above is alive.
fn checkpointed_activations(model: &ModelShape, run: &RunShape) -> f64 {
    let hidden = run.tokens() * model.hidden_size as f64 * run.compute_bytes as f64;
    let one_layer = layer_saved_bytes(model, run, true) + hidden;
    (model.num_layers + 1) as f64 * hidden + one_layer + shared_bytes(model, run)
}

/// The rotary `cos`/`sin` of the pass and, with a mask, the batch's boolean mask and the copy with
/// the diagonal forced on (`training_mask`).
fn shared_bytes(model: &ModelShape, run: &RunShape) -> f64 {
    let rope = 2.0 * run.tokens() * model.head_dim as f64 * run.compute_bytes as f64;
    let mask = if run.attention_mask {
        2.0 * run.tokens() * run.seq_len as f64
    } else {
        0.0
    };
    rope + mask
}

/// Bytes one decoder layer's autograd graph saves for a micro-batch; `input_grad` says whether the
/// layer's input needs a gradient. Follows `DecoderLayer::forward`: which tensors are saved depends
/// on which inputs of each op require a gradient (see the module docs).
pub fn layer_saved_bytes(model: &ModelShape, run: &RunShape, input_grad: bool) -> f64 {
    let full = run.lora.is_none();
    let (h, i) = (model.hidden_size, model.intermediate_size);
    let mut bytes = rms_norm_saved(model, run, input_grad);
    let normed_grad = input_grad || full;
    bytes += projections_saved(model, run, &ATTENTION_INPUT, h, normed_grad);
    let qkv_grad = normed_grad || ATTENTION_INPUT.iter().any(|n| run.trains(n));
    if qkv_grad {
        bytes += attention_saved(model, run);
    }
    bytes += projections_saved(model, run, &["o_proj"], model.q_width(), qkv_grad);
    let residual_grad = input_grad || qkv_grad || run.trains("o_proj");
    bytes += rms_norm_saved(model, run, residual_grad);
    let normed_grad = residual_grad || full;
    bytes += projections_saved(model, run, &MLP_INPUT, h, normed_grad);
    let gate_grad = normed_grad || run.trains("gate_proj");
    let up_grad = normed_grad || run.trains("up_proj");
    // silu(gate) saves gate; silu(gate) · up saves each factor for the other's gradient.
    let per_row = [gate_grad, up_grad, gate_grad]
        .iter()
        .filter(|g| **g)
        .count() as f64;
    bytes += per_row * run.tokens() * i as f64 * run.compute_bytes as f64;
    bytes += projections_saved(model, run, &["down_proj"], i, gate_grad || up_grad);
    bytes
}

/// A quantized base's projection dequantizes its weight on every forward, and autograd keeps that
/// compute-dtype copy for the input's gradient: one whole weight per projection whose input needs
/// a gradient. (bitsandbytes dequantizes again in backward instead; tch has no custom autograd
/// function to do that.) Checkpointing bounds it to one layer's weights.
fn dequantized_saved(model: &ModelShape, run: &RunShape, names: &[&str], input_grad: bool) -> f64 {
    if run.base_quantization.is_none() || !input_grad {
        return 0.0;
    }
    let weights: i64 = names
        .iter()
        .filter_map(|n| model.linear_shape(n))
        .map(|(i, o)| i * o)
        .sum();
    weights as f64 * run.compute_bytes as f64
}

/// RMSNorm squares and scales a float32 copy of its input (the input itself in float32), saving it
/// and the per-row `rsqrt`; its weight's gradient (full fine-tuning) also needs the normalised rows.
fn rms_norm_saved(model: &ModelShape, run: &RunShape, input_grad: bool) -> f64 {
    let rows = run.tokens();
    let h = model.hidden_size as f64;
    let mut bytes = 0.0;
    if input_grad {
        bytes += rows * (h + 1.0) * F32;
    }
    if run.lora.is_none() {
        bytes += rows * h * run.compute_bytes as f64;
    }
    bytes
}

/// What linear layers `names`, which all read the same `width`-wide input, save. A trained base
/// weight saves the input (once for all of them); a LoRA adapter with dropout saves its own mask
/// (a float32 noise tensor on the CPU, where libtorch has no fused dropout; one byte per element
/// on CUDA; only when the input needs a gradient) and the dropped copy, without dropout the shared
/// input; and `A`'s output for `B`'s gradient. Over a quantized base, also each dequantized weight
/// ([`dequantized_saved`]).
fn projections_saved(
    model: &ModelShape,
    run: &RunShape,
    names: &[&str],
    width: i64,
    input_grad: bool,
) -> f64 {
    let c = run.compute_bytes as f64;
    let row = run.tokens() * width as f64;
    let mut keeps_input = run.lora.is_none();
    let mut bytes = 0.0;
    for _ in names.iter().filter(|n| run.adapted(n)) {
        let rank = run.lora.as_ref().map_or(0, |(r, _)| *r) as f64;
        bytes += run.tokens() * rank * c;
        if !run.lora_dropout {
            keeps_input = true;
            continue;
        }
        bytes += row * c;
        if input_grad {
            bytes += match run.device {
                DeviceKind::Cpu => row * c,
                DeviceKind::Cuda => row,
            };
        }
    }
    if keeps_input {
        bytes += row * c;
    }
    bytes + dequantized_saved(model, run, names, input_grad)
}

/// Attention saves the rotated queries, the keys and values as repeated for grouped-query heads
/// (full-width copies when heads share keys), its output, the float32 log-sum-exp, and with a
/// mask the compute-dtype copy SDPA makes of the boolean one.
fn attention_saved(model: &ModelShape, run: &RunShape) -> f64 {
    let c = run.compute_bytes as f64;
    let rows = run.tokens();
    let q = model.q_width() as f64;
    let kv = if model.num_heads == model.num_kv_heads {
        model.kv_width() as f64
    } else {
        q
    };
    let mask = if run.attention_mask {
        rows * run.seq_len as f64 * c
    } else {
        0.0
    };
    rows * (2.0 * q + 2.0 * kv) * c + rows * model.num_heads as f64 * F32 + mask
}

/// The loss head at its peak, in its backward: the float32 log-probabilities of the targets, the
/// loss's gradient and the log-softmax's gradient (plus the compute-dtype copies below float32);
/// with full fine-tuning the head's weight gradient also needs the normalised target rows.
fn head_peak(model: &ModelShape, run: &RunShape) -> f64 {
    let targets =
        run.micro_batch as f64 * (run.seq_len - 1).max(0) as f64 * run.supervised_fraction;
    let vocab = model.vocab_size as f64;
    let c = run.compute_bytes as f64;
    let mut per_target = 3.0 * vocab * F32;
    if c < F32 {
        per_target += vocab * c;
    }
    let h = model.hidden_size as f64;
    per_target += (h + 1.0) * F32;
    if run.lora.is_none() {
        per_target += 2.0 * h * c;
    }
    targets * per_target
}

/// One layer's backward on top of what is saved: the SwiGLU gradients, three `[tokens,
/// intermediate]` alive at once around `silu`'s backward.
fn layer_workspace(model: &ModelShape, run: &RunShape) -> f64 {
    3.0 * run.tokens() * model.intermediate_size as f64 * run.compute_bytes as f64
}

/// One change to a run that does not fit, with the peak it would have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fix {
    /// The spec change, as a person would write it (`hyperparameters.gradientCheckpointing: true`).
    pub change: String,
    /// The predicted peak with the change.
    pub total: u64,
    /// Whether one micro-batch fits `device_memory` with it.
    pub fits: bool,
}

/// The single changes that bring `run` closer to fitting `device_memory`: one sequence per
/// forward pass, activation checkpointing (at one sequence), the longest `maxSeqLength` that fits
/// with both, and LoRA instead of full fine-tuning. The trainer's `plan` and the operator's
/// `WillNotFit` both say these, so a person gets the same advice from either.
pub fn fixes(model: &ModelShape, run: &RunShape, device_memory: u64) -> Vec<Fix> {
    let fix = |change: String, r: &RunShape| Fix {
        change,
        total: plan(model, r).total(),
        fits: largest_micro_batch(model, r, device_memory).is_some(),
    };
    // One example per forward pass: one row, or a DPO pair's two.
    let one = RunShape {
        micro_batch: run.rows_per_example.max(1),
        ..run.clone()
    };
    let mut out = Vec::new();
    if run.micro_batch > one.micro_batch {
        out.push(fix("hyperparameters.microBatchSize: 1".into(), &one));
    }
    let checkpointed = RunShape {
        gradient_checkpointing: true,
        ..one.clone()
    };
    if !run.gradient_checkpointing {
        out.push(fix(
            "hyperparameters.gradientCheckpointing: true".into(),
            &checkpointed,
        ));
    }
    let shorter = std::iter::successors(Some(run.seq_len / 2), |s| Some(s / 2))
        .take_while(|&s| s >= 64)
        .map(|seq_len| RunShape {
            seq_len,
            ..checkpointed.clone()
        })
        .find(|r| largest_micro_batch(model, r, device_memory).is_some());
    if let Some(r) = shorter {
        out.push(fix(
            format!(
                "hyperparameters.maxSeqLength: {} with checkpointing",
                r.seq_len
            ),
            &r,
        ));
    }
    if run.lora.is_some() && run.base_quantization.is_none() {
        let qlora = RunShape {
            base_quantization: Some(BaseQuantization::Nf4),
            ..checkpointed.clone()
        };
        out.push(fix(
            "adapter.lora.baseQuantization: nf4 with checkpointing".into(),
            &qlora,
        ));
    }
    if run.lora.is_none() {
        let lora = RunShape {
            lora: Some((16, ATTENTION_INPUT.iter().map(|s| s.to_string()).collect())),
            ..one
        };
        out.push(fix("adapter.type: lora".into(), &lora));
    }
    out
}

/// Parses a Kubernetes-style byte quantity: `80Gi`, `141G`, `8000Mi`, `512k`, `2GiB`, plain bytes.
pub fn parse_quantity(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|ch: char| !(ch.is_ascii_digit() || ch == '.'))
        .unwrap_or(t.len());
    let (number, suffix) = t.split_at(split);
    // `2GiB` and `2GB` as people write them, beside Kubernetes' `2Gi` and `2G`.
    let suffix = suffix
        .strip_suffix('B')
        .filter(|s| !s.is_empty())
        .unwrap_or(suffix);
    let scale: u64 = match suffix {
        "" => 1,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => {
            return Err(format!(
                "`{s}`: unknown unit `{suffix}` (use bytes or k, M, G, T, Ki, Mi, Gi, Ti)"
            ));
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a quantity like 80Gi, 141G or 8000Mi"))?;
    let bytes = value * scale as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 / 2.0 {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn smollm2() -> ModelShape {
        ModelShape::from_config_json(&json!({
            "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
            "tie_word_embeddings": true
        }))
        .unwrap()
    }

    fn lora_run(batch: i64, seq: i64) -> RunShape {
        RunShape {
            micro_batch: batch,
            rows_per_example: 1,
            seq_len: seq,
            gradient_checkpointing: false,
            lora: Some((16, LLAMA_TARGETS.map(String::from).to_vec())),
            lora_dropout: true,
            weight_bytes: 4,
            compute_bytes: 4,
            device: DeviceKind::Cpu,
            supervised_fraction: 1.0,
            attention_mask: false,
            base_quantization: None,
        }
    }

    #[test]
    fn an_nf4_base_holds_the_decoder_linears_in_about_a_quarter_of_bf16() {
        let model = smollm2();
        let bf16 = RunShape {
            weight_bytes: 2,
            compute_bytes: 2,
            device: DeviceKind::Cuda,
            ..lora_run(1, 256)
        };
        let nf4 = RunShape {
            base_quantization: Some(BaseQuantization::Nf4),
            ..bf16.clone()
        };
        let (a, b) = (plan(&model, &bf16).weights, plan(&model, &nf4).weights);
        let linear = model.linear_parameters() as f64;
        let saved = (2.0 - NF4_BYTES_PER_WEIGHT) * linear;
        assert!(((a - b) as f64 - saved).abs() < 1.0, "{a} {b}");
        // The embedding stays bf16, so the whole is more than a quarter.
        assert!(
            b as f64 > a as f64 / 4.0 && (b as f64) < a as f64 / 2.0,
            "{a} {b}"
        );
    }

    const LLAMA_TARGETS: [&str; 7] = crate::training::LLAMA_LINEAR_MODULES;

    #[test]
    fn smollm2_135m_has_its_published_parameter_count() {
        let m = smollm2();
        assert_eq!(m.head_dim, 64);
        assert_eq!(m.parameters(), 134_515_008);
    }

    #[test]
    fn config_errors_name_the_key_and_never_panic() {
        let err = |v: serde_json::Value| ModelShape::from_config_json(&v).unwrap_err();
        assert!(err(json!({})).contains("hidden_size"));
        assert!(err(json!({"hidden_size": -3})).contains("hidden_size"));
        let base = json!({"vocab_size": 10, "hidden_size": 64, "intermediate_size": 8,
                          "num_hidden_layers": 2, "num_attention_heads": 6});
        assert!(err(base.clone()).contains("head_dim"));
        let mut v = base.clone();
        v["num_attention_heads"] = json!(4);
        v["num_key_value_heads"] = json!(3);
        assert!(err(v.clone()).contains("num_key_value_heads"));
        v["num_key_value_heads"] = json!("2");
        assert!(err(v.clone()).contains("num_key_value_heads"));
        v["num_key_value_heads"] = json!(2);
        v["num_hidden_layers"] = json!(1u64 << 40);
        assert!(err(v.clone()).contains("num_hidden_layers"));
        v["num_hidden_layers"] = json!(2);
        v["tie_word_embeddings"] = json!(1);
        assert!(err(v).contains("tie_word_embeddings"));
    }

    #[test]
    fn checkpointing_keeps_one_layer_instead_of_thirty() {
        let m = smollm2();
        let mut run = lora_run(1, 1024);
        let plain = plan(&m, &run);
        run.gradient_checkpointing = true;
        let ckpt = plan(&m, &run);
        assert!(
            plain.activations > 10 * ckpt.activations,
            "{plain:?} {ckpt:?}"
        );
        assert_eq!(plain.per_token_plain, ckpt.per_token_plain);
        assert_eq!(
            ckpt.activation_bytes_per_token(true),
            ckpt.per_token_checkpointed
        );
        assert_eq!(plain.weights, ckpt.weights);
    }

    #[test]
    fn lora_dropout_costs_a_mask_and_a_copy_per_adapted_projection() {
        let m = smollm2();
        let with = lora_run(1, 256);
        let without = RunShape {
            lora_dropout: false,
            ..with.clone()
        };
        let (a, b) = (plan(&m, &with).activations, plan(&m, &without).activations);
        assert!(a > b);
        // Dropout replaces the shared normalised input of q/k/v (and of gate/up) by per-projection
        // masks and copies: 6 − 1 rows of hidden width, 4 − 1, 2·q − q, 2·I − I per token.
        let h = 576.0;
        let rows_per_token = 5.0 * h + 3.0 * h + 576.0 + 1536.0;
        // Layer 0: q/k/v read the frozen embedding's rows, so they draw no saved mask.
        let layers = 29.0 * rows_per_token + (rows_per_token - 3.0 * h);
        let expect = 256.0 * 4.0 * layers;
        assert!(
            ((a - b) as f64 - expect).abs() < 1.0,
            "{} vs {expect}",
            a - b
        );
    }

    #[test]
    fn a_mask_costs_one_compute_dtype_copy_per_layer_not_a_softmax() {
        let m = smollm2();
        let mut run = lora_run(1, 1024);
        let plain = plan(&m, &run);
        run.attention_mask = true;
        let masked = plan(&m, &run);
        // Per layer one float copy of the [1, 1, 1024, 1024] mask; shared: the two boolean masks.
        let expect = 30 * 1024 * 1024 * 4 + 2 * 1024 * 1024;
        assert_eq!(masked.activations - plain.activations, expect);
    }

    #[test]
    fn full_fine_tuning_pays_gradients_and_two_moments_per_parameter() {
        let m = smollm2();
        let run = RunShape {
            lora: None,
            lora_dropout: false,
            ..lora_run(1, 128)
        };
        let p = plan(&m, &run);
        let n = m.parameters() as u64;
        assert_eq!(p.weights, 4 * n);
        assert_eq!(p.gradients, 4 * n);
        assert_eq!(p.optimizer, 8 * n);
        assert_eq!(p.adapter, 0);
    }

    #[test]
    fn the_largest_micro_batch_fits_and_one_more_does_not() {
        let m = smollm2();
        let run = lora_run(1, 1024);
        let budget = 16 * GIB;
        let b = largest_micro_batch(&m, &run, budget).unwrap();
        let at = |b| {
            plan(
                &m,
                &RunShape {
                    micro_batch: b,
                    ..run.clone()
                },
            )
            .total()
        };
        assert!(at(b) <= budget && at(b + 1) > budget, "{b}");
        assert_eq!(largest_micro_batch(&m, &run, GIB / 2), None);
    }

    #[test]
    fn a_dpo_micro_batch_is_counted_in_pairs_and_one_pair_is_the_smallest_fix() {
        let m = smollm2();
        let pairs = |n: i64| RunShape {
            micro_batch: 2 * n,
            rows_per_example: 2,
            ..lora_run(1, 1024)
        };
        let budget = 16 * GIB;
        let b = largest_micro_batch(&m, &pairs(1), budget).unwrap();
        assert!(plan(&m, &pairs(b)).total() <= budget, "{b}");
        assert!(plan(&m, &pairs(b + 1)).total() > budget, "{b}");
        // Already one pair per pass: nothing smaller to offer.
        let fixes_at_one = fixes(&m, &pairs(1), GIB);
        assert!(
            !fixes_at_one
                .iter()
                .any(|f| f.change.contains("microBatchSize")),
            "{fixes_at_one:?}"
        );
        // Four pairs per pass: the fix is one pair, two rows, not half a pair.
        let fix = fixes(&m, &pairs(4), GIB)
            .into_iter()
            .find(|f| f.change == "hyperparameters.microBatchSize: 1")
            .unwrap();
        assert_eq!(fix.total, plan(&m, &pairs(1)).total());
    }

    #[test]
    fn a_quantized_base_keeps_its_dequantized_weights_for_backward_unless_checkpointed() {
        let model = smollm2();
        let nf4 = RunShape {
            base_quantization: Some(BaseQuantization::Nf4),
            ..lora_run(1, 256)
        };
        let float = lora_run(1, 256);
        let extra = plan(&model, &nf4).activations - plan(&model, &float).activations;
        // Every projection but the first layer's q/k/v (its input needs no gradient under LoRA).
        let first_qkv: i64 = ATTENTION_INPUT
            .iter()
            .filter_map(|n| model.linear_shape(n))
            .map(|(i, o)| i * o)
            .sum();
        let expected = 4 * (model.linear_parameters() - first_qkv);
        assert_eq!(extra, expected as u64);
        let ckpt = |r: &RunShape| RunShape {
            gradient_checkpointing: true,
            ..r.clone()
        };
        let extra_ckpt =
            plan(&model, &ckpt(&nf4)).activations - plan(&model, &ckpt(&float)).activations;
        assert_eq!(
            extra_ckpt,
            (4 * model.linear_parameters() / model.num_layers) as u64
        );
    }

    #[test]
    fn a_70b_config_plans_without_overflow() {
        let m = ModelShape::from_config_json(&json!({
            "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672,
            "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8
        }))
        .unwrap();
        let run = RunShape {
            device: DeviceKind::Cuda,
            weight_bytes: 2,
            compute_bytes: 2,
            seq_len: 1 << 20,
            micro_batch: 1 << 20,
            ..lora_run(1, 1)
        };
        let p = plan(&m, &run);
        assert!(p.weights > 140_000_000_000);
        assert!(p.total() >= p.weights);
        assert_eq!(largest_micro_batch(&m, &run, 80 * GIB), None);
    }

    #[test]
    fn quantities_parse_like_kubernetes() {
        assert_eq!(parse_quantity("80Gi"), Ok(80 * GIB));
        assert_eq!(parse_quantity("141G"), Ok(141_000_000_000));
        assert_eq!(parse_quantity("8000Mi"), Ok(8000 * MIB));
        assert_eq!(parse_quantity("1.5Gi"), Ok(3 * GIB / 2));
        assert_eq!(parse_quantity("12345"), Ok(12345));
        assert_eq!(parse_quantity("2GiB"), Ok(2 * GIB));
        assert_eq!(parse_quantity("2GB"), Ok(2_000_000_000));
        for bad in ["", "Gi", "80Gb", "-1Gi", "1e400", "0", "B", "3BB"] {
            assert!(parse_quantity(bad).is_err(), "{bad}");
        }
    }
}
