//! Everything between the [`Plan`] and the first step, in the order it has always run (the RNG
//! is seeded between the guards' generation and the adapter's initialisation, so the order is
//! part of the result): the model ([`load_model`]), the data ([`load_data`]), the probes
//! ([`probes`]), the forgetting guards ([`guards`]), the trainable parameters and the optimizer
//! ([`trainable`]), the batches and the schedule ([`batches`]) and DPO's reference ([`dpo`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use finetune_crds::training::{
    AdapterType, BaseQuantization, ForgettingGuard, GuardAction, Precision,
};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::data::mixture::{SourceReport, prepare_mixture};
use crate::data::{
    Batch, BatchPlan, Batcher, Encoder, Origin, Prepared, PreparedPairs, Sample, build_batch,
    prepare_preference, prepare_sft,
};
use crate::export;
use crate::load::ModelSource;
use crate::model::lora::LoraExpectation;
use crate::model::{CausalLm, LoraConfig};
use crate::text::{ChatTemplate, TextTokenizer};
use crate::train::anchor::{DISTILL_PER_STEP, L2ToInit, LayerAnchor, SelfDistillation};
use crate::train::dpo::{Dpo, DpoConfig, PairSet, ReferenceMode};
use crate::train::general;
use crate::train::guard::{self, GuardSource, Replay};
use crate::train::optim::AdamW;
use crate::train::plan::{Plan, Schedule, TrainFiles, config_digest};
use crate::train::probe::Probe;
use crate::train::retention::RetentionSet;
use crate::train::stop::{Stop, invalid};
use crate::train::trainer::RETENTION_TOKENS;
use crate::train::vocab;

/// Where a DPO run without an adapter to switch off caches its reference log-probs (in the
/// checkpoint directory, so a resumed attempt measures rewards from the same reference).
const DPO_REFERENCE_FILE: &str = "dpo_reference_logps.json";

/// The loaded base model and what came with it.
pub struct Loaded {
    pub model: CausalLm,
    pub tokenizer: TextTokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub eos_ids: Vec<i64>,
    pub device: Device,
    pub kind: Kind,
    /// What `baseModel.ropeScaling` did (null when nothing), for the summary.
    pub rope_scaling: Value,
    pub vocab: Option<vocab::Expansion>,
    /// When loading began: the summary's `load_seconds` run until the batches are ready.
    pub started: Instant,
}

impl Loaded {
    /// The data encoder. Built from the fields (not `&self`) so that the model can be borrowed
    /// mutably beside it.
    fn encoder<'a>(
        tokenizer: &'a TextTokenizer,
        template: Option<&'a ChatTemplate>,
        plan: &Plan,
    ) -> Encoder<'a> {
        Encoder {
            tokenizer,
            template,
            options: plan.data.load,
        }
    }
}

fn pick_device(plan: &Plan) -> Result<(Device, Kind), Stop> {
    let (device, _) = crate::load::pick_device(&plan.device)?;
    let kind = match resolved_precision(plan, device.is_cuda()) {
        Precision::Bf16 => Kind::BFloat16,
        _ => Kind::Float,
    };
    Ok((device, kind))
}

/// `hyperparameters.precision` made concrete on this machine (`Precision::resolve`).
pub fn resolved_precision(plan: &Plan, on_cuda: bool) -> Precision {
    let native_bf16 = !on_cuda && crate::load::cpu_has_native_bf16();
    plan.hp()
        .precision
        .resolve(on_cuda, plan.spec().adapter.kind, native_bf16)
}

/// How a LoRA run holds its frozen base (`adapter.lora.baseQuantization`); `None` for full-precision.
fn base_quantization(plan: &Plan) -> Option<BaseQuantization> {
    let adapter = &plan.spec().adapter;
    (adapter.kind == AdapterType::Lora)
        .then(|| adapter.lora.as_ref().and_then(|l| l.base_quantization))
        .flatten()
}

