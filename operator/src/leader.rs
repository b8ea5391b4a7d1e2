//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go's `leaderelection` does it,
//! so that two replicas can run and only one reconciles.
//!
//! - A candidate takes the lease when it has no holder, or when the holder's record has not
//!   changed for a whole lease duration *as observed by this candidate's own clock* (the
//!   `renewTime` written by another machine is never compared with the local clock, so clock
//!   skew between replicas cannot cause two leaders).
//! - The leader renews every [`Timings::retry_period`]; when no renewal has succeeded for
//!   [`Timings::renew_deadline`] (shorter than the lease duration, so it stops before anyone else
//!   may take over) it steps down: [`LeaderElector::hold`] returns and the caller stops
//!   reconciling by exiting, as kube-controller-manager does.
//! - On graceful shutdown the leader clears `holderIdentity`, so a standby takes over at its next
//!   retry instead of waiting out the lease.
//!
//! Every write is an update with the resourceVersion last read, so two candidates racing for
//! the same lease cannot both win: the apiserver rejects the loser with a conflict.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::{info, warn};

/// How long a lease lasts and how often it is renewed (client-go's defaults).
#[derive(Clone, Copy, Debug)]
pub struct Timings {
    /// How long a standby waits, after the record last changed, before taking the lease.
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before it steps down.
    pub renew_deadline: Duration,
    /// Pause between tries to acquire or renew.
    pub retry_period: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// The holder and renew time of a lease as this candidate last saw them, and when it saw them
/// change: the lease is expired once that local instant is a lease duration old.
struct Observed {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    changed_at: Instant,
}

/// One candidate for one Lease.
pub struct LeaderElector {
    leases: Api<Lease>,
    name: String,
    identity: String,
    timings: Timings,
    /// The lease as last read or written; its resourceVersion guards the next update.
    lease: Mutex<Option<Lease>>,
    observed: Mutex<Option<Observed>>,
}

/// Whether a try to acquire or renew made this candidate the holder.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Leader,
    Follower,
}

