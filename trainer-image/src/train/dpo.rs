//! Direct preference optimisation: the loss, one optimizer step and the held-out evaluation.
//!
//! A pair is the same prompt with a `chosen` and a `rejected` reply. A batch of `n` pairs is one
//! forward over `2n` rows, chosen rows first (TRL's layout). The log-probability of a reply is the
//! sum of its tokens' log-probabilities (the supervised positions, as for SFT).
//!
//! The reference model is where the implicit reward `β·(log π − log π_ref)` is measured from:
//! * a fresh LoRA adapter: the same weights with the adapter switched off, so the reference costs a
//!   no-grad forward per step and no second copy of the model;
//! * full fine-tuning or a LoRA adapter started from `initAdapter`: the starting weights are gone
//!   after the first update, so every pair's reference log-probs are computed once before training
//!   and cached (see [`Dpo::precompute_reference`]).
//!
//! Loss variants (per pair, with `Δ = (log π_c − log π_ref,c) − (log π_r − log π_ref,r)`):
//! * `sigmoid`: `−(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)` — the DPO paper; `ε` (label smoothing) is
//!   conservative DPO. With `ε = 0` this is TRL's `sigmoid`.
//! * `ipo`: `((Δ_c/|c| − Δ_r/|r|) − 1/(2β))²` with the log-ratios averaged over each reply's tokens,
//!   as TRL's `ipo` does.

use std::path::Path;

use finetune_crds::training::DpoLoss;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::data::{Batch, PreferencePair, Sample, build_batch};
use crate::error::contain_panic;
use crate::model::CausalLm;
use crate::train::group::Group;
use crate::train::optim::AdamW;
use crate::train::step::{
    MicroBatch, StepStats, Targets, agree_on_memory, backward_on_targets, dropout_seed,
    target_logits,
};
use crate::train::stop::Stop;

/// The loss settings of `spec.method.dpo`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpoConfig {
    pub beta: f64,
    pub loss: DpoLoss,
    pub label_smoothing: f64,
}

/// The per-pair terms of a batch.
pub struct DpoTerms {
    /// `[n]` loss of each pair.
    pub losses: Tensor,
    /// `[n]` `β·(log π_c − log π_ref,c)`, detached.
    pub chosen_rewards: Tensor,
    /// `[n]` `β·(log π_r − log π_ref,r)`, detached.
    pub rejected_rewards: Tensor,
}

/// The DPO/IPO loss of `n` pairs from `[2n]` policy and reference log-probs (chosen rows first)
/// and `[2n]` reply lengths in tokens (only IPO uses them).
pub fn dpo_terms(
    policy: &Tensor,
    reference: &Tensor,
    lengths: &Tensor,
    cfg: &DpoConfig,
) -> DpoTerms {
    let n = policy.size()[0] / 2;
    let ratios = policy - reference;
    let (c, r) = (ratios.narrow(0, 0, n), ratios.narrow(0, n, n));
    let beta = cfg.beta;
    let losses = match cfg.loss {
        DpoLoss::Sigmoid => {
            let z = (&c - &r) * beta;
            let eps = cfg.label_smoothing;
            let clean = z.log_sigmoid() * -(1.0 - eps);
            if eps > 0.0 {
                clean - (-z).log_sigmoid() * eps
            } else {
                clean
            }
        }
        DpoLoss::Ipo => {
            let len = lengths.to_kind(Kind::Float).clamp_min(1.0);
            let (lc, lr) = (len.narrow(0, 0, n), len.narrow(0, n, n));
            let d = &c / lc - &r / lr - 1.0 / (2.0 * beta);
            &d * &d
        }
    };
    let rewards = ratios.detach() * beta;
    DpoTerms {
        losses,
        chosen_rewards: rewards.narrow(0, 0, n),
        rejected_rewards: rewards.narrow(0, n, n),
    }
}

/// `[rows]` summed log-probability of each row's targets (`labels[:, 1:]` other than −100) and
/// `[rows]` the number of targets, from the logits at target positions only.
pub fn sequence_logps(model: &CausalLm, batch: &Batch) -> (Tensor, Tensor) {
    let targets = target_logits(model, &MicroBatch::from(batch));
    logps_of(targets, batch, model.device)
}