/// The base model, with `ropeScaling` applied and the vocabulary expanded (before any text is
/// encoded: the added tokens must be in the tokenizer).
pub fn load_model(plan: &Plan) -> Result<Loaded, Stop> {
    let spec = plan.spec();
    let hp = plan.hp();
    let (device, kind) = pick_device(plan)?;
    eprintln!(
        "job {} (attempt {}): model {}, {device:?} {kind:?}",
        plan.name,
        plan.attempt,
        plan.model_path.display()
    );
    let started = Instant::now();
    let source = ModelSource::open(&plan.model_path)?;
    let base = base_quantization(plan);
    if base == Some(BaseQuantization::Gguf) && !matches!(source, ModelSource::Gguf(_)) {
        return Err(invalid(
            format!(
                "adapter.lora.baseQuantization: gguf trains on a GGUF file's own quantized blocks, \
                 but the base model {} is a Hugging Face directory: use nf4 or int8 with it",
                plan.model_path.display()
            ),
            "spec.adapter.lora.baseQuantization",
        ));
    }
    let mut loaded = source.load_with(kind, device, base)?;
    let rope_scaling = crate::train::long_context::apply(
        &mut loaded.model,
        spec.base_model.rope_scaling.as_ref(),
        hp.max_seq_length.into(),
        spec.output.gguf.is_some(),
    )
    .map_err(|e| invalid(e.message, e.field))?;
    let vocab = match &spec.vocabulary {
        Some(v) => {
            let file = v
                .tokenizer
                .as_ref()
                .map(|d| plan.resolve(&d.uri, "spec.vocabulary.tokenizer.uri"))
                .transpose()?;
            let lora = matches!(spec.adapter.kind, AdapterType::Lora);
            Some(
                vocab::expand(v, file.as_deref(), lora, &mut loaded, &plan.model_path)
                    .map_err(|e| invalid(e.message, &e.field))?,
            )
        }
        None => None,
    };
    Ok(Loaded {
        model: loaded.model,
        tokenizer: loaded.tokenizer,
        chat_template: loaded.chat_template,
        eos_ids: loaded.eos_ids,
        device,
        kind,
        rope_scaling,
        vocab,
        started,
    })
}

/// The prepared data. DPO: the pairs themselves go to the objective; `prepared` holds their
/// chosen sides, which order the batches and feed the generation eval.
pub struct Data {
    pub prepared: Prepared,
    pub pairs: Option<PreparedPairs>,
    /// What each source of a mixture gave (empty for one file).
    pub sources: Vec<SourceReport>,
}

/// Reads, curates and splits the data; refuses contaminated eval data under `action: fail` and
/// an empty training set.
pub fn load_data(plan: &Plan, m: &Loaded) -> Result<Data, Stop> {
    let spec = plan.spec();
    let encoder = Loaded::encoder(&m.tokenizer, m.chat_template.as_ref(), plan);
    let eval_path = plan.eval_path.as_deref();
    let mut sources = Vec::new();
    let (mut prepared, mut pairs) = match &plan.train {
        TrainFiles::One(path) if plan.is_dpo => {
            let p = prepare_preference(path, eval_path, &encoder, &plan.data)?;
            (Prepared::chosen_sides(&p), Some(p))
        }
        TrainFiles::One(path) => (prepare_sft(path, eval_path, &encoder, &plan.data)?, None),
        TrainFiles::Mixture(_) if plan.is_dpo => {
            return Err(invalid(
                "DPO reads one preference file: use dataset.train.uri, not sources",
                "spec.dataset.train.sources",
            ));
        }
        TrainFiles::Mixture(mix) => {
            let (prepared, reports) = prepare_mixture(mix, eval_path, &encoder, &plan.data)?;
            for (i, r) in reports.iter().enumerate() {
                eprintln!(
                    "mixture source {i} ({}): {} samples, {} drawn per epoch; digest {}",
                    r.path.display(),
                    r.available,
                    r.drawn,
                    r.digest
                );
            }
            sources = reports;
            (prepared, None)
        }
    };
    if let Some(max) = spec.dataset.max_samples {
        prepared.train.truncate(max as usize);
        if let Some(p) = pairs.as_mut() {
            p.train.truncate(max as usize);
        }
    }
    eprintln!("train data: {}", prepared.train_stats.summary());
    if let Some(s) = &prepared.eval_stats {
        eprintln!("eval data: {}", s.summary());
    }
    if let Some(report) = &prepared.contamination
        && report.count() > 0
    {
        match plan.evaluation.contamination.as_ref().map(|c| c.action) {
            Some(GuardAction::Fail) => {
                return Err(Stop::Invalid {
                    message: format!("eval data overlaps the training data: {}", report.summary()),
                    param: Some(
                        report
                            .first_origin()
                            .map_or_else(|| "spec.dataset.eval".into(), str::to_string),
                    ),
                });
            }
            _ => eprintln!("warning: {}", report.summary()),
        }
    }
    if prepared.train.is_empty() {
        return Err(invalid(
            "no training samples left after curation",
            "spec.dataset.train.uri",
        ));
    }
    Ok(Data {
        prepared,
        pairs,
        sources,
    })
}

