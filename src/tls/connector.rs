//! Reaching PostgreSQL over TLS: the native-tls connector built from `server_tls_*` and the
//! SSLRequest negotiation on a fresh server connection.
//!
//! `server_tls_sslmode` as in PgBouncer: `disable` never asks; `allow` and `prefer` ask and
//! fall back to plaintext when the server says no, without checking its certificate;
//! `require` insists on TLS; `verify-ca` also checks the certificate chain against
//! `server_tls_ca_file` (the system's roots without one); `verify-full` also checks that the
//! certificate names the host pgcorral connected to. Unix-socket servers never use TLS.

use std::fmt;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{protocol_range, SslMode, TlsError, TlsSettings, TlsVersion};
use crate::net::Socket;

/// The SSLRequest code (1234 << 16 | 5679) after its length.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// How servers are reached.
pub struct ServerTls {
    sslmode: SslMode,
    connector: Option<tokio_native_tls::TlsConnector>,
}

impl ServerTls {
    pub fn build(settings: &TlsSettings) -> Result<ServerTls, TlsError> {
        if settings.sslmode == SslMode::Disable {
            return Ok(ServerTls { sslmode: SslMode::Disable, connector: None });
        }
        let mut builder = native_tls::TlsConnector::builder();
        let (low, high) = protocol_range("server_tls_protocols", &settings.protocols)?;
        builder.min_protocol_version(Some(native_version(low)));
        builder.max_protocol_version(Some(native_version(high)));
        if !settings.sslmode.verifies_peer() {
            builder.danger_accept_invalid_certs(true);
        }
        if settings.sslmode != SslMode::VerifyFull {
            builder.danger_accept_invalid_hostnames(true);
        }
        if let Some(ca) = &settings.ca_file {
            let pem = std::fs::read(ca).map_err(|e| TlsError::file("server_tls_ca_file", ca, e))?;
            let certs = native_tls::Certificate::stack_from_pem(&pem)
                .map_err(|e| TlsError::file("server_tls_ca_file", ca, e))?;
            if certs.is_empty() {
                return Err(TlsError::file("server_tls_ca_file", ca, "holds no PEM certificate"));
            }
            builder.disable_built_in_roots(true);
            for cert in certs {
                builder.add_root_certificate(cert);
            }
        }
        match (&settings.key_file, &settings.cert_file) {
            (Some(key), Some(cert)) => {
                builder.identity(client_identity(key, cert)?);
            }
            (None, None) => {}
            _ => {
                return Err(TlsError::setting(
                    "server_tls_key_file",
                    "server_tls_key_file and server_tls_cert_file go together",
                ))
            }
        }
        let connector = builder.build().map_err(|e| TlsError::setting("server_tls", e.to_string()))?;
        Ok(ServerTls { sslmode: settings.sslmode, connector: Some(connector.into()) })
    }

    pub fn sslmode(&self) -> SslMode {
        self.sslmode
    }
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls").field("sslmode", &self.sslmode).finish_non_exhaustive()
    }
}

/// native-tls takes a certificate and a PKCS#8 key; operators often have traditional
/// (`BEGIN RSA PRIVATE KEY`) keys, which OpenSSL converts.
fn client_identity(key: &std::path::Path, cert: &std::path::Path) -> Result<native_tls::Identity, TlsError> {
    let key_pem = std::fs::read(key).map_err(|e| TlsError::file("server_tls_key_file", key, e))?;
    let cert_pem = std::fs::read(cert).map_err(|e| TlsError::file("server_tls_cert_file", cert, e))?;
    let pkcs8 = openssl::pkey::PKey::private_key_from_pem(&key_pem)
        .and_then(|pkey| pkey.private_key_to_pem_pkcs8())
        .map_err(|e| TlsError::file("server_tls_key_file", key, e))?;
    native_tls::Identity::from_pkcs8(&cert_pem, &pkcs8)
        .map_err(|e| TlsError::file("server_tls_cert_file", cert, e))
}

fn native_version(version: TlsVersion) -> native_tls::Protocol {
    match version {
        TlsVersion::Tls10 => native_tls::Protocol::Tlsv10,
        TlsVersion::Tls11 => native_tls::Protocol::Tlsv11,
        TlsVersion::Tls12 => native_tls::Protocol::Tlsv12,
        TlsVersion::Tls13 => native_tls::Protocol::Tlsv13,
    }
}

/// `server_tls_*` settings native-tls cannot honour, to be logged at start-up.
pub fn limitations(settings: &TlsSettings) -> Vec<String> {
    let mut out = Vec::new();
    if settings.sslmode != SslMode::Disable {
        if !matches!(settings.ciphers.to_ascii_lowercase().as_str(), "" | "default") {
            out.push(format!(
                "server_tls_ciphers = {} is not applied: native-tls cannot choose ciphers; OpenSSL's defaults are used",
                settings.ciphers
            ));
        }
        if !settings.tls13_ciphers.is_empty() {
            out.push("server_tls13_ciphers is not applied: native-tls cannot choose ciphers".into());
        }
    }
    out
}

/// Asks a fresh server connection for TLS as `server_tls_sslmode` says, and returns the
/// socket to log in over. `host` is the name verify-full checks the certificate against.
pub async fn negotiate_server_tls(mut socket: Socket, tls: &ServerTls, host: &str) -> Result<Socket, String> {
    let Some(connector) = &tls.connector else { return Ok(socket) };
    if socket.is_unix() {
        return Ok(socket);
    }
    socket.write_all(&SSL_REQUEST).await.map_err(|e| e.to_string())?;
    let mut answer = [0u8; 1];
    socket.read_exact(&mut answer).await.map_err(|e| e.to_string())?;
    match answer[0] {
        b'S' => {
            let stream =
                connector.connect(host, socket).await.map_err(|e| format!("TLS handshake failed: {e}"))?;
            Ok(Socket::ServerTls(Box::new(stream)))
        }
        b'N' if tls.sslmode.requires_tls() => {
            Err(format!("server does not support TLS, and server_tls_sslmode is {}", tls.sslmode))
        }
        b'N' => Ok(socket),
        // An ErrorResponse here is a pre-7.4 server or something that is not PostgreSQL.
        other => Err(format!("unexpected answer {:?} to SSLRequest", other as char)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disable_builds_no_connector_and_half_an_identity_is_refused() {
        assert!(ServerTls::build(&TlsSettings::new(SslMode::Disable)).unwrap().connector.is_none());
        let mut settings = TlsSettings::new(SslMode::Prefer);
        assert!(ServerTls::build(&settings).unwrap().connector.is_some());
        settings.key_file = Some("/nonexistent.key".into());
        assert!(ServerTls::build(&settings).unwrap_err().to_string().contains("go together"));
    }

    #[test]
    fn cipher_settings_native_tls_cannot_apply_are_reported() {
        let mut settings = TlsSettings::new(SslMode::Prefer);
        assert!(limitations(&settings).is_empty());
        settings.ciphers = "HIGH".into();
        assert!(limitations(&settings)[0].contains("server_tls_ciphers"));
    }
}
