//! The Hugging Face Hub's HTTP API, the part a download needs: a revision resolved to its commit
//! and file list (`/api/models/REPO/revision/REV`), each file's size and hash (`paths-info`),
//! and the bytes (`REPO/resolve/COMMIT/PATH`, with `Range` to resume). Works against the Hub
//! itself and any mirror of its API (`HF_ENDPOINT`), such as olah.
//!
//! The token goes only to the endpoint's own host: a redirect to another host (the Hub's CDN,
//! whose URL is already signed) is followed without it.

use std::io::Read;
use std::time::Duration;

use serde::Deserialize;

use super::FetchError;

/// Refuse API answers bigger than this (a file list of a large repository is a few MiB).
const MAX_API_BODY: u64 = 32 << 20;
/// What of an error reply is read (for the message).
const MAX_ERROR_BODY: u64 = 64 << 10;
/// Redirect hops followed per request (the Hub uses one or two).
const MAX_REDIRECTS: usize = 5;

/// A client of one Hub endpoint with an optional token.
pub struct HubClient {
    endpoint: String,
    token: Option<String>,
    /// Where the token came from, for error messages (`Secret hf-token (key token)`).
    token_source: Option<String>,
    agent: ureq::Agent,
}

/// A revision resolved: the commit and the repository's file names at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revision {
    pub commit: String,
    pub files: Vec<String>,
}

/// A file at a commit, with what to check it against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFile {
    pub path: String,
    pub size: u64,
    pub check: Check,
}

/// The hash the Hub publishes for a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// A Git LFS object: sha256 of the content.
    Sha256(String),
    /// A plain git blob: sha1 of `blob <size>\0<content>`.
    GitBlob(String),
}

#[derive(Deserialize)]
struct RevisionJson {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
}

#[derive(Deserialize)]
struct PathInfoJson {
    #[serde(rename = "type")]
    kind: String,
    path: String,
    #[serde(default)]
    size: u64,
    oid: String,
    #[serde(default)]
    lfs: Option<LfsJson>,
}

#[derive(Deserialize)]
struct LfsJson {
    oid: String,
    size: u64,
}