/// The retention and generation evaluations.
#[derive(Default)]
pub struct Probes {
    /// The retention data set (`evaluation.retention`), if any.
    pub retention: Option<RetentionSet>,
    /// Its texts as samples, for the retention loss.
    pub retention_set: Vec<Sample>,
    /// Its questions, answered greedily (references: the base model's answers).
    pub retention_probe: Probe,
    pub retention_keys: Vec<Vec<String>>,
    /// Answer the probe in full instead of stopping at a key: the references are whole answers
    /// (see [`crate::train::state::TrainState::retention_references_settled`]).
    pub whole_answers: bool,
    /// `minScore` and what to do below it.
    pub retention_floor: Option<(f64, GuardAction)>,
    pub generation_probe: Probe,
    pub generation_tokens: usize,
}

impl Probes {
    /// `model`'s answers to the retention probe's questions, each stopping once it holds one of
    /// its keys ([`Probe::answer_until_correct`]) unless `whole_answers`, at most
    /// [`RETENTION_TOKENS`] tokens.
    pub fn retention_answers(
        &self,
        model: &mut CausalLm,
        tokenizer: &TextTokenizer,
        eos_ids: &[i64],
    ) -> crate::error::Result<Vec<String>> {
        let keys: &[Vec<String>] = if self.whole_answers {
            &[]
        } else {
            &self.retention_keys
        };
        let probe = &self.retention_probe;
        probe.answer_until_correct(model, tokenizer, eos_ids, RETENTION_TOKENS, keys)
    }
}

pub fn probes(plan: &Plan, m: &Loaded, prepared: &Prepared) -> Result<Probes, Stop> {
    let evaluation = &plan.evaluation;
    let retention = match &evaluation.retention {
        Some(r) => Some(match &r.data {
            Some(d) => RetentionSet::from_jsonl(
                &plan.resolve(&d.uri, "spec.evaluation.retention.data.uri")?,
            )?,
            None => RetentionSet::builtin(),
        }),
        None => None,
    };
    let retention_set = match &retention {
        Some(r) => retention_samples(&m.tokenizer, r)?,
        None => Vec::new(),
    };
    let retention_probe = match &retention {
        Some(r) => Probe::from_questions(&r.questions, &m.tokenizer, m.chat_template.as_ref())?,
        None => Probe::default(),
    };
    let retention_keys: Vec<Vec<String>> = retention
        .as_ref()
        .map(|r| r.answer_keys.clone())
        .unwrap_or_default();
    let retention_floor = evaluation
        .retention
        .as_ref()
        .and_then(|r| r.min_score.map(|m| (m, r.action)));
    let generation_probe = match &evaluation.generation {
        Some(g) => {
            let p = Probe::from_samples(&prepared.eval, &m.tokenizer, g.max_samples as usize)?;
            if p.is_empty() {
                eprintln!(
                    "warning: evaluation.generation: no eval prompts (it needs chat or instruction eval data)"
                );
            }
            p
        }
        None => Probe::default(),
    };
    let generation_tokens = evaluation
        .generation
        .as_ref()
        .map_or(0, |g| g.max_new_tokens as usize);
    Ok(Probes {
        retention,
        retention_set,
        retention_probe,
        retention_keys,
        whole_answers: false,
        retention_floor,
        generation_probe,
        generation_tokens,
    })
}

