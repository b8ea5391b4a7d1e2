//! Which job specs have passed validation, so a reconcile validates a spec once per generation.
//!
//! Validation runs the CRD's schema and CEL rules (~1 ms a job); reconciles run far more often
//! than specs change (every pod transition, every requeue), and the spec of one generation
//! never changes. A spec that fails is not remembered: it is checked again each time, and such
//! a job does nothing else.

use std::collections::HashMap;
use std::sync::Mutex;

use kube::{Resource, ResourceExt};

/// The generation (and UID) that passed validation, per `namespace/name`.
#[derive(Default)]
pub struct ValidSpecs {
    passed: Mutex<HashMap<String, (String, i64)>>,
}

fn identity<K: Resource>(object: &K) -> Option<(String, i64)> {
    Some((object.uid()?, object.meta().generation?))
}

impl ValidSpecs {
    /// Whether this generation of `object` has passed validation before.
    pub fn passed<K: Resource>(&self, key: &str, object: &K) -> bool {
        let Some(identity) = identity(object) else {
            return false;
        };
        self.lock().get(key) == Some(&identity)
    }

    /// Remembers that this generation of `object` passed.
    pub fn remember<K: Resource>(&self, key: &str, object: &K) {
        if let Some(identity) = identity(object) {
            self.lock().insert(key.to_string(), identity);
        }
    }

    /// Forgets a deleted object.
    pub fn forget(&self, key: &str) {
        self.lock().remove(key);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, i64)>> {
        self.passed.lock().expect("valid-specs lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::ObjectMeta;

    fn object(uid: &str, generation: i64) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                uid: Some(uid.into()),
                generation: Some(generation),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn only_the_generation_that_passed_is_skipped() {
        let specs = ValidSpecs::default();
        assert!(!specs.passed("ns/a", &object("u1", 1)));
        specs.remember("ns/a", &object("u1", 1));
        assert!(specs.passed("ns/a", &object("u1", 1)));
        // An edited spec, or a new object of the same name, is validated again.
        assert!(!specs.passed("ns/a", &object("u1", 2)));
        assert!(!specs.passed("ns/a", &object("u2", 1)));
        specs.forget("ns/a");
        assert!(!specs.passed("ns/a", &object("u1", 1)));
    }
}
