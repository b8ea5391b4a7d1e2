//! Fine-tuning past the base model's context: `spec.baseModel.ropeScaling` becomes the model's
//! rotary scaling (and `max_position_embeddings`) before training, `hyperparameters.maxSeqLength`
//! is checked against the context the result can address, and the exported configs carry the
//! scaling so that transformers reloads exactly the model that was trained.
//!
//! `max_position_embeddings` follows transformers' conventions per type: for linear, yarn and
//! llama3 it is the extended context (`original × factor`; yarn and llama3 keep the original in
//! `rope_parameters`). For dynamic NTK it stays the original context, because transformers uses
//! it as the length past which the base starts to grow; the context covered is then
//! `max_position_embeddings × factor`.

use finetune_crds::model::{RopeScaling as SpecRope, RopeScalingType};
use serde_json::{Value, json};

use crate::model::rope::RopeScaling;
use crate::model::{CausalLm, ModelConfig};

/// A spec the model cannot be trained with: the message and the field to fix (exit code 2).
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    pub field: &'static str,
    pub message: String,
}

fn invalid(field: &'static str, message: impl Into<String>) -> Invalid {
    Invalid {
        field,
        message: message.into(),
    }
}

/// The rope a job trains with, when the spec changes it.
#[derive(Debug, Clone, PartialEq)]
pub struct RopePlan {
    pub scaling: RopeScaling,
    /// The `max_position_embeddings` the model (and its exported config) gets.
    pub max_position_embeddings: i64,
}

/// The longest sequence (in positions) a model with this config is meant to handle.
pub fn context_length(scaling: &RopeScaling, max_position_embeddings: i64) -> i64 {
    match scaling {
        // max_position_embeddings is the original context here (see the module docs).
        RopeScaling::Dynamic { factor } => (max_position_embeddings as f64 * factor).floor() as i64,
        _ => max_position_embeddings,
    }
}

fn kind_name(k: RopeScalingType) -> &'static str {
    match k {
        RopeScalingType::Linear => "linear",
        RopeScalingType::Dynamic => "dynamic",
        RopeScalingType::Yarn => "yarn",
        RopeScalingType::Llama3 => "llama3",
    }
}

fn same_kind(k: RopeScalingType, s: &RopeScaling) -> Option<f64> {
    match (k, s) {
        (RopeScalingType::Linear, RopeScaling::Linear { factor })
        | (RopeScalingType::Dynamic, RopeScaling::Dynamic { factor })
        | (RopeScalingType::Yarn, RopeScaling::Yarn { factor, .. })
        | (RopeScalingType::Llama3, RopeScaling::Llama3 { factor, .. }) => Some(*factor),
        _ => None,
    }
}

/// The spec's scaling as transformers' `rope_parameters`, with the defaults transformers applies
/// (`original_max_position_embeddings` = the model's `max_position_embeddings`).
fn spec_rope_json(r: &SpecRope, original: i64, theta: f64) -> Value {
    let mut v = json!({"rope_type": kind_name(r.kind), "factor": r.factor, "rope_theta": theta});
    match r.kind {
        RopeScalingType::Llama3 => {
            // Llama 3.1's values: the CRD leaves them optional, transformers requires them.
            v["low_freq_factor"] = json!(r.low_freq_factor.unwrap_or(1.0));
            v["high_freq_factor"] = json!(r.high_freq_factor.unwrap_or(4.0));
            v["original_max_position_embeddings"] = json!(original);
        }
        RopeScalingType::Yarn => {
            if let Some(b) = r.beta_fast {
                v["beta_fast"] = json!(b);
            }
            if let Some(b) = r.beta_slow {
                v["beta_slow"] = json!(b);
            }
            v["original_max_position_embeddings"] = json!(original);
        }
        RopeScalingType::Linear | RopeScalingType::Dynamic => {}
    }
    v
}