fn retention_samples(tok: &TextTokenizer, set: &RetentionSet) -> Result<Vec<Sample>, Stop> {
    let origin_path: Arc<Path> = Arc::from(Path::new(&set.source));
    set.texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let ids = tok.encode(t, true)?;
            let sup = vec![true; ids.len()];
            Ok(Sample::new(
                ids,
                sup,
                Origin {
                    path: origin_path.clone(),
                    line: i + 1,
                },
            ))
        })
        .collect()
}

/// The least number of distinct replay requests a run asks the base model.
const MIN_REPLAY_PROMPTS: usize = 40;

/// How many distinct requests self-replay should ask the base model: one per replay turn the run
/// will take (an upper estimate: one batch per `batchSize` samples, before packing), so no
/// request is rehearsed twice while the replay part of the general set lasts.
fn replay_turns(plan: &Plan, train_samples: usize, ratio: f64) -> usize {
    let hp = plan.hp();
    let per_step = ratio * f64::from(hp.batch_size * hp.gradient_accumulation_steps);
    ((optimizer_steps(plan, train_samples) * per_step).ceil() as usize).max(MIN_REPLAY_PROMPTS)
}

/// Most distinct requests self-distillation asks the base model. The base's log-probabilities on
/// its answers are kept in host memory, about 17 × vocabulary × 4 bytes a conversation (300 MiB
/// for 120 with SmolLM2's 49k vocabulary, 1 GiB with Llama 3's 128k).
const MAX_DISTILL_PROMPTS: usize = 120;

/// How many distinct requests self-distillation asks the base model: one per conversation the
/// run will score ([`DISTILL_PER_STEP`] a step), so none is scored twice, within
/// [`MIN_REPLAY_PROMPTS`]..=[`MAX_DISTILL_PROMPTS`]. On the dates task (60 steps) distinct
/// conversations kept 145 of 159 held-out answers where 40 in turn, two a step, kept 142.
fn distill_turns(plan: &Plan, train_samples: usize) -> usize {
    let turns = optimizer_steps(plan, train_samples) * DISTILL_PER_STEP as f64;
    (turns.ceil() as usize).clamp(MIN_REPLAY_PROMPTS, MAX_DISTILL_PROMPTS)
}

/// The run's optimizer steps (an upper estimate: one batch per `batchSize` samples, before
/// packing).
fn optimizer_steps(plan: &Plan, train_samples: usize) -> f64 {
    let hp = plan.hp();
    let batches = train_samples.div_ceil(hp.batch_size.max(1) as usize);
    Schedule::new(hp, batches as i64).total.max(0) as f64
}

/// The forgetting guards in effect and what they recorded from the base model.
pub struct Guards {
    pub effective: ForgettingGuard,
    pub source: GuardSource,
    /// Self-replay: the base model's own answers, joined to every step.
    pub replay: Option<Replay>,
    pub distill: Option<SelfDistillation>,
    /// Set by [`trainable`]: it needs the parameters before any update.
    pub l2: Option<L2ToInit>,
    /// The general conversations the layer anchor sketches each layer's inputs on.
    anchor_text: AnchorText,
    /// Set by [`trainable`] from `anchor_text`, once the adapters exist.
    pub anchor: Option<LayerAnchor>,
}

/// Whose general conversations the layer anchor sketches.
enum AnchorText {
    /// Self-replay's base answers.
    Replay,
    /// Self-distillation's: one forward of the base then serves both guards.
    Distill,
    /// Base answers of its own, when neither of the others runs.
    Own(Vec<Sample>),
}

impl Guards {
    /// The conversations the layer anchor sketches (empty without one).
    fn anchor_samples(&self) -> &[Sample] {
        match &self.anchor_text {
            AnchorText::Replay => self.replay.as_ref().map_or(&[], |r| r.samples()),
            AnchorText::Distill => self.distill.as_ref().map_or(&[], |d| d.samples()),
            AnchorText::Own(samples) => samples,
        }
    }
}

