//! `finetune-trainer`: the trainer image's entry point. Errors caused by the input (files, flags,
//! data) exit with status 2 and a one-line message naming the file; nothing prints a backtrace.

use clap::Parser;
use finetune_trainer::cli;

fn main() {
    // A panic is a bug, not bad input: report it in one line, without a backtrace.
    std::panic::set_hook(Box::new(|info| {
        if finetune_trainer::error::panic_is_contained() {
            return; // reported as an input error by the caller
        }
        eprintln!("internal error: {info}");
    }));
    let cli = cli::Cli::parse();
    match std::panic::catch_unwind(|| cli::run(cli)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            std::process::exit(e.exit_code());
        }
        Err(_) => std::process::exit(101),
    }
}
