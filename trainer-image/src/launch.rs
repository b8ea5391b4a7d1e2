//! `finetune-trainer launch --nproc-per-node N -- run JOB.yaml`: one trainer process per rank on
//! this machine, as torchrun starts them. Each child gets the standard variables (`WORLD_SIZE`,
//! `RANK`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), its own GPU through
//! `CUDA_VISIBLE_DEVICES` when there are GPUs, and an equal share of the CPU threads.
//!
//! The children are one attempt: when one exits with a failure, the others get SIGTERM (they
//! checkpoint nothing new: the step they are in cannot finish without the failed rank) and, after
//! a grace period, SIGKILL; the launcher exits with the first failure's code. SIGTERM to the
//! launcher (a preemption) goes to every child, which checkpoint together and exit 143. The pod's
//! first rank alone writes its termination message and serves `/status` (rank 0's reports the
//! group); the other ranks' output lines are prefixed with their rank (whole lines, never
//! interleaved).

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use finetune_crds::contract::env;
use rustix::process::{Pid, Signal, kill_process};

use crate::{Error, Result};

/// Where and how many.
#[derive(Debug, Clone)]
pub struct LaunchPlan {
    pub nproc_per_node: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// GPUs to hand out, one per local rank (`CUDA_VISIBLE_DEVICES` entries); empty on CPU.
    pub gpus: Vec<String>,
    /// Threads for each rank's libtorch (`OMP_NUM_THREADS`).
    pub threads_per_rank: usize,
    /// After a failure, how long the others get to stop before SIGKILL.
    pub grace: Duration,
}

impl LaunchPlan {
    pub fn world(&self) -> usize {
        self.nnodes * self.nproc_per_node
    }

    /// The environment of local rank `local`.
    pub fn child_env(&self, local: usize) -> Vec<(&'static str, String)> {
        let rank = self.node_rank * self.nproc_per_node + local;
        let mut vars = vec![
            ("WORLD_SIZE", self.world().to_string()),
            ("RANK", rank.to_string()),
            ("LOCAL_RANK", local.to_string()),
            ("LOCAL_WORLD_SIZE", self.nproc_per_node.to_string()),
            ("MASTER_ADDR", self.master_addr.clone()),
            ("MASTER_PORT", self.master_port.to_string()),
            ("OMP_NUM_THREADS", self.threads_per_rank.to_string()),
        ];
        if let Some(gpu) = self.gpus.get(local) {
            vars.push(("CUDA_VISIBLE_DEVICES", gpu.clone()));
        }
        vars
    }

    /// Refuses what cannot start: more local ranks than GPUs, a node rank outside the nodes.
    pub fn check(&self) -> Result<()> {
        if self.nproc_per_node == 0 || self.nnodes == 0 {
            return Err(Error::Usage(
                "--nproc-per-node and --nnodes must be at least 1".into(),
            ));
        }
        if self.node_rank >= self.nnodes {
            return Err(Error::Usage(format!(
                "--node-rank {} is not below --nnodes {}",
                self.node_rank, self.nnodes
            )));
        }
        if !self.gpus.is_empty() && self.gpus.len() < self.nproc_per_node {
            return Err(Error::Usage(format!(
                "{} ranks per node but {} GPUs visible ({})",
                self.nproc_per_node,
                self.gpus.len(),
                self.gpus.join(",")
            )));
        }
        Ok(())
    }
}

/// The GPUs this process may use: `CUDA_VISIBLE_DEVICES`'s entries, else `0..count`.
pub fn visible_gpus(visible: Option<String>, count: usize) -> Vec<String> {
    match visible {
        Some(v) if !v.trim().is_empty() => v.split(',').map(|s| s.trim().to_string()).collect(),
        _ => (0..count).map(|i| i.to_string()).collect(),
    }
}

/// Runs `args` (a trainer command line, e.g. `run job.yaml`) once per local rank; returns the
/// exit code for the launcher.
pub fn launch(plan: &LaunchPlan, args: &[String]) -> Result<i32> {
    plan.check()?;
    let exe =
        std::env::current_exe().map_err(|e| Error::Usage(format!("cannot find myself: {e}")))?;
    let term = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, term.clone())
            .map_err(|e| Error::Usage(format!("cannot install the signal handler: {e}")))?;
    }
    eprintln!(
        "launch: {} ranks on this node (node {} of {}, world {}), rendezvous at {}:{}",
        plan.nproc_per_node,
        plan.node_rank,
        plan.nnodes,
        plan.world(),
        plan.master_addr,
        plan.master_port
    );
    let mut children = Vec::new();
    let mut forwarders = Vec::new();
    for local in 0..plan.nproc_per_node {
        match spawn(&exe, plan, local, args) {
            Ok((c, f)) => {
                children.push(Some(c));
                forwarders.extend(f);
            }
            Err(e) => {
                stop_all(&mut children, Signal::KILL);
                return Err(e);
            }
        }
    }
    let code = supervise(&mut children, &term, plan.grace);
    // The children are gone, so their pipes close: the last lines are out once these end.
    for f in forwarders {
        let _ = f.join();
    }
    Ok(code)
}

type Forwarder = std::thread::JoinHandle<()>;

