//! Writes a job's children without ever adopting an object that is not ours. Children have
//! derived names (`NAME-manifest`, `NAME-storage`, `NAME-attempt-N`), so a user's object can
//! hold one first; a server-side apply with `force` would merge our fields and owner reference
//! into it, and deleting the job would then garbage-collect the user's data. So a child is
//! created (POST, which fails on an existing name) and only updated once it is known to be owned
//! by this very job (its UID: a re-created job of the same name does not own the old one's).

use std::fmt::Debug;

use kube::api::PostParams;
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::{self, MANAGER};

/// Why a child was not written.
#[derive(Debug)]
pub enum Refused {
    /// An object of the child's name exists and is not owned by this job: left untouched.
    NameConflict(String),
    /// The apiserver refused or failed the request.
    Api(kube::Error),
}

/// Whether `object` has an owner reference to the object with `uid`.
pub fn owned_by<K: Resource>(object: &K, uid: &str) -> bool {
    object
        .meta()
        .owner_references
        .iter()
        .flatten()
        .any(|owner| owner.uid == uid)
}

/// Creates `object`, or, when its name exists and this job owns it, server-side applies it.
pub async fn create_or_update<K>(api: &Api<K>, job_uid: &str, object: &K) -> Result<K, Refused>
where
    K: Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + Debug,
{
    match create(api, job_uid, object).await {
        Err(Refused::Api(error)) if is_already_exists(&error) => {
            // Ours (an earlier write the cache has not shown): bring it up to date.
            api::apply(api, &object.name_any(), object)
                .await
                .map_err(Refused::Api)
        }
        other => other,
    }
}

/// Creates `object`. An existing object of that name is returned as `AlreadyExists` when this
/// job owns it (nothing to do), and refused as a name conflict when it does not.
pub async fn create<K>(api: &Api<K>, job_uid: &str, object: &K) -> Result<K, Refused>
where
    K: Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + Debug,
{
    let params = PostParams {
        field_manager: Some(MANAGER.into()),
        ..PostParams::default()
    };
    let error = match api.create(&params, object).await {
        Ok(created) => return Ok(created),
        Err(error) if is_already_exists(&error) => error,
        Err(error) => return Err(Refused::Api(error)),
    };
    let name = object.name_any();
    match api.get_opt(&name).await {
        Ok(Some(existing)) if owned_by(&existing, job_uid) => Err(Refused::Api(error)),
        Ok(Some(_)) => Err(Refused::NameConflict(format!(
            "{} {name} already exists and does not belong to this job; it is left untouched: \
             rename or delete it, or rename the job",
            K::kind(&()).to_lowercase(),
        ))),
        // Deleted in between: the next reconcile creates it.
        Ok(None) => Err(Refused::Api(error)),
        Err(get_error) => Err(Refused::Api(get_error)),
    }
}

/// A 409 `AlreadyExists` from a create.
pub fn is_already_exists(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 409 && status.reason == "AlreadyExists")
}

/// A delete's result: done when it succeeded or the object was already gone (404). Every other
/// error, a 403 from RBAC included, is returned so it is logged and retried, never swallowed.
pub fn deleted<T>(result: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::Status;

    fn api_error(code: u16, reason: &str) -> kube::Error {
        kube::Error::Api(Box::new(Status::failure("refused", reason).with_code(code)))
    }

    #[test]
    fn only_a_missing_object_counts_as_deleted() {
        assert!(deleted(Ok(())).is_ok());
        assert!(deleted::<()>(Err(api_error(404, "NotFound"))).is_ok());
        assert!(deleted::<()>(Err(api_error(403, "Forbidden"))).is_err());
        assert!(deleted::<()>(Err(api_error(409, "Conflict"))).is_err());
    }

    #[test]
    fn already_exists_is_told_apart_from_other_conflicts() {
        assert!(is_already_exists(&api_error(409, "AlreadyExists")));
        assert!(!is_already_exists(&api_error(409, "Conflict")));
        assert!(!is_already_exists(&api_error(403, "Forbidden")));
    }
}
