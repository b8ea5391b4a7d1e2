//! Data parallelism: the ranks of one run as a c10d process group ([`finetune_c10d`]).
//!
//! Every rank loads the same model and data and walks the same batcher, so each builds the
//! step's full list of micro-batches and counts its supervised tokens without talking to the
//! others. Rank `r` runs forward and backward on the micro-batches `i` with `i % world == r`, with
//! the loss divided by the step's global token count; the gradients are then summed over the
//! ranks ([`Group::sum_gradients`]), which gives every rank the gradient one process would have
//! computed over the whole step. Clipping and AdamW then run on every rank on identical inputs,
//! so the weights stay equal without being sent. Dropout seeds come from the global micro-batch
//! index, so masks do not depend on which rank runs a micro-batch: N ranks make the same update as
//! one process that splits the step into the same micro-batches.
//!
//! The data cursor is the same on every rank (each walks all of the step's batches), so the one
//! checkpoint rank 0 writes resumes the whole group. Evaluation and the probes run on every rank
//! (their results decide early stops, which must agree); only rank 0 writes files and serves
//! `/status`.

use std::time::Duration;

use finetune_c10d::{Backend, GlooDevice, ProcessGroup, Rendezvous};
use tch::{Device, Kind, Tensor};

use crate::train::optim::AdamW;
use crate::train::stop::{Stop, is_oom};

/// The standard variables of `torch.distributed` (as torchrun sets them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// `GLOO_SOCKET_IFNAME`: the interface Gloo binds to.
    pub gloo_interface: Option<String>,
    /// `FINETUNE_DIST_TIMEOUT_SECONDS` (default 1800, torch's): rendezvous and each collective.
    pub timeout: Duration,
}

impl Topology {
    /// `None` without `WORLD_SIZE`; an error naming the variable when one is missing or
    /// malformed. `WORLD_SIZE=1` is a group of one (as torchrun makes it): the collectives are
    /// trivial, and the binding is exercised (`make gpu-check` proves NCCL that way).
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<Topology>, Stop> {
        let Some(world) = var("WORLD_SIZE") else {
            return Ok(None);
        };
        let world: usize = parse("WORLD_SIZE", &world)?;
        if world == 0 {
            return Err(invalid(
                "WORLD_SIZE",
                "WORLD_SIZE must be at least 1".into(),
            ));
        }
        let need = |name: &str| {
            var(name).ok_or_else(|| {
                invalid(
                    name,
                    format!("{name} is required when WORLD_SIZE is {world}"),
                )
            })
        };
        let rank: usize = parse("RANK", &need("RANK")?)?;
        if rank >= world {
            return Err(invalid(
                "RANK",
                format!("RANK {rank} is not below WORLD_SIZE {world}"),
            ));
        }
        let local_rank = match var("LOCAL_RANK") {
            Some(v) => parse("LOCAL_RANK", &v)?,
            None => rank,
        };
        let timeout = match var("FINETUNE_DIST_TIMEOUT_SECONDS") {
            Some(v) => Duration::from_secs(parse("FINETUNE_DIST_TIMEOUT_SECONDS", &v)?),
            None => Duration::from_secs(1800),
        };
        Ok(Some(Topology {
            rank,
            world,
            local_rank,
            master_addr: need("MASTER_ADDR")?,
            master_port: parse("MASTER_PORT", &need("MASTER_PORT")?)?,
            gloo_interface: var("GLOO_SOCKET_IFNAME").filter(|s| !s.is_empty()),
            timeout,
        }))
    }

    /// Gloo's address: the interface when named, loopback when the group meets on loopback
    /// (one machine), else the host name's address as `torch.distributed` does.
    fn gloo_device(&self) -> GlooDevice {
        let loopback = matches!(self.master_addr.as_str(), "localhost" | "::1")
            || self.master_addr.starts_with("127.");
        match &self.gloo_interface {
            Some(i) => GlooDevice::Interface(i.clone()),
            None if loopback => GlooDevice::Hostname("127.0.0.1".into()),
            None => GlooDevice::Default,
        }
    }
}

fn parse<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, Stop> {
    value
        .trim()
        .parse()
        .map_err(|_| invalid(name, format!("{name}={value:?} is not a valid number")))
}

