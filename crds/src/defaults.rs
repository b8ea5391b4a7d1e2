//! Default values shared by serde (`#[serde(default = ...)]`) and the generated schema's `default`.
//! They live in one place so the apiserver, the operator and the trainer fill in the same values.

pub(crate) fn yes() -> bool {
    true
}
