//! Storage URIs (`pvc://`, `configmap://`, `file://`, `hf://`, `s3://`) and where they appear
//! inside the trainer pod. The operator mounts volumes at these places and the trainer reads from them, so
//! both sides use this one mapping; a local run points the roots somewhere else.

use std::path::{Path, PathBuf};

/// Where the operator mounts PersistentVolumeClaims named in URIs: `<root>/<claim>`.
pub const PVC_MOUNT_ROOT: &str = "/mnt/pvc";
/// Where the operator mounts ConfigMaps named in URIs: `<root>/<name>`.
pub const CONFIGMAP_MOUNT_ROOT: &str = "/mnt/configmap";

/// A parsed storage URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageUri {
    /// `pvc://CLAIM/PATH`.
    Pvc { claim: String, path: String },
    /// `configmap://NAME/KEY`.
    ConfigMap { name: String, key: String },
    /// `file:///PATH`.
    File { path: String },
    /// `hf://ORG/NAME[@REVISION]`.
    HuggingFace {
        repo: String,
        revision: Option<String>,
    },
    /// `hf://datasets/ORG/NAME[@REVISION]/PATH`: one file of a Hub dataset repository (the
    /// form `huggingface_hub`'s file system takes); `repo` is `datasets/ORG/NAME`.
    HuggingFaceFile {
        repo: String,
        revision: Option<String>,
        path: String,
    },
    /// `s3://BUCKET/KEY`: an object, or for outputs and adapters a prefix.
    S3 { bucket: String, key: String },
}

impl StorageUri {
    /// Parses a URI; the CRD's CEL rules have already checked the shape of URIs in manifests,
    /// so `None` here means a URI that never passed validation.
    pub fn parse(uri: &str) -> Option<Self> {
        let (scheme, rest) = uri.split_once("://")?;
        // The path stays under its volume: no empty, `.` or `..` segment (the CRD's rule says
        // the same; this also covers objects and local runs that never met the apiserver).
        let split = |rest: &str| {
            let (head, tail) = rest.split_once('/')?;
            let inside = tail.split('/').all(|seg| !matches!(seg, "" | "." | ".."));
            (!head.is_empty() && inside).then(|| (head.to_string(), tail.to_string()))
        };
        match scheme {
            "pvc" => split(rest).map(|(claim, path)| Self::Pvc { claim, path }),
            "configmap" => split(rest).map(|(name, key)| Self::ConfigMap { name, key }),
            "s3" => split(rest)
                .filter(|(bucket, _)| valid_bucket(bucket))
                .map(|(bucket, key)| Self::S3 { bucket, key }),
            "file" => rest.starts_with('/').then(|| Self::File {
                path: rest.to_string(),
            }),
            "hf" if rest.starts_with("datasets/") => hub_file(rest),
            "hf" => {
                let (repo, revision) = match rest.split_once('@') {
                    Some((repo, revision)) => (repo, Some(revision.to_string())),
                    None => (rest, None),
                };
                repo.contains('/').then(|| Self::HuggingFace {
                    repo: repo.to_string(),
                    revision,
                })
            }
            _ => None,
        }
    }

    /// The local path of this URI under the given mount roots; `None` for `hf://` and `s3://`,
    /// which must be downloaded first.
    pub fn local_path(&self, roots: &MountRoots) -> Option<PathBuf> {
        match self {
            Self::Pvc { claim, path } => Some(roots.pvc.join(claim).join(path)),
            Self::ConfigMap { name, key } => Some(roots.configmap.join(name).join(key)),
            Self::File { path } => Some(PathBuf::from(path)),
            Self::HuggingFace { .. } | Self::HuggingFaceFile { .. } | Self::S3 { .. } => None,
        }
    }
}

/// `datasets/ORG/NAME[@REVISION]/PATH` (the part after `hf://`).
fn hub_file(rest: &str) -> Option<StorageUri> {
    let mut parts = rest.splitn(4, '/');
    let (kind, org, name_rev, path) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let (name, revision) = match name_rev.split_once('@') {
        Some((name, revision)) => (name, Some(revision.to_string())),
        None => (name_rev, None),
    };
    let inside = path.split('/').all(|seg| !matches!(seg, "" | "." | ".."));
    let named = !org.is_empty() && !name.is_empty() && revision.as_deref() != Some("");
    (named && inside).then(|| StorageUri::HuggingFaceFile {
        repo: format!("{kind}/{org}/{name}"),
        revision,
        path: path.to_string(),
    })
}

