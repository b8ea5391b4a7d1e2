//! The training loop. [`Trainer::train`] reads top to bottom like nanoGPT's: stop on SIGTERM
//! (after a checkpoint), take a step, record it, evaluate, probe retention, checkpoint. The
//! measurements before the first update ([`Trainer::baseline`]) are here too, since resuming
//! skips the ones a checkpoint already holds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use finetune_crds::contract::{StopKind, TerminationMessage, TrainerPhase};
use finetune_crds::training::GuardAction;

use crate::data::Batch;
use crate::model::{CausalLm, LoraConfig};
use crate::serve::Live;
use crate::train::anchor::{L2ToInit, LayerAnchor, SelfDistillation};
use crate::train::checkpoint::{Saver, Snapshots, load_trainable, trainable_tensors};
use crate::train::dpo::{Dpo, PreferenceMetrics};
use crate::train::group::Group;
use crate::train::micro;
use crate::train::optim::AdamW;
use crate::train::plan::Plan;
use crate::train::probe::ProbeScore;
use crate::train::retention::{RetentionScore, changed_answers};
use crate::train::schedule::lr_lambda;
use crate::train::setup::{Batches, Guards, Loaded, Probes};
use crate::train::state::{EvalRecord, RetentionRecord, StepRecord, TrainState};
use crate::train::step::{
    MicroBatch, Rider, StepStats, accumulate_gradients_in, dropout_seed, eval_loss, finish_step,
};
use crate::train::stop::Stop;

/// Longest greedy answer of the retention probe, in tokens: enough for a short factual answer,
/// and a change in the first few dozen tokens is what matters.
pub const RETENTION_TOKENS: usize = 32;

/// Seconds and tokens of this attempt, for the summary's timings and throughput.
#[derive(Debug, Default)]
pub struct Clock {
    pub step_seconds: f64,
    pub step_tokens: i64,
    pub steps_this_attempt: i64,
    pub eval_seconds: f64,
    pub checkpoint_seconds: f64,
    /// Named phases outside the loop (`retention_seconds`, `initial_eval_seconds`, ...).
    pub timings: BTreeMap<&'static str, f64>,
}

impl Clock {
    pub fn add(&mut self, phase: &'static str, t: Instant) {
        *self.timings.entry(phase).or_default() += t.elapsed().as_secs_f64();
    }
}

/// A run after setup: the model, what it trains on, and the state that a checkpoint keeps.
pub struct Trainer {
    pub plan: Plan,
    pub loaded: Loaded,
    pub prepared: crate::data::Prepared,
    pub probes: Probes,
    pub guards: Guards,
    pub lora: Option<LoraConfig>,
    pub opt: AdamW,
    pub batches: Batches,
    pub dpo: Option<Dpo>,
    /// Eval data of either kind (SFT batches or DPO pairs).
    pub has_eval: bool,
    pub load_seconds: f64,
    pub st: TrainState,
    pub snapshots: Snapshots,
    /// `(step, dir)` of the newest checkpoint written or resumed from.
    pub last_ckpt: Option<(i64, PathBuf)>,
    pub clock: Clock,
    /// This process's rank in a data-parallel run ([`Group::single`] alone).
    pub group: Group,
}

/// The eval loss and the targets it covered, with dropout off.
pub fn evaluate(model: &mut CausalLm, batches: &[Batch]) -> (f64, i64) {
    model.set_training(false);
    let r = eval_loss(model, batches.iter().map(MicroBatch::from));
    model.set_training(true);
    r
}

/// The loss-term guards of a run: self-distillation, L2 to init, the layer anchor.
type Anchors<'a> = (
    Option<&'a SelfDistillation>,
    Option<&'a L2ToInit>,
    Option<&'a LayerAnchor>,
);

/// Gradients of one SFT step (summed over `group`'s ranks) with the forgetting guards' terms
/// added (self-distillation or L2 to init, and the layer anchor), before clipping; returns the
/// terms' sum as well. Every rank adds the same terms to the same gradients.
type Guarded = Result<(StepStats, Option<f64>), StepStats>;

