//! `verify-adapter`: checks a PEFT LoRA adapter directory that a user registered as an Adapter,
//! before anything serves or trains from it. Run by the operator's short-lived verification pod;
//! the outcome is the termination message ([`AdapterVerification`]) and the exit code (0 when
//! verified, 2 when not).
//!
//! The checks go from cheapest to dearest and stop at the first failure, so the reason names the
//! first thing to fix: the files are there → their sha256 match `expectedSha256` → the adapter
//! parses → its LoRA settings match `spec.lora` → it fits the base model. The base model is
//! checked from its config alone (`linear_shapes`), never by loading its weights.

use std::path::Path;

use finetune_crds::adapter::{AdapterLora, FileDigest};
use finetune_crds::contract::{AdapterExpectations, AdapterVerification, VerificationReason};

use crate::error::Error;
use crate::export::merge::check_adapter;
use crate::export::{ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_peft_adapter};
use crate::load::ModelSource;
use crate::model::LoraConfig;
use crate::model::lora::linear_shapes;
use crate::model::lora::{LoraExpectation, LoraMismatch};
use crate::train::checkpoint::digest_file;

/// Most files listed (the Adapter status's `files` holds at most 64).
const MAX_FILES: usize = 64;

/// Verifies the adapter in `dir` against `expect` and the base model at `model` (`None`: a base
/// the trainer cannot read locally, such as `hf://`; the fit is then not checked and the message
/// says so). `shown_as` names the adapter in messages (its URI: the local path means nothing to
/// the user).
pub fn verify_adapter(
    dir: &Path,
    model: Option<&Path>,
    expect: &AdapterExpectations,
    shown_as: &str,
) -> AdapterVerification {
    let mut files = Vec::new();
    match check(dir, model, expect, shown_as, &mut files) {
        Ok(message) => AdapterVerification {
            verified: true,
            reason: VerificationReason::Verified,
            message,
            files,
        },
        Err((reason, message)) => AdapterVerification {
            verified: false,
            reason,
            message,
            files,
        },
    }
}

type Failure = (VerificationReason, String);

fn check(
    dir: &Path,
    model: Option<&Path>,
    expect: &AdapterExpectations,
    shown_as: &str,
    files: &mut Vec<FileDigest>,
) -> Result<String, Failure> {
    use VerificationReason::*;
    if !dir.is_dir() {
        return Err((
            FileMissing,
            format!("{shown_as}: the adapter directory does not exist"),
        ));
    }
    for required in [ADAPTER_CONFIG, ADAPTER_WEIGHTS] {
        if !dir.join(required).is_file() {
            return Err((
                FileMissing,
                format!(
                    "{shown_as}: {required} is missing (a PEFT LoRA adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})"
                ),
            ));
        }
    }
    for name in expect.expected_sha256.keys() {
        // A relative path inside the directory: `/x` or `../x` would check another file.
        let inside = Path::new(name)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !inside || !dir.join(name).is_file() {
            let why = if inside {
                "is missing"
            } else {
                "is not a path inside the adapter directory"
            };
            return Err((
                FileMissing,
                format!("{shown_as}: {name} {why} (spec.expectedSha256 names it)"),
            ));
        }
    }
    files.extend(digests(dir).map_err(|e| (FileMissing, format!("{shown_as}: {e}")))?);
    for (name, wanted) in &expect.expected_sha256 {
        // Files outside the listing (in a subdirectory, hidden, beyond MAX_FILES) are hashed
        // on their own.
        let found = match files.iter().find(|f| &f.name == name) {
            Some(file) => file.sha256.clone(),
            None => {
                digest_file(&dir.join(name))
                    .map_err(|e| (FileMissing, shown(&e, dir, shown_as)))?
                    .0
            }
        };
        if !found.eq_ignore_ascii_case(wanted) {
            return Err((
                DigestMismatch,
                format!(
                    "{shown_as}: {name} has sha256 {found} but spec.expectedSha256 says {wanted}"
                ),
            ));
        }
    }
    let (lora, weights) =
        read_peft_adapter(dir).map_err(|e| (InvalidAdapter, shown(&e, dir, shown_as)))?;
    consistent(&lora, &weights)
        .map_err(|m| (InvalidAdapter, format!("{shown_as}/{ADAPTER_WEIGHTS}: {m}")))?;
    if let Some(wanted) = &expect.lora {
        lora_matches(&lora, wanted).map_err(|m| {
            (
                LoraMismatch,
                format!("{shown_as}: {ADAPTER_CONFIG} has {m}"),
            )
        })?;
    }
    let layers = format!(
        "{} LoRA layer(s), r = {}, alpha = {}",
        weights.len(),
        lora.rank,
        lora.alpha
    );
    let Some(model) = model else {
        return Ok(format!(
            "{layers}; {} file(s) hashed; fit to the base model not checked (no local copy of it)",
            files.len()
        ));
    };
    let config = ModelSource::open(model)
        .and_then(|source| source.config())
        .map_err(|e| (BaseModelUnavailable, format!("base model: {e}")))?;
    check_adapter(&config, &linear_shapes(&config), &lora, &weights, dir)
        .map_err(|e| (BaseModelMismatch, shown(&e, dir, shown_as)))?;
    Ok(format!(
        "{layers}, fit the base model ({} layers, hidden size {}); {} file(s) hashed",
        config.num_layers,
        config.hidden_size,
        files.len()
    ))
}