/// [`sequence_logps`] from the batch's target logits.
fn logps_of(targets: Option<Targets>, batch: &Batch, device: Device) -> (Tensor, Tensor) {
    let b = batch.input_ids.size()[0];
    let zeros = || Tensor::zeros([b], (Kind::Float, device));
    let Some(t) = targets else {
        return (zeros(), zeros());
    };
    let logp = t
        .logits
        .log_softmax(-1, Kind::Float)
        .gather(1, &t.labels.unsqueeze(1), false)
        .squeeze_dim(1);
    let sums = zeros().index_add(0, &t.rows, &logp);
    let counts = zeros().index_add(0, &t.rows, &Tensor::ones_like(&logp));
    (sums, counts)
}

/// Preference pairs as rows: sample `i` is pair `i`'s chosen side, sample `n + i` its rejected one.
#[derive(Debug, Default)]
pub struct PairSet {
    samples: Vec<Sample>,
    n: usize,
    /// `[2n]` reference log-probs in the same order, when precomputed.
    reference: Option<Vec<f64>>,
}

impl PairSet {
    pub fn new(pairs: &[PreferencePair]) -> Self {
        let mut samples: Vec<Sample> = pairs.iter().map(|p| p.chosen.clone()).collect();
        samples.extend(pairs.iter().map(|p| p.rejected.clone()));
        PairSet {
            samples,
            n: pairs.len(),
            reference: None,
        }
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The chosen sides (what batching orders and groups by length).
    pub fn chosen(&self) -> &[Sample] {
        &self.samples[..self.n]
    }

    /// The `2k` rows of pairs `idx` (chosen rows first).
    pub fn batch(&self, idx: &[usize]) -> Batch {
        let rows: Vec<Vec<usize>> = idx
            .iter()
            .map(|&i| vec![i])
            .chain(idx.iter().map(|&i| vec![self.n + i]))
            .collect();
        build_batch(&self.samples, &rows)
    }

    fn cached_reference(&self, idx: &[usize], model: &CausalLm) -> Option<Tensor> {
        let r = self.reference.as_ref()?;
        let v: Vec<f32> = idx
            .iter()
            .map(|&i| r[i])
            .chain(idx.iter().map(|&i| r[self.n + i]))
            .map(|x| x as f32)
            .collect();
        Some(Tensor::from_slice(&v).to_device(model.device))
    }
}

/// Where reference log-probs come from (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReferenceMode {
    /// The LoRA adapter switched off for a no-grad forward.
    AdapterOff,
    /// Computed once before training.
    Precomputed,
}

/// `[2k]` reference log-probs of pairs `idx` of `set`.
fn reference_logps(
    model: &mut CausalLm,
    set: &PairSet,
    idx: &[usize],
    batch: &Batch,
    mode: ReferenceMode,
) -> Tensor {
    if let Some(cached) = set.cached_reference(idx, model) {
        return cached;
    }
    assert_eq!(
        mode,
        ReferenceMode::AdapterOff,
        "precomputed reference log-probs are missing"
    );
    let _guard = tch::no_grad_guard();
    model.set_adapters_enabled(false);
    let (r, _) = sequence_logps(model, batch);
    model.set_adapters_enabled(true);
    r
}

/// Means over the pairs of a step or an evaluation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PreferenceMetrics {
    pub loss: f64,
    pub chosen_reward: f64,
    pub rejected_reward: f64,
    pub reward_margin: f64,
    /// Share of pairs whose chosen reward is higher (TRL's `rewards/accuracies`).
    pub reward_accuracy: f64,
    /// Share of pairs where the policy gives the chosen reply the higher mean token log-prob: what
    /// it prefers when scoring the two, independent of the reference.
    pub logp_accuracy: f64,
    pub pairs: usize,
}

/// Running sums behind [`PreferenceMetrics`].
#[derive(Default)]
struct Tally {
    loss: f64,
    chosen: f64,
    rejected: f64,
    correct: f64,
    logp_correct: f64,
    pairs: usize,
}

/// The step's counts and tallies summed over the ranks (each holds its own micro-batches').
fn sum_over_ranks(group: &Group, stats: &mut StepStats, t: &mut Tally) -> Result<(), Stop> {
    let mut v = [
        t.loss,
        t.chosen,
        t.rejected,
        t.correct,
        t.logp_correct,
        t.pairs as f64,
        stats.tokens as f64,
        stats.targets as f64,
        stats.samples as f64,
    ];
    group.sum_values(&mut v)?;
    let [
        loss,
        chosen,
        rejected,
        correct,
        logp_correct,
        pairs,
        tokens,
        targets,
        samples,
    ] = v;
    *t = Tally {
        loss,
        chosen,
        rejected,
        correct,
        logp_correct,
        pairs: pairs as usize,
    };
    stats.tokens = tokens as i64;
    stats.targets = targets as i64;
    stats.samples = samples as usize;
    Ok(())
}

