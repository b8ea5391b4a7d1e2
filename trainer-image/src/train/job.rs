//! `finetune-trainer run JOB.yaml`: validate the FinetuneJob, resolve its URIs, load model and
//! data, train (resuming from the newest verified checkpoint), evaluate, export, and report through
//! the operator contract: exit code, termination message, `/status` and `/metrics`.
//!
//! This module is the driver: [`plan`](crate::train::plan) → [`setup`](crate::train::setup) →
//! [`resume`](crate::train::checkpoint::resume) → the loop ([`trainer`](crate::train::trainer))
//! → finish and export → report ([`summary`](crate::train::summary), `report.html` from
//! [`report`](crate::report), and the termination message).
//!
//! Exit codes ([`ExitCode`]): 0 done; 2 invalid manifest or data (the message names the field or
//! `file:line`); 3 NaN/inf loss; 4 out of memory; 5 retention probe below `minScore` with
//! `action: fail`; 143 stopped by SIGTERM after a checkpoint.

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use finetune_crds::adapter::{FileDigest, SourceDigest};
use finetune_crds::contract::{
    ExitCode, ProducedAdapter, TerminationMessage, TrainerError, TrainerPhase, env,
};
use finetune_crds::finetunejob::TrainingMetrics;

use crate::export;
use crate::model::CausalLm;
use crate::serve::{self, Live};
use crate::train::base;
use crate::train::checkpoint::{self, Snapshots};
use crate::train::group::{Group, Topology};
use crate::train::plan::{Environment, Plan};
use crate::train::stop::is_oom;
use crate::train::summary::{self, MemoryMarks, Outcome, TrainingSummary};
use crate::train::trainer::{Clock, Finished, Trainer};
use crate::train::{setup, transfer};

use crate::train::plan::RunOptions;
use crate::train::state::TrainState;
use crate::train::stop::Stop;

/// The manifest path the operator passes.
pub const JOB_FILE_ENV: &str = env::JOB_FILE;

/// Runs the job; returns the process exit status. Writes the termination message on every path.
pub fn run_job(opts: &RunOptions) -> i32 {
    let live = Live::new();
    let mut tm = TerminationMessage::default();
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| train(opts, &live, &mut tm)));
    let (code, error) = match outcome {
        Ok(Ok(())) => (ExitCode::Success, None),
        Ok(Err(Stop::Preempted)) => (ExitCode::Preempted, None),
        Ok(Err(Stop::Invalid { message, param })) => (
            ExitCode::InvalidInput,
            Some(TrainerError {
                code: "invalid_input".into(),
                message,
                param,
            }),
        ),
        Ok(Err(Stop::Diverged(message))) => (
            ExitCode::Diverged,
            Some(TrainerError {
                code: "diverged".into(),
                message,
                param: None,
            }),
        ),
        Ok(Err(Stop::Forgetting(message))) => (
            ExitCode::RetentionBelowMinimum,
            Some(TrainerError {
                code: "retention_below_minimum".into(),
                message,
                param: Some("spec.evaluation.retention.minScore".into()),
            }),
        ),
        Ok(Err(Stop::Oom(message))) => (
            ExitCode::OutOfMemory,
            Some(TrainerError {
                code: "out_of_memory".into(),
                message,
                param: None,
            }),
        ),
        Ok(Err(Stop::Error(message))) => (
            ExitCode::Other(1),
            Some(TrainerError {
                code: "error".into(),
                message,
                param: None,
            }),
        ),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "internal error".into());
            if is_oom(&message) {
                (
                    ExitCode::OutOfMemory,
                    Some(TrainerError {
                        code: "out_of_memory".into(),
                        message,
                        param: None,
                    }),
                )
            } else {
                (
                    ExitCode::Other(101),
                    Some(TrainerError {
                        code: "internal_error".into(),
                        message,
                        param: None,
                    }),
                )
            }
        }
    };
    if let Some(e) = &error {
        match &e.param {
            Some(p) => eprintln!("error: {} ({})", e.message, p),
            None => eprintln!("error: {}", e.message),
        }
    }
    tm.error = error;
    if let Ok(path) = std::env::var(env::TERMINATION_LOG)
        && !path.is_empty()
        && let Err(e) = std::fs::write(&path, tm.to_bounded_json())
    {
        eprintln!("warning: cannot write the termination message to {path}: {e}");
    }
    code.code()
}

