//! `finetune-operator`: the FinetuneJob and Adapter operator.
//!
//! Commands available now:
//! - `crd`: print the CustomResourceDefinitions (pipe into `kubectl apply -f -`).
//! - `check FILE...`: validate FinetuneJob and Adapter manifests offline with the same schema and
//!   CEL rules the apiserver applies, e.g. in a GitOps pipeline before a merge.
//!
//! The controller itself (`run`) arrives with the operator-core work; see the README.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "finetune-operator",
    version,
    about = "Fine-tuning jobs on Kubernetes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CRDs as a multi-document YAML stream.
    Crd,
    /// Validate manifests (FinetuneJob or Adapter) as the apiserver would; exit 2 when any is invalid.
    Check {
        /// Manifest files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Crd => {
            for (_name, yaml) in finetune_crds::crd_files() {
                print!("---\n{yaml}");
            }
            ExitCode::SUCCESS
        }
        Command::Check { files } => finetune_operator::check::run(&files),
    }
}