impl LeaderElector {
    /// A candidate named `identity` for the lease `namespace/name`.
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: String,
        timings: Timings,
    ) -> Self {
        Self {
            leases: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity,
            timings,
            lease: Mutex::new(None),
            observed: Mutex::new(None),
        }
    }

    /// This candidate's identity, as written into `holderIdentity`.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Returns once this candidate holds the lease.
    pub async fn acquire(&self) {
        let mut waiting_logged = false;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(Outcome::Leader) => {
                    info!(lease = %self.name, identity = %self.identity, "acquired the leader lease");
                    return;
                }
                Ok(Outcome::Follower) if !waiting_logged => {
                    let holder = self.current_holder().await;
                    info!(lease = %self.name, ?holder, "standing by: another replica leads");
                    waiting_logged = true;
                }
                Ok(Outcome::Follower) => {}
                Err(error) => warn!(%error, lease = %self.name, "cannot read or take the lease"),
            }
            tokio::time::sleep(self.timings.retry_period).await;
        }
    }

    /// Renews the lease while this candidate leads; returns when a renewal has not succeeded
    /// within the renew deadline or another holder took the lease. The caller must stop
    /// reconciling then.
    pub async fn hold(&self) {
        let mut last_renewed = Instant::now();
        loop {
            tokio::time::sleep(self.timings.retry_period).await;
            match self.try_acquire_or_renew().await {
                Ok(Outcome::Leader) => last_renewed = Instant::now(),
                Ok(Outcome::Follower) => {
                    warn!(lease = %self.name, "another replica holds the lease now");
                    return;
                }
                Err(error) => warn!(%error, lease = %self.name, "cannot renew the lease"),
            }
            if last_renewed.elapsed() >= self.timings.renew_deadline {
                warn!(lease = %self.name, "no renewal within the deadline");
                return;
            }
        }
    }

    /// Gives the lease up (graceful shutdown): clears the holder so a standby need not wait for
    /// the lease to expire.
    pub async fn release(&self) {
        let mut cached = self.lease.lock().await;
        let Some(mut lease) = cached.clone() else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.acquire_time = None;
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        spec.lease_duration_seconds = Some(1);
        match self
            .leases
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(released) => {
                info!(lease = %self.name, "released the leader lease");
                *cached = Some(released);
            }
            Err(error) => warn!(%error, lease = %self.name, "cannot release the lease"),
        }
    }

    async fn current_holder(&self) -> Option<String> {
        let cached = self.lease.lock().await;
        cached.as_ref()?.spec.as_ref()?.holder_identity.clone()
    }

    /// One round of client-go's `tryAcquireOrRenew`.
    async fn try_acquire_or_renew(&self) -> Result<Outcome, kube::Error> {
        let now = Timestamp::now();
        let mut cached = self.lease.lock().await;
        let current = match self.leases.get_opt(&self.name).await? {
            Some(lease) => lease,
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.held_spec(None, now)),
                };
                return match self.leases.create(&PostParams::default(), &lease).await {
                    Ok(created) => {
                        self.observe(&created).await;
                        *cached = Some(created);
                        Ok(Outcome::Leader)
                    }
                    // Another candidate created it first.
                    Err(kube::Error::Api(status)) if status.code == 409 => Ok(Outcome::Follower),
                    Err(error) => Err(error),
                };
            }
        };
        self.observe(&current).await;
        *cached = Some(current.clone());
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
        let we_hold = holder == Some(self.identity.as_str());
        if holder.is_some() && !we_hold && !self.expired(&spec).await {
            return Ok(Outcome::Follower);
        }
        let mut updated = current;
        updated.spec = Some(self.held_spec(we_hold.then_some(&spec), now));
        if !we_hold {
            let transitions = spec.lease_transitions.unwrap_or(0);
            let new_spec = updated.spec.as_mut().expect("just set");
            new_spec.lease_transitions = Some(transitions + 1);
        }
        match self
            .leases
            .replace(&self.name, &PostParams::default(), &updated)
            .await
        {
            Ok(written) => {
                self.observe(&written).await;
                *cached = Some(written);
                Ok(Outcome::Leader)
            }
            // Someone else updated it between our read and write (renewed or took it).
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(Outcome::Follower),
            Err(error) => Err(error),
        }
    }

    /// The spec of a lease held by this candidate: `previous` when renewing keeps the acquire
    /// time and transition count.
    fn held_spec(&self, previous: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.timings.lease_duration.as_secs() as i32),
            acquire_time: previous
                .and_then(|p| p.acquire_time.clone())
                .or(Some(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: previous.and_then(|p| p.lease_transitions).or(Some(0)),
            ..LeaseSpec::default()
        }
    }

    /// Notes when the holder or renew time last changed, on the local monotonic clock.
    async fn observe(&self, lease: &Lease) {
        let spec = lease.spec.as_ref();
        let holder = spec.and_then(|s| s.holder_identity.clone());
        let renew_time = spec.and_then(|s| s.renew_time.clone());
        let mut observed = self.observed.lock().await;
        let unchanged = observed
            .as_ref()
            .is_some_and(|o| o.holder == holder && o.renew_time == renew_time);
        if !unchanged {
            *observed = Some(Observed {
                holder,
                renew_time,
                changed_at: Instant::now(),
            });
        }
    }

    /// Whether the holder has let the lease lapse: its record has not changed for the lease
    /// duration the holder itself wrote (ours when it wrote none).
    async fn expired(&self, spec: &LeaseSpec) -> bool {
        let duration = spec
            .lease_duration_seconds
            .filter(|s| *s > 0)
            .map(|s| Duration::from_secs(s as u64))
            .unwrap_or(self.timings.lease_duration);
        let observed = self.observed.lock().await;
        observed
            .as_ref()
            .is_none_or(|o| o.changed_at.elapsed() >= duration)
    }
}

/// This process's identity: `$POD_NAME` in a cluster, else `hostname-pid`.
pub fn default_identity() -> String {
    if let Some(pod) = std::env::var("POD_NAME").ok().filter(|p| !p.is_empty()) {
        return pod;
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "finetune-operator".into());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_ends_leadership_before_a_standby_may_take_over() {
        let timings = Timings::default();
        assert!(timings.renew_deadline < timings.lease_duration);
        assert!(timings.retry_period * 3 <= timings.renew_deadline);
    }

    #[test]
    fn identity_is_unique_per_process() {
        let identity = default_identity();
        if std::env::var("POD_NAME").is_err() {
            assert!(identity.ends_with(&format!("-{}", std::process::id())));
        }
    }
}