/// plan → setup → resume → loop → finish → report.
fn train(opts: &RunOptions, live: &Arc<Live>, tm: &mut TerminationMessage) -> Result<(), Stop> {
    let started = Instant::now();
    let mut plan = Plan::new(opts, &Environment::from_process())?;

    // Signals: a flag checked between steps.
    let term = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, term.clone())
            .map_err(|e| Stop::Error(format!("cannot install the signal handler: {e}")))?;
    }
    let topology = Topology::from_env(|k| std::env::var(k).ok())?;
    let group = join_group(&plan, topology.as_ref())?;
    // One machine's first rank: it downloads for the machine and serves its pod's `/healthz`
    // and `/status` (the kubelet probes every member of a gang); rank 0's reports the group.
    let leader = topology.as_ref().is_none_or(|t| t.local_rank == 0);
    if group.is_writer() || leader {
        let (host, port) = &plan.status_addr;
        match serve::serve(live.clone(), &format!("{host}:{port}")) {
            Ok(addr) => eprintln!("status server on http://{addr} (/status, /metrics)"),
            Err(e) => eprintln!("warning: status server not started on {host}:{port}: {e}"),
        }
    }
    // One download per machine: each machine's first rank fetches into the shared cache, the
    // others find it there after the barrier.
    let mut fetch = |plan: &mut Plan| -> Result<(), Stop> {
        tm.base_model_commit = base::fetch_base(plan, live)?;
        if !plan.remote_inputs.is_empty() {
            live.update(|s| s.phase = TrainerPhase::Downloading);
            transfer::fetch_inputs(plan)?;
        }
        Ok(())
    };
    if leader {
        fetch(&mut plan)?;
    }
    group.barrier()?;
    if !leader {
        fetch(&mut plan)?;
    }
    if group.is_writer() {
        transfer::check_output(&plan)?;
    }
    live.update(|s| s.phase = TrainerPhase::Loading);

    let mut trainer = set_up(plan, tm)?;
    if !trainer.is_lora() {
        // Full fine-tuning: AdamW's moments are twice the weights; each rank keeps its share.
        group.shard_optimizer(&mut trainer.opt);
    }
    trainer.group = group;
    if let Some(r) = checkpoint::resume(
        &trainer.plan.checkpoint_dir,
        &trainer.batches.config_digest,
        &trainer.loaded.model,
        trainer.is_lora(),
        &mut trainer.opt,
        &mut trainer.batches.batcher,
    )? {
        trainer.st = r.state;
        trainer.snapshots = r.snapshots;
        tm.resumed_from_step = Some(r.step);
        tm.checkpoint_step = Some(r.step);
        tm.checkpoint_path = Some(r.dir.display().to_string());
        eprintln!("resumed from {} (step {})", r.dir.display(), r.step);
        trainer.last_ckpt = Some((r.step, r.dir));
    }
    // Every rank starts from rank 0's weights (equal already by seeding and the shared checkpoint).
    trainer.group.broadcast_trainable(&trainer.opt)?;
    let resumed_from = tm.resumed_from_step;
    trainer.baseline()?;
    let total = trainer.batches.schedule.total;
    let world = trainer.group.world();
    live.total_steps.set(total as f64);
    live.update(|s| {
        s.phase = TrainerPhase::Training;
        s.total_steps = total;
        s.step = trainer.st.step;
        s.resumed_from_step = resumed_from;
        s.ranks = (world > 1).then_some(world as i64);
        s.checkpoint_step = trainer.last_ckpt.as_ref().map(|c| c.0);
        s.metrics.contaminated_eval_samples = contaminated(&trainer);
        s.metrics.micro_batch_size = trainer.split_micro_batch();
    });

    let memory = MemoryMarks::start_training();
    let train_started = Instant::now();
    trainer.train(&term, live, tm)?;
    let train_seconds = train_started.elapsed().as_secs_f64();

    live.update(|s| s.phase = TrainerPhase::Exporting);
    let finished = trainer.finish(live)?;
    if !trainer.group.is_writer() {
        // Rank 0 writes the result; the others are done once it has.
        trainer.group.barrier()?;
        return Ok(());
    }
    let t_export = Instant::now();
    let digests = export_result(&trainer)?;
    let export_seconds = t_export.elapsed().as_secs_f64();
    let metrics = metrics(&trainer, &finished);
    let c = &mut trainer.clock;
    c.timings.insert("load_seconds", trainer.load_seconds);
    c.timings.insert("train_seconds", train_seconds);
    c.timings.insert("step_seconds", c.step_seconds);
    c.timings.insert("eval_seconds", c.eval_seconds);
    c.timings.insert("checkpoint_seconds", c.checkpoint_seconds);
    c.timings.insert("export_seconds", export_seconds);
    c.timings
        .insert("total_seconds", started.elapsed().as_secs_f64());
    let summary = TrainingSummary::new(
        &trainer,
        Outcome {
            finished: &finished,
            metrics: &metrics,
            resumed_from,
            memory,
            timings: &trainer.clock.timings,
            files: &digests,
        },
    );
    let output_dir = &trainer.plan.output_dir;
    export::write_json(
        &output_dir.join("training_summary.json"),
        &summary.to_value(),
    )?;
    write_report(output_dir);
    transfer::upload_outputs(&trainer.plan)?;
    report(&trainer, metrics, digests, live, tm);
    trainer.group.barrier()?;
    Ok(())
}