fn guarded_gradients(
    group: &Group,
    model: &mut CausalLm,
    opt: &mut AdamW,
    mbs: &[MicroBatch],
    (seed, step): (u64, i64),
    (distill, l2, anchor): Anchors,
) -> Result<Guarded, Stop> {
    // Self-distillation's conversation rides in the last micro-batch's forward when this process
    // runs the whole step and backward recomputes nothing; else it gets a forward of its own. A
    // forward of one short conversation costs nearly what the task's 8 rows do (each weight is
    // read either way): on reviews the guarded step's median went from 1.94-1.99 s to
    // 1.54-1.73 s (runs alternating the two), against 1.42 s unguarded.
    let ride = distill
        .filter(|_| group.world() == 1 && !model.checkpoint_layers)
        .and_then(|d| {
            d.for_step(step)
                .map(|(batch, teacher)| (batch, teacher, d.weight))
        });
    let rider = ride.as_ref().map(|(batch, teacher, weight)| Rider {
        batch,
        teacher,
        weight: *weight,
    });
    let stats = match accumulate_gradients_in(group, model, opt, mbs, rider.as_ref(), seed, step)? {
        Ok(s) => s,
        Err(s) => return Ok(Err(s)),
    };
    // A guard's own forward draws its dropout masks from a seed of its own, so they do not
    // depend on which micro-batch this rank ran last.
    tch::manual_seed(dropout_seed(seed, step, mbs.len()));
    let term = match (distill, l2) {
        (Some(d), _) => Some(stats.rider_kl.unwrap_or_else(|| d.accumulate(model, step))),
        (None, Some(l)) => Some(l.accumulate()),
        (None, None) => None,
    };
    let term = match (term, anchor) {
        (t, Some(a)) => t.unwrap_or(0.0) + a.accumulate() * a.weight,
        (Some(t), None) => t,
        (None, None) => return Ok(Ok((stats, None))),
    };
    if !term.is_finite() {
        return Ok(Err(stats));
    }
    Ok(Ok((stats, Some(term))))
}

/// The evaluations of the result (after [`Trainer::finish`]).
#[derive(Debug, Default)]
pub struct Finished {
    pub retention_score: Option<RetentionScore>,
    /// Answers that changed, for a person to judge (the score alone says how many, not how).
    pub retention_changed: Vec<serde_json::Value>,
    pub retention_after: Option<f64>,
    pub generation_after: Option<ProbeScore>,
    /// Up to five `(reference, answer)` pairs of the generation eval.
    pub generation_examples: Vec<(String, String)>,
}

/// What one optimizer step produced.
struct Stepped {
    stats: StepStats,
    preference: Option<PreferenceMetrics>,
    guard_loss: Option<f64>,
    lr: f64,
    seconds: f64,
}

impl Trainer {
    pub fn is_lora(&self) -> bool {
        self.lora.is_some()
    }

