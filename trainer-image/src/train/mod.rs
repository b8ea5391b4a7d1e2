//! Supervised fine-tuning and preference alignment: the `run JOB.yaml` pipeline and its parts.
//!
//! The pipeline, one module per stage, each depending only on the ones before it:
//! - [`stop`]: why a run ends early ([`stop::Stop`]), one variant per exit code.
//! - [`state`]: what a checkpoint remembers across attempts (`trainer_state.json`).
//! - [`plan`]: the pure first stage, the FinetuneJob and the environment resolved into paths,
//!   device, data and LoRA settings, schedule and config digest, with the refusals that need no
//!   model; unit-tested without one.
//! - [`base`]: an `hf://` base model fetched into the model cache, with progress.
//! - [`setup`]: model, data, probes, forgetting guards, trainable parameters, optimizer, batches
//!   and DPO's reference, in the fixed order that the RNG seeding depends on.
//! - [`checkpoint`]: atomic, verified `step-N/` directories, and the run's `save`/`resume` pair.
//! - [`trainer`]: the loop (step, record, evaluate, probe retention, checkpoint), the
//!   measurements before the first update and the evaluations of the result.
//! - [`summary`]: `training_summary.json` as a typed struct.
//! - [`job`]: the driver (plan → setup → resume → loop → finish → report) and the exit codes.
//!
//! The pieces they use: the optimizer ([`optim`]), learning-rate schedules ([`schedule`]), one
//! optimizer step with gradient accumulation ([`step`]), micro-batches and out-of-memory
//! recovery ([`micro`]), data parallelism over a c10d process group ([`group`]), DPO ([`dpo`]), the forgetting guards
//! ([`guard`], [`anchor`]), the general question set they and the probe draw on ([`general`]),
//! the retention and generation probes ([`probe`], [`retention`]),
//! long-context RoPE scaling ([`long_context`]) and vocabulary expansion ([`vocab`]).

pub mod anchor;
pub mod base;
pub mod checkpoint;
pub mod dpo;
pub mod general;
pub mod group;
pub mod guard;
pub mod job;
pub mod long_context;
pub mod micro;
pub mod optim;
pub mod plan;
pub mod probe;
pub mod retention;
pub mod schedule;
pub mod setup;
pub mod state;
pub mod step;
pub mod stop;
pub mod summary;
pub mod trainer;
pub mod transfer;
pub mod vocab;

pub use job::run_job;
pub use plan::RunOptions;
