//! `s3://BUCKET/KEY`: datasets read before training, results written after it, adapters read
//! by `verify-adapter`. AWS S3 or any store that speaks its API, addressed path-style.
//!
//! object_store's client is async; the trainer is not, so each bucket handle owns a
//! current-thread runtime and blocks on it. The client retries transient failures itself
//! (connection errors, 5xx, throttling, a stalled read) with backoff for up to a minute; what
//! reaches us after that is final for this attempt. A transfer has no overall time limit (a
//! model of many GB takes as long as it takes), only a limit on silence.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use finetune_crds::contract::env;
use finetune_crds::s3::keys;
use futures::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{
    ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig, WriteMultipart,
};

use super::FetchError;

/// Files up to this size are uploaded in one PUT; larger ones in parts of this size.
const PART_BYTES: usize = 16 << 20;
/// A connection that sends nothing for this long is broken (and retried, resuming with a range).
const READ_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Endpoint, region and credentials, from the variables the operator sets (the names the AWS
/// SDKs read). `Debug` leaves the keys out.
#[derive(Clone, Default)]
pub struct S3Settings {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    /// The Secret the keys came from, named in refusals.
    pub secret_name: Option<String>,
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("has_keys", &self.access_key_id.is_some())
            .field("secret_name", &self.secret_name)
            .finish()
    }
}

impl S3Settings {
    /// From this process's environment; empty variables count as unset.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        S3Settings {
            endpoint: var(env::S3_ENDPOINT),
            region: var(env::S3_REGION),
            access_key_id: var(keys::ACCESS_KEY_ID),
            secret_access_key: var(keys::SECRET_ACCESS_KEY),
            session_token: var(keys::SESSION_TOKEN),
            secret_name: var(env::S3_CREDENTIALS_SECRET),
        }
    }

    /// Where the credentials came from, for refusals.
    fn credentials(&self) -> String {
        match (&self.secret_name, &self.access_key_id) {
            (Some(name), _) => {
                format!("the credentials in Secret `{name}` (s3.credentialsSecretRef)")
            }
            (None, Some(_)) => "the credentials in AWS_ACCESS_KEY_ID".into(),
            (None, None) => "anonymous access (no s3.credentialsSecretRef)".into(),
        }
    }
}

/// What a listing or a HEAD says about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The key.
    pub key: String,
    pub size: u64,
    /// The store's ETag (unquoted), when it gives one.
    pub etag: Option<String>,
    /// Last-Modified, RFC 3339: what identifies a version when there is no ETag.
    pub modified: String,
}

impl ObjectInfo {
    fn from_meta(meta: object_store::ObjectMeta) -> Self {
        ObjectInfo {
            key: meta.location.to_string(),
            size: meta.size,
            etag: meta.e_tag.map(|e| e.trim_matches('"').to_string()),
            modified: meta.last_modified.to_rfc3339(),
        }
    }
}

/// One bucket of one store.
pub struct S3Bucket {
    runtime: tokio::runtime::Runtime,
    store: AmazonS3,
    bucket: String,
    credentials: String,
}