/// Checks `spec` (the job's `baseModel.ropeScaling`) and `max_seq_length` against the model's
/// `config`; returns the rope to train with, or `None` to keep the checkpoint's. `gguf`: the job
/// also exports GGUF, which cannot carry rope scaling yet.
pub fn plan(
    config: &ModelConfig,
    spec: Option<&SpecRope>,
    max_seq_length: i64,
    gguf: bool,
) -> Result<Option<RopePlan>, Invalid> {
    const FIELD: &str = "spec.baseModel.ropeScaling";
    let base_context = context_length(&config.rope_scaling, config.max_position_embeddings);
    let Some(r) = spec else {
        if max_seq_length > base_context {
            return Err(invalid(
                "spec.hyperparameters.maxSeqLength",
                format!(
                    "maxSeqLength {max_seq_length} is past the base model's context of {base_context} positions \
                     (max_position_embeddings); lower it, or extend the context with baseModel.ropeScaling \
                     (e.g. {{type: linear, factor: {}}})",
                    (max_seq_length as f64 / base_context as f64).ceil()
                ),
            ));
        }
        return Ok(None);
    };
    let kind = kind_name(r.kind);
    if !r.factor.is_finite() || r.factor < 1.0 {
        return Err(invalid(
            "spec.baseModel.ropeScaling.factor",
            format!("factor must be at least 1 (got {})", r.factor),
        ));
    }
    if r.kind != RopeScalingType::Llama3
        && (r.low_freq_factor.is_some() || r.high_freq_factor.is_some())
    {
        return Err(invalid(
            FIELD,
            "lowFreqFactor and highFreqFactor only apply to type llama3",
        ));
    }
    if r.kind != RopeScalingType::Yarn && (r.beta_fast.is_some() || r.beta_slow.is_some()) {
        return Err(invalid(
            FIELD,
            "betaFast and betaSlow only apply to type yarn",
        ));
    }
    let (low, high) = (
        r.low_freq_factor.unwrap_or(1.0),
        r.high_freq_factor.unwrap_or(4.0),
    );
    if r.kind == RopeScalingType::Llama3 && high <= low {
        // The smoothing divides by high - low.
        return Err(invalid(
            "spec.baseModel.ropeScaling.highFreqFactor",
            format!("highFreqFactor ({high}) must be greater than lowFreqFactor ({low})"),
        ));
    }
    if r.kind == RopeScalingType::Yarn && r.beta_fast.unwrap_or(32.0) <= r.beta_slow.unwrap_or(1.0)
    {
        return Err(invalid(
            "spec.baseModel.ropeScaling.betaFast",
            "betaFast must be greater than betaSlow (defaults 32 and 1)",
        ));
    }
    if gguf {
        return Err(invalid(
            "spec.output.gguf",
            "GGUF export of a rope-scaled model is not implemented; drop output.gguf or baseModel.ropeScaling",
        ));
    }
    if config.rope_scaling != RopeScaling::Default {
        // Scaling a scaled model again has no transformers equivalent (one rope_type per config):
        // the spec may only restate what the checkpoint already has, e.g. to fine-tune a merged
        // long-context output again.
        return match same_kind(r.kind, &config.rope_scaling) {
            Some(f) if f == r.factor && r.original_max_position_embeddings.is_none() => {
                check_len(max_seq_length, base_context)?;
                Ok(None)
            }
            _ => Err(invalid(
                FIELD,
                format!(
                    "the base model already uses rope scaling {:?} (max_position_embeddings {}); \
                     the spec's {kind} ×{} differs. Omit baseModel.ropeScaling to keep the model's own",
                    config.rope_scaling, config.max_position_embeddings, r.factor
                ),
            )),
        };
    }
    let original = r
        .original_max_position_embeddings
        .unwrap_or(config.max_position_embeddings);
    let extended = (original as f64 * r.factor).floor() as i64;
    let max_position_embeddings = match r.kind {
        RopeScalingType::Dynamic => original,
        _ => extended,
    };
    let json = spec_rope_json(r, original, config.rope_theta);
    let scaling = RopeScaling::from_json(&json, &json!({}), max_position_embeddings)
        .map_err(|m| invalid(FIELD, m))?;
    check_len(max_seq_length, extended)?;
    Ok(Some(RopePlan {
        scaling,
        max_position_embeddings,
    }))
}

fn check_len(max_seq_length: i64, context: i64) -> Result<(), Invalid> {
    if max_seq_length > context {
        return Err(invalid(
            "spec.hyperparameters.maxSeqLength",
            format!(
                "maxSeqLength {max_seq_length} is past the {context} positions baseModel.ropeScaling \
                 covers (original context × factor); raise the factor or lower maxSeqLength"
            ),
        ));
    }
    Ok(())
}

/// [`plan`] applied to a loaded model; returns what `training_summary.json` records under
/// `rope_scaling` (null when the checkpoint's rope is kept).
pub fn apply(
    model: &mut CausalLm,
    spec: Option<&SpecRope>,
    max_seq_length: i64,
    gguf: bool,
) -> Result<Value, Invalid> {
    let before = model.config.max_position_embeddings;
    let Some(p) = plan(&model.config, spec, max_seq_length, gguf)? else {
        return Ok(Value::Null);
    };
    eprintln!(
        "rope scaling: {:?}, max_position_embeddings {before} -> {}",
        p.scaling, p.max_position_embeddings
    );
    model.set_rope_scaling(p.scaling, p.max_position_embeddings);
    Ok(summary_json(model, before))
}