fn invalid(name: &str, message: String) -> Stop {
    Stop::Invalid {
        message,
        param: Some(format!("env {name}")),
    }
}

/// Gradients are summed in buckets of about this many bytes: few enough calls to amortise the
/// latency, small enough that one flat copy never doubles a large model's gradient memory.
const BUCKET_BYTES: i64 = 25 << 20;

/// This process's place in the run: one process alone, or a rank of a process group.
pub struct Group {
    pg: Option<ProcessGroup>,
    rank: usize,
    world: usize,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Group(rank {} of {})", self.rank, self.world)
    }
}

impl Group {
    /// One process, no communication.
    pub fn single() -> Self {
        Group {
            pg: None,
            rank: 0,
            world: 1,
        }
    }

    /// Meets the other ranks (blocking until all are there or the timeout): NCCL when the model
    /// is on a GPU, Gloo on the CPU.
    pub fn join(topo: &Topology, device: Device) -> Result<Self, Stop> {
        let backend = match device {
            Device::Cuda(_) => Backend::Nccl,
            _ => Backend::Gloo(topo.gloo_device()),
        };
        let rv = Rendezvous {
            host: topo.master_addr.clone(),
            port: topo.master_port,
            rank: topo.rank,
            world: topo.world,
            timeout: topo.timeout,
        };
        let pg = ProcessGroup::new(&rv, &backend).map_err(|e| {
            Stop::Error(format!(
                "rank {} of {}: cannot join the group at {}:{}: {e}",
                topo.rank, topo.world, topo.master_addr, topo.master_port
            ))
        })?;
        Ok(Group {
            pg: Some(pg),
            rank: topo.rank,
            world: topo.world,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Rank 0: the one that writes checkpoints, outputs and the status.
    pub fn is_writer(&self) -> bool {
        self.rank == 0
    }

    /// Whether this rank runs micro-batch `index` of a step.
    pub fn runs(&self, index: usize) -> bool {
        index % self.world == self.rank
    }

    /// Sums every trainable gradient over the ranks, in place. A rank that ran no micro-batch
    /// still takes part (with zero gradients).
    pub fn sum_gradients(&self, opt: &AdamW) -> Result<(), Stop> {
        let Some(pg) = &self.pg else { return Ok(()) };
        let grads: Vec<Tensor> = opt.params.iter().map(|p| defined_grad(&p.param)).collect();
        // Allocation failures here are not retried (only the step's own share is, on every rank
        // at once): `f_` calls turn them into a stop instead of a panic.
        let torch = |e: tch::TchError| {
            let message = format!("rank {}: summing gradients: {e}", self.rank);
            if is_oom(&message) {
                Stop::Oom(message)
            } else {
                Stop::Error(message)
            }
        };
        tch::no_grad(|| -> Result<(), Stop> {
            let buckets = buckets(&grads);
            let mut flat = Vec::with_capacity(buckets.len());
            for bucket in &buckets {
                let parts: Vec<Tensor> = bucket.iter().map(|&i| grads[i].reshape([-1])).collect();
                flat.push(Tensor::f_cat(&parts, 0).map_err(torch)?);
            }
            pg.all_reduce_sum(&mut flat).map_err(|e| lost(self, e))?;
            for (bucket, sum) in buckets.iter().zip(&flat) {
                let mut offset = 0;
                for &i in bucket {
                    let mut g = grads[i].shallow_clone();
                    let n = g.numel() as i64;
                    g.f_copy_(&sum.narrow(0, offset, n).view_as(&g))
                        .map_err(torch)?;
                    offset += n;
                }
            }
            Ok(())
        })
    }

    /// Sums `values` over the ranks (float64, in place).
    pub fn sum_values(&self, values: &mut [f64]) -> Result<(), Stop> {
        let Some(pg) = &self.pg else { return Ok(()) };
        let mut t = vec![Tensor::from_slice(values).to_kind(Kind::Double)];
        pg.all_reduce_sum(&mut t).map_err(|e| lost(self, e))?;
        let summed = Vec::<f64>::try_from(&t[0]).map_err(|e| Stop::Error(e.to_string()))?;
        values.copy_from_slice(&summed);
        Ok(())
    }

    /// Whether any rank has `flag` set (SIGTERM on one member stops all at the same step).
    pub fn any(&self, flag: bool) -> Result<bool, Stop> {
        let mut v = [f64::from(u8::from(flag))];
        self.sum_values(&mut v)?;
        Ok(v[0] > 0.0)
    }

    /// Copies rank 0's trainable weights to every rank (they start equal by seeding; this makes
    /// it so whatever a rank's initialisation did).
    pub fn broadcast_trainable(&self, opt: &AdamW) -> Result<(), Stop> {
        let Some(pg) = &self.pg else { return Ok(()) };
        tch::no_grad(|| {
            let mut params: Vec<Tensor> =
                opt.params.iter().map(|p| p.param.shallow_clone()).collect();
            pg.broadcast(&mut params, 0).map_err(|e| lost(self, e))
        })
    }

    /// Shards `opt`'s state over the ranks (ZeRO stage 1): each rank keeps the moments of about
    /// `1/world` of the parameters and updates only those; [`Group::share_updates`] then sends
    /// each updated parameter to the others. Nothing to do alone.
    pub fn shard_optimizer(&self, opt: &mut AdamW) {
        if self.world > 1 {
            let kept = opt.shard(self.rank, self.world);
            let all = opt.numel() * 2;
            eprintln!(
                "rank {} of {}: optimizer state sharded, {:.1} of {:.1} MiB on this rank",
                self.rank,
                self.world,
                (kept * 4) as f64 / (1 << 20) as f64,
                (all * 4) as f64 / (1 << 20) as f64
            );
        }
    }

    /// After a sharded update: every parameter from the rank that updated it to all the others.
    pub fn share_updates(&self, opt: &AdamW) -> Result<(), Stop> {
        let (Some(pg), Some(_)) = (&self.pg, opt.shard_rank) else {
            return Ok(());
        };
        tch::no_grad(|| {
            for owner in 0..self.world {
                let mut params: Vec<Tensor> = opt
                    .params
                    .iter()
                    .filter(|p| p.owner == owner)
                    .map(|p| p.param.shallow_clone())
                    .collect();
                if !params.is_empty() {
                    pg.broadcast(&mut params, owner)
                        .map_err(|e| lost(self, e))?;
                }
            }
            Ok(())
        })
    }

    /// The whole optimizer state (`m.NAME`, `v.NAME` of every parameter) for a checkpoint: under
    /// sharding each parameter's moments come from their owner, one parameter at a time (so no
    /// rank ever holds more than its share and one parameter's extra). Every rank must call it;
    /// only rank 0's result is complete.
    pub fn full_optimizer_state(&self, opt: &AdamW) -> Result<Vec<(String, Tensor)>, Stop> {
        let (Some(pg), Some(_)) = (&self.pg, opt.shard_rank) else {
            return Ok(opt.state_tensors());
        };
        let mut out = Vec::new();
        for p in &opt.params {
            let mut mv = if p.owner == self.rank {
                vec![p.m.shallow_clone(), p.v.shallow_clone()]
            } else {
                let z = Tensor::zeros(p.param.size(), (Kind::Float, p.param.device()));
                vec![z.copy(), z]
            };
            pg.broadcast(&mut mv, p.owner).map_err(|e| lost(self, e))?;
            if self.is_writer() {
                let v = mv.pop().expect("two tensors");
                let m = mv.pop().expect("two tensors");
                out.push((format!("m.{}", p.name), m));
                out.push((format!("v.{}", p.name), v));
            }
        }
        Ok(out)
    }

    /// Returns once every rank is here (after rank 0 wrote a checkpoint or the outputs).
    pub fn barrier(&self) -> Result<(), Stop> {
        let Some(pg) = &self.pg else { return Ok(()) };
        pg.barrier().map_err(|e| lost(self, e))
    }
}

/// A collective failed: another rank died, left or timed out. The attempt ends; the operator
/// restarts the group from the last checkpoint.
fn lost(g: &Group, e: finetune_c10d::Error) -> Stop {
    Stop::Error(format!(
        "rank {} of {}: {e} (another rank failed, left or timed out; the group stops)",
        g.rank, g.world
    ))
}

/// `param`'s gradient, made (zero) when backward has not reached it on this rank yet: every rank
/// must pass the same tensors to the collective.
fn defined_grad(param: &Tensor) -> Tensor {
    let g = param.grad();
    if g.defined() {
        return g;
    }
    (param * 0.0).sum(Kind::Float).backward();
    param.grad()
}

/// Indices of `grads` grouped into buckets of one dtype and at most [`BUCKET_BYTES`] (a larger
/// tensor is a bucket of its own), in order.
fn buckets(grads: &[Tensor]) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut bytes = 0i64;
    for (i, g) in grads.iter().enumerate() {
        let size = g.numel() as i64 * g.kind().elt_size_in_bytes() as i64;
        let same_kind = current.first().is_none_or(|&j| grads[j].kind() == g.kind());
        if !current.is_empty() && (bytes + size > BUCKET_BYTES || !same_kind) {
            out.push(std::mem::take(&mut current));
            bytes = 0;
        }
        current.push(i);
        bytes += size;
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn the_torchrun_variables_make_the_topology() {
        assert_eq!(Topology::from_env(env(&[])).unwrap(), None);
        // torchrun's world of one is a group of one (the binding still runs).
        let one = env(&[
            ("WORLD_SIZE", "1"),
            ("RANK", "0"),
            ("MASTER_ADDR", "::1"),
            ("MASTER_PORT", "1"),
        ]);
        assert_eq!(Topology::from_env(one).unwrap().unwrap().world, 1);
        let t = Topology::from_env(env(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29500"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (t.rank, t.world, t.local_rank, t.master_port),
            (3, 4, 1, 29500)
        );
        assert_eq!(t.gloo_device(), GlooDevice::Hostname("127.0.0.1".into()));
        assert_eq!(t.timeout, Duration::from_secs(1800));
        let named = Topology {
            master_addr: "job-0.job".into(),
            ..t.clone()
        };
        assert_eq!(named.gloo_device(), GlooDevice::Default);
        let iface = Topology {
            gloo_interface: Some("eth0".into()),
            ..named
        };
        assert_eq!(iface.gloo_device(), GlooDevice::Interface("eth0".into()));
    }

    #[test]
    fn a_missing_or_bad_variable_is_named() {
        let cases: [(&[(&str, &str)], &str); 5] = [
            (&[("WORLD_SIZE", "two")], "env WORLD_SIZE"),
            (&[("WORLD_SIZE", "0")], "env WORLD_SIZE"),
            (
                &[
                    ("WORLD_SIZE", "2"),
                    ("MASTER_ADDR", "a"),
                    ("MASTER_PORT", "1"),
                ],
                "env RANK",
            ),
            (
                &[
                    ("WORLD_SIZE", "2"),
                    ("RANK", "2"),
                    ("MASTER_ADDR", "a"),
                    ("MASTER_PORT", "1"),
                ],
                "env RANK",
            ),
            (
                &[
                    ("WORLD_SIZE", "2"),
                    ("RANK", "1"),
                    ("MASTER_ADDR", "a"),
                    ("MASTER_PORT", "99999"),
                ],
                "env MASTER_PORT",
            ),
        ];
        for (vars, want) in cases {
            match Topology::from_env(env(vars)) {
                Err(Stop::Invalid { param, message }) => {
                    assert_eq!(param.as_deref(), Some(want), "{message}")
                }
                other => panic!("{vars:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn buckets_keep_order_split_by_size_and_dtype() {
        let f = |n: i64| Tensor::zeros([n], (Kind::Float, Device::Cpu));
        let big = (BUCKET_BYTES / 4) + 1;
        let grads = vec![
            f(10),
            f(20),
            f(big),
            f(5),
            Tensor::zeros([3], (Kind::BFloat16, Device::Cpu)),
            f(1),
        ];
        assert_eq!(
            buckets(&grads),
            vec![vec![0, 1], vec![2], vec![3], vec![4], vec![5]]
        );
        assert!(buckets(&[]).is_empty());
    }

    #[test]
    fn one_process_needs_no_communication() {
        let g = Group::single();
        assert!(g.is_writer() && g.runs(0) && g.runs(7));
        let mut v = [1.5, 2.0];
        g.sum_values(&mut v).unwrap();
        assert_eq!(v, [1.5, 2.0]);
        assert!(!g.any(false).unwrap());
    }
}
