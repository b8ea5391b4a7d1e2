//! Checks a manifest against the structural OpenAPI schema of our CRDs, the way the apiserver
//! does before it runs CEL rules: unknown fields, types, enums, bounds and required fields.
//!
//! It covers the subset of OpenAPI v3 that Kubernetes allows in structural schemas and that
//! kube/schemars generate for our types. Messages follow the apiserver's wording
//! (`spec.x: Invalid value: 0: must be greater than or equal to 1`) so a user sees the same
//! words from `kubectl apply`, the operator and a local `finetune-trainer run`.

use serde_json::{Map, Value};

use crate::errors::FieldError;

/// Appends every structural violation of `value` against `schema` to `errors`.
pub(crate) fn check(schema: &Value, value: &Value, path: &str, errors: &mut Vec<FieldError>) {
    if value.is_null() {
        // The apiserver drops nulls of non-nullable fields before validation.
        return;
    }
    if schema.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        if !(value.is_i64() || value.is_u64() || value.is_string()) {
            errors.push(invalid(path, value, "must be an integer or a string"));
        }
        return;
    }
    if let Some(branches) = schema.get("anyOf").and_then(Value::as_array) {
        let fits = branches.iter().any(|branch| {
            let mut branch_errors = Vec::new();
            check(branch, value, path, &mut branch_errors);
            branch_errors.is_empty()
        });
        if !fits && schema.get("type").is_none() {
            errors.push(invalid(path, value, "does not match any allowed form"));
            return;
        }
    }
    if let Some(expected) = schema.get("type").and_then(Value::as_str)
        && !has_type(value, expected)
    {
        errors.push(invalid(path, value, &format!("must be of type {expected}")));
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        let list: Vec<String> = allowed.iter().map(Value::to_string).collect();
        errors.push(FieldError::new(
            path,
            format!(
                "Unsupported value: {}: supported values: {}",
                value,
                list.join(", ")
            ),
        ));
    }
    match value {
        Value::Object(object) => check_object(schema, object, path, errors),
        Value::Array(items) => check_array(schema, items, path, errors),
        Value::String(text) => check_string(schema, text, path, errors),
        Value::Number(_) => check_number(schema, value, path, errors),
        _ => {}
    }
}

fn has_type(value: &Value, expected: &str) -> bool {
    match expected {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        _ => true,
    }
}

fn check_object(
    schema: &Value,
    object: &Map<String, Value>,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    let properties = schema.get("properties").and_then(Value::as_object);
    let additional = schema.get("additionalProperties").filter(|a| a.is_object());
    let preserve_unknown =
        schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for name in required.iter().filter_map(Value::as_str) {
            if object.get(name).is_none_or(Value::is_null) {
                errors.push(FieldError::new(&join(path, name), "Required value".into()));
            }
        }
    }
    for (name, field) in object {
        let field_path = join(path, name);
        if let Some(field_schema) = properties.and_then(|p| p.get(name)) {
            check(field_schema, field, &field_path, errors);
        } else if let Some(value_schema) = additional {
            check(value_schema, field, &field_path, errors);
        } else if properties.is_some() && !preserve_unknown && !is_implicit_root_field(path, name) {
            errors.push(FieldError::new(
                &field_path,
                format!("Unsupported field: \"{name}\" is not part of the schema (check its spelling and indentation)"),
            ));
        }
    }
}

/// A CRD's schema leaves out `apiVersion`, `kind` and `metadata`: the apiserver validates them
/// itself.
fn is_implicit_root_field(path: &str, name: &str) -> bool {
    path.is_empty() && matches!(name, "apiVersion" | "kind" | "metadata")
}

fn check_array(schema: &Value, items: &[Value], path: &str, errors: &mut Vec<FieldError>) {
    if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
        && items.len() as u64 > max
    {
        errors.push(FieldError::new(
            path,
            format!("Too many: {}: must have at most {max} items", items.len()),
        ));
    }
    if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
        && (items.len() as u64) < min
    {
        errors.push(FieldError::new(
            path,
            format!("Required value: must have at least {min} items"),
        ));
    }
    if let Some(item_schema) = schema.get("items") {
        for (index, item) in items.iter().enumerate() {
            check(item_schema, item, &format!("{path}[{index}]"), errors);
        }
    }
}

fn check_string(schema: &Value, text: &str, path: &str, errors: &mut Vec<FieldError>) {
    let length = text.chars().count() as u64;
    if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
        && length > max
    {
        errors.push(FieldError::new(
            path,
            format!("Too long: may not be more than {max} characters"),
        ));
    }
    if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
        && length < min
    {
        errors.push(invalid(
            path,
            &Value::String(text.into()),
            &format!("must be at least {min} characters long"),
        ));
    }
}

fn check_number(schema: &Value, value: &Value, path: &str, errors: &mut Vec<FieldError>) {
    let Some(number) = value.as_f64() else { return };
    let exclusive = |key: &str| schema.get(key) == Some(&Value::Bool(true));
    if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
        let why = if exclusive("exclusiveMinimum") && number <= min {
            Some(format!("must be greater than {}", show(min)))
        } else if number < min {
            Some(format!("must be greater than or equal to {}", show(min)))
        } else {
            None
        };
        errors.extend(why.map(|why| invalid(path, value, &why)));
    }
    if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
        let why = if exclusive("exclusiveMaximum") && number >= max {
            Some(format!("must be less than {}", show(max)))
        } else if number > max {
            Some(format!("must be less than or equal to {}", show(max)))
        } else {
            None
        };
        errors.extend(why.map(|why| invalid(path, value, &why)));
    }
}

fn show(bound: f64) -> String {
    if bound.fract() == 0.0 && bound.abs() < 1e15 {
        format!("{}", bound as i64)
    } else {
        bound.to_string()
    }
}

fn invalid(path: &str, value: &Value, why: &str) -> FieldError {
    // Like the apiserver, name the kind of a composite value instead of dumping it.
    let shown = match value {
        Value::Object(_) => "\"object\"".to_string(),
        Value::Array(_) => "\"array\"".to_string(),
        scalar => scalar.to_string(),
    };
    FieldError::new(path, format!("Invalid value: {shown}: {why}"))
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}