impl Tally {
    fn add(&mut self, terms: &DpoTerms, policy: &Tensor, lengths: &Tensor) {
        let n = terms.losses.size()[0];
        let sum = |t: &Tensor| t.sum(Kind::Double).double_value(&[]);
        self.loss += sum(&terms.losses.detach());
        self.chosen += sum(&terms.chosen_rewards);
        self.rejected += sum(&terms.rejected_rewards);
        self.correct += sum(&terms
            .chosen_rewards
            .gt_tensor(&terms.rejected_rewards)
            .to_kind(Kind::Double));
        let mean = policy.detach() / lengths.clamp_min(1.0);
        self.logp_correct += sum(&mean
            .narrow(0, 0, n)
            .gt_tensor(&mean.narrow(0, n, n))
            .to_kind(Kind::Double));
        self.pairs += n as usize;
    }

    fn finish(&self) -> PreferenceMetrics {
        let n = self.pairs.max(1) as f64;
        PreferenceMetrics {
            loss: self.loss / n,
            chosen_reward: self.chosen / n,
            rejected_reward: self.rejected / n,
            reward_margin: (self.chosen - self.rejected) / n,
            reward_accuracy: self.correct / n,
            logp_accuracy: self.logp_correct / n,
            pairs: self.pairs,
        }
    }
}

/// The DPO objective of a run: settings, train and eval pairs, and the reference.
#[derive(Debug)]
pub struct Dpo {
    pub cfg: DpoConfig,
    pub train: PairSet,
    pub eval: PairSet,
    pub mode: ReferenceMode,
    pub batch_size: usize,
}

/// What [`Dpo::precompute_reference`] caches, keyed by the run's configuration digest.
#[derive(Serialize, Deserialize)]
struct ReferenceCache {
    config_digest: String,
    train: Vec<f64>,
    eval: Vec<f64>,
}

impl Dpo {
    /// Computes every pair's reference log-probs with the current weights (call before the first
    /// update), or reads them from `cache` when it holds this configuration's, and writes the cache
    /// so that a resumed attempt, whose weights have moved, uses the same reference.
    pub fn precompute_reference(
        &mut self,
        model: &mut CausalLm,
        cache: &Path,
        config_digest: &str,
    ) -> crate::error::Result<bool> {
        if let Ok(text) = std::fs::read_to_string(cache)
            && let Ok(c) = serde_json::from_str::<ReferenceCache>(&text)
            && c.config_digest == config_digest
            && c.train.len() == 2 * self.train.n
            && c.eval.len() == 2 * self.eval.n
        {
            self.train.reference = Some(c.train);
            self.eval.reference = Some(c.eval);
            return Ok(false);
        }
        model.set_training(false);
        let mut all = Vec::new();
        for set in [&self.train, &self.eval] {
            let _guard = tch::no_grad_guard();
            let mut chosen = vec![0.0; set.n];
            let mut rejected = vec![0.0; set.n];
            let idx: Vec<usize> = (0..set.n).collect();
            for chunk in idx.chunks(self.batch_size.max(1)) {
                let (lp, _) = sequence_logps(model, &set.batch(chunk));
                let v: Vec<f64> =
                    Vec::<f64>::try_from(lp.to_kind(Kind::Double).to_device(tch::Device::Cpu))
                        .expect("a 1-D tensor");
                for (k, &i) in chunk.iter().enumerate() {
                    chosen[i] = v[k];
                    rejected[i] = v[chunk.len() + k];
                }
            }
            chosen.extend(rejected);
            all.push(chosen);
        }
        model.set_training(true);
        let eval = all.pop().expect("two sets");
        let train = all.pop().expect("two sets");
        let c = ReferenceCache {
            config_digest: config_digest.to_string(),
            train,
            eval,
        };
        if let Some(dir) = cache.parent() {
            std::fs::create_dir_all(dir).map_err(|e| crate::error::Error::io(dir, e))?;
        }
        let text = serde_json::to_string(&c).expect("cache serializes");
        std::fs::write(cache, text).map_err(|e| crate::error::Error::io(cache, e))?;
        self.train.reference = Some(c.train);
        self.eval.reference = Some(c.eval);
        Ok(true)
    }