impl HubClient {
    /// `endpoint` without a trailing slash is the API base (`https://huggingface.co`).
    pub fn new(endpoint: &str, token: Option<String>, token_source: Option<String>) -> Self {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(120)))
            // A stalled body fails after this long without a byte, not a whole-file limit.
            .timeout_recv_body(None)
            .user_agent(concat!("finetune-trainer/", env!("CARGO_PKG_VERSION")))
            .build();
        HubClient {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token: token.filter(|t| !t.is_empty()),
            token_source,
            agent: config.into(),
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The API base of `repo`: `ORG/NAME` is a model, `datasets/ORG/NAME` a dataset (files of
    /// both are at `/{repo}/resolve/...`).
    fn api(&self, repo: &str) -> String {
        match repo.strip_prefix("datasets/") {
            Some(dataset) => format!("{}/api/datasets/{dataset}", self.endpoint),
            None => format!("{}/api/models/{repo}", self.endpoint),
        }
    }

    /// Resolves `revision` (a branch, tag or commit) of a repository.
    pub fn revision(&self, repo: &str, revision: &str) -> Result<Revision, FetchError> {
        let url = format!("{}/revision/{}", self.api(repo), encode_segment(revision));
        let mut response = self.check(self.get(&url, None)?, repo, Some(revision))?;
        let text = read_api_body(&mut response, &url)?;
        let parsed: RevisionJson = serde_json::from_str(&text)
            .map_err(|e| FetchError::Protocol(format!("{url}: not a revision document: {e}")))?;
        if !is_commit_hash(&parsed.sha) {
            return Err(FetchError::Protocol(format!(
                "{url}: `sha` is not a commit hash"
            )));
        }
        Ok(Revision {
            commit: parsed.sha,
            files: parsed.siblings.into_iter().map(|s| s.rfilename).collect(),
        })
    }

    /// Sizes and hashes of `paths` at `commit`.
    pub fn paths_info(
        &self,
        repo: &str,
        commit: &str,
        paths: &[String],
    ) -> Result<Vec<RemoteFile>, FetchError> {
        let url = format!("{}/paths-info/{commit}", self.api(repo));
        let form: Vec<(&str, &str)> = paths.iter().map(|p| ("paths", p.as_str())).collect();
        let mut request = self.agent.post(&url);
        if let Some(token) = &self.token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        let response = request
            .send_form(form)
            .map_err(|e| FetchError::Transport(format!("{url}: {e}")))?;
        let mut response = self.check(response, repo, Some(commit))?;
        let text = read_api_body(&mut response, &url)?;
        let infos: Vec<PathInfoJson> = serde_json::from_str(&text)
            .map_err(|e| FetchError::Protocol(format!("{url}: not a paths-info list: {e}")))?;
        let mut files = Vec::with_capacity(infos.len());
        for info in infos.into_iter().filter(|i| i.kind == "file") {
            files.push(match info.lfs {
                Some(lfs) => RemoteFile {
                    path: info.path,
                    size: lfs.size,
                    check: Check::Sha256(lfs.oid),
                },
                None => RemoteFile {
                    path: info.path,
                    size: info.size,
                    check: Check::GitBlob(info.oid),
                },
            });
        }
        Ok(files)
    }

    /// Starts the download of `path` at `commit` from byte `from` on. The reply is `Partial` when
    /// the server honoured the range, `Whole` when it sent the file from its start.
    pub fn open(
        &self,
        repo: &str,
        commit: &str,
        path: &str,
        from: u64,
    ) -> Result<Body, FetchError> {
        let encoded: Vec<String> = path.split('/').map(encode_segment).collect();
        let url = format!(
            "{}/{repo}/resolve/{commit}/{}",
            self.endpoint,
            encoded.join("/")
        );
        let range = (from > 0).then(|| format!("bytes={from}-"));
        let response = self.get(&url, range.as_deref())?;
        let status = response.status().as_u16();
        match status {
            206 => Ok(Body::Partial(Box::new(response.into_body().into_reader()))),
            200 => Ok(Body::Whole(Box::new(response.into_body().into_reader()))),
            // The part already held is the whole file: nothing left to send.
            416 => Ok(Body::Partial(Box::new(std::io::empty()))),
            _ => Err(self.refusal(response, repo, Some(commit))),
        }
    }

    /// GET with the token on the endpoint's host, following redirects by hand so that a
    /// same-host redirect keeps the token and another host never sees it.
    fn get(
        &self,
        url: &str,
        range: Option<&str>,
    ) -> Result<ureq::http::Response<ureq::Body>, FetchError> {
        let mut url = url.to_string();
        for _ in 0..=MAX_REDIRECTS {
            let mut request = self.agent.get(&url);
            if let Some(token) = self.token.as_ref().filter(|_| self.same_host(&url)) {
                request = request.header("Authorization", format!("Bearer {token}"));
            }
            if let Some(range) = range {
                request = request.header("Range", range);
            }
            let response = request
                .call()
                .map_err(|e| FetchError::Transport(format!("{url}: {e}")))?;
            if !response.status().is_redirection() {
                return Ok(response);
            }
            let location = response
                .headers()
                .get("location")
                .and_then(|l| l.to_str().ok())
                .ok_or_else(|| FetchError::Protocol(format!("{url}: redirect without Location")))?;
            url = join_location(&url, location);
        }
        Err(FetchError::Protocol(format!(
            "{url}: more than {MAX_REDIRECTS} redirects"
        )))
    }

    fn same_host(&self, url: &str) -> bool {
        origin(url) == origin(&self.endpoint)
    }

    /// The response when it is a success, else [`HubClient::refusal`].
    fn check(
        &self,
        response: ureq::http::Response<ureq::Body>,
        repo: &str,
        revision: Option<&str>,
    ) -> Result<ureq::http::Response<ureq::Body>, FetchError> {
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(self.refusal(response, repo, revision))
        }
    }

    /// Maps the Hub's refusals to errors a person can act on, with the start of what the
    /// server said (the Hub explains itself in the body, e.g. "Invalid rev id").
    fn refusal(
        &self,
        mut response: ureq::http::Response<ureq::Body>,
        repo: &str,
        revision: Option<&str>,
    ) -> FetchError {
        let status = response.status().as_u16();
        let said = response
            .body_mut()
            .with_config()
            .limit(MAX_ERROR_BODY)
            .read_to_string()
            .map(|b| b.trim().chars().take(200).collect::<String>())
            .ok()
            .filter(|b| !b.is_empty())
            .map(|b| format!("; the server said: {b}"))
            .unwrap_or_default();
        let at = revision.map(|r| format!("@{r}")).unwrap_or_default();
        let endpoint = &self.endpoint;
        let (what, token_field) = match repo.starts_with("datasets/") {
            true => ("dataset", "spec.dataset.tokenSecretRef"),
            false => ("model", "spec.baseModel.tokenSecretRef"),
        };
        match status {
            401 | 403 => FetchError::Refused(match &self.token_source {
                Some(source) => format!(
                    "{endpoint} refused the token from {source} for `{repo}{at}` (HTTP {status}{said}): the token is invalid or cannot read the repository, or the repository or revision does not exist"
                ),
                None => format!(
                    "{endpoint} refused `{repo}{at}` without a token (HTTP {status}{said}): the repository is gated, private or does not exist; give a token with {token_field}"
                ),
            }),
            404 => FetchError::NotFound(format!(
                "{endpoint} has no {what} `{repo}{at}` (HTTP 404{said})"
            )),
            429 | 500..=599 => FetchError::Transport(format!(
                "{endpoint} answered HTTP {status} for `{repo}{at}`{said}"
            )),
            _ => FetchError::Protocol(format!(
                "{endpoint} answered HTTP {status} for `{repo}{at}`{said}"
            )),
        }
    }
}