/// The guards, with the base model's answers generated (or read from their cache) before any
/// update.
pub fn guards(plan: &Plan, m: &mut Loaded, train_samples: usize) -> Result<Guards, Stop> {
    let spec = plan.spec();
    let hp = plan.hp();
    let encoder = Loaded::encoder(&m.tokenizer, m.chat_template.as_ref(), plan);
    let lora_sft = !plan.is_dpo && spec.adapter.kind == AdapterType::Lora;
    let (mut effective, source) = guard::effective(
        spec.forgetting_guard.as_ref(),
        lora_sft,
        encoder.template.is_some(),
    );
    if source == GuardSource::Default {
        eprintln!(
            "forgetting guard: default selfDistillation (weight {}, base answers up to {} tokens) and layerAnchor (weight {}); name a guard in spec.forgettingGuard, or set forgettingGuard.disabled: true to train without one",
            finetune_crds::training::DEFAULT_DISTILL_WEIGHT,
            guard::DISTILL_TOKENS,
            finetune_crds::training::DEFAULT_ANCHOR_WEIGHT
        );
    }
    let mut replay = None;
    if let Some(r) = &effective.self_replay {
        let t = Instant::now();
        let per_step = hp.batch_size as usize * hp.gradient_accumulation_steps as usize;
        let samples = base_answers(
            plan,
            (&mut m.model, &m.eos_ids),
            &encoder,
            &guard::replay_cache_path(&plan.checkpoint_dir),
            (
                replay_turns(plan, train_samples, r.ratio),
                r.answer_tokens as usize,
            ),
            "spec.forgettingGuard.selfReplay",
        )?;
        let r = Replay::new(samples, r.ratio, per_step, r.weight);
        eprintln!(
            "self-replay: {} base answers, {:.2} replayed per step at weight {} ({:.1}s)",
            r.len(),
            r.ratio_per_step(),
            r.weight,
            t.elapsed().as_secs_f64()
        );
        replay = Some(r);
    }
    let distill = match &effective.self_distillation {
        Some(g) => self_distillation(
            plan,
            (&mut m.model, &m.eos_ids),
            &encoder,
            (distill_turns(plan, train_samples), g.weight),
            source,
        )?,
        None => None,
    };
    if distill.is_none() {
        effective.self_distillation = None;
    }
    let anchor_text = match &effective.layer_anchor {
        Some(_) => anchor_text(
            plan,
            (&mut m.model, &m.eos_ids),
            &encoder,
            (replay.as_ref(), distill.as_ref()),
            source,
        )?,
        None => AnchorText::Own(Vec::new()),
    };
    let mut guards = Guards {
        effective,
        source,
        replay,
        distill,
        l2: None,
        anchor_text,
        anchor: None,
    };
    if guards.anchor_samples().is_empty() {
        guards.effective.layer_anchor = None;
    }
    Ok(guards)
}

/// The general conversations the layer anchor sketches: self-replay's when the run replays, else
/// self-distillation's, else the base model's answers to [`MIN_REPLAY_PROMPTS`] requests of the
/// replay part (cached); none when the default guard's base had no usable answer.
fn anchor_text(
    plan: &Plan,
    (model, eos_ids): (&mut CausalLm, &[i64]),
    encoder: &Encoder,
    (replay, distill): (Option<&Replay>, Option<&SelfDistillation>),
    source: GuardSource,
) -> Result<AnchorText, Stop> {
    if replay.is_some_and(|r| !r.is_empty()) {
        return Ok(AnchorText::Replay);
    }
    if distill.is_some_and(|d| !d.is_empty()) {
        return Ok(AnchorText::Distill);
    }
    let cache = guard::anchor_cache_path(&plan.checkpoint_dir);
    let field = "spec.forgettingGuard.layerAnchor";
    let answer_tokens = finetune_crds::training::default_replay_answer_tokens() as usize;
    let samples = base_answers(
        plan,
        (model, eos_ids),
        encoder,
        &cache,
        (MIN_REPLAY_PROMPTS, answer_tokens),
        field,
    )?;
    let usable = some_answers(
        &samples,
        (&cache, source),
        "layerAnchor has no general text to anchor on",
        field,
    )?;
    Ok(AnchorText::Own(if usable { samples } else { Vec::new() }))
}