    /// One optimizer step over the micro-batches `micro` (pair indices into the train set): the
    /// loss is the mean over all their pairs. `micro` is the whole step's list on every rank of
    /// `group`; each runs its share and the gradients and tallies are summed over the ranks.
    /// `Ok(Err(stats))` (weights untouched) when the loss is not finite; `Err` when a collective
    /// fails.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &self,
        group: &Group,
        model: &mut CausalLm,
        opt: &mut AdamW,
        micro: &[Vec<usize>],
        lr: f64,
        max_grad_norm: f64,
        seed: u64,
        step: i64,
    ) -> Result<Result<(StepStats, PreferenceMetrics), StepStats>, Stop> {
        let total: usize = micro.iter().map(Vec::len).sum();
        let mut stats = StepStats::default();
        let mut tally = Tally::default();
        opt.zero_grad();
        // This rank's share; running out of memory in it makes every rank retry the step with
        // smaller micro-batches (see `agree_on_memory`).
        let local = contain_panic(|| {
            for (i, idx) in micro.iter().enumerate() {
                if !group.runs(i) {
                    continue;
                }
                let batch = self.train.batch(idx);
                stats.tokens += batch.tokens;
                stats.targets += batch.supervised_tokens;
                stats.samples += idx.len();
                let reference = reference_logps(model, &self.train, idx, &batch, self.mode);
                tch::manual_seed(dropout_seed(seed, step, i));
                let mb = MicroBatch::from(&batch);
                // The tally keeps the loss value.
                let _ = backward_on_targets(model, &mb, total as f64, |targets| {
                    let (policy, lengths) = logps_of(targets, &batch, model.device);
                    let terms = dpo_terms(&policy, &reference, &lengths, &self.cfg);
                    tally.add(&terms, &policy, &lengths);
                    terms.losses.sum(Kind::Float)
                });
            }
            0.0
        });
        agree_on_memory(group, local)?;
        group.sum_gradients(opt)?;
        sum_over_ranks(group, &mut stats, &mut tally)?;
        let m = tally.finish();
        stats.loss = m.loss;
        if !stats.loss.is_finite() {
            return Ok(Err(stats));
        }
        stats.grad_norm = opt.clip_grad_norm(max_grad_norm);
        if !stats.grad_norm.is_finite() {
            return Ok(Err(stats));
        }
        opt.step(lr);
        Ok(Ok((stats, m)))
    }

    /// Loss, rewards and preference accuracies on the eval pairs (no dropout, no gradients).
    pub fn evaluate(&self, model: &mut CausalLm) -> PreferenceMetrics {
        model.set_training(false);
        let mut tally = Tally::default();
        let idx: Vec<usize> = (0..self.eval.n).collect();
        for chunk in idx.chunks(self.batch_size.max(1)) {
            let batch = self.eval.batch(chunk);
            let reference = reference_logps(model, &self.eval, chunk, &batch, self.mode);
            let _guard = tch::no_grad_guard();
            let (policy, lengths) = sequence_logps(model, &batch);
            tally.add(
                &dpo_terms(&policy, &reference, &lengths, &self.cfg),
                &policy,
                &lengths,
            );
        }
        model.set_training(true);
        tally.finish()
    }
}

