//! Serving TLS to clients: the OpenSSL context built from `client_tls_*`, the handshake, and
//! what a finished handshake tells the login (the client certificate's common name, the
//! `tls-server-end-point` channel-binding data for SCRAM-SHA-256-PLUS).

use std::fmt;
use std::pin::Pin;

use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::ssl::{AlpnError, Ssl, SslAcceptor, SslFiletype, SslMethod, SslVerifyMode, SslVersion};
use openssl::x509::X509;
use tokio_openssl::SslStream;

use super::{protocol_range, SslMode, TlsError, TlsSettings, TlsVersion};
use crate::net::Socket;

/// ALPN protocol of PostgreSQL 17's direct TLS, in the wire format OpenSSL matches against.
const ALPN_POSTGRESQL: &[u8] = b"\x0apostgresql";

/// How clients are served TLS; exists when `client_tls_sslmode` is not `disable`.
pub struct ClientTls {
    acceptor: SslAcceptor,
    sslmode: SslMode,
    /// RFC 5929 `tls-server-end-point`: the hash of our certificate that SCRAM-SHA-256-PLUS
    /// binds to.
    end_point: Vec<u8>,
}

/// What the login learns from a finished handshake.
#[derive(Debug, Clone, Default)]
pub struct ClientTlsInfo {
    /// The verified client certificate's subject common name, if one was presented.
    pub peer_common_name: Option<String>,
    /// `tls-server-end-point` channel-binding data.
    pub end_point: Vec<u8>,
    /// e.g. `TLSv1.3/TLS_AES_256_GCM_SHA384`, for logs and `SHOW CLIENTS`.
    pub description: String,
    /// The client asked for ALPN `postgresql` (required for direct TLS).
    pub alpn_postgresql: bool,
}

impl ClientTls {
    pub fn build(settings: &TlsSettings) -> Result<Option<ClientTls>, TlsError> {
        if settings.sslmode == SslMode::Disable {
            return Ok(None);
        }
        let (Some(key), Some(cert)) = (&settings.key_file, &settings.cert_file) else {
            return Err(TlsError::setting(
                "client_tls_sslmode",
                format!("{} needs client_tls_key_file and client_tls_cert_file", settings.sslmode),
            ));
        };
        let mut builder = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())
            .map_err(|e| TlsError::setting("client_tls", e.to_string()))?;
        // OpenSSL reads both PKCS#8 (`BEGIN PRIVATE KEY`) and traditional (`BEGIN RSA PRIVATE
        // KEY`, `BEGIN EC PRIVATE KEY`) PEM keys here.
        builder
            .set_private_key_file(key, SslFiletype::PEM)
            .map_err(openssl_error("client_tls_key_file", key))?;
        builder.set_certificate_chain_file(cert).map_err(openssl_error("client_tls_cert_file", cert))?;
        builder
            .check_private_key()
            .map_err(|_| TlsError::file("client_tls_key_file", key, "does not match client_tls_cert_file"))?;
        let (low, high) = protocol_range("client_tls_protocols", &settings.protocols)?;
        builder.set_min_proto_version(Some(openssl_version(low))).ok();
        builder.set_max_proto_version(Some(openssl_version(high))).ok();
        if let Some(list) = cipher_list(&settings.ciphers) {
            builder
                .set_cipher_list(&list)
                .map_err(|e| TlsError::setting("client_tls_ciphers", format!("{list:?}: {e}")))?;
        }
        if !settings.tls13_ciphers.is_empty() {
            builder.set_ciphersuites(&settings.tls13_ciphers).map_err(|e| {
                TlsError::setting("client_tls13_ciphers", format!("{:?}: {e}", settings.tls13_ciphers))
            })?;
        }
        match &settings.ca_file {
            Some(ca) => {
                builder.set_ca_file(ca).map_err(openssl_error("client_tls_ca_file", ca))?;
                // With a CA file a certificate is asked for (cert and hba `cert` logins need it);
                // the verify modes make it mandatory.
                let mut mode = SslVerifyMode::PEER;
                if settings.sslmode.verifies_peer() {
                    mode |= SslVerifyMode::FAIL_IF_NO_PEER_CERT;
                }
                builder.set_verify(mode);
            }
            None if settings.sslmode.verifies_peer() => {
                return Err(TlsError::setting(
                    "client_tls_sslmode",
                    format!("{} needs client_tls_ca_file to check client certificates", settings.sslmode),
                ))
            }
            None => builder.set_verify(SslVerifyMode::NONE),
        }
        // PostgreSQL 17 clients using direct TLS must offer ALPN "postgresql"; one that offers
        // something else is refused, as PostgreSQL does. Clients offering none still connect.
        builder.set_alpn_select_callback(|_, offered| {
            openssl::ssl::select_next_proto(ALPN_POSTGRESQL, offered).ok_or(AlpnError::ALERT_FATAL)
        });
        let pem = std::fs::read(cert).map_err(|e| TlsError::file("client_tls_cert_file", cert, e))?;
        let leaf = X509::from_pem(&pem).map_err(|e| TlsError::file("client_tls_cert_file", cert, e))?;
        let end_point = end_point_hash(&leaf).map_err(|e| TlsError::file("client_tls_cert_file", cert, e))?;
        Ok(Some(ClientTls { acceptor: builder.build(), sslmode: settings.sslmode, end_point }))
    }

    pub fn sslmode(&self) -> SslMode {
        self.sslmode
    }

    /// Runs the server side of the handshake on a client socket.
    pub async fn accept(&self, socket: Socket) -> Result<(Socket, ClientTlsInfo), String> {
        let ssl = Ssl::new(self.acceptor.context()).map_err(|e| e.to_string())?;
        let mut stream = SslStream::new(ssl, socket).map_err(|e| e.to_string())?;
        Pin::new(&mut stream).accept().await.map_err(|e| e.to_string())?;
        let ssl = stream.ssl();
        let peer_common_name = ssl.peer_certificate().and_then(|cert| {
            let entry = cert.subject_name().entries_by_nid(Nid::COMMONNAME).next()?;
            String::from_utf8(entry.data().as_slice().to_vec()).ok()
        });
        let alpn_postgresql = ssl.selected_alpn_protocol() == Some(&ALPN_POSTGRESQL[1..]);
        let socket = Socket::ClientTls(Box::new(stream));
        let description = socket.tls_description();
        let info = ClientTlsInfo {
            peer_common_name,
            end_point: self.end_point.clone(),
            description,
            alpn_postgresql,
        };
        Ok((socket, info))
    }
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls").field("sslmode", &self.sslmode).finish_non_exhaustive()
    }
}

