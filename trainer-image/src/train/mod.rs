//! Supervised fine-tuning: the optimizer ([`optim`]), learning-rate schedules ([`schedule`]), one
//! optimizer step with gradient accumulation ([`step`]), atomic checkpoints ([`checkpoint`]) and
//! the `run JOB.yaml` driver ([`job`]) that ties them to the data pipeline, the status server and
//! the operator contract.

pub mod anchor;
pub mod checkpoint;
pub mod dpo;
pub mod guard;
pub mod job;
pub mod long_context;
pub mod optim;
pub mod probe;
pub mod retention;
pub mod schedule;
pub mod step;
pub mod vocab;

pub use job::{RunOptions, run_job};
