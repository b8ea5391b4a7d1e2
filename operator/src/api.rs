//! The API plumbing both controllers share: the field manager and server-side apply, status
//! writes that feed read-your-writes, the applied-hash that spares unchanged children a write,
//! the watches behind the caches, and the start-up check that the CRDs are there.

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;

use finetune_crds::FinetuneJob;
use futures::{Stream, TryStreamExt};
use kube::api::{
    ApiResource, DynamicObject, ListParams, PartialObjectMeta, PartialObjectMetaExt, Patch,
    PatchParams,
};
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::filled::{Filled, filled};
use crate::last_written::LastWritten;

/// Field manager for server-side apply.
pub const MANAGER: &str = "finetune-operator";

/// Annotation on applied children holding a hash of what was applied, so an unchanged child is
/// recognised from its cached metadata alone and not applied again.
pub const APPLIED_HASH_ANNOTATION: &str = "finetune.dev/applied-hash";

/// Who publishes the operator's Events: the field manager, and the pod when it is known.
pub fn reporter() -> Reporter {
    Reporter {
        controller: MANAGER.into(),
        instance: std::env::var("POD_NAME").ok(),
    }
}

/// Fails with an install hint when the CRDs are not installed, or when the operator may not
/// list FinetuneJobs where it watches them. With `namespace` the check lists in that namespace
/// only, so a namespaced Role suffices, as for the watches.
pub async fn ensure_crds_installed(client: &Client, namespace: Option<&str>) -> Result<(), String> {
    let jobs: Api<FinetuneJob> = match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    };
    match jobs.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(error) => Err(crd_check_hint(&error, namespace)),
    }
}

/// What to tell the user when the startup list of FinetuneJobs fails.
fn crd_check_hint(error: &kube::Error, namespace: Option<&str>) -> String {
    let scope = match namespace {
        Some(namespace) => format!("in namespace {namespace}"),
        None => "in all namespaces".to_string(),
    };
    match error {
        kube::Error::Api(status) if status.code == 404 => {
            "the FinetuneJob CRD is not installed: run `finetune-operator crd | kubectl apply -f -` \
             (or install the Helm chart with crds.enabled=true)"
                .into()
        }
        kube::Error::Api(status) if status.code == 403 => format!(
            "not allowed to list FinetuneJobs {scope}: grant list/watch on finetunejobs \
             (the Helm chart's RBAC does; with watchNamespace set it is a Role in that namespace, \
             so pass --namespace as well): {}",
            status.message
        ),
        error => format!("cannot reach the apiserver: {error}"),
    }
}

/// The API of `K` in `namespace`, or in all namespaces.
pub fn api<K>(client: &Client, namespace: &Option<String>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// A watch of `api` filling a store: `strip` drops what nothing reads before the store keeps
/// it (managedFields and the last-applied annotation are most of an object's size), and
/// `written`, when given, learns which of our writes the watch has delivered. The [`Filled`]
/// says when the store holds its first full list (read it, not the store's own
/// `wait_until_ready`: see `filled`). The caller picks which of the returned events trigger
/// reconciles.
pub fn cached_watch<K>(
    api: Api<K>,
    config: watcher::Config,
    strip: impl FnMut(&mut K) + Send + 'static,
    written: Option<&Arc<LastWritten<K>>>,
) -> (
    Store<K>,
    Filled,
    impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    cache(watcher(api, config).default_backoff(), strip, written)
}

/// Fills a store from `events` after `strip`, telling `written` what the watch delivered and
/// the returned [`Filled`] when the initial list is in.
fn cache<K>(
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    strip: impl FnMut(&mut K) + Send + 'static,
    written: Option<&Arc<LastWritten<K>>>,
) -> (
    Store<K>,
    Filled,
    impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
)
where
    K: Resource + Clone + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let (store, writer) = reflector::store::<K>();
    let (filler, filled) = filled();
    let written = written.cloned();
    let events = events
        .modify(strip)
        .reflect(writer)
        .inspect_ok(move |event| {
            if let Some(written) = &written {
                written.observe(event);
            }
            // After `reflect`: the store already holds the whole list.
            if matches!(event, watcher::Event::InitDone) {
                filler.fill();
            }
        });
    (store, filled, events)
}

/// [`cached_watch`] for a custom resource whose objects may not all decode (a status edited by
/// hand past a field's range, an object stored under another schema). The watch reads them as
/// untyped objects and decodes each on its own: one that fails is reported through
/// `undecodable` and left out, and every other object keeps being reconciled. A typed watch
/// would fail its whole list on that one object and retry forever.
pub fn cached_watch_lenient<K>(
    client: &Client,
    namespace: &Option<String>,
    config: watcher::Config,
    strip: impl FnMut(&mut K) + Send + 'static,
    written: Option<&Arc<LastWritten<K>>>,
    undecodable: impl Fn(&DynamicObject, &serde_json::Error) + Send + Sync + 'static,
) -> (
    Store<K>,
    Filled,
    impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
)
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static,
{
    let resource = ApiResource::erase::<K>(&());
    let untyped: Api<DynamicObject> = match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    let events = watcher(untyped, config)
        .default_backoff()
        .try_filter_map(move |event| futures::future::ready(Ok(typed_event(event, &undecodable))));
    cache(events, strip, written)
}