/// The scaling as written into configs, with the context before and after.
fn summary_json(model: &CausalLm, base_max_position_embeddings: i64) -> Value {
    let c = &model.config;
    json!({
        "rope_parameters": crate::export::rope_parameters_json(&c.rope_scaling, c.rope_theta),
        "max_position_embeddings": c.max_position_embeddings,
        "base_max_position_embeddings": base_max_position_embeddings,
        "context_length": context_length(&c.rope_scaling, c.max_position_embeddings),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Architecture;

    fn config(max_pos: i64) -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Llama,
            vocab_size: 32,
            hidden_size: 16,
            intermediate_size: 32,
            num_layers: 1,
            num_heads: 2,
            num_kv_heads: 2,
            head_dim: 8,
            rms_norm_eps: 1e-5,
            max_position_embeddings: max_pos,
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::Default,
            tie_word_embeddings: true,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            eos_token_ids: vec![2],
            bos_token_id: Some(1),
        }
    }

    fn spec(kind: RopeScalingType, factor: f64) -> SpecRope {
        SpecRope {
            kind,
            factor,
            original_max_position_embeddings: None,
            low_freq_factor: None,
            high_freq_factor: None,
            beta_fast: None,
            beta_slow: None,
        }
    }

    #[test]
    fn linear_extends_the_context() {
        let p = plan(
            &config(64),
            Some(&spec(RopeScalingType::Linear, 4.0)),
            256,
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.scaling, RopeScaling::Linear { factor: 4.0 });
        assert_eq!(p.max_position_embeddings, 256);
    }

    #[test]
    fn yarn_and_llama3_keep_the_original_and_take_transformers_defaults() {
        let p = plan(
            &config(64),
            Some(&spec(RopeScalingType::Yarn, 4.0)),
            200,
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.max_position_embeddings, 256);
        assert_eq!(
            p.scaling,
            RopeScaling::Yarn {
                factor: 4.0,
                attention_factor: 0.1 * 4f64.ln() + 1.0,
                beta_fast: 32.0,
                beta_slow: 1.0,
                original_max_position_embeddings: 64.0,
                truncate: true,
            }
        );
        let mut s = spec(RopeScalingType::Llama3, 2.0);
        s.original_max_position_embeddings = Some(32);
        let p = plan(&config(64), Some(&s), 64, false).unwrap().unwrap();
        assert_eq!(p.max_position_embeddings, 64);
        assert_eq!(
            p.scaling,
            RopeScaling::Llama3 {
                factor: 2.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 32.0,
            }
        );
    }

    #[test]
    fn dynamic_keeps_max_position_embeddings_as_the_threshold() {
        let p = plan(
            &config(64),
            Some(&spec(RopeScalingType::Dynamic, 4.0)),
            256,
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.max_position_embeddings, 64);
        assert_eq!(context_length(&p.scaling, p.max_position_embeddings), 256);
    }

    #[test]
    fn max_seq_length_past_the_context_is_refused() {
        let e = plan(&config(64), None, 256, false).unwrap_err();
        assert_eq!(e.field, "spec.hyperparameters.maxSeqLength");
        assert!(e.message.contains("ropeScaling"), "{}", e.message);
        assert_eq!(plan(&config(64), None, 64, false), Ok(None));
        let e = plan(
            &config(64),
            Some(&spec(RopeScalingType::Linear, 2.0)),
            256,
            false,
        )
        .unwrap_err();
        assert_eq!(e.field, "spec.hyperparameters.maxSeqLength");
        let e = plan(
            &config(64),
            Some(&spec(RopeScalingType::Dynamic, 2.0)),
            256,
            false,
        )
        .unwrap_err();
        assert_eq!(e.field, "spec.hyperparameters.maxSeqLength");
    }

    #[test]
    fn invalid_specs_name_their_field() {
        let field = |s: SpecRope, gguf| plan(&config(64), Some(&s), 64, gguf).unwrap_err().field;
        assert_eq!(
            field(spec(RopeScalingType::Linear, 0.5), false),
            "spec.baseModel.ropeScaling.factor"
        );
        let mut s = spec(RopeScalingType::Llama3, 2.0);
        s.low_freq_factor = Some(4.0);
        s.high_freq_factor = Some(4.0);
        assert_eq!(field(s, false), "spec.baseModel.ropeScaling.highFreqFactor");
        let mut s = spec(RopeScalingType::Linear, 2.0);
        s.beta_fast = Some(8.0);
        assert_eq!(field(s, false), "spec.baseModel.ropeScaling");
        assert_eq!(
            field(spec(RopeScalingType::Linear, 2.0), true),
            "spec.output.gguf"
        );
    }

    #[test]
    fn an_already_scaled_model_only_accepts_the_same_scaling() {
        let mut c = config(256);
        c.rope_scaling = RopeScaling::Linear { factor: 4.0 };
        assert_eq!(
            plan(&c, Some(&spec(RopeScalingType::Linear, 4.0)), 256, false),
            Ok(None)
        );
        for s in [
            spec(RopeScalingType::Linear, 2.0),
            spec(RopeScalingType::Yarn, 4.0),
        ] {
            let e = plan(&c, Some(&s), 64, false).unwrap_err();
            assert_eq!(e.field, "spec.baseModel.ropeScaling");
        }
        // Without a spec the checkpoint's own scaling stays, dynamic covering max_pos × factor.
        c.rope_scaling = RopeScaling::Dynamic { factor: 2.0 };
        c.max_position_embeddings = 64;
        assert_eq!(plan(&c, None, 128, false), Ok(None));
    }
}
