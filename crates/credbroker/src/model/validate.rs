//! Validation of every name and field that enters the model. Errors name the field.

use std::collections::BTreeMap;

pub const DEFAULT_WORKSPACE: &str = "default";

const MAX_NAME_CHARS: usize = 64;
const MAX_USER_ID_BYTES: usize = 256;
const MAX_CONFIG_ENTRIES: usize = 64;
const MAX_CONFIG_VALUE_BYTES: usize = 16 * 1024;
const MAX_SECRET_BYTES: usize = 16 * 1024;

/// A field that failed validation: which one, and why, in words a person can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct FieldError {
    pub field: String,
    pub problem: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// Workspace names follow `[a-z0-9][a-z0-9-]{0,62}`; empty means the default workspace.
pub fn workspace_or_default(field: &str, workspace: &str) -> Result<String, FieldError> {
    if workspace.is_empty() {
        return Ok(DEFAULT_WORKSPACE.to_string());
    }
    let bytes = workspace.as_bytes();
    let ok = bytes.len() <= 63
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
    if !ok {
        return Err(FieldError::new(
            field,
            "must be 1-63 characters of a-z, 0-9 and '-', starting with a letter or digit",
        ));
    }
    Ok(workspace.to_string())
}

/// Connector names: 1-64 characters, no control characters, no leading or trailing spaces,
/// and not shaped like an id ("cn_…"), so that a name and an id can never be confused.
pub fn validate_connector_name(field: &str, name: &str) -> Result<(), FieldError> {
    let chars = name.chars().count();
    if chars == 0 {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if chars > MAX_NAME_CHARS {
        return Err(FieldError::new(
            field,
            format!("is {chars} characters long; at most {MAX_NAME_CHARS} allowed"),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(FieldError::new(
            field,
            "must not contain control characters",
        ));
    }
    if name.trim() != name {
        return Err(FieldError::new(field, "must not start or end with spaces"));
    }
    if name.starts_with("cn_") {
        return Err(FieldError::new(
            field,
            "must not start with \"cn_\" (reserved for connector ids)",
        ));
    }
    Ok(())
}

pub fn validate_user_id(field: &str, user_id: &str) -> Result<(), FieldError> {
    if user_id.len() > MAX_USER_ID_BYTES {
        return Err(FieldError::new(
            field,
            format!(
                "is {} bytes long; at most {MAX_USER_ID_BYTES} allowed",
                user_id.len()
            ),
        ));
    }
    if user_id.chars().any(char::is_control) {
        return Err(FieldError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// Checks a map of settings against the keys a kind accepts.
pub fn validate_config(
    field: &str,
    config: &BTreeMap<String, String>,
    known: &[&str],
) -> Result<(), FieldError> {
    if config.len() > MAX_CONFIG_ENTRIES {
        return Err(FieldError::new(
            field,
            format!(
                "has {} entries; at most {MAX_CONFIG_ENTRIES} allowed",
                config.len()
            ),
        ));
    }
    for (key, value) in config {
        if !known.contains(&key.as_str()) {
            return Err(FieldError::new(
                format!("{field}.{key}"),
                format!("is not a known setting here (known: {})", known.join(", ")),
            ));
        }
        if value.len() > MAX_CONFIG_VALUE_BYTES {
            return Err(FieldError::new(
                format!("{field}.{key}"),
                format!("is longer than {MAX_CONFIG_VALUE_BYTES} bytes"),
            ));
        }
        if key != "ca_pem" && value.chars().any(|c| c.is_control()) {
            return Err(FieldError::new(
                format!("{field}.{key}"),
                "must not contain control characters",
            ));
        }
    }
    Ok(())
}

/// Checks a secret slot name against the kind's slots, and its value's size. The value itself
/// never appears in the error.
pub fn validate_secret(
    field: &str,
    slot: &str,
    value: &str,
    slots: &[&str],
) -> Result<(), FieldError> {
    let field = format!("{field}.{slot}");
    if !slots.contains(&slot) {
        let known = if slots.is_empty() {
            "none".to_string()
        } else {
            slots.join(", ")
        };
        return Err(FieldError::new(
            field,
            format!("is not a secret slot here (slots: {known})"),
        ));
    }
    if value.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if value.len() > MAX_SECRET_BYTES {
        return Err(FieldError::new(
            field,
            format!("is longer than {MAX_SECRET_BYTES} bytes"),
        ));
    }
    if value.contains(['\r', '\n', '\0']) {
        return Err(FieldError::new(
            field,
            "must not contain line breaks or NUL",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_names() {
        assert_eq!(workspace_or_default("w", "").unwrap(), "default");
        assert!(workspace_or_default("w", "acme-1").is_ok());
        for bad in ["-acme", "Acme", "a/b", "a b", &"a".repeat(64)] {
            let err = workspace_or_default("workspace", bad).unwrap_err();
            assert_eq!(err.field, "workspace", "{bad}");
        }
    }

    #[test]
    fn connector_names() {
        assert!(validate_connector_name("name", "HubSpot API").is_ok());
        assert!(validate_connector_name("name", "Équipe Gmail").is_ok());
        for (bad, why) in [
            ("", "empty"),
            (" x", "spaces"),
            ("a\nb", "control"),
            ("cn_123", "reserved"),
            (&"x".repeat(65) as &str, "65 characters"),
        ] {
            let err = validate_connector_name("name", bad).unwrap_err();
            assert!(err.to_string().contains(why), "{bad:?}: {err}");
        }
    }

    #[test]
    fn unknown_config_key_lists_known_ones() {
        let mut config = BTreeMap::new();
        config.insert("colour".to_string(), "x".to_string());
        let err = validate_config("config", &config, &["header_name"]).unwrap_err();
        assert_eq!(err.field, "config.colour");
        assert!(err.problem.contains("header_name"));
    }

    #[test]
    fn secret_errors_never_show_the_value() {
        let err = validate_secret("secrets", "api_key", "canary\nvalue", &["api_key"]).unwrap_err();
        assert!(!err.to_string().contains("canary"));
        let err = validate_secret("secrets", "pasword", "canary", &["password"]).unwrap_err();
        assert_eq!(err.field, "secrets.pasword");
        assert!(!err.to_string().contains("canary"));
    }
}