/// S3's bucket naming rules, as far as a URI shows them: 3 to 63 lowercase letters, digits,
/// `.` and `-`, starting and ending with a letter or digit (the CRD's rule says the same).
fn valid_bucket(name: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    (3..=63).contains(&name.len())
        && edge(name.chars().next())
        && edge(name.chars().last())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
}

/// The directories under which PVCs and ConfigMaps named in URIs appear.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountRoots {
    /// Parent of one directory per claim.
    pub pvc: PathBuf,
    /// Parent of one directory per ConfigMap.
    pub configmap: PathBuf,
}

impl MountRoots {
    /// The mount points the operator uses in trainer pods.
    pub fn in_pod() -> Self {
        Self {
            pvc: PathBuf::from(PVC_MOUNT_ROOT),
            configmap: PathBuf::from(CONFIGMAP_MOUNT_ROOT),
        }
    }

    /// Roots for a local run: `<base>/pvc` and `<base>/configmap`.
    pub fn under(base: &Path) -> Self {
        Self {
            pvc: base.join("pvc"),
            configmap: base.join("configmap"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_scheme() {
        assert_eq!(
            StorageUri::parse("pvc://models/smollm2/m.gguf"),
            Some(StorageUri::Pvc {
                claim: "models".into(),
                path: "smollm2/m.gguf".into()
            })
        );
        assert_eq!(
            StorageUri::parse("configmap://data/train.jsonl"),
            Some(StorageUri::ConfigMap {
                name: "data".into(),
                key: "train.jsonl".into()
            })
        );
        assert_eq!(
            StorageUri::parse("file:///x/y"),
            Some(StorageUri::File {
                path: "/x/y".into()
            })
        );
        assert_eq!(
            StorageUri::parse("hf://org/name@v1"),
            Some(StorageUri::HuggingFace {
                repo: "org/name".into(),
                revision: Some("v1".into())
            })
        );
        assert_eq!(
            StorageUri::parse("s3://my-bucket/data/train.jsonl"),
            Some(StorageUri::S3 {
                bucket: "my-bucket".into(),
                key: "data/train.jsonl".into()
            })
        );
        assert_eq!(
            StorageUri::parse("hf://datasets/org/chat@v2/data/train.jsonl"),
            Some(StorageUri::HuggingFaceFile {
                repo: "datasets/org/chat".into(),
                revision: Some("v2".into()),
                path: "data/train.jsonl".into()
            })
        );
        assert_eq!(
            StorageUri::parse("hf://datasets/org/chat/train.jsonl"),
            Some(StorageUri::HuggingFaceFile {
                repo: "datasets/org/chat".into(),
                revision: None,
                path: "train.jsonl".into()
            })
        );
        for bad in [
            "hf://datasets/org/chat",
            "hf://datasets/org/chat@/x.jsonl",
            "hf://datasets/org/chat/../x.jsonl",
            "s3://b/k",
            "s3://Bucket/k",
            "s3://bucket-/k",
            "s3://bucket",
            "s3://bucket/",
            "s3://bucket/a//b",
            "s3://bucket/../k",
            "pvc://claim",
            "pvc:///path",
            "file://relative",
            "hf://name",
            "pvc://claim/../x",
            "pvc://claim/a//b",
            "pvc://claim/a/.",
            "configmap://map/..",
        ] {
            assert_eq!(StorageUri::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn maps_to_pod_paths() {
        let roots = MountRoots::in_pod();
        let path = StorageUri::parse("pvc://models/a/b.gguf")
            .unwrap()
            .local_path(&roots);
        assert_eq!(path, Some(PathBuf::from("/mnt/pvc/models/a/b.gguf")));
        let path = StorageUri::parse("configmap://d/k.jsonl")
            .unwrap()
            .local_path(&roots);
        assert_eq!(path, Some(PathBuf::from("/mnt/configmap/d/k.jsonl")));
    }
}