fn openssl_error<'a>(
    key: &'a str,
    path: &'a std::path::Path,
) -> impl Fn(openssl::error::ErrorStack) -> TlsError + 'a {
    move |e| TlsError::file(key, path, e)
}

fn openssl_version(version: TlsVersion) -> SslVersion {
    match version {
        TlsVersion::Tls10 => SslVersion::TLS1,
        TlsVersion::Tls11 => SslVersion::TLS1_1,
        TlsVersion::Tls12 => SslVersion::TLS1_2,
        TlsVersion::Tls13 => SslVersion::TLS1_3,
    }
}

/// PgBouncer's cipher keywords as OpenSSL lists; anything else is an OpenSSL list already.
/// `None` keeps the built-in list (Mozilla's intermediate profile).
fn cipher_list(ciphers: &str) -> Option<String> {
    match ciphers.trim().to_ascii_lowercase().as_str() {
        "" | "default" => None,
        "secure" => Some("ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL".into()),
        "fast" | "normal" => Some("HIGH:!aNULL:!MD5:!3DES".into()),
        "all" => Some("ALL:!aNULL".into()),
        _ => Some(ciphers.trim().to_string()),
    }
}

/// RFC 5929 section 4.1: the certificate hashed with its signature's digest, SHA-256 when
/// that digest is MD5 or SHA-1.
pub fn end_point_hash(cert: &X509) -> Result<Vec<u8>, openssl::error::ErrorStack> {
    let digest = cert
        .signature_algorithm()
        .object()
        .nid()
        .signature_algorithms()
        .and_then(|algorithms| MessageDigest::from_nid(algorithms.digest))
        .filter(|digest| digest.type_() != Nid::MD5 && digest.type_() != Nid::SHA1)
        .unwrap_or_else(MessageDigest::sha256);
    Ok(cert.digest(digest)?.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cipher_keywords_map_to_openssl_lists() {
        assert_eq!(cipher_list("default"), None);
        assert_eq!(cipher_list("ALL").as_deref(), Some("ALL:!aNULL"));
        assert_eq!(
            cipher_list("ECDHE-RSA-AES128-GCM-SHA256").as_deref(),
            Some("ECDHE-RSA-AES128-GCM-SHA256")
        );
    }

    #[test]
    fn modes_that_verify_need_a_ca_and_every_mode_needs_a_key() {
        let mut settings = TlsSettings::new(SslMode::Require);
        assert!(ClientTls::build(&settings).unwrap_err().to_string().contains("client_tls_key_file"));
        settings.sslmode = SslMode::Disable;
        assert!(ClientTls::build(&settings).unwrap().is_none());
    }
}
