//! Read-your-writes on top of watch caches.
//!
//! Reconciles read from the caches that watches fill, and a watch delivers our own writes some
//! time after the apiserver answered them: under load, seconds. A reconcile that runs in that
//! window (often one our write itself triggered) would see the world as it was before the
//! write: a pod we just created missing, a ConfigMap not yet applied, a status transition not
//! yet made. Acting on that costs a GET, a redundant apply, or a second Event, and each of those
//! holds a reconcile slot that a new job is waiting for.
//!
//! [`LastWritten`] keeps what each of our writes returned until the watch delivers that version
//! (or a newer one, or the object's deletion) and serves it in the meantime. Entries leave when
//! the watch catches up, so it holds only the writes in flight, not a second cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kube::runtime::watcher;
use kube::{Resource, ResourceExt};

/// Objects as our last write to each returned them, keyed `namespace/name`, until the watch
/// has delivered them.
pub struct LastWritten<K> {
    state: Mutex<State<K>>,
}

struct State<K> {
    written: HashMap<String, Written<K>>,
    /// Counts writes, so a relist can tell the writes it reflects from later ones.
    writes: u64,
    /// The write count when the watch began its current relist.
    relist_from: Option<u64>,
}

struct Written<K> {
    object: Arc<K>,
    write: u64,
}

impl<K> Default for LastWritten<K> {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                written: HashMap::new(),
                writes: 0,
                relist_from: None,
            }),
        }
    }
}

/// `namespace/name` of an object.
pub fn key_of<K: Resource>(object: &K) -> String {
    format!(
        "{}/{}",
        object.namespace().unwrap_or_default(),
        object.name_any()
    )
}

fn version<K: Resource>(object: &K) -> Option<u64> {
    object.meta().resource_version.as_deref()?.parse().ok()
}

/// Whether `ours` is a later version of the same object than `seen`. Resource versions are
/// etcd revisions here, compared as numbers, as every controller on one apiserver may.
fn newer<K: Resource>(ours: &K, seen: &K) -> bool {
    ours.meta().uid == seen.meta().uid
        && version(ours)
            .zip(version(seen))
            .is_some_and(|(ours, seen)| ours > seen)
}

impl<K: Resource> LastWritten<K> {
    /// Remembers what a write returned; returns it shared.
    pub fn record(&self, object: K) -> Arc<K> {
        let key = key_of(&object);
        let object = Arc::new(object);
        let mut state = self.lock();
        state.writes += 1;
        let write = state.writes;
        state.written.insert(
            key,
            Written {
                object: object.clone(),
                write,
            },
        );
        object
    }

    /// Drops what we wrote to `key` (the object is being deleted).
    pub fn forget(&self, key: &str) {
        self.lock().written.remove(key);
    }

    /// The newer of the cached object and our last write to it.
    pub fn freshest(&self, key: &str, cached: Arc<K>) -> Arc<K> {
        match self.lock().written.get(key) {
            Some(ours) if newer(ours.object.as_ref(), &cached) => ours.object.clone(),
            _ => cached,
        }
    }

    /// Like [`Self::freshest`] for an object the cache may not hold yet: our write when the
    /// watch has not delivered it.
    pub fn freshest_or_ours(&self, key: &str, cached: Option<Arc<K>>) -> Option<Arc<K>> {
        match cached {
            Some(cached) => Some(self.freshest(key, cached)),
            None => self.lock().written.get(key).map(|ours| ours.object.clone()),
        }
    }

    /// Our writes that match `wanted`: with the cache's objects, the objects as they are.
    pub fn matching(&self, wanted: impl Fn(&K) -> bool) -> Vec<Arc<K>> {
        self.lock()
            .written
            .values()
            .filter(|ours| wanted(&ours.object))
            .map(|ours| ours.object.clone())
            .collect()
    }

    /// How many writes the watch has not delivered yet.
    pub fn len(&self) -> usize {
        self.lock().written.len()
    }

    /// Whether the watch has delivered every write.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes note of a watch event (after the cache has applied it): a write the watch has
    /// delivered, or that a deletion or a relist supersedes, is dropped.
    pub fn observe(&self, event: &watcher::Event<K>) {
        let mut state = self.lock();
        match event {
            watcher::Event::Apply(seen) | watcher::Event::InitApply(seen) => {
                let key = key_of(seen);
                if state
                    .written
                    .get(&key)
                    .is_some_and(|ours| !newer(ours.object.as_ref(), seen))
                {
                    state.written.remove(&key);
                }
            }
            watcher::Event::Delete(gone) => {
                let key = key_of(gone);
                if state.written.get(&key).is_some_and(|ours| {
                    ours.object.meta().uid == gone.meta().uid || !newer(ours.object.as_ref(), gone)
                }) {
                    state.written.remove(&key);
                }
            }
            watcher::Event::Init => state.relist_from = Some(state.writes),
            watcher::Event::InitDone => {
                // The relist shows every write that returned before it began, or its deletion.
                if let Some(from) = state.relist_from.take() {
                    state.written.retain(|_, ours| ours.write > from);
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<K>> {
        self.state.lock().expect("last-written lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::ObjectMeta;

    fn map(name: &str, uid: &str, version: u64) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                uid: Some(uid.into()),
                resource_version: Some(version.to_string()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn version_of(object: Option<Arc<ConfigMap>>) -> Option<String> {
        object?.metadata.resource_version.clone()
    }

    #[test]
    fn our_write_is_served_until_the_watch_delivers_it() {
        let written = LastWritten::default();
        written.record(map("a", "u1", 7));
        // Not cached yet, then cached at an older version: ours.
        assert_eq!(
            version_of(written.freshest_or_ours("ns/a", None)),
            Some("7".into())
        );
        assert_eq!(
            version_of(written.freshest_or_ours("ns/a", Some(Arc::new(map("a", "u1", 5))))),
            Some("7".into())
        );
        // An event before our write does not drop it; ours once delivered does.
        written.observe(&watcher::Event::Apply(map("a", "u1", 6)));
        assert_eq!(written.len(), 1);
        written.observe(&watcher::Event::Apply(map("a", "u1", 7)));
        assert!(written.is_empty());
        assert_eq!(version_of(written.freshest_or_ours("ns/a", None)), None);
    }

    #[test]
    fn a_cache_that_is_ahead_or_holds_another_object_wins() {
        let written = LastWritten::default();
        written.record(map("a", "u1", 7));
        let ahead = Arc::new(map("a", "u1", 9));
        assert_eq!(
            written.freshest("ns/a", ahead).metadata.resource_version,
            Some("9".into())
        );
        // A re-created object of the same name is another object: the cache's.
        let other = Arc::new(map("a", "u2", 3));
        assert_eq!(
            written.freshest("ns/a", other).metadata.uid,
            Some("u2".into())
        );
    }

    #[test]
    fn a_deletion_or_a_relist_drops_what_it_supersedes() {
        let written = LastWritten::default();
        written.record(map("a", "u1", 7));
        written.observe(&watcher::Event::Delete(map("a", "u1", 7)));
        assert!(written.is_empty());

        // A write that returned before a relist began is reflected by it (here: its pod was
        // deleted meanwhile, so the relist does not list it); one after it is kept.
        written.record(map("gone", "u3", 10));
        written.observe(&watcher::Event::Init);
        written.record(map("later", "u4", 12));
        written.observe(&watcher::Event::InitDone);
        let left: Vec<String> = written
            .matching(|_| true)
            .iter()
            .map(|m| m.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(left, vec!["later".to_string()]);
    }
}
