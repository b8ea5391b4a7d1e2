//! Validation errors that name the field at fault.

use std::fmt;

/// One problem, tied to the field at fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the field, e.g. `spec.adapter.lora.rank`; empty for the whole document.
    pub field: String,
    /// What is wrong, in the apiserver's wording where it has one.
    pub message: String,
}

impl FieldError {
    pub(crate) fn new(field: &str, message: String) -> Self {
        Self {
            field: field.to_string(),
            message,
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

/// A manifest that cannot be used, with every problem found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidManifest {
    /// Where the manifest came from (a file path, or `namespace/name`).
    pub source: String,
    /// The kind that was expected.
    pub kind: String,
    /// Every problem found, in document order.
    pub errors: Vec<FieldError>,
}

impl InvalidManifest {
    /// The first problem's field, for error reports that carry one `param`.
    pub fn first_field(&self) -> Option<&str> {
        self.errors
            .first()
            .map(|e| e.field.as_str())
            .filter(|f| !f.is_empty())
    }
}

impl fmt::Display for InvalidManifest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: invalid {}:", self.source, self.kind)?;
        for error in &self.errors {
            write!(f, "\n  - {error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for InvalidManifest {}
