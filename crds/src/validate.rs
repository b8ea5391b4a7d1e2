//! One validation path for manifests, shared by the operator and the trainer.
//!
//! A manifest passes the same three gates the apiserver applies, in the same order and with the
//! same words: schema defaults, the structural schema (unknown fields, types, bounds), then the
//! CEL rules (`x-kubernetes-validations`) taken from the generated CRD itself. Because the rules
//! are read from the CRD, the apiserver, the operator and `finetune-trainer run job.yaml` can
//! never disagree about what is valid.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use kube::core::cel;
use kube::{CustomResourceExt, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::errors::{FieldError, InvalidManifest};
use crate::schema_check;

/// Parses a YAML (or JSON) manifest of kind `K` and validates it as the apiserver would.
/// `source` names the file in error messages.
pub fn parse_manifest<K>(text: &str, source: &str) -> Result<K, InvalidManifest>
where
    K: CustomResourceExt + Resource<DynamicType = ()> + DeserializeOwned,
{
    let fail = |errors| InvalidManifest {
        source: source.to_string(),
        kind: K::kind(&()).into_owned(),
        errors,
    };
    if let Some(message) = too_deep(text) {
        return Err(fail(vec![FieldError::new("", message)]));
    }
    let document: Value = serde_yaml::from_str(text).map_err(|e| {
        fail(vec![FieldError::new(
            "",
            format!("not a YAML document: {e}"),
        )])
    })?;
    let document = check_document::<K>(&document).map_err(fail)?;
    serde_path_to_error::deserialize(document).map_err(|e| {
        let field = e.path().to_string();
        fail(vec![FieldError::new(
            if field == "." { "" } else { &field },
            e.into_inner().to_string(),
        )])
    })
}

/// Reads and validates a manifest file of kind `K`.
pub fn read_manifest<K>(path: &std::path::Path) -> Result<K, InvalidManifest>
where
    K: CustomResourceExt + Resource<DynamicType = ()> + DeserializeOwned,
{
    let source = path.display().to_string();
    let text = read_manifest_text(path).map_err(|message| InvalidManifest {
        source: source.clone(),
        kind: K::kind(&()).into_owned(),
        errors: vec![FieldError::new("", message)],
    })?;
    parse_manifest(&text, &source)
}

/// The apiserver refuses request bodies over 3 MiB, so no valid manifest is larger.
pub const MAX_MANIFEST_BYTES: u64 = 3 << 20;

/// Flow collections (`[`, `{`) nested deeper than this are refused before parsing: the YAML
/// parser's time grows steeply with depth, and no manifest of ours nests beyond ten.
const MAX_FLOW_DEPTH: usize = 100;

/// Reads a manifest file of at most [`MAX_MANIFEST_BYTES`]; the error is a sentence for the user.
pub fn read_manifest_text(path: &std::path::Path) -> Result<String, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read the file: {e}"))?;
    let mut bytes = Vec::new();
    file.take(MAX_MANIFEST_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read the file: {e}"))?;
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(format!(
            "the file is larger than {MAX_MANIFEST_BYTES} bytes, the apiserver's limit"
        ));
    }
    String::from_utf8(bytes)
        .map_err(|e| format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to() + 1))
}

/// The nesting of `[`/`{` outside quoted scalars and comments, checked against [`MAX_FLOW_DEPTH`].
/// Conservative: a bracket inside a plain scalar counts too, which only matters past the limit.
fn too_deep(text: &str) -> Option<String> {
    let mut depth = 0usize;
    for (i, line) in text.lines().enumerate() {
        let (mut quote, mut escaped, mut prev) = (None, false, ' ');
        for c in line.chars() {
            match quote {
                Some('"') if escaped => escaped = false,
                Some('"') if c == '\\' => escaped = true,
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None => match c {
                    '#' if prev.is_whitespace() => break,
                    '\'' | '"' => quote = Some(c),
                    '[' | '{' => depth += 1,
                    ']' | '}' => depth = depth.saturating_sub(1),
                    _ => {}
                },
            }
            if depth > MAX_FLOW_DEPTH {
                return Some(format!(
                    "line {}: collections nested deeper than {MAX_FLOW_DEPTH}",
                    i + 1
                ));
            }
            prev = c;
        }
    }
    None
}

