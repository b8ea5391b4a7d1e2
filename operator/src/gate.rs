//! A bound on the reconciles writing to the apiserver at once, with new work first.
//!
//! When the apiserver is the bottleneck (many jobs at once on a small control plane), every
//! write waits, and the order in which the operator sends them decides whose latency suffers.
//! A job waiting for its first pod is the latency users see; the status transitions of jobs
//! already running, and their Events, can wait a moment. The gate hands a freed slot to an
//! urgent waiter before any routine one; within a class, first come first served.
//!
//! A reconcile that writes nothing (most of them: a pod's status changed nothing the job
//! reports) never takes a slot.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// Which waiters a freed slot goes to first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// Creating a job's trainer pod.
    Urgent,
    /// Everything else: status transitions, storage, Events, clean-up.
    Routine,
}

/// Up to `slots` holders of a [`Permit`] at once.
pub struct Gate {
    state: Mutex<State>,
}

struct State {
    free: usize,
    urgent: VecDeque<oneshot::Sender<Permit>>,
    routine: VecDeque<oneshot::Sender<Permit>>,
}

/// A slot, given back on drop (to the next waiter, urgent ones first).
pub struct Permit {
    gate: Arc<Gate>,
}

impl Gate {
    /// A gate with `slots` slots (at least one).
    pub fn new(slots: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                free: slots.max(1),
                urgent: VecDeque::new(),
                routine: VecDeque::new(),
            }),
        })
    }

    /// Waits for a slot.
    pub async fn acquire(self: &Arc<Self>, priority: Priority) -> Permit {
        let granted = {
            let mut state = self.lock();
            if state.free > 0 {
                state.free -= 1;
                return Permit { gate: self.clone() };
            }
            let (grant, granted) = oneshot::channel();
            match priority {
                Priority::Urgent => state.urgent.push_back(grant),
                Priority::Routine => state.routine.push_back(grant),
            }
            granted
        };
        // A slot is only ever handed over with its permit, so the sender is never dropped
        // without sending while the gate lives.
        granted.await.expect("the gate hands over its slots")
    }

    /// Slots free now.
    pub fn free(&self) -> usize {
        self.lock().free
    }

    /// Gives a slot to the first live waiter, urgent ones first, or frees it.
    fn hand_over(self: &Arc<Self>) {
        let mut state = self.lock();
        loop {
            let next = match state.urgent.pop_front() {
                Some(waiter) => Some(waiter),
                None => state.routine.pop_front(),
            };
            let Some(waiter) = next else {
                state.free += 1;
                return;
            };
            match waiter.send(Permit { gate: self.clone() }) {
                Ok(()) => return,
                // That waiter gave up; the permit it did not take must not give the slot back
                // a second time.
                Err(unclaimed) => std::mem::forget(unclaimed),
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("gate lock")
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        // A permit that reached a waiter who then gave up is dropped inside the channel: the
        // slot goes on to the next waiter, so it is never lost.
        let gate = self.gate.clone();
        gate.hand_over();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_freed_slot_goes_to_urgent_waiters_first() {
        let gate = Gate::new(1);
        let held = gate.acquire(Priority::Routine).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiting = Vec::new();
        for (name, priority) in [
            ("routine-1", Priority::Routine),
            ("urgent-1", Priority::Urgent),
            ("routine-2", Priority::Routine),
            ("urgent-2", Priority::Urgent),
        ] {
            let (gate, order) = (gate.clone(), order.clone());
            waiting.push(tokio::spawn(async move {
                let _permit = gate.acquire(priority).await;
                order.lock().unwrap().push(name);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }));
            // Queue them in this order.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(held);
        for task in waiting {
            task.await.unwrap();
        }
        assert_eq!(
            *order.lock().unwrap(),
            vec!["urgent-1", "urgent-2", "routine-1", "routine-2"]
        );
        assert_eq!(gate.free(), 1);
    }

    #[tokio::test]
    async fn no_more_than_the_slots_are_held_at_once() {
        let gate = Gate::new(3);
        let holding = Arc::new(Mutex::new((0usize, 0usize)));
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let (gate, holding) = (gate.clone(), holding.clone());
                tokio::spawn(async move {
                    let priority = if i % 2 == 0 {
                        Priority::Urgent
                    } else {
                        Priority::Routine
                    };
                    let _permit = gate.acquire(priority).await;
                    {
                        let mut h = holding.lock().unwrap();
                        h.0 += 1;
                        h.1 = h.1.max(h.0);
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    holding.lock().unwrap().0 -= 1;
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(holding.lock().unwrap().1, 3);
        assert_eq!(gate.free(), 3);
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_loses_no_slot() {
        let gate = Gate::new(1);
        let held = gate.acquire(Priority::Routine).await;
        // Wait, then give up before the slot comes.
        let gave_up =
            tokio::time::timeout(Duration::from_millis(10), gate.acquire(Priority::Urgent)).await;
        assert!(gave_up.is_err());
        drop(held);
        assert_eq!(gate.free(), 1);
        let _again = gate.acquire(Priority::Routine).await;
        assert_eq!(gate.free(), 0);
    }
}