/// The base model's answers (up to `answer_tokens` tokens) to `prompts` requests of the general
/// set's replay part, as chat samples that fit `maxSeqLength`: generated once, then read from
/// `cache`. Errors name `field`, the guard that asked.
fn base_answers(
    plan: &Plan,
    (model, eos_ids): (&mut CausalLm, &[i64]),
    encoder: &Encoder,
    cache: &Path,
    (prompts, answer_tokens): (usize, usize),
    field: &str,
) -> Result<Vec<Sample>, Stop> {
    let max_seq = plan.hp().max_seq_length as usize;
    let prompts = general::replay_prompts(prompts, plan.seed);
    let mut samples = guard::replay_samples(model, encoder, eos_ids, cache, prompts, answer_tokens)
        .map_err(|e| invalid(e.to_string(), field))?;
    samples.retain(|s| s.len() <= max_seq);
    Ok(samples)
}

/// Whether a guard's base answers are usable. Empty answers would anchor nothing: a guard the
/// spec names is refused; the default's is dropped with a warning (a base model that cannot
/// answer general requests, such as a random test model, still trains).
fn some_answers(
    samples: &[Sample],
    (cache, source): (&Path, GuardSource),
    consequence: &str,
    field: &str,
) -> Result<bool, Stop> {
    if !samples.is_empty() {
        return Ok(true);
    }
    let why = format!(
        "the base model gave no usable answer to the general requests (all empty or longer than maxSeqLength; see {}), so {consequence}",
        cache.display()
    );
    if source == GuardSource::Default {
        eprintln!("warning: {why}: the default guard trains without it ({field})");
        return Ok(false);
    }
    Err(invalid(why, field))
}

/// Self-distillation's base answers (`None` when the default guard had none to score).
fn self_distillation(
    plan: &Plan,
    (model, eos_ids): (&mut CausalLm, &[i64]),
    encoder: &Encoder,
    (prompts, weight): (usize, f64),
    source: GuardSource,
) -> Result<Option<SelfDistillation>, Stop> {
    let t = Instant::now();
    let cache = guard::distill_cache_path(&plan.checkpoint_dir);
    let field = "spec.forgettingGuard.selfDistillation";
    let samples = base_answers(
        plan,
        (model, eos_ids),
        encoder,
        &cache,
        (prompts, guard::DISTILL_TOKENS),
        field,
    )?;
    if !some_answers(
        &samples,
        (&cache, source),
        "selfDistillation has nothing to anchor",
        field,
    )? {
        return Ok(None);
    }
    eprintln!(
        "self-distillation: {} base answers, weight {weight} ({:.1}s)",
        samples.len(),
        t.elapsed().as_secs_f64()
    );
    Ok(Some(SelfDistillation::new(samples, weight)))
}

/// The LoRA settings of the adapter a run starts from (`initAdapter`): its own
/// `adapter_config.json` decides rank, alpha, targets and rsLoRA, since its weights have those
/// shapes; settings also given in the spec must agree. The spec's dropout applies when given.
fn init_lora_config(
    dir: &Path,
    from_spec: LoraConfig,
    spec_given: bool,
) -> Result<LoraConfig, Stop> {
    let (saved, _) = export::read_peft_adapter(dir)?;
    if spec_given && saved.mismatch(&LoraExpectation::from(&from_spec)).is_some() {
        let mut a = saved.target_modules.clone();
        let mut b = from_spec.target_modules.clone();
        a.sort();
        b.sort();
        return Err(invalid(
            format!(
                "adapter.lora (rank {}, alpha {}, rslora {}, targets {:?}) disagrees with the initAdapter's adapter_config.json in {} (rank {}, alpha {}, rslora {}, targets {:?}); leave adapter.lora out to continue with the adapter's settings",
                from_spec.rank,
                from_spec.alpha,
                from_spec.rslora,
                b,
                dir.display(),
                saved.rank,
                saved.alpha,
                saved.rslora,
                a
            ),
            "spec.adapter.lora",
        ));
    }
    Ok(LoraConfig {
        dropout: if spec_given {
            from_spec.dropout
        } else {
            saved.dropout
        },
        ..saved
    })
}