/// Validates an object the operator already holds (e.g. from a watch), for objects that reached
/// it without passing this CRD version's rules (an older CRD, a disabled validation).
pub fn validate_object<K>(object: &K) -> Result<(), InvalidManifest>
where
    K: CustomResourceExt + Resource<DynamicType = ()> + Serialize,
{
    let document = serde_json::to_value(object).expect("custom resources serialize to JSON");
    check_document::<K>(&document)
        .map(|_| ())
        .map_err(|errors| InvalidManifest {
            source: format!(
                "{}/{}",
                object.meta().namespace.as_deref().unwrap_or_default(),
                object.meta().name.as_deref().unwrap_or_default()
            ),
            kind: K::kind(&()).into_owned(),
            errors,
        })
}

/// Runs the CEL transition rules (those using `oldSelf`, such as the immutable spec fields of a
/// started job) for an update from `old` to `new`, both given as JSON documents.
pub fn check_update<K>(new: &Value, old: &Value) -> Result<(), Vec<FieldError>>
where
    K: CustomResourceExt + Resource<DynamicType = ()>,
{
    let compiled = compiled_schema::<K>();
    let (schema, rules) = compiled.as_ref();
    let new = cel::apply_defaults(schema, new);
    let old = cel::apply_defaults(schema, old);
    cel::validate_compiled(rules, &new, Some(&old)).map_err(|failures| field_errors(&failures))
}

/// CEL failures as field errors (kube-cel reports paths with a leading dot).
fn field_errors(failures: &cel::ValidationErrors) -> Vec<FieldError> {
    failures
        .iter()
        .map(|failure| {
            FieldError::new(
                failure.field_path.trim_start_matches('.'),
                failure.message.clone(),
            )
        })
        .collect()
}

/// Checks identity, schema and CEL rules; returns the document with schema defaults applied.
fn check_document<K>(document: &Value) -> Result<Value, Vec<FieldError>>
where
    K: CustomResourceExt + Resource<DynamicType = ()>,
{
    let mut errors = identity_errors::<K>(document);
    if !errors.is_empty() {
        return Err(errors);
    }
    let compiled = compiled_schema::<K>();
    let (schema, rules) = compiled.as_ref();
    let defaulted = cel::apply_defaults(schema, document);
    schema_check::check(schema, &defaulted, "", &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    cel::validate_compiled(rules, &defaulted, None).map_err(|failures| field_errors(&failures))?;
    Ok(defaulted)
}

fn identity_errors<K>(document: &Value) -> Vec<FieldError>
where
    K: Resource<DynamicType = ()>,
{
    let mut errors = Vec::new();
    if !document.is_object() {
        return vec![FieldError::new(
            "",
            "the manifest must be a YAML mapping".into(),
        )];
    }
    let api_version = K::api_version(&());
    let kind = K::kind(&());
    if document.get("apiVersion").and_then(Value::as_str) != Some(api_version.as_ref()) {
        errors.push(FieldError::new(
            "apiVersion",
            format!("must be {api_version}"),
        ));
    }
    if document.get("kind").and_then(Value::as_str) != Some(kind.as_ref()) {
        errors.push(FieldError::new("kind", format!("must be {kind}")));
    }
    let name = document.pointer("/metadata/name").and_then(Value::as_str);
    if name.is_none_or(str::is_empty) {
        errors.push(FieldError::new("metadata.name", "Required value".into()));
    }
    errors
}

/// The schema of `K` and its compiled CEL rules, built once per thread: generating the schema and
/// compiling its rules costs far more than validating one object, and the operator validates
/// on every reconcile.
fn compiled_schema<K: CustomResourceExt + Resource<DynamicType = ()>>()
-> Rc<(Value, cel::CompiledSchema)> {
    thread_local! {
        static COMPILED: RefCell<HashMap<String, Rc<(Value, cel::CompiledSchema)>>> = RefCell::default();
    }
    let kind = K::kind(&()).into_owned();
    COMPILED.with(|cache| {
        let mut cache = cache.borrow_mut();
        cache
            .entry(kind)
            .or_insert_with(|| {
                let schema = openapi_schema::<K>();
                let rules = cel::compile_schema(&schema);
                Rc::new((schema, rules))
            })
            .clone()
    })
}

/// The `openAPIV3Schema` of the CRD generated for `K`.
pub fn openapi_schema<K: CustomResourceExt>() -> Value {
    let crd = K::crd();
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref());
    serde_json::to_value(schema.expect("derived CRDs carry a schema")).expect("schemas serialize")
}