/// One batch of `pairs` through the loss with the adapter switched off as the reference and no
/// dropout, then backward: the values a parity test compares with TRL's `DPOTrainer`. Returns the
/// report (loss, rewards, log-probs and each pair's tokens) and the LoRA gradients under PEFT's
/// names.
pub fn batch_report(
    model: &mut CausalLm,
    pairs: &[PreferencePair],
    cfg: &DpoConfig,
) -> (serde_json::Value, Vec<(String, Tensor)>) {
    let set = PairSet::new(pairs);
    let idx: Vec<usize> = (0..pairs.len()).collect();
    let batch = set.batch(&idx);
    model.set_training(false);
    let reference = reference_logps(model, &set, &idx, &batch, ReferenceMode::AdapterOff);
    let (policy, lengths) = sequence_logps(model, &batch);
    let terms = dpo_terms(&policy, &reference, &lengths, cfg);
    let loss = terms.losses.mean(Kind::Float);
    loss.backward();
    let n = pairs.len() as i64;
    let vec = |t: &Tensor| -> Vec<f64> {
        Vec::<f64>::try_from(t.detach().to_kind(Kind::Double).to_device(tch::Device::Cpu))
            .expect("a 1-D tensor")
    };
    let completion = |s: &Sample, p: usize| serde_json::json!({"ids": &s.ids[p..], "supervised": &s.supervised[p..]});
    let report = serde_json::json!({
        "loss": loss.double_value(&[]),
        "losses": vec(&terms.losses),
        "chosen_rewards": vec(&terms.chosen_rewards),
        "rejected_rewards": vec(&terms.rejected_rewards),
        "chosen_logps": vec(&policy.narrow(0, 0, n)),
        "rejected_logps": vec(&policy.narrow(0, n, n)),
        "reference_chosen_logps": vec(&reference.narrow(0, 0, n)),
        "reference_rejected_logps": vec(&reference.narrow(0, n, n)),
        "pairs": pairs.iter().map(|p| serde_json::json!({
            "prompt_ids": p.prompt,
            "chosen": completion(&p.chosen, p.prompt.len()),
            "rejected": completion(&p.rejected, p.prompt.len()),
        })).collect::<Vec<_>>(),
    });
    let grads = model
        .lora_parameters()
        .into_iter()
        .map(|(name, t)| {
            (
                format!("{}{name}", crate::export::PEFT_PREFIX),
                t.grad().to_device(tch::Device::Cpu),
            )
        })
        .collect();
    (report, grads)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(loss: DpoLoss, label_smoothing: f64) -> DpoConfig {
        DpoConfig {
            beta: 0.5,
            loss,
            label_smoothing,
        }
    }

    fn t(v: &[f32]) -> Tensor {
        Tensor::from_slice(v)
    }

    #[test]
    fn sigmoid_loss_follows_the_formula() {
        // Δ = (−1 − −2) − (−3 − −2.5) = 1.5; loss = −log σ(0.75).
        let terms = dpo_terms(
            &t(&[-1.0, -3.0]),
            &t(&[-2.0, -2.5]),
            &t(&[1.0, 1.0]),
            &cfg(DpoLoss::Sigmoid, 0.0),
        );
        let want = -(1.0 / (1.0 + (-0.75f64).exp())).ln();
        assert!((terms.losses.double_value(&[0]) - want).abs() < 1e-6);
        assert!((terms.chosen_rewards.double_value(&[0]) - 0.5).abs() < 1e-6);
        assert!((terms.rejected_rewards.double_value(&[0]) + 0.25).abs() < 1e-6);
    }

    #[test]
    fn label_smoothing_mixes_in_the_flipped_label() {
        let eps = 0.2;
        let terms = dpo_terms(
            &t(&[-1.0, -3.0]),
            &t(&[-2.0, -2.5]),
            &t(&[1.0, 1.0]),
            &cfg(DpoLoss::Sigmoid, eps),
        );
        let ls = |z: f64| -(1.0 + (-z).exp()).ln();
        let want = -(1.0 - eps) * ls(0.75) - eps * ls(-0.75);
        assert!((terms.losses.double_value(&[0]) - want).abs() < 1e-6);
    }

    #[test]
    fn ipo_averages_the_log_ratios_over_reply_tokens() {
        let terms = dpo_terms(
            &t(&[-1.0, -3.0]),
            &t(&[-2.0, -2.5]),
            &t(&[2.0, 4.0]),
            &cfg(DpoLoss::Ipo, 0.0),
        );
        // (1/2 − (−0.5)/4 − 1/(2·0.5))² = (0.5 + 0.125 − 1)².
        let want = (0.5f64 + 0.125 - 1.0).powi(2);
        assert!((terms.losses.double_value(&[0]) - want).abs() < 1e-6);
    }

    #[test]
    fn equal_policy_and_reference_give_log_2() {
        let p = t(&[-4.0, -1.0, -2.0, -9.0]);
        let terms = dpo_terms(&p, &p, &t(&[1.0; 4]), &cfg(DpoLoss::Sigmoid, 0.0));
        let l = Vec::<f64>::try_from(terms.losses.to_kind(Kind::Double)).unwrap();
        for x in l {
            assert!((x - 2f64.ln()).abs() < 1e-6);
        }
    }
}