/// Downloads the adapter at `uri` (`s3://BUCKET/PREFIX`, a job's uploaded `output.uri`) into
/// `scratch`: the PEFT files and those `expectedSha256` names, each checked against the
/// prefix's manifest. Returns the directory to verify.
pub fn fetch_adapter(
    uri: &str,
    scratch: &Path,
    expect: &AdapterExpectations,
) -> Result<std::path::PathBuf, AdapterVerification> {
    use crate::fetch::FetchError;
    use crate::fetch::prefix::{self, MANIFEST};
    use crate::fetch::s3::{S3Bucket, S3Settings};
    use finetune_crds::uri::StorageUri;
    let fail = |reason, message: String| AdapterVerification {
        verified: false,
        reason,
        message,
        files: Vec::new(),
    };
    let Some(StorageUri::S3 { bucket, key }) = StorageUri::parse(uri) else {
        return Err(fail(
            VerificationReason::FileMissing,
            format!("{uri}: not s3://BUCKET/PREFIX"),
        ));
    };
    let fetched = (|| {
        let bucket = S3Bucket::open(&bucket, &S3Settings::from_env())?;
        let manifest = prefix::read_manifest(&bucket, &key)?;
        let mut wanted = vec![ADAPTER_CONFIG, ADAPTER_WEIGHTS];
        wanted.extend(expect.expected_sha256.keys().map(String::as_str));
        std::fs::create_dir_all(scratch)
            .map_err(|e| FetchError::Cache(format!("{}: {e}", scratch.display())))?;
        prefix::download_listed(&bucket, &key, &manifest, &wanted, scratch)
    })();
    match fetched {
        Ok(_) => Ok(scratch.to_path_buf()),
        Err(e @ FetchError::Corrupt(_)) => Err(fail(
            VerificationReason::DigestMismatch,
            format!("{e} (checked against {MANIFEST})"),
        )),
        Err(e) => Err(fail(VerificationReason::FileMissing, e.to_string())),
    }
}

/// Faults of the adapter itself, whatever the base: every LoRA pair is `[r, in]` / `[out, r]`
/// with the config's `r`, and every plain target module has weights. What is left for
/// `check_adapter` to find is then a misfit with the base model.
fn consistent(
    lora: &LoraConfig,
    weights: &std::collections::BTreeMap<String, (tch::Tensor, tch::Tensor)>,
) -> Result<(), String> {
    for (name, (a, b)) in weights {
        let (a, b) = (a.size(), b.size());
        if a.len() != 2 || b.len() != 2 {
            return Err(format!(
                "{name}: lora_A/lora_B must be 2-D matrices, got {a:?} and {b:?}"
            ));
        }
        if a[0] != lora.rank || b[1] != lora.rank {
            return Err(format!(
                "{name}: rank mismatch: {ADAPTER_CONFIG} has r = {}, the tensors are {a:?} and {b:?}",
                lora.rank
            ));
        }
    }
    for target in &lora.target_modules {
        let plain = target
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if plain && !weights.keys().any(|k| k.rsplit('.').next() == Some(target)) {
            return Err(format!(
                "target_modules lists `{target}` but the adapter holds no weights for it"
            ));
        }
    }
    Ok(())
}