fn spawn(
    exe: &std::path::Path,
    plan: &LaunchPlan,
    local: usize,
    args: &[String],
) -> Result<(Child, Vec<Forwarder>)> {
    let rank = plan.node_rank * plan.nproc_per_node + local;
    let mut cmd = Command::new(exe);
    cmd.args(args).envs(plan.child_env(local));
    if local != 0 {
        // One termination message per pod: its first rank's (rank 0's in the gang's first pod).
        cmd.env_remove(env::TERMINATION_LOG);
    }
    // Every rank's output goes through a line forwarder, so lines never interleave mid-line.
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::Usage(format!("cannot start rank {rank}: {e}")))?;
    let prefix = if rank == 0 {
        String::new()
    } else {
        format!("[rank {rank}] ")
    };
    let mut forwarders = Vec::new();
    if let Some(out) = child.stdout.take() {
        forwarders.push(forward(out, prefix.clone(), false));
    }
    if let Some(err) = child.stderr.take() {
        forwarders.push(forward(err, prefix, true));
    }
    Ok((child, forwarders))
}

/// Copies a child's lines to ours with `prefix`, on a thread of its own.
fn forward(from: impl Read + Send + 'static, prefix: String, to_stderr: bool) -> Forwarder {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(std::io::Result::ok) {
            if to_stderr {
                let _ = writeln!(std::io::stderr().lock(), "{prefix}{line}");
            } else {
                let _ = writeln!(std::io::stdout().lock(), "{prefix}{line}");
            }
        }
    })
}

/// Waits for the children: the first failure (or SIGTERM to us) stops the rest. Returns the
/// first failure's exit code (a signal `s` counts as `128 + s`), 0 when all succeeded.
fn supervise(children: &mut [Option<Child>], term: &AtomicBool, grace: Duration) -> i32 {
    let mut first_failure: Option<i32> = None;
    let mut forwarded_term = false;
    let mut kill_at: Option<Instant> = None;
    while children.iter().any(Option::is_some) {
        if term.load(Ordering::SeqCst) && !forwarded_term {
            eprintln!("launch: SIGTERM: passing it to every rank");
            stop_all(children, Signal::TERM);
            forwarded_term = true;
        }
        for (local, slot) in children.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            let Ok(Some(status)) = child.try_wait() else {
                continue;
            };
            *slot = None;
            let code = exit_code(status);
            if code != 0 && first_failure.is_none() {
                eprintln!("launch: local rank {local} exited with {code}: stopping the others");
                first_failure = Some(code);
                stop_all(children, Signal::TERM);
                kill_at = Some(Instant::now() + grace);
                break;
            }
        }
        if kill_at.is_some_and(|t| Instant::now() >= t) {
            stop_all(children, Signal::KILL);
            kill_at = None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    first_failure.unwrap_or(0)
}

fn stop_all(children: &mut [Option<Child>], signal: Signal) {
    for child in children.iter_mut().flatten() {
        if let Some(pid) = i32::try_from(child.id()).ok().and_then(Pid::from_raw) {
            let _ = kill_process(pid, signal);
        }
    }
}

fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> LaunchPlan {
        LaunchPlan {
            nproc_per_node: 2,
            nnodes: 2,
            node_rank: 1,
            master_addr: "job-0.job".into(),
            master_port: 29500,
            gpus: vec!["4".into(), "6".into()],
            threads_per_rank: 8,
            grace: Duration::from_secs(30),
        }
    }

    #[test]
    fn each_child_gets_the_torchrun_variables_and_its_gpu() {
        let p = plan();
        let env: std::collections::HashMap<_, _> = p.child_env(1).into_iter().collect();
        assert_eq!(env["WORLD_SIZE"], "4");
        assert_eq!(env["RANK"], "3");
        assert_eq!(env["LOCAL_RANK"], "1");
        assert_eq!(env["LOCAL_WORLD_SIZE"], "2");
        assert_eq!(env["MASTER_ADDR"], "job-0.job");
        assert_eq!(env["CUDA_VISIBLE_DEVICES"], "6");
        assert_eq!(env["OMP_NUM_THREADS"], "8");
        let cpu = LaunchPlan { gpus: vec![], ..p };
        assert!(
            !cpu.child_env(0)
                .iter()
                .any(|(k, _)| *k == "CUDA_VISIBLE_DEVICES")
        );
    }

    #[test]
    fn impossible_layouts_are_refused() {
        assert!(plan().check().is_ok());
        let e = LaunchPlan {
            gpus: vec!["0".into()],
            ..plan()
        }
        .check()
        .unwrap_err();
        assert!(e.to_string().contains("2 ranks per node but 1 GPUs"), "{e}");
        let e = LaunchPlan {
            node_rank: 2,
            ..plan()
        }
        .check()
        .unwrap_err();
        assert!(e.to_string().contains("--node-rank 2"), "{e}");
    }

    #[test]
    fn visible_gpus_come_from_the_variable_or_the_count() {
        assert_eq!(visible_gpus(Some("3, 1".into()), 8), vec!["3", "1"]);
        assert_eq!(visible_gpus(None, 2), vec!["0", "1"]);
        assert_eq!(visible_gpus(Some(String::new()), 0), Vec::<String>::new());
    }

    #[test]
    fn the_first_failure_stops_the_others_and_is_the_exit_code() {
        let sh = |script: &str| Some(Command::new("sh").arg("-c").arg(script).spawn().unwrap());
        let started = Instant::now();
        let mut children = vec![sh("sleep 60"), sh("sleep 0.2; exit 3"), sh("sleep 60")];
        let code = supervise(
            &mut children,
            &AtomicBool::new(false),
            Duration::from_secs(5),
        );
        assert_eq!(code, 3);
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
        let mut ok = vec![sh("exit 0"), sh("sleep 0.1")];
        assert_eq!(
            supervise(&mut ok, &AtomicBool::new(false), Duration::from_secs(1)),
            0
        );
        // SIGTERM to the launcher reaches the children (sleep dies of it: 128 + 15).
        let mut term = vec![sh("sleep 60")];
        let code = supervise(&mut term, &AtomicBool::new(true), Duration::from_secs(5));
        assert_eq!(code, 143);
    }
}
