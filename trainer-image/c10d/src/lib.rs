//! A small, safe binding to libtorch's c10d, the engine under `torch.distributed`: a `TCPStore`
//! for rendezvous, and Gloo (CPU) or NCCL (GPU) process groups with all-reduce, broadcast and
//! barrier on tch tensors. Nothing is re-implemented: every collective is c10d's own.
//!
//! ```no_run
//! use finetune_c10d::{Backend, GlooDevice, ProcessGroup, Rendezvous};
//! let rv = Rendezvous { host: "127.0.0.1".into(), port: 29500, rank: 0, world: 1,
//!                       timeout: std::time::Duration::from_secs(60) };
//! let pg = ProcessGroup::new(&rv, &Backend::Gloo(GlooDevice::Hostname("127.0.0.1".into())))?;
//! let mut t = vec![tch::Tensor::ones([4], (tch::Kind::Float, tch::Device::Cpu))];
//! pg.all_reduce_sum(&mut t)?;
//! # Ok::<(), finetune_c10d::Error>(())
//! ```
//!
//! The C++ side (csrc/) is a shim of a few functions that catch every exception and return its
//! message; [`ffi`] is the only module with `unsafe`.

mod ffi;

use std::ffi::CString;
use std::time::Duration;

use tch::{Device, Tensor};

/// A failed c10d call: which one, and libtorch's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// The call: `rendezvous`, `gloo`, `nccl`, `all_reduce`, `broadcast` or `barrier`.
    pub op: &'static str,
    /// libtorch's exception message, or what the binding found wrong before calling it.
    pub message: String,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "c10d {}: {}", self.op, self.message)
    }
}

impl std::error::Error for Error {}

fn fail(op: &'static str) -> impl FnOnce(String) -> Error {
    move |message| Error { op, message }
}

/// Where the group meets: rank 0 serves the `TCPStore` on `port`, the others connect to
/// `host:port`; `timeout` bounds the rendezvous and every collective.
#[derive(Debug, Clone)]
pub struct Rendezvous {
    /// Rank 0's address (`MASTER_ADDR`).
    pub host: String,
    /// The store's port (`MASTER_PORT`).
    pub port: u16,
    /// This process's rank (`RANK`).
    pub rank: usize,
    /// How many ranks (`WORLD_SIZE`).
    pub world: usize,
    /// For the rendezvous and for each collective.
    pub timeout: Duration,
}

/// The address Gloo's TCP transport listens on and advertises to its peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GlooDevice {
    /// The address a host name resolves to (`127.0.0.1` for one machine).
    Hostname(String),
    /// A network interface's address (`GLOO_SOCKET_IFNAME`).
    Interface(String),
    /// The machine's host name, as `torch.distributed` does by default.
    Default,
}

/// Which c10d process group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// CPU tensors.
    Gloo(GlooDevice),
    /// CUDA tensors, each rank on its own GPU.
    Nccl,
}

/// Whether this build has the Gloo process group (gloo headers were found at build time).
pub fn gloo_built_in() -> bool {
    ffi::gloo_built_in()
}

/// Whether this build has the NCCL process group (a CUDA libtorch and the nvidia headers).
pub fn nccl_built_in() -> bool {
    ffi::nccl_built_in()
}

/// A connected process group of `world` ranks. Not `Send`: use it on the thread that made it.
pub struct ProcessGroup {
    group: *mut ffi::RawGroup,
    rank: usize,
    world: usize,
    backend: Backend,
    timeout_ms: i64,
}