/// sha256 of the directory's regular files (not hidden ones), by name.
fn digests(dir: &Path) -> Result<Vec<FileDigest>, Error> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|entry| entry.path().is_file())
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| !name.starts_with('.'))
        .collect();
    names.sort();
    names.truncate(MAX_FILES);
    names
        .into_iter()
        .map(|name| {
            let (sha256, size) = digest_file(&dir.join(&name))?;
            Ok(FileDigest { name, sha256, size })
        })
        .collect()
}

/// Where `lora` (read from the adapter) differs from what the spec expects, if anywhere.
fn lora_matches(lora: &LoraConfig, wanted: &AdapterLora) -> Result<(), String> {
    let Some(mismatch) = lora.mismatch(&LoraExpectation::from(wanted)) else {
        return Ok(());
    };
    Err(match mismatch {
        LoraMismatch::Rank => format!("r = {} but spec.lora.rank is {}", lora.rank, wanted.rank),
        LoraMismatch::Alpha => format!(
            "lora_alpha = {} but spec.lora.alpha is {}",
            lora.alpha, wanted.alpha
        ),
        LoraMismatch::Rslora => format!(
            "use_rslora = {} but spec.lora.rslora is {}",
            lora.rslora, wanted.rslora
        ),
        LoraMismatch::TargetModules(have, want) => {
            format!("target_modules {have:?} but spec.lora.targetModules is {want:?}")
        }
    })
}

/// An error's text with the local directory replaced by the adapter's URI.
fn shown(error: &Error, dir: &Path, shown_as: &str) -> String {
    let local = dir.display().to_string();
    let local = local.trim_end_matches('/');
    // In one pass: a file:// URI contains the local path itself.
    error
        .to_string()
        .split(local)
        .collect::<Vec<_>>()
        .join(shown_as.trim_end_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lora() -> LoraConfig {
        LoraConfig {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: vec!["v_proj".into(), "q_proj".into()],
            rslora: false,
        }
    }

    fn wanted() -> AdapterLora {
        AdapterLora {
            rank: 8,
            alpha: 16.0,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            rslora: false,
        }
    }

    #[test]
    fn lora_settings_match_in_any_module_order_and_each_difference_is_named() {
        assert_eq!(lora_matches(&lora(), &wanted()), Ok(()));
        let any_modules = AdapterLora {
            target_modules: vec![],
            ..wanted()
        };
        assert_eq!(lora_matches(&lora(), &any_modules), Ok(()));
        let cases = [
            (
                AdapterLora {
                    rank: 16,
                    ..wanted()
                },
                "spec.lora.rank is 16",
            ),
            (
                AdapterLora {
                    alpha: 32.0,
                    ..wanted()
                },
                "spec.lora.alpha is 32",
            ),
            (
                AdapterLora {
                    rslora: true,
                    ..wanted()
                },
                "spec.lora.rslora is true",
            ),
            (
                AdapterLora {
                    target_modules: vec!["q_proj".into()],
                    ..wanted()
                },
                "spec.lora.targetModules",
            ),
        ];
        for (spec, says) in cases {
            let why = lora_matches(&lora(), &spec).unwrap_err();
            assert!(why.contains(says), "{why}");
        }
    }

    #[test]
    fn messages_name_the_uri_not_the_pod_path() {
        let dir = Path::new("/mnt/pvc/adapters/team/sft");
        let error = Error::format(&dir.join(ADAPTER_CONFIG), "missing integer `r`");
        assert_eq!(
            shown(&error, dir, "pvc://adapters/team/sft"),
            "pvc://adapters/team/sft/adapter_config.json: missing integer `r`"
        );
        let local = Path::new("/data/adapters/sft");
        let error = Error::format(&local.join(ADAPTER_WEIGHTS), "bad");
        assert_eq!(
            shown(&error, local, "file:///data/adapters/sft"),
            "file:///data/adapters/sft/adapter_model.safetensors: bad"
        );
    }
}