/// The process group of a data-parallel run (from the torchrun variables), or one process.
fn join_group(plan: &Plan, topology: Option<&Topology>) -> Result<Group, Stop> {
    let Some(t) = topology else {
        return Ok(Group::single());
    };
    let (device, _) = crate::load::pick_device(&plan.device)?;
    eprintln!(
        "rank {} of {} (local rank {}): joining the group at {}:{}",
        t.rank, t.world, t.local_rank, t.master_addr, t.master_port
    );
    let group = Group::join(t, device)?;
    eprintln!("rank {} of {}: group ready", t.rank, t.world);
    Ok(group)
}

/// `report.html`, the picture of the run. It is for people: a run whose results are written has
/// succeeded even when the picture cannot be drawn, so any failure, a panic included, is a warning.
fn write_report(output_dir: &Path) {
    match std::panic::catch_unwind(|| crate::report::write_report(output_dir)) {
        Ok(Ok(w)) => eprintln!("report: {} ({} bytes)", w.path.display(), w.bytes),
        Ok(Err(e)) => eprintln!("warning: report.html not written: {e}"),
        Err(_) => eprintln!("warning: report.html not written: internal error"),
    }
}

/// The setup stages in their fixed order. The data's digest goes into the termination message
/// as soon as it is known, so a later refusal still reports it.
fn set_up(plan: Plan, tm: &mut TerminationMessage) -> Result<Trainer, Stop> {
    let mut loaded = setup::load_model(&plan)?;
    let mut data = setup::load_data(&plan, &loaded)?;
    tm.dataset_digest = Some(data.prepared.train_digest.clone());
    tm.dataset_sources = data
        .sources
        .iter()
        .map(|r| SourceDigest {
            uri: None,
            digest: r.digest.clone(),
            samples: r.drawn as i64,
        })
        .collect();
    let probes = setup::probes(&plan, &loaded, &data.prepared)?;
    let mut guards = setup::guards(&plan, &mut loaded, data.prepared.train.len())?;
    let (lora, opt) = setup::trainable(&plan, &mut loaded.model, &mut guards)?;
    let batches = setup::batches(
        &plan,
        &mut data.prepared,
        &probes.retention_set,
        &guards.effective,
    );
    let load_seconds = loaded.started.elapsed().as_secs_f64();
    let s = &batches.schedule;
    eprintln!(
        "{} train samples, {} eval samples; {} batches/epoch, {} steps ({}/epoch, warmup {}); {} trainable parameters",
        batches.n_train,
        data.prepared.eval.len(),
        s.batches_per_epoch,
        s.total,
        s.steps_per_epoch,
        s.warmup,
        opt.numel()
    );
    let dpo = setup::dpo(
        &plan,
        data.pairs.take(),
        &mut loaded.model,
        &batches.config_digest,
    )?;
    let has_eval = !batches.eval_set.is_empty() || dpo.as_ref().is_some_and(|d| !d.eval.is_empty());
    Ok(Trainer {
        st: TrainState {
            config_digest: batches.config_digest.clone(),
            ..Default::default()
        },
        plan,
        loaded,
        prepared: data.prepared,
        probes,
        guards,
        lora,
        opt,
        batches,
        dpo,
        has_eval,
        load_seconds,
        snapshots: Snapshots::default(),
        last_ckpt: None,
        clock: Clock::default(),
        group: Group::single(),
    })
}

