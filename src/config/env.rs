//! Environment overrides for `[pgbouncer]` settings, for containers where
//! editing the mounted config file is awkward: `PGCORRAL_LISTEN_PORT=7432`
//! overrides `listen_port`.
//!
//! This is the only place that uses the `config` crate: its `Environment`
//! source already knows how to pick prefixed variables and turn
//! `PGCORRAL_LISTEN_PORT` into the key `listen_port`. The values are then
//! validated by exactly the same code as file values; errors point at the
//! pseudo location `environment:PGCORRAL_<KEY>`.

use config::{Environment, Map, Source};

use super::error::ConfigError;

/// Prefix of the override variables (followed by `_`).
pub(crate) const PREFIX: &str = "PGCORRAL";

/// One override taken from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Override {
    /// Lowercase `[pgbouncer]` key, e.g. `listen_port`.
    pub key: String,
    pub value: String,
    /// Variable it came from, e.g. `PGCORRAL_LISTEN_PORT`.
    pub var: String,
}

impl Override {
    /// The `file` part of error and warning locations.
    pub fn location(&self) -> String {
        format!("environment:{}", self.var)
    }
}

/// Overrides from the process environment.
pub(crate) fn from_process() -> Result<Vec<Override>, ConfigError> {
    collect(None)
}

/// Overrides from `vars` instead of the process environment (tests use this
/// to stay independent of each other's `set_var`).
pub(crate) fn collect(vars: Option<Map<String, String>>) -> Result<Vec<Override>, ConfigError> {
    let source = Environment::with_prefix(PREFIX).source(vars);
    let values = source.collect().map_err(env_error)?;
    let mut overrides = Vec::with_capacity(values.len());
    for (key, value) in values {
        if key.is_empty() {
            continue;
        }
        let var = format!("{PREFIX}_{}", key.to_ascii_uppercase());
        let value = value.into_string().map_err(env_error)?;
        overrides.push(Override { key, value: value.trim().to_string(), var });
    }
    // The environment has no order; sort so errors and warnings are stable.
    overrides.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(overrides)
}

fn env_error(err: config::ConfigError) -> ConfigError {
    ConfigError::Syntax { file: "environment".to_string(), line: 0, message: err.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_prefixed_variables_only() {
        let mut vars = Map::new();
        vars.insert("PGCORRAL_LISTEN_PORT".to_string(), " 7432 ".to_string());
        vars.insert("PGCORRAL_ADMIN_USERS".to_string(), "a,b".to_string());
        vars.insert("PGBOUNCER_LISTEN_PORT".to_string(), "1".to_string());
        vars.insert("HOME".to_string(), "/root".to_string());
        let overrides = collect(Some(vars)).unwrap();
        assert_eq!(
            overrides,
            [
                Override {
                    key: "admin_users".into(),
                    value: "a,b".into(),
                    var: "PGCORRAL_ADMIN_USERS".into()
                },
                Override {
                    key: "listen_port".into(),
                    value: "7432".into(),
                    var: "PGCORRAL_LISTEN_PORT".into()
                },
            ]
        );
        assert_eq!(overrides[1].location(), "environment:PGCORRAL_LISTEN_PORT");
    }
}