impl ProcessGroup {
    /// Meets the other ranks at `rv` (blocking until all have joined or the timeout) and builds
    /// the `backend` process group over the store.
    pub fn new(rv: &Rendezvous, backend: &Backend) -> Result<Self, Error> {
        if rv.world == 0 || rv.rank >= rv.world {
            return Err(Error {
                op: "rendezvous",
                message: format!("rank {} is not in a world of {}", rv.rank, rv.world),
            });
        }
        let world = i32::try_from(rv.world).map_err(|_| Error {
            op: "rendezvous",
            message: format!("a world of {} ranks is too large", rv.world),
        })?;
        let timeout_ms = i64::try_from(rv.timeout.as_millis()).unwrap_or(i64::MAX);
        let host = cstring("rendezvous", &rv.host)?;
        let store = ffi::tcp_store(&host, rv.port, world, rv.rank == 0, timeout_ms)
            .map_err(fail("rendezvous"))?;
        let store = StoreGuard(store);
        let rank = rv.rank as i32;
        let group = match backend {
            Backend::Gloo(device) => {
                let (kind, name) = match device {
                    GlooDevice::Hostname(h) => (0, h.as_str()),
                    GlooDevice::Interface(i) => (1, i.as_str()),
                    GlooDevice::Default => (2, ""),
                };
                let name = cstring("gloo", name)?;
                ffi::gloo_new(store.0, rank, world, (kind, &name), timeout_ms)
                    .map_err(fail("gloo"))?
            }
            Backend::Nccl => {
                ffi::nccl_new(store.0, rank, world, timeout_ms).map_err(fail("nccl"))?
            }
        };
        // The group holds its own reference to the store; ours goes with the guard.
        Ok(ProcessGroup {
            group,
            rank: rv.rank,
            world: rv.world,
            backend: backend.clone(),
            timeout_ms,
        })
    }

    /// This process's rank, 0-based.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// How many ranks the group has.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Sums each tensor over the ranks, in place. Every rank passes the same shapes in the same
    /// order; all reductions are launched before the first is waited for.
    pub fn all_reduce_sum(&self, tensors: &mut [Tensor]) -> Result<(), Error> {
        self.check("all_reduce", tensors)?;
        ffi::all_reduce_sum(self.group, tensors, self.timeout_ms).map_err(fail("all_reduce"))
    }

    /// Copies `root`'s tensors into every other rank's, in place.
    pub fn broadcast(&self, tensors: &mut [Tensor], root: usize) -> Result<(), Error> {
        self.check("broadcast", tensors)?;
        if root >= self.world {
            return Err(Error {
                op: "broadcast",
                message: format!("root {root} is not in a world of {}", self.world),
            });
        }
        ffi::broadcast(self.group, tensors, root as i32, self.timeout_ms).map_err(fail("broadcast"))
    }

    /// Returns once every rank has called it.
    pub fn barrier(&self) -> Result<(), Error> {
        ffi::barrier(self.group, self.timeout_ms).map_err(fail("barrier"))
    }

    /// What c10d would reject with a less helpful message (or, for a non-contiguous tensor,
    /// reduce into a copy the caller never sees).
    fn check(&self, op: &'static str, tensors: &[Tensor]) -> Result<(), Error> {
        for (i, t) in tensors.iter().enumerate() {
            let problem = if !t.defined() {
                Some("is undefined".to_string())
            } else if !t.is_contiguous() {
                Some("is not contiguous".to_string())
            } else {
                match (&self.backend, t.device()) {
                    (Backend::Gloo(_), Device::Cpu) | (Backend::Nccl, Device::Cuda(_)) => None,
                    (b, d) => Some(format!("is on {d:?}, which {b:?} cannot reduce")),
                }
            };
            if let Some(p) = problem {
                return Err(Error {
                    op,
                    message: format!("tensor {i} {p}"),
                });
            }
        }
        Ok(())
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: `group` came from the shim in `new` and is dropped once, here.
        unsafe { ffi::group_free(self.group) }
    }
}

/// Frees our reference to the store once the group holds its own.
struct StoreGuard(*mut ffi::RawStore);

impl Drop for StoreGuard {
    fn drop(&mut self) {
        // SAFETY: the pointer came from `ffi::tcp_store` and is freed once, here.
        unsafe { ffi::store_free(self.0) }
    }
}

fn cstring(op: &'static str, s: &str) -> Result<CString, Error> {
    CString::new(s).map_err(|_| Error {
        op,
        message: format!("{s:?} contains a NUL byte"),
    })
}
