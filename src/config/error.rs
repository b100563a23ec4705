//! The single error type of configuration loading.
//!
//! Every variant that comes from a file carries the file and 1-based line so
//! an operator can jump straight to the offending line; values that come from
//! the environment use the pseudo file `environment:PGCORRAL_<KEY>` and line 0,
//! which `Display` leaves out because there is no line to point at.

use std::fmt;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file (main config, `%include`, `auth_file`) could not be read.
    #[error("could not read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A well-formed line whose key or value is not acceptable.
    #[error("{}: {key}: {message}", Location(.file, *.line))]
    Invalid { file: String, line: usize, key: String, message: String },
    /// A line that cannot be understood at all (bad section header, missing
    /// `=`, include cycle, broken userlist line, ...).
    #[error("{}: {message}", Location(.file, *.line))]
    Syntax { file: String, line: usize, message: String },
    /// The TLS settings name a missing or unusable key, certificate or CA file, or a
    /// combination that cannot work.
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// `auth_hba_file` or `auth_ident_file` cannot be read or has a bad line.
    #[error("{0}")]
    Hba(#[from] crate::auth::hba::HbaError),
}

/// Formats `file:line`, or just `file` when `line` is 0 (environment values).
pub(crate) struct Location<'a>(pub &'a str, pub usize);

impl fmt::Display for Location<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.1 == 0 {
            f.write_str(self.0)
        } else {
            write!(f, "{}:{}", self.0, self.1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_with_and_without_line() {
        let e = ConfigError::Invalid {
            file: "pgbouncer.ini".into(),
            line: 12,
            key: "default_pool_size".into(),
            message: "expected a non-negative integer, got \"twenty\"".into(),
        };
        assert_eq!(
            e.to_string(),
            "pgbouncer.ini:12: default_pool_size: expected a non-negative integer, got \"twenty\""
        );
        let e = ConfigError::Invalid {
            file: "environment:PGCORRAL_LISTEN_PORT".into(),
            line: 0,
            key: "listen_port".into(),
            message: "bad".into(),
        };
        assert_eq!(e.to_string(), "environment:PGCORRAL_LISTEN_PORT: listen_port: bad");
        let e = ConfigError::Syntax { file: "a.ini".into(), line: 3, message: "missing '='".into() };
        assert_eq!(e.to_string(), "a.ini:3: missing '='");
    }
}
