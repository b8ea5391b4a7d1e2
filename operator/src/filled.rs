//! Whether a watch's cache holds its first full list, told to any number of tasks.
//!
//! kube's `Store::wait_until_ready` cannot be shared between tasks: it polls one oneshot
//! receiver, which keeps one waker, so of the tasks waiting while the list loads only the last
//! to poll is woken. Reconciles check readiness without waiting (`now_or_never`, a no-op waker)
//! while the start-up task waits to turn `/readyz` green; each check took the waker from that
//! task, and a new leader stayed unready with its caches full until the Deployment's rollout
//! timed out (seen under a real kubelet: `helm upgrade --wait` failed one run in two). A
//! `tokio::sync::watch` wakes every waiter, so each cache has one of these beside its store.

use tokio::sync::watch;

/// The watch's half: marks its cache filled once the initial list is in the store.
#[derive(Debug)]
pub struct Filler(watch::Sender<bool>);

/// The readers' half: whether the cache is filled, now or once it is.
#[derive(Clone, Debug)]
pub struct Filled(watch::Receiver<bool>);

/// A linked pair, not yet filled.
pub fn filled() -> (Filler, Filled) {
    let (sender, receiver) = watch::channel(false);
    (Filler(sender), Filled(receiver))
}

impl Filler {
    /// Marks the cache filled (later calls, after a relist, change nothing).
    pub fn fill(&self) {
        self.0
            .send_if_modified(|filled| !std::mem::replace(filled, true));
    }
}

impl Filled {
    /// Whether the cache holds its first full list, without waiting.
    pub fn is_filled(&self) -> bool {
        *self.0.borrow()
    }

    /// Waits for the first full list: true once it is in, false if the watch ended before.
    pub async fn wait(&self) -> bool {
        self.0.clone().wait_for(|filled| *filled).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::FutureExt;

    use super::*;

    const PATIENCE: Duration = Duration::from_secs(5);

    /// The case kube's store loses: a task waits, other tasks check without waiting (as each
    /// reconcile does), then the list completes. Every waiter must wake.
    #[tokio::test]
    async fn every_waiter_wakes_after_checks_without_waiting() {
        let (filler, filled) = filled();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let filled = filled.clone();
                tokio::spawn(async move { filled.wait().await })
            })
            .collect();
        tokio::task::yield_now().await;
        for _ in 0..10 {
            assert!(!filled.is_filled());
            assert!(filled.wait().now_or_never().is_none());
        }
        filler.fill();
        for waiter in waiters {
            let woke = tokio::time::timeout(PATIENCE, waiter).await;
            assert!(
                matches!(woke, Ok(Ok(true))),
                "a waiter did not wake: {woke:?}"
            );
        }
        assert!(filled.is_filled());
    }

    #[tokio::test]
    async fn filled_stays_filled_after_the_watch_ends() {
        let (filler, filled) = filled();
        filler.fill();
        filler.fill();
        drop(filler);
        assert!(filled.is_filled());
        assert_eq!(filled.wait().now_or_never(), Some(true));
    }

    #[tokio::test]
    async fn a_watch_that_ends_unfilled_releases_its_waiters() {
        let (filler, filled) = filled();
        let waiter = tokio::spawn({
            let filled = filled.clone();
            async move { filled.wait().await }
        });
        drop(filler);
        let woke = tokio::time::timeout(PATIENCE, waiter).await;
        assert!(matches!(woke, Ok(Ok(false))), "{woke:?}");
        assert!(!filled.is_filled());
    }
}