impl S3Bucket {
    pub fn open(bucket: &str, settings: &S3Settings) -> Result<Self, FetchError> {
        // reqwest is built without a default crypto provider; ring is the one the rest of the
        // trainer links. A second install (another bucket) is refused harmlessly.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(settings.region.as_deref().unwrap_or("us-east-1"))
            .with_client_options(
                ClientOptions::new()
                    .with_timeout_disabled()
                    .with_read_timeout(READ_TIMEOUT)
                    .with_connect_timeout(CONNECT_TIMEOUT),
            )
            .with_retry(RetryConfig {
                max_retries: 4,
                retry_timeout: Duration::from_secs(60),
                ..RetryConfig::default()
            });
        if let Some(endpoint) = &settings.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        match (&settings.access_key_id, &settings.secret_access_key) {
            (Some(id), Some(secret)) => {
                builder = builder
                    .with_access_key_id(id)
                    .with_secret_access_key(secret);
                if let Some(token) = &settings.session_token {
                    builder = builder.with_token(token);
                }
            }
            (None, None) => builder = builder.with_skip_signature(true),
            // One key without the other is a Secret missing a key, not a wish to go anonymous.
            _ => {
                return Err(FetchError::Refused(format!(
                    "s3://{bucket}: {} has only one of {} and {}",
                    settings.credentials(),
                    keys::ACCESS_KEY_ID,
                    keys::SECRET_ACCESS_KEY
                )));
            }
        }
        let store = builder
            .build()
            .map_err(|e| FetchError::Unusable(format!("s3://{bucket}: {e}")))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| FetchError::Transport(format!("starting the S3 client: {e}")))?;
        Ok(S3Bucket {
            runtime,
            store,
            bucket: bucket.to_string(),
            credentials: settings.credentials(),
        })
    }

    /// The bucket's name.
    pub fn name(&self) -> &str {
        &self.bucket
    }

    /// `key` as the store's path, unchanged (`Path::from` would percent-encode characters such
    /// as `~` and fetch another key than the one the user named).
    fn path(&self, key: &str) -> Result<ObjectPath, FetchError> {
        ObjectPath::parse(key)
            .map_err(|e| FetchError::Unusable(format!("{}: not a usable key: {e}", self.uri(key))))
    }

    fn uri(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    /// Streams the object at `key` into `dest` (through `DEST.partial`, renamed when whole);
    /// refuses an object larger than `max_bytes` before reading it. Returns its size.
    pub fn download(&self, key: &str, dest: &Path, max_bytes: u64) -> Result<u64, FetchError> {
        let name = dest.file_name().unwrap_or_default().to_string_lossy();
        let partial = dest.with_file_name(format!("{name}.partial"));
        let cache_err =
            |e: std::io::Error| FetchError::Cache(format!("{}: {e}", partial.display()));
        let size = self.runtime.block_on(async {
            let got = self.get_capped(key, max_bytes).await?;
            let size = got.meta.size;
            let mut file = std::fs::File::create(&partial).map_err(cache_err)?;
            let mut stream = got.into_stream();
            let mut written = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| self.classify(e, key))?;
                written += chunk.len() as u64;
                file.write_all(&chunk).map_err(cache_err)?;
            }
            if written != size {
                return Err(FetchError::Transport(format!(
                    "{}: {written} of {size} bytes arrived",
                    self.uri(key)
                )));
            }
            file.sync_all().map_err(cache_err)?;
            Ok(size)
        })?;
        std::fs::rename(&partial, dest)
            .map_err(|e| FetchError::Cache(format!("{}: {e}", dest.display())))?;
        Ok(size)
    }

    /// The object at `key`, at most `max_bytes` of it (a manifest).
    pub fn read(&self, key: &str, max_bytes: u64) -> Result<Vec<u8>, FetchError> {
        self.runtime.block_on(async {
            let got = self.get_capped(key, max_bytes).await?;
            let bytes = got.bytes().await.map_err(|e| self.classify(e, key))?;
            Ok(bytes.to_vec())
        })
    }

    /// Starts the GET of `key`; an object larger than `max_bytes` is refused before its body
    /// is read.
    async fn get_capped(
        &self,
        key: &str,
        max_bytes: u64,
    ) -> Result<object_store::GetResult, FetchError> {
        let got = self
            .store
            .get(&self.path(key)?)
            .await
            .map_err(|e| self.classify(e, key))?;
        if got.meta.size > max_bytes {
            return Err(FetchError::Unusable(format!(
                "{}: {} bytes, more than the {max_bytes} allowed",
                self.uri(key),
                got.meta.size
            )));
        }
        Ok(got)
    }

    /// Uploads `src` to `key`: one PUT when small, a multipart upload otherwise (S3 makes the
    /// object visible only when the upload completes, so readers never see half a file).
    pub fn upload(&self, key: &str, src: &Path) -> Result<(), FetchError> {
        let read_err = |e: std::io::Error| FetchError::Cache(format!("{}: {e}", src.display()));
        let size = std::fs::metadata(src).map_err(read_err)?.len();
        let path = self.path(key)?;
        self.runtime.block_on(async {
            if size <= PART_BYTES as u64 {
                let bytes = std::fs::read(src).map_err(read_err)?;
                self.store
                    .put(&path, PutPayload::from(bytes))
                    .await
                    .map_err(|e| self.classify(e, key))?;
                return Ok(());
            }
            let upload = self
                .store
                .put_multipart(&path)
                .await
                .map_err(|e| self.classify(e, key))?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
            match self.write_parts(&mut writer, src, key).await {
                Ok(()) => writer
                    .finish()
                    .await
                    .map(|_| ())
                    .map_err(|e| self.classify(e, key)),
                Err(e) => {
                    // Parts of an unfinished upload are stored (and billed) until aborted.
                    let _ = writer.abort().await;
                    Err(e)
                }
            }
        })
    }

    /// Feeds `src` into a multipart upload, at most four parts in flight.
    async fn write_parts(
        &self,
        writer: &mut WriteMultipart,
        src: &Path,
        key: &str,
    ) -> Result<(), FetchError> {
        let read_err = |e: std::io::Error| FetchError::Cache(format!("{}: {e}", src.display()));
        let mut file = std::fs::File::open(src).map_err(read_err)?;
        let mut buf = vec![0u8; PART_BYTES];
        loop {
            let n = std::io::Read::read(&mut file, &mut buf).map_err(read_err)?;
            if n == 0 {
                return Ok(());
            }
            writer
                .wait_for_capacity(4)
                .await
                .map_err(|e| self.classify(e, key))?;
            writer.write(&buf[..n]);
        }
    }

    /// Uploads small bytes to `key` (the manifest).
    pub fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), FetchError> {
        self.runtime.block_on(async {
            self.store
                .put(&self.path(key)?, PutPayload::from(bytes))
                .await
                .map(|_| ())
                .map_err(|e| self.classify(e, key))
        })
    }

    /// The object at `key`, without its content.
    pub fn head(&self, key: &str) -> Result<ObjectInfo, FetchError> {
        self.runtime.block_on(async {
            let meta = self
                .store
                .head(&self.path(key)?)
                .await
                .map_err(|e| self.classify(e, key))?;
            Ok(ObjectInfo::from_meta(meta))
        })
    }

    /// The objects directly under `prefix/` (not in its subdirectories), at most `max`.
    pub fn list_top(&self, prefix: &str, max: usize) -> Result<Vec<ObjectInfo>, FetchError> {
        self.runtime.block_on(async {
            let listed = self
                .store
                .list_with_delimiter(Some(&self.path(prefix)?))
                .await
                .map_err(|e| self.classify(e, prefix))?;
            if listed.objects.len() > max {
                return Err(FetchError::Unusable(format!(
                    "{}/: more than {max} objects",
                    self.uri(prefix)
                )));
            }
            Ok(listed
                .objects
                .into_iter()
                .map(ObjectInfo::from_meta)
                .collect())
        })
    }

    /// Deletes `key`; an object that is not there is not an error.
    pub fn delete(&self, key: &str) -> Result<(), FetchError> {
        self.runtime.block_on(async {
            match self.store.delete(&self.path(key)?).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(self.classify(e, key)),
            }
        })
    }

    /// What the operator should do about `e`: refusals (wrong keys, no access, no such object)
    /// are final and name what to fix; the rest may pass by itself.
    fn classify(&self, e: object_store::Error, key: &str) -> FetchError {
        let uri = self.uri(key);
        match e {
            object_store::Error::NotFound { .. } => {
                FetchError::NotFound(format!("{uri}: no such object"))
            }
            object_store::Error::PermissionDenied { source, .. }
            | object_store::Error::Unauthenticated { source, .. } => FetchError::Refused(format!(
                "{uri}: the store refused {}: {}",
                self.credentials,
                store_said(&source.to_string())
            )),
            other => FetchError::Transport(format!("{uri}: {}", first_line(&other.to_string()))),
        }
    }
}