/// The trainable parameters and their optimizer: the RNG is seeded here, right before a fresh
/// adapter is initialised. Sets `guards.l2` from the parameters before any update.
pub fn trainable(
    plan: &Plan,
    model: &mut CausalLm,
    guards: &mut Guards,
) -> Result<(Option<LoraConfig>, AdamW), Stop> {
    let hp = plan.hp();
    let lora_cfg = match &plan.lora {
        Some(from_spec) => Some(match &plan.init_adapter {
            Some(dir) => {
                init_lora_config(dir, from_spec.clone(), plan.spec().adapter.lora.is_some())?
            }
            None => from_spec.clone(),
        }),
        None => None,
    };
    tch::manual_seed(hp.seed);
    let params: Vec<(String, Tensor, f64)> = if let Some(c) = &lora_cfg {
        match &plan.init_adapter {
            Some(dir) => {
                let n = export::apply_peft_adapter(model, dir)?;
                model.set_lora_trainable();
                eprintln!("starting from adapter {} ({n} layers)", dir.display());
            }
            None => {
                model.add_lora(c).map_err(|e| Stop::Invalid {
                    message: e.to_string(),
                    param: Some("spec.adapter.lora.targetModules".into()),
                })?;
            }
        }
        if let Some(q) = base_quantization(plan) {
            let (before, after) = model.base_linear_bytes();
            eprintln!(
                "base weights of the decoder's linear layers quantized ({q:?}): {:.1} MiB -> {:.1} MiB ({})",
                before as f64 / (1u64 << 20) as f64,
                after as f64 / (1u64 << 20) as f64,
                model.quantized_storage().join(", ")
            );
            if !hp.checkpointing(true) {
                eprintln!(
                    "note: with hyperparameters.gradientCheckpointing: false each layer's dequantized \
                     weight stays alive for backward (up to {:.1} MiB in all); checkpointing (the \
                     default over a quantized base) holds one layer's at a time",
                    before as f64 / (1u64 << 20) as f64
                );
            }
        }
        model
            .lora_parameters()
            .into_iter()
            .map(|(n, t)| (n, t, hp.weight_decay))
            .collect()
    } else {
        model.unfreeze_all();
        model
            .named_parameters()
            .into_iter()
            .map(|(n, t)| {
                let decay = if n.ends_with("norm.weight") || n.ends_with(".bias") {
                    0.0
                } else {
                    hp.weight_decay
                };
                (n, t.shallow_clone(), decay)
            })
            .collect()
    };
    base_scores(model, guards);
    // Before any update (and before a resume loads trained weights): the weights to pull toward.
    guards.l2 = guards.effective.l2_to_init.as_ref().map(|g| {
        let tensors: Vec<Tensor> = params.iter().map(|(_, t, _)| t.shallow_clone()).collect();
        L2ToInit::new(&tensors, g.weight)
    });
    let opt = AdamW::new(params);
    model.set_training(true);
    model.checkpoint_layers = hp.checkpointing(base_quantization(plan).is_some());
    Ok((lora_cfg, opt))
}

/// With the adapters attached (and the base quantized, if it is to be) and before a resume loads
/// trained weights: the layer anchor's sketch of general inputs, drawn from the generator seeded
/// above, and self-distillation's record of the base's log-probabilities, from the same forwards
/// when both guards use the same conversations.
fn base_scores(model: &mut CausalLm, guards: &mut Guards) {
    let mut teacher = None;
    if let Some(g) = &guards.effective.layer_anchor {
        let t = Instant::now();
        let score = matches!(guards.anchor_text, AnchorText::Distill);
        let samples = guards.anchor_samples();
        let (anchor, lp) = LayerAnchor::gather_scoring(model, samples, g.weight, score);
        eprintln!(
            "layer anchor: {} layers sketched on {} general conversations, weight {} ({:.1}s)",
            anchor.len(),
            samples.len(),
            g.weight,
            t.elapsed().as_secs_f64()
        );
        guards.anchor = Some(anchor);
        teacher = score.then_some(lp);
    }
    if let Some(d) = guards.distill.take() {
        let t = Instant::now();
        let how = match teacher {
            Some(_) => "from the layer anchor's forwards",
            None => "scored",
        };
        let d = d.with_teacher(model, teacher);
        eprintln!(
            "self-distillation: the base's log-probabilities on its {} answers, {how} ({:.0} MiB of host memory, {:.1}s)",
            d.len(),
            d.teacher_bytes() as f64 / (1u64 << 20) as f64,
            t.elapsed().as_secs_f64()
        );
        guards.distill = Some(d);
    }
}

