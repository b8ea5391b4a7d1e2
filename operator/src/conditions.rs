//! Status conditions, written one way for every kind: a condition's `lastTransitionTime` moves
//! only when its status changes, so `kubectl describe` and `kubectl wait` see real transitions
//! and not every reconcile. A FinetuneJob's phase conditions are exclusive (one is True at a
//! time: [`set_phase`]); an Adapter's `Verified` and `Ready` stand side by side ([`set`]).
//!
//! [`Transition`] is here too because it is what both kinds emit beside a condition change: the
//! Event a controller records for it.

use finetune_crds::JobPhase;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::{Event, EventType};

/// An Event to record about a transition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// `Normal` or `Warning`.
    pub warning: bool,
    /// CamelCase reason, e.g. `Unschedulable`.
    pub reason: String,
    /// What happened, for people.
    pub message: String,
}

impl Transition {
    /// The Event that records this transition for `action` (e.g. `Reconcile`, `Verify`).
    pub fn event(&self, action: &str) -> Event {
        event(self.warning, &self.reason, &self.message, action)
    }
}

/// An Event, its note cut to the 1000 characters the Events API keeps.
pub fn event(warning: bool, reason: &str, message: &str, action: &str) -> Event {
    Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(message.chars().take(1000).collect()),
        action: action.into(),
        secondary: None,
    }
}

/// The condition type that is True while a job is in `phase`.
pub fn job_phase_condition(phase: JobPhase) -> &'static str {
    match phase {
        JobPhase::Pending => "Created",
        JobPhase::Queued => "Queued",
        JobPhase::Running => "Running",
        JobPhase::Succeeded => "Succeeded",
        JobPhase::Failed => "Failed",
        JobPhase::Suspended => "Suspended",
    }
}

/// Sets the condition of job phase `phase` True (see [`set`]) and turns any other True phase
/// condition False, so `kubectl describe` shows one current phase. Conditions that are not phase
/// conditions (e.g. `EarlyStopped`) are left alone.
pub fn set_phase(
    conditions: &mut Vec<Condition>,
    phase: JobPhase,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) {
    let type_ = job_phase_condition(phase);
    for other in JobPhase::ALL.map(job_phase_condition) {
        if other == type_ {
            continue;
        }
        if let Some(other) = conditions
            .iter_mut()
            .find(|c| c.type_ == other && c.status == "True")
        {
            other.status = "False".into();
            other.last_transition_time = Time(now);
            other.observed_generation = generation;
        }
    }
    set(conditions, type_, "True", reason, message, generation, now);
}

/// Sets one condition, keeping `lastTransitionTime` when its status does not change; other
/// conditions are left alone. `generation` is the condition's `observedGeneration` (`None` for
/// kinds whose status records the generation once for all conditions, like the Adapter).
pub fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) {
    let transition = conditions
        .iter()
        .find(|c| c.type_ == type_)
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone());
    put(
        conditions,
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: generation,
            last_transition_time: transition.unwrap_or(Time(now)),
        },
    );
}

/// Puts `condition` in place of the one of its type, or appends it: exactly as given, its
/// `lastTransitionTime` included (for a condition that is restated at each failure, such as a
/// FinetuneJob's `Created` False while the apiserver refuses a child).
pub fn put(conditions: &mut Vec<Condition>, condition: Condition) {
    match conditions.iter_mut().find(|c| c.type_ == condition.type_) {
        Some(existing) => *existing = condition,
        None => conditions.push(condition),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(minute: u32) -> Timestamp {
        format!("2026-11-26T12:{minute:02}:00Z").parse().unwrap()
    }

    #[test]
    fn set_keeps_the_transition_time_while_the_status_stays() {
        let mut conditions = Vec::new();
        set(&mut conditions, "Ready", "False", "A", "a", None, at(0));
        set(&mut conditions, "Ready", "False", "B", "b", None, at(1));
        assert_eq!(conditions.len(), 1);
        assert_eq!(
            (
                conditions[0].reason.as_str(),
                &conditions[0].last_transition_time
            ),
            ("B", &Time(at(0)))
        );
        set(&mut conditions, "Ready", "True", "C", "c", None, at(2));
        assert_eq!(conditions[0].last_transition_time, Time(at(2)));
    }

    #[test]
    fn set_phase_leaves_one_phase_condition_true_and_others_alone() {
        let mut conditions = Vec::new();
        set(
            &mut conditions,
            "EarlyStopped",
            "True",
            "X",
            "x",
            Some(1),
            at(0),
        );
        set_phase(
            &mut conditions,
            JobPhase::Running,
            "Running",
            "r",
            Some(1),
            at(0),
        );
        set_phase(
            &mut conditions,
            JobPhase::Succeeded,
            "Completed",
            "s",
            Some(2),
            at(1),
        );
        let status = |type_: &str| {
            let c = conditions.iter().find(|c| c.type_ == type_).unwrap();
            (c.status.as_str(), c.observed_generation)
        };
        assert_eq!(status("Running"), ("False", Some(2)));
        assert_eq!(status("Succeeded"), ("True", Some(2)));
        assert_eq!(status("EarlyStopped"), ("True", Some(1)));
    }
}