/// A download's body: from the requested byte on, or the whole file.
pub enum Body {
    Partial(Box<dyn Read + Send>),
    Whole(Box<dyn Read + Send>),
}

fn read_api_body(
    response: &mut ureq::http::Response<ureq::Body>,
    url: &str,
) -> Result<String, FetchError> {
    response
        .body_mut()
        .with_config()
        .limit(MAX_API_BODY)
        .read_to_string()
        .map_err(|e| FetchError::Transport(format!("{url}: {e}")))
}

/// `scheme://host[:port]` of a URL.
fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map(|i| i + 3).unwrap_or(0);
    let end = url[after_scheme..]
        .find('/')
        .map(|i| after_scheme + i)
        .unwrap_or(url.len());
    &url[..end]
}

/// The URL a `Location` header names, relative to the request's URL.
fn join_location(base: &str, location: &str) -> String {
    if location.contains("://") {
        location.to_string()
    } else if location.starts_with('/') {
        format!("{}{location}", origin(base))
    } else {
        let dir = base.rsplit_once('/').map(|(d, _)| d).unwrap_or(base);
        format!("{dir}/{location}")
    }
}

/// Percent-encodes one path segment (a revision like `refs/pr/1` stays one segment).
fn encode_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// A full 40-hex git commit hash.
pub fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_resolve_against_the_request() {
        let base = "https://hub.local:8443/org/m/resolve/abc/config.json";
        assert_eq!(origin(base), "https://hub.local:8443");
        assert_eq!(
            join_location(base, "/api/resolve-cache/x"),
            "https://hub.local:8443/api/resolve-cache/x"
        );
        assert_eq!(
            join_location(base, "https://cdn.example/o?sig=1"),
            "https://cdn.example/o?sig=1"
        );
        assert_eq!(
            join_location(base, "other.json"),
            "https://hub.local:8443/org/m/resolve/abc/other.json"
        );
    }

    #[test]
    fn revisions_and_names_are_encoded_as_one_segment() {
        assert_eq!(encode_segment("refs/pr/1"), "refs%2Fpr%2F1");
        assert_eq!(
            encode_segment("model-00001.safetensors"),
            "model-00001.safetensors"
        );
        assert_eq!(encode_segment("a b"), "a%20b");
        assert!(is_commit_hash(&"a1".repeat(20)));
        assert!(!is_commit_hash("main"));
    }
}