/// The batches a run iterates over and evaluates on.
pub struct Batches {
    pub eval_set: Vec<Batch>,
    pub retention_batches: Vec<Batch>,
    pub batcher: Batcher,
    /// Training samples (before packing).
    pub n_train: usize,
    pub schedule: Schedule,
    pub config_digest: String,
}

/// Eval batches: samples in order, `batch_size` per batch, padded (no packing).
pub fn eval_batches(samples: &[Sample], batch_size: usize) -> Vec<Batch> {
    let rows: Vec<Vec<usize>> = (0..samples.len()).map(|i| vec![i]).collect();
    rows.chunks(batch_size.max(1))
        .map(|c| build_batch(samples, c))
        .collect()
}

/// Moves the training samples into the batcher and fixes the schedule and the config digest.
pub fn batches(
    plan: &Plan,
    prepared: &mut Prepared,
    retention_set: &[Sample],
    forgetting_guard: &ForgettingGuard,
) -> Batches {
    let hp = plan.hp();
    let batch_size = hp.batch_size as usize;
    let eval_set = if plan.is_dpo {
        Vec::new()
    } else {
        eval_batches(&prepared.eval, batch_size)
    };
    let retention_batches = eval_batches(retention_set, batch_size);
    let train_samples = std::mem::take(&mut prepared.train);
    let n_train = train_samples.len();
    let batcher = Batcher::new(
        train_samples,
        BatchPlan {
            batch_size,
            max_seq_length: hp.max_seq_length as usize,
            packing: hp.packing,
            seed: plan.seed,
        },
    );
    let schedule = Schedule::new(hp, batcher.batches_per_epoch() as i64);
    let config_digest = config_digest(
        &plan.job,
        forgetting_guard,
        &prepared.train_digest,
        plan.init_adapter.as_deref(),
    );
    Batches {
        eval_set,
        retention_batches,
        batcher,
        n_train,
        schedule,
        config_digest,
    }
}

/// DPO: the pairs and where their reference log-probs come from (computed now, or read from
/// the cache a previous attempt left in the checkpoint directory).
pub fn dpo(
    plan: &Plan,
    pairs: Option<PreparedPairs>,
    model: &mut CausalLm,
    config_digest: &str,
) -> Result<Option<Dpo>, Stop> {
    let Some(p) = pairs else {
        return Ok(None);
    };
    let o = plan.spec().method.dpo.clone().unwrap_or_default();
    let mut d = Dpo {
        cfg: DpoConfig {
            beta: o.beta,
            loss: o.loss,
            label_smoothing: o.label_smoothing,
        },
        train: PairSet::new(&p.train),
        eval: PairSet::new(&p.eval),
        // Switching the adapter off gives the starting weights only for a fresh adapter.
        mode: if plan.is_lora() && plan.init_adapter.is_none() {
            ReferenceMode::AdapterOff
        } else {
            ReferenceMode::Precomputed
        },
        batch_size: plan.hp().batch_size as usize,
    };
    if d.mode == ReferenceMode::Precomputed {
        let t = Instant::now();
        let cache: PathBuf = plan.checkpoint_dir.join(DPO_REFERENCE_FILE);
        let computed = d.precompute_reference(model, &cache, config_digest)?;
        eprintln!(
            "dpo reference log-probs {} for {} + {} pairs ({:.1}s)",
            if computed {
                "computed"
            } else {
                "read from the cache"
            },
            d.train.len(),
            d.eval.len(),
            t.elapsed().as_secs_f64()
        );
    }
    Ok(Some(d))
}