/// The first line of a message, at most 300 characters (a store's error can quote a whole XML
/// body).
fn first_line(message: &str) -> String {
    message
        .lines()
        .next()
        .unwrap_or("")
        .chars()
        .take(300)
        .collect()
}

/// What an S3 error body says (`<Code>` and `<Message>`), else the first line of `message`.
fn store_said(message: &str) -> String {
    let element = |name: &str| {
        let open = format!("<{name}>");
        let start = message.find(&open)? + open.len();
        let end = message[start..].find(&format!("</{name}>"))?;
        Some(
            message[start..start + end]
                .chars()
                .take(300)
                .collect::<String>(),
        )
    };
    match (element("Code"), element("Message")) {
        (Some(code), Some(text)) => format!("{code} ({text})"),
        (Some(code), None) => code,
        _ => first_line(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stores_refusal_is_its_code_and_message_not_its_xml() {
        let body = "Server returned non-2xx status code: 403 Forbidden: <?xml version=\"1.0\"?>\n<Error><Code>SignatureDoesNotMatch</Code><Message>The signature does not match</Message></Error>";
        assert_eq!(
            store_said(body),
            "SignatureDoesNotMatch (The signature does not match)"
        );
        assert_eq!(store_said("connection refused\nmore"), "connection refused");
    }

    #[test]
    fn a_secret_with_one_key_of_two_is_refused_not_taken_for_anonymous() {
        let settings = S3Settings {
            access_key_id: Some("AKID".into()),
            secret_name: Some("s3-credentials".into()),
            ..S3Settings::default()
        };
        let Err(FetchError::Refused(message)) = S3Bucket::open("bucket", &settings) else {
            panic!("opened with half the credentials");
        };
        assert!(message.contains("Secret `s3-credentials`"), "{message}");
        assert!(message.contains("AWS_SECRET_ACCESS_KEY"), "{message}");
    }

    #[test]
    fn settings_never_print_their_keys() {
        let settings = S3Settings {
            access_key_id: Some("AKIDSECRETID".into()),
            secret_access_key: Some("very-secret".into()),
            session_token: Some("token-secret".into()),
            ..S3Settings::default()
        };
        let shown = format!("{settings:?}");
        for secret in ["AKIDSECRETID", "very-secret", "token-secret"] {
            assert!(!shown.contains(secret), "{shown}");
        }
    }
}