/// The event with its object decoded as `K`; `None` (and `undecodable` told) when it does not
/// decode.
pub fn typed_event<K: DeserializeOwned>(
    event: watcher::Event<DynamicObject>,
    undecodable: &impl Fn(&DynamicObject, &serde_json::Error),
) -> Option<watcher::Event<K>> {
    let decode = |object: DynamicObject| match serde_json::to_value(&object)
        .and_then(serde_json::from_value::<K>)
    {
        Ok(typed) => Some(typed),
        Err(error) => {
            undecodable(&object, &error);
            None
        }
    };
    match event {
        watcher::Event::Apply(o) => decode(o).map(watcher::Event::Apply),
        watcher::Event::Delete(o) => decode(o).map(watcher::Event::Delete),
        watcher::Event::InitApply(o) => decode(o).map(watcher::Event::InitApply),
        watcher::Event::Init => Some(watcher::Event::Init),
        watcher::Event::InitDone => Some(watcher::Event::InitDone),
    }
}

/// Server-side applies `object` as the operator.
pub async fn apply<K>(api: &Api<K>, name: &str, object: &K) -> Result<K, kube::Error>
where
    K: Resource + Clone + Serialize + DeserializeOwned + Debug,
{
    api.patch(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
}

/// Server-side applies `status` to the status of `name`.
pub async fn patch_status<K>(
    api: &Api<K>,
    name: &str,
    status: &impl Serialize,
) -> Result<K, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let patch = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
}

/// Writes `status` to `object` and keeps the object the apiserver returned in `written` until
/// the watch delivers it: a reconcile that runs before then must not derive the same
/// transition again (a second Event and a redundant write).
pub async fn write_status<K>(
    api: &Api<K>,
    object: &K,
    status: &impl Serialize,
    written: &LastWritten<K>,
) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let mut returned = patch_status(api, &object.name_any(), status).await?;
    returned.meta_mut().managed_fields = None;
    written.record(returned);
    Ok(())
}

/// Annotates `object` with a hash of its desired content and returns the hash.
pub fn stamp_hash<K: Resource + Serialize>(object: &mut K) -> String {
    let content = serde_json::to_vec(&*object).expect("Kubernetes objects serialize to JSON");
    let hash = format!("{:016x}", fnv1a(&content));
    object
        .meta_mut()
        .annotations
        .get_or_insert_with(Default::default)
        .insert(APPLIED_HASH_ANNOTATION.into(), hash.clone());
    hash
}

/// FNV-1a, 64 bits: stable across builds and platforms, unlike std's hasher.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The applied-hash annotation of a child as we last applied it or the cache holds it,
/// whichever is newer.
pub fn applied_hash<K>(
    store: &Store<PartialObjectMeta<K>>,
    written: &LastWritten<PartialObjectMeta<K>>,
    name: &str,
    namespace: &str,
) -> Option<String>
where
    PartialObjectMeta<K>: Resource<DynamicType = ()> + Clone,
{
    let cached = store.get(&ObjectRef::new(name).within(namespace));
    let current = written.freshest_or_ours(&format!("{namespace}/{name}"), cached)?;
    current.annotations().get(APPLIED_HASH_ANNOTATION).cloned()
}

/// What the metadata-only child caches keep of an object an apply returned.
pub fn written_meta<K: Resource<DynamicType = ()>>(
    mut metadata: kube::api::ObjectMeta,
) -> PartialObjectMeta<K> {
    metadata.managed_fields = None;
    metadata.into_request_partial::<K>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_that_does_not_decode_is_reported_and_left_out() {
        let job = |failed: serde_json::Value| -> DynamicObject {
            serde_json::from_value(json!({
                "apiVersion": "finetune.dev/v1alpha1", "kind": "FinetuneJob",
                "metadata": {"name": "j", "namespace": "n"},
                "spec": serde_yaml::from_str::<serde_json::Value>(
                    &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/sft-lora-smollm2.yaml")).unwrap()
                ).unwrap()["spec"],
                "status": {"failedAttempts": failed}
            }))
            .unwrap()
        };
        let reported = std::cell::RefCell::new(Vec::new());
        let report = |o: &DynamicObject, e: &serde_json::Error| {
            reported.borrow_mut().push(format!("{}: {e}", o.name_any()));
        };
        let ok = typed_event::<FinetuneJob>(watcher::Event::Apply(job(json!(2))), &report);
        assert!(
            matches!(ok, Some(watcher::Event::Apply(j)) if j.status.as_ref().unwrap().failed_attempts == 2)
        );
        // Stored under a looser schema: a string, or a number past int32.
        for bad in [json!("many"), json!(1u64 << 40)] {
            assert!(
                typed_event::<FinetuneJob>(watcher::Event::InitApply(job(bad)), &report).is_none()
            );
        }
        assert_eq!(reported.borrow().len(), 2, "{:?}", reported.borrow());
        assert!(reported.borrow()[0].starts_with("j: "));
        assert!(matches!(
            typed_event::<FinetuneJob>(watcher::Event::InitDone, &report),
            Some(watcher::Event::InitDone)
        ));
    }
    use kube::core::Status;

    fn api_error(code: u16, message: &str) -> kube::Error {
        kube::Error::Api(Box::new(Status::failure(message, "reason").with_code(code)))
    }

    #[test]
    fn the_startup_check_says_what_to_do() {
        let missing = crd_check_hint(&api_error(404, "not found"), Some("team-a"));
        assert!(missing.contains("CRD is not installed"), "{missing}");
        let forbidden =
            crd_check_hint(&api_error(403, "finetunejobs is forbidden"), Some("team-a"));
        assert!(
            forbidden.contains("in namespace team-a") && forbidden.contains("is forbidden"),
            "{forbidden}"
        );
        let cluster = crd_check_hint(&api_error(403, "forbidden"), None);
        assert!(cluster.contains("in all namespaces"), "{cluster}");
    }
}