    fn saver(&self) -> Saver<'_> {
        Saver {
            root: &self.plan.checkpoint_dir,
            keep_last: self.plan.spec().checkpoint.keep_last.max(1) as usize,
            lora: self.lora.as_ref(),
            base_model: &self.plan.base_ref,
        }
    }

    /// Rank 0 writes the checkpoint; every rank returns after it is complete (a rank that
    /// resumed from a half-written one would not match its peers).
    fn save(&self) -> Result<(PathBuf, f64), Stop> {
        // A collective under sharding: every rank takes part.
        let optimizer = self.group.full_optimizer_state(&self.opt)?;
        let saved = if self.group.is_writer() {
            self.saver().save(
                &self.st,
                &self.loaded.model,
                optimizer,
                &self.snapshots,
                self.batches.batcher.cursor(),
            )?
        } else {
            let dir = crate::train::checkpoint::step_dir(&self.plan.checkpoint_dir, self.st.step);
            (dir, 0.0)
        };
        self.group.barrier()?;
        Ok(saved)
    }

    /// Before the first update (skipping what a resumed checkpoint already holds): the
    /// retention loss, the base model's answers to the retention questions, the generation eval,
    /// the starting weights as the retention floor's fallback, and the eval loss.
    pub fn baseline(&mut self) -> Result<(), Stop> {
        let model = &mut self.loaded.model;
        let (tokenizer, eos_ids) = (&self.loaded.tokenizer, &self.loaded.eos_ids);
        let (st, p, clock) = (&mut self.st, &mut self.probes, &mut self.clock);
        if !self.batches.retention_batches.is_empty() && st.retention_loss_before.is_none() {
            // Before any update: the adapter is zero (or the weights are the base weights).
            let t = Instant::now();
            st.retention_loss_before = Some(evaluate(model, &self.batches.retention_batches).0);
            clock.add("retention_seconds", t);
        }
        if !p.retention_probe.is_empty() {
            let t = Instant::now();
            let references = match st.retention_references.clone() {
                Some(r) => {
                    p.whole_answers = !st.retention_references_settled;
                    r
                }
                None => {
                    // The base model's own answers: the adapter is still zero here.
                    let r = p.retention_answers(model, tokenizer, eos_ids)?;
                    eprintln!(
                        "retention: the base model's answers to {} questions ({:.1}s)",
                        r.len(),
                        t.elapsed().as_secs_f64()
                    );
                    st.retention_references = Some(r.clone());
                    st.retention_references_settled = true;
                    st.last_good_step = Some(0);
                    r
                }
            };
            p.retention_probe = std::mem::take(&mut p.retention_probe).with_references(references);
            clock.add("retention_seconds", t);
        }
        if !p.generation_probe.is_empty() && st.generation_before.is_none() {
            let t = Instant::now();
            let (_, score) = p.generation_probe.generation_eval(
                model,
                tokenizer,
                eos_ids,
                p.generation_tokens,
                "before",
            )?;
            st.generation_before = Some(score);
            clock.add("generation_seconds", t);
        }
        if matches!(p.retention_floor, Some((_, GuardAction::Stop)))
            && self.snapshots.last_good.is_none()
        {
            // What a breach falls back to (the starting weights until a probe passes).
            self.snapshots.last_good = Some(trainable_tensors(model, self.lora.is_some()));
        }
        if let Some(d) = &self.dpo
            && !d.eval.is_empty()
            && st.preference_before.is_none()
        {
            let t = Instant::now();
            let m = d.evaluate(model);
            eprintln!(
                "eval before training: dpo loss {:.4} | reward accuracy {:.3} | logp accuracy {:.3} ({} pairs)",
                m.loss, m.reward_accuracy, m.logp_accuracy, m.pairs
            );
            st.initial_eval_loss = Some(m.loss);
            st.preference_before = Some(m);
            clock.add("initial_eval_seconds", t);
        }
        if !self.batches.eval_set.is_empty() && st.initial_eval_loss.is_none() {
            let t = Instant::now();
            let (loss, _) = evaluate(model, &self.batches.eval_set);
            eprintln!("eval loss before training: {loss:.4}");
            st.initial_eval_loss = Some(loss);
            clock.add("initial_eval_seconds", t);
        }
        Ok(())
    }

    /// Until the last step, an early stop, SIGTERM (`Stop::Preempted`) or a failure.
    pub fn train(
        &mut self,
        term: &AtomicBool,
        live: &Live,
        tm: &mut TerminationMessage,
    ) -> Result<(), Stop> {
        let total = self.batches.schedule.total;
        while self.st.step < total && !self.st.early_stopped {
            // SIGTERM on any rank stops every rank at this same step.
            if self.group.any(term.load(Ordering::SeqCst))? {
                return Err(self.preempted(live, tm));
            }
            let stepped = self.step()?;
            self.record(&stepped, live);
            let due = self
                .plan
                .evaluation
                .every_steps
                .is_some_and(|n| self.st.step % n == 0)
                || self.st.step == total;
            if self.has_eval && due {
                self.evaluate(live);
            }
            // The retention floor: probed on the evaluation cadence (and at the last step).
            if let (true, Some(floor)) = (due, self.probes.retention_floor)
                && !self.probes.retention_probe.is_empty()
            {
                self.probe_retention(floor, live, tm)?;
            }
            if self.st.step % self.plan.spec().checkpoint.every_steps == 0 || self.st.early_stopped
            {
                self.checkpoint(live, tm)?;
            }
        }
        Ok(())
    }

    /// SIGTERM: a checkpoint of the current step (unless there is one), then the contract's
    /// fields, so the next attempt resumes here.
    fn preempted(&mut self, live: &Live, tm: &mut TerminationMessage) -> Stop {
        if self.last_ckpt.as_ref().map(|c| c.0) != Some(self.st.step) {
            live.update(|s| s.phase = TrainerPhase::Checkpointing);
            match self.save() {
                Ok((dir, secs)) => {
                    eprintln!("SIGTERM: checkpoint {} ({secs:.2}s)", dir.display());
                    self.last_ckpt = Some((self.st.step, dir));
                }
                Err(e) => return e,
            }
        }
        tm.step = Some(self.st.step);
        tm.checkpoint_step = self.last_ckpt.as_ref().map(|c| c.0);
        tm.checkpoint_path = self.last_ckpt.as_ref().map(|c| c.1.display().to_string());
        tm.metrics = Some(live.status().metrics);
        Stop::Preempted
    }

    /// One optimizer step over `gradientAccumulationSteps` micro-batches (fewer at the end of
    /// an epoch).
    fn step(&mut self) -> Result<Stepped, Stop> {
        let hp = self.plan.hp();
        let schedule = self.batches.schedule;
        let cur = self.batches.batcher.cursor();
        let n_micro = schedule
            .accumulation
            .min(schedule.batches_per_epoch - cur.next_batch as i64)
            .max(1);
        let lr = hp.learning_rate
            * lr_lambda(hp.scheduler, self.st.step, schedule.warmup, schedule.total);
        let (seed, step, max_norm) = (self.plan.seed, self.st.step, hp.max_grad_norm);
        let t = Instant::now();
        let batcher = &mut self.batches.batcher;
        let outcome = match &self.dpo {
            None => {
                let groups: Vec<Vec<Vec<usize>>> =
                    (0..n_micro).map(|_| batcher.next_rows()).collect();
                self.sft_gradients_fitting(&groups, seed, step)?
                    .and_then(|(s, g)| finish_step(&mut self.opt, s, lr, max_norm).map(|s| (s, g)))
                    .map(|(s, g)| (s, None, g))
            }
            Some(_) => {
                // Each "row" of the batcher is one pair (its chosen side stands for it).
                let groups: Vec<Vec<Vec<usize>>> =
                    (0..n_micro).map(|_| batcher.next_rows()).collect();
                self.dpo_step_fitting(&groups, lr, max_norm, (seed, step))?
                    .map(|(s, m)| (s, Some(m), None))
            }
        };
        if outcome.is_ok() {
            // Under a sharded optimizer each rank updated its own parameters only.
            self.group.share_updates(&self.opt)?;
        }
        let (stats, preference, guard_loss) = outcome.map_err(|s| {
            Stop::Diverged(format!(
                "loss {} (grad norm {}) at step {}: lower hyperparameters.learningRate or check the data",
                s.loss,
                s.grad_norm,
                step + 1
            ))
        })?;
        Ok(Stepped {
            stats,
            preference,
            guard_loss,
            lr,
            seconds: t.elapsed().as_secs_f64(),
        })
    }

    /// Sequences per forward pass: the spec's `microBatchSize`, or what an out-of-memory error
    /// reduced it to. Unset, it is `batchSize` for one process, and a rank's share of a batch
    /// (`batchSize / world`, rounded up) for a group, so every rank has work in every step.
    pub fn micro_batch_size(&self) -> usize {
        let hp = self.plan.hp();
        let share = (hp.batch_size.max(1) as usize).div_ceil(self.group.world().max(1));
        let configured = hp.micro_batch_size.map_or(share, |m| m as usize);
        self.st.micro_batch.unwrap_or(configured as i64).max(1) as usize
    }

    /// The micro-batch size when batches are split (it is below `batchSize`), for the status.
    pub fn split_micro_batch(&self) -> Option<i64> {
        let m = self.micro_batch_size();
        (m < self.plan.hp().batch_size as usize).then_some(m as i64)
    }

    /// The gradients of one SFT step over `groups` (the batcher's batches, rows of sample
    /// indices), in micro-batches that fit: after an out-of-memory error the micro-batch is halved
    /// and the step runs again from its first row ([`micro::fit`]).
    fn sft_gradients_fitting(
        &mut self,
        groups: &[Vec<Vec<usize>>],
        seed: u64,
        step: i64,
    ) -> Result<Guarded, Stop> {
        // In a group every rank sees the out-of-memory panic of any of them (step.rs), so all
        // halve together and keep running the same micro-batches.
        let start = self.micro_batch_size();
        let mut reductions = Vec::new();
        let (gradients, size) = micro::fit(
            start,
            |size| self.sft_gradients(groups, size, seed, step),
            |from, to, why| reductions.push((from, to, why.to_string())),
        )?;
        self.note_reductions(step, start, size, reductions);
        gradients
    }

    /// One DPO step over `groups` (the batcher's batches; each row is one pair) in micro-batches
    /// of pairs that fit, split as SFT's are ([`micro::split`]) and halved from the same step
    /// after an out-of-memory error (the loss is the mean over all the step's pairs, so the
    /// update is the same).
    fn dpo_step_fitting(
        &mut self,
        groups: &[Vec<Vec<usize>>],
        lr: f64,
        max_norm: f64,
        (seed, step): (u64, i64),
    ) -> Result<Result<(StepStats, PreferenceMetrics), StepStats>, Stop> {
        let start = self.micro_batch_size();
        let mut reductions = Vec::new();
        let (dpo, group) = (self.dpo.as_ref().expect("a DPO run"), &self.group);
        let (model, opt) = (&mut self.loaded.model, &mut self.opt);
        let (outcome, size) = micro::fit(
            start,
            |size| {
                let micro: Vec<Vec<usize>> = micro::split(groups, size)
                    .into_iter()
                    .map(|rows| rows.concat())
                    .collect();
                dpo.step(group, model, opt, &micro, lr, max_norm, seed, step)
            },
            |from, to, why| reductions.push((from, to, why.to_string())),
        )?;
        self.note_reductions(step, start, size, reductions);
        outcome
    }

    /// Logs each halving of the micro-batch and keeps the size that fitted for the checkpoint.
    fn note_reductions(
        &mut self,
        step: i64,
        start: usize,
        size: usize,
        reductions: Vec<(usize, usize, String)>,
    ) {
        for (from, to, why) in reductions {
            eprintln!(
                "out of memory at step {} with micro-batches of {from} sequences ({why}): running \
                 the step again with {to} (the update is the same)",
                step + 1
            );
        }
        if size != start {
            self.st.micro_batch = Some(size as i64);
        }
    }

    /// [`guarded_gradients`] over `groups` split into micro-batches of `size` rows, with the
    /// self-replay guard's weighted micro-batch added.
    fn sft_gradients(
        &mut self,
        groups: &[Vec<Vec<usize>>],
        size: usize,
        seed: u64,
        step: i64,
    ) -> Result<Guarded, Stop> {
        let batcher = &self.batches.batcher;
        let batches: Vec<Batch> = micro::split(groups, size)
            .iter()
            .map(|rows| batcher.build(rows))
            .collect();
        let replay = self.guards.replay.as_ref();
        let replay_batch = replay.and_then(|r| r.batch_for_step(step));
        let mut mbs: Vec<MicroBatch> = batches.iter().map(MicroBatch::from).collect();
        // Self-replay: the step's base conversations as one more, weighted micro-batch.
        if let (Some(b), Some(r)) = (&replay_batch, replay) {
            mbs.push(MicroBatch {
                weight: r.weight,
                ..MicroBatch::from(b)
            });
        }
        let anchors = (
            self.guards.distill.as_ref(),
            self.guards.l2.as_ref(),
            self.guards.anchor.as_ref(),
        );
        let model = &mut self.loaded.model;
        guarded_gradients(
            &self.group,
            model,
            &mut self.opt,
            &mbs,
            (seed, step),
            anchors,
        )
    }

    /// The step into the history, the metrics and the log.
    fn record(&mut self, s: &Stepped, live: &Live) {
        let split = self.split_micro_batch();
        let (stats, lr, secs) = (&s.stats, s.lr, s.seconds);
        let total = self.batches.schedule.total;
        let st = &mut self.st;
        st.step += 1;
        self.clock.steps_this_attempt += 1;
        self.clock.step_seconds += secs;
        self.clock.step_tokens += stats.tokens;
        st.trained_tokens += stats.tokens;
        let epoch = st.step as f64 / self.batches.schedule.steps_per_epoch as f64;
        st.history.push(StepRecord {
            step: st.step,
            epoch,
            loss: stats.loss,
            learning_rate: lr,
            grad_norm: stats.grad_norm,
            tokens: stats.tokens,
            targets: stats.targets,
            samples: stats.samples,
            seconds: secs,
            preference: s.preference,
            guard_loss: s.guard_loss,
        });
        let tps = stats.tokens as f64 / secs.max(1e-9);
        let eta = self.clock.step_seconds / self.clock.steps_this_attempt as f64
            * (total - st.step) as f64;
        live.step.set(st.step as f64);
        live.epoch.set(epoch);
        live.train_loss.set(stats.loss);
        live.learning_rate.set(lr);
        live.grad_norm.set(stats.grad_norm);
        live.tokens_per_second.set(tps);
        live.samples_per_second
            .set(stats.samples as f64 / secs.max(1e-9));
        live.supervised_token_fraction
            .set(stats.targets as f64 / stats.tokens.max(1) as f64);
        live.eta_seconds.set(eta);
        live.update(|l| {
            l.step = st.step;
            l.epoch = epoch;
            l.eta_seconds = Some(eta);
            l.metrics.train_loss = Some(stats.loss);
            l.metrics.learning_rate = Some(lr);
            l.metrics.tokens_per_second = Some(tps);
            l.metrics.trained_tokens = Some(st.trained_tokens);
            l.metrics.micro_batch_size = split;
        });
        let guard_note = s
            .guard_loss
            .map_or_else(String::new, |g| format!(" | guard {g:.4}"));
        let rewards = s.preference.map_or_else(String::new, |m| {
            format!(
                " | reward margin {:.4} | reward accuracy {:.2}",
                m.reward_margin, m.reward_accuracy
            )
        });
        eprintln!(
            "step {}/{total} | epoch {epoch:.2} | loss {:.4}{guard_note}{rewards} | lr {lr:.3e} | grad norm {:.3} | {tps:.0} tok/s | eta {}",
            st.step,
            stats.loss,
            stats.grad_norm,
            fmt_secs(eta)
        );
    }

    /// The eval loss (DPO: the eval pairs), the best step so far, and early stopping.
    fn evaluate(&mut self, live: &Live) {
        live.update(|s| s.phase = TrainerPhase::Evaluating);
        let t = Instant::now();
        let (loss, targets, preference) = match &self.dpo {
            None => {
                let (loss, targets) = evaluate(&mut self.loaded.model, &self.batches.eval_set);
                (loss, targets, None)
            }
            Some(d) => {
                let m = d.evaluate(&mut self.loaded.model);
                (m.loss, m.pairs as i64, Some(m))
            }
        };
        self.clock.eval_seconds += t.elapsed().as_secs_f64();
        let early = self.plan.evaluation.early_stopping.as_ref();
        let st = &mut self.st;
        st.evals.push(EvalRecord {
            step: st.step,
            eval_loss: loss,
            targets,
            preference,
        });
        let improved = match st.best_eval_loss {
            None => true,
            Some(b) => loss < b - early.map_or(0.0, |e| e.min_delta),
        };
        if improved {
            st.best_eval_loss = Some(loss);
            st.best_step = Some(st.step);
            st.evals_without_improvement = 0;
            if early.is_some() {
                self.snapshots.best =
                    Some(trainable_tensors(&self.loaded.model, self.lora.is_some()));
            }
        } else {
            st.evals_without_improvement += 1;
        }
        eprintln!(
            "eval step {} | eval loss {loss:.4} | best {:.4} (step {})",
            st.step,
            st.best_eval_loss.unwrap_or(f64::NAN),
            st.best_step.unwrap_or(0)
        );
        if let Some(m) = preference {
            eprintln!(
                "eval step {} | reward accuracy {:.3} | logp accuracy {:.3} | reward margin {:.4} (chosen {:.4}, rejected {:.4})",
                st.step,
                m.reward_accuracy,
                m.logp_accuracy,
                m.reward_margin,
                m.chosen_reward,
                m.rejected_reward
            );
            live.preference_accuracy.set(m.reward_accuracy);
            live.reward_margin.set(m.reward_margin);
        }
        live.eval_loss.set(loss);
        live.update(|s| {
            s.phase = TrainerPhase::Training;
            s.metrics.eval_loss = Some(loss);
            s.metrics.best_eval_loss = st.best_eval_loss;
            if let Some(m) = preference {
                s.metrics.preference_accuracy = Some(m.reward_accuracy);
                s.metrics.reward_margin = Some(m.reward_margin);
            }
        });
        if let Some(e) = early
            && st.evals_without_improvement >= e.patience
        {
            let best = st.best_step.unwrap_or(0);
            eprintln!(
                "early stopping: no improvement in {} evaluations; the result is step {best}",
                e.patience
            );
            st.stop(
                StopKind::EarlyStopping,
                format!(
                    "early stopping: no eval loss improvement in {} evaluations; the result is step {best}",
                    e.patience
                ),
            );
        }
    }

    /// The retention probe against its floor `(minScore, action)`: below it, warn, stop with
    /// the last good weights, or fail.
    fn probe_retention(
        &mut self,
        (min, action): (f64, GuardAction),
        live: &Live,
        tm: &mut TerminationMessage,
    ) -> Result<(), Stop> {
        live.update(|s| s.phase = TrainerPhase::Evaluating);
        let t = Instant::now();
        let p = &self.probes;
        let loaded = &mut self.loaded;
        let answers = p.retention_answers(&mut loaded.model, &loaded.tokenizer, &loaded.eos_ids)?;
        let score =
            RetentionScore::measure(&answers, &p.retention_probe.references, &p.retention_keys);
        self.clock.eval_seconds += t.elapsed().as_secs_f64();
        let st = &mut self.st;
        let value = score.score();
        st.retention_scores.push(RetentionRecord {
            step: st.step,
            score: value,
            exact: score.exact_share(),
            verbatim: Some(score.verbatim_share()),
        });
        live.retention_score.set(value);
        live.update(|s| {
            s.phase = TrainerPhase::Training;
            s.metrics.retention_score = Some(value);
        });
        eprintln!(
            "retention step {} | {} ({value:.3}, floor {min}; {:.1}s)",
            st.step,
            score.describe(),
            t.elapsed().as_secs_f64()
        );
        if value >= min {
            st.last_good_step = Some(st.step);
            if action == GuardAction::Stop {
                self.snapshots.last_good =
                    Some(trainable_tensors(&self.loaded.model, self.lora.is_some()));
            }
            return Ok(());
        }
        let message = format!(
            "retention score {value:.3} ({}) fell below evaluation.retention.minScore {min} at step {}",
            score.describe(),
            st.step
        );
        match action {
            GuardAction::Warn => eprintln!("warning: {message}"),
            GuardAction::Stop => {
                let good = st.last_good_step.unwrap_or(0);
                eprintln!("stopping: {message}; the result is step {good}");
                st.stop(
                    StopKind::RetentionFloor,
                    format!("{message}; the result is step {good}"),
                );
            }
            GuardAction::Fail => {
                tm.step = Some(st.step);
                tm.metrics = Some(live.status().metrics);
                return Err(Stop::Forgetting(message));
            }
        }
        Ok(())
    }

    /// The result: the last good weights after a retention stop, the best evaluated ones under
    /// early stopping, else the last; then the evaluations after training.
    pub fn finish(&mut self, live: &Live) -> Result<Finished, Stop> {
        let lora = self.lora.is_some();
        let fallback = if self.st.stop_kind == Some(StopKind::RetentionFloor) {
            self.snapshots.last_good.take().map(|g| (g, "<last good>"))
        } else if self.plan.evaluation.early_stopping.is_some() {
            self.snapshots.best.take().map(|b| (b, "<best>"))
        } else {
            None
        };
        if let Some((weights, what)) = fallback {
            load_trainable(
                &self.loaded.model,
                lora,
                weights.into_iter().collect(),
                Path::new(what),
            )?;
        }
        let mut f = Finished::default();
        let model = &mut self.loaded.model;
        let (tokenizer, eos_ids) = (&self.loaded.tokenizer, &self.loaded.eos_ids);
        let p = &self.probes;
        if !p.retention_probe.is_empty() {
            let t = Instant::now();
            let answers = p.retention_answers(model, tokenizer, eos_ids)?;
            let score =
                RetentionScore::measure(&answers, &p.retention_probe.references, &p.retention_keys);
            let questions = p
                .retention
                .as_ref()
                .map(|r| r.questions.as_slice())
                .unwrap_or_default();
            f.retention_changed = changed_answers(
                questions,
                &p.retention_probe.references,
                &answers,
                &p.retention_keys,
            );
            let (low, high) = score.interval_95();
            eprintln!(
                "retention: {} ({:.3}, 95% interval {low:.3}-{high:.3}; {:.1}s)",
                score.describe(),
                score.score(),
                t.elapsed().as_secs_f64()
            );
            live.retention_score.set(score.score());
            f.retention_score = Some(score);
            self.clock.add("retention_seconds", t);
        }
        if !p.generation_probe.is_empty() {
            let t = Instant::now();
            let (answers, score) = p.generation_probe.generation_eval(
                model,
                tokenizer,
                eos_ids,
                p.generation_tokens,
                "after",
            )?;
            live.eval_exact_match.set(score.exact_match());
            f.generation_examples = answers
                .iter()
                .zip(&p.generation_probe.references)
                .take(5)
                .map(|(a, r)| (r.clone(), a.clone()))
                .collect();
            f.generation_after = Some(score);
            self.clock.add("generation_seconds", t);
        }
        if !self.batches.retention_batches.is_empty() {
            let t = Instant::now();
            f.retention_after = Some(evaluate(model, &self.batches.retention_batches).0);
            self.clock.add("retention_seconds", t);
        }
        Ok(f)
    }

    fn checkpoint(&mut self, live: &Live, tm: &mut TerminationMessage) -> Result<(), Stop> {
        live.update(|s| s.phase = TrainerPhase::Checkpointing);
        let (dir, secs) = self.save()?;
        self.clock.checkpoint_seconds += secs;
        live.checkpoint_duration_seconds.set(secs);
        *live
            .last_checkpoint
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        let step = self.st.step;
        live.update(|s| {
            s.phase = TrainerPhase::Training;
            s.checkpoint_step = Some(step);
        });
        tm.checkpoint_step = Some(step);
        tm.checkpoint_path = Some(dir.display().to_string());
        self.last_ckpt = Some((step, dir));
        Ok(())
    }
}

fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0) as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}
