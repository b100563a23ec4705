//! TLS on both sides of the pooler, built from the `client_tls_*` and `server_tls_*` settings.
//!
//! Clients are served with the `openssl` crate ([`acceptor`]): native-tls cannot ask a client
//! for a certificate, so it could not do `client_tls_sslmode = verify-ca/verify-full`,
//! `auth_type = cert` or hba `cert` lines, and it cannot take a cipher list. Servers are reached
//! with native-tls ([`connector`]), which covers everything `server_tls_*` needs except cipher
//! lists (reported at start-up). Both are built when the configuration is loaded, so a missing
//! key or a bad CA file rejects the configuration (or the reload) as a whole.

pub mod acceptor;
pub mod connector;

use std::fmt;
use std::path::PathBuf;

pub use acceptor::{ClientTls, ClientTlsInfo};
pub use connector::{negotiate_server_tls, ServerTls};

/// libpq's and PgBouncer's `sslmode` values, weakest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum SslMode {
    #[default]
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(value: &str) -> Option<SslMode> {
        Some(match value.to_ascii_lowercase().as_str() {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether plaintext is refused.
    pub fn requires_tls(self) -> bool {
        self >= SslMode::Require
    }

    /// Whether the peer's certificate is checked against the CA file.
    pub fn verifies_peer(self) -> bool {
        self >= SslMode::VerifyCa
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One side's TLS settings as written (paths already resolved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub sslmode: SslMode,
    pub key_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    /// PgBouncer's `*_tls_protocols`: `secure` (TLS 1.2 and 1.3), `all`, `legacy`, or a list of
    /// `tlsv1.0` ... `tlsv1.3`.
    pub protocols: String,
    /// PgBouncer's `*_tls_ciphers` (TLS 1.2 and below): `default`, `secure`, `fast`, `normal`,
    /// `all`, or an OpenSSL cipher list.
    pub ciphers: String,
    /// `*_tls13_ciphers`: an OpenSSL TLS 1.3 ciphersuite list; empty for OpenSSL's own.
    pub tls13_ciphers: String,
}

impl TlsSettings {
    pub fn new(sslmode: SslMode) -> TlsSettings {
        TlsSettings {
            sslmode,
            key_file: None,
            cert_file: None,
            ca_file: None,
            protocols: "secure".into(),
            ciphers: "default".into(),
            tls13_ciphers: String::new(),
        }
    }
}

/// Why TLS could not be set up from the settings.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key}: {message}")]
    Setting { key: String, message: String },
    #[error("{key} {path}: {message}")]
    File { key: String, path: String, message: String },
}

impl TlsError {
    fn setting(key: &str, message: impl Into<String>) -> TlsError {
        TlsError::Setting { key: key.into(), message: message.into() }
    }

    fn file(key: &str, path: &std::path::Path, message: impl fmt::Display) -> TlsError {
        TlsError::File { key: key.into(), path: path.display().to_string(), message: message.to_string() }
    }
}

/// A TLS protocol version, as both TLS libraries name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    Tls10,
    Tls11,
    Tls12,
    Tls13,
}

/// The lowest and highest versions `protocols` allows. Both libraries take a range, so a list
/// with a hole (`tlsv1.0,tlsv1.2`) is refused rather than silently widened.
pub fn protocol_range(key: &str, protocols: &str) -> Result<(TlsVersion, TlsVersion), TlsError> {
    let mut enabled = Vec::new();
    for word in protocols.split([',', ' ', ':']).map(str::trim).filter(|w| !w.is_empty()) {
        match word.to_ascii_lowercase().as_str() {
            "secure" => enabled.extend([TlsVersion::Tls12, TlsVersion::Tls13]),
            "all" | "legacy" => {
                enabled.extend([TlsVersion::Tls10, TlsVersion::Tls11, TlsVersion::Tls12, TlsVersion::Tls13])
            }
            "tlsv1" | "tlsv1.0" => enabled.push(TlsVersion::Tls10),
            "tlsv1.1" => enabled.push(TlsVersion::Tls11),
            "tlsv1.2" => enabled.push(TlsVersion::Tls12),
            "tlsv1.3" => enabled.push(TlsVersion::Tls13),
            other => {
                return Err(TlsError::setting(
                    key,
                    format!(
                        "unknown protocol {other:?}; expected secure, all, legacy or tlsv1.0, tlsv1.1, tlsv1.2, tlsv1.3"
                    ),
                ))
            }
        }
    }
    enabled.sort();
    enabled.dedup();
    let (Some(&low), Some(&high)) = (enabled.first(), enabled.last()) else {
        return Err(TlsError::setting(key, "no protocol enabled"));
    };
    if enabled.len() != high as usize - low as usize + 1 {
        return Err(TlsError::setting(
            key,
            format!("{protocols:?} leaves a gap between {low:?} and {high:?}; list a contiguous range"),
        ));
    }
    Ok((low, high))
}

/// The TLS contexts of one configuration: how clients are served and how servers are reached.
#[derive(Clone)]
pub struct TlsContexts {
    pub client: Option<std::sync::Arc<ClientTls>>,
    pub server: std::sync::Arc<ServerTls>,
}

impl TlsContexts {
    pub fn build(client: &TlsSettings, server: &TlsSettings) -> Result<TlsContexts, TlsError> {
        Ok(TlsContexts {
            client: ClientTls::build(client)?.map(std::sync::Arc::new),
            server: std::sync::Arc::new(ServerTls::build(server)?),
        })
    }

    /// Settings this build could not honour, for the start-up log.
    pub fn limitations(server: &TlsSettings) -> Vec<String> {
        connector::limitations(server)
    }
}

impl fmt::Debug for TlsContexts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsContexts")
            .field("client", &self.client.as_ref().map(|c| c.sslmode()))
            .field("server", &self.server.sslmode())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmodes_parse_and_order() {
        assert_eq!(SslMode::parse("VERIFY-FULL"), Some(SslMode::VerifyFull));
        assert_eq!(SslMode::parse("nope"), None);
        assert!(SslMode::Require.requires_tls() && !SslMode::Prefer.requires_tls());
        assert!(SslMode::VerifyCa.verifies_peer() && !SslMode::Require.verifies_peer());
    }

    #[test]
    fn protocol_lists_become_ranges() {
        use TlsVersion::*;
        assert_eq!(protocol_range("k", "secure").unwrap(), (Tls12, Tls13));
        assert_eq!(protocol_range("k", "all").unwrap(), (Tls10, Tls13));
        assert_eq!(protocol_range("k", "tlsv1.3").unwrap(), (Tls13, Tls13));
        assert_eq!(protocol_range("k", "tlsv1.1, tlsv1.2").unwrap(), (Tls11, Tls12));
        assert!(protocol_range("k", "tlsv1.0,tlsv1.2").unwrap_err().to_string().contains("gap"));
        assert!(protocol_range("k", "sslv3").unwrap_err().to_string().contains("unknown protocol"));
        assert!(protocol_range("k", "").is_err());
    }
}