/// Writes the result (the adapter or the full model, then `output.merge` and `output.gguf`) and
/// returns the digests of the files written.
fn export_result(t: &Trainer) -> Result<Vec<FileDigest>, Stop> {
    let plan = &t.plan;
    let (output_dir, model) = (&plan.output_dir, &t.loaded.model);
    let mut files = match &t.lora {
        Some(c) => export::write_peft_adapter(output_dir, model, c, &plan.base_ref)?,
        None => export::write_full_model(output_dir, model, Some(&plan.model_path))?,
    };
    files.extend(export_merged(
        &plan.spec().output,
        output_dir,
        model,
        t.is_lora(),
        &plan.model_path,
    )?);
    Ok(checkpoint::digest_files(output_dir, &files)?)
}

/// The run's metrics as the FinetuneJob's status reports them.
fn metrics(t: &Trainer, f: &Finished) -> TrainingMetrics {
    let st = &t.st;
    let last = st.history.last();
    let preference_after = summary::preference_after(st);
    let c = &t.clock;
    TrainingMetrics {
        train_loss: last.map(|r| r.loss),
        eval_loss: st.evals.last().map(|e| e.eval_loss),
        best_eval_loss: st.best_eval_loss,
        learning_rate: last.map(|r| r.learning_rate),
        tokens_per_second: (c.step_seconds > 0.0).then(|| c.step_tokens as f64 / c.step_seconds),
        trained_tokens: Some(st.trained_tokens),
        retention_loss_delta: summary::retention_delta(st, f),
        retention_score: f.retention_score.map(|s| s.score()),
        eval_exact_match: f.generation_after.map(|s| s.exact_match()),
        preference_accuracy: preference_after.map(|m| m.reward_accuracy),
        reward_margin: preference_after.map(|m| m.reward_margin),
        contaminated_eval_samples: contaminated(t),
        micro_batch_size: t.split_micro_batch(),
    }
}

/// Eval samples the contamination check found (None without eval data).
fn contaminated(t: &Trainer) -> Option<i64> {
    let report = t.prepared.contamination.as_ref();
    report.map(|r| r.count() as i64)
}

/// The end of a successful run: the log line, `/status`, and the termination message.
fn report(
    t: &Trainer,
    metrics: TrainingMetrics,
    digests: Vec<FileDigest>,
    live: &Live,
    tm: &mut TerminationMessage,
) {
    let st = &t.st;
    eprintln!(
        "done: {} steps, last loss {:.4}{}, adapter in {}",
        st.step,
        metrics.train_loss.unwrap_or(f64::NAN),
        st.best_eval_loss
            .map(|b| format!(", best eval loss {b:.4}"))
            .unwrap_or_default(),
        t.plan.output_dir.display()
    );
    live.update(|s| {
        s.phase = TrainerPhase::Done;
        s.metrics = metrics.clone();
        s.eta_seconds = Some(0.0);
    });
    tm.step = Some(st.step);
    tm.metrics = Some(metrics);
    tm.stop_reason = st.stop_reason.clone();
    tm.stop_kind = st.stop_kind;
    tm.adapter = Some(ProducedAdapter {
        path: t.plan.output_dir.display().to_string(),
        files: digests,
    });
}

/// `output.merge` (LoRA: a Hugging Face model with the adapter folded in, under `merged/`) and
/// `output.gguf` (that model, or the full fine-tuned one, as `model-TYPE.gguf`). Returns the files
/// written, relative to `output_dir`.
fn export_merged(
    output: &finetune_crds::runtime::Output,
    output_dir: &Path,
    model: &CausalLm,
    is_lora: bool,
    source: &Path,
) -> Result<Vec<String>, Stop> {
    let mut files = Vec::new();
    // A full fine-tune's output directory already is the merged model.
    let merged = if is_lora {
        output_dir.join("merged")
    } else {
        output_dir.to_path_buf()
    };
    if is_lora && (output.merge || output.gguf.is_some()) {
        let t = Instant::now();
        let written = export::write_full_model(&merged, model, Some(source))?;
        eprintln!(
            "merged model: {} ({:.1}s)",
            merged.display(),
            t.elapsed().as_secs_f64()
        );
        files.extend(written.into_iter().map(|f| format!("merged/{f}")));
    }
    if let Some(ty) = output.gguf {
        let ty = export::gguf::GgufType::from(ty);
        let name = ty.name();
        let file = format!("model-{name}.gguf");
        let t = Instant::now();
        export::gguf::export_gguf(&merged, &output_dir.join(&file), ty)?;
        eprintln!("GGUF ({name}): {file} ({:.1}s)", t.elapsed().as_secs_f64());
        files.push(file);
    }
    Ok(files)
}
