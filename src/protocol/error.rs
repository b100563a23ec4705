//! Errors as clients see them, and malformed-input errors found while framing.
//!
//! Every error that reaches a client is a [`PgError`]: a severity, a SQLSTATE and a message an
//! operator understands, encoded as a PostgreSQL ErrorResponse. Codes follow PostgreSQL's and
//! PgBouncer's choices so that client libraries classify them the same way.

use bytes::{BufMut, BytesMut};

/// SQLSTATE codes pgcorral sends itself.
pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const INVALID_PARAMETER_VALUE: &str = "22023";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    pub const ACTIVE_SQL_TRANSACTION: &str = "25001";
}

/// An error to be sent to a client as an ErrorResponse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{severity} {code} {message}")]
pub struct PgError {
    /// `FATAL` closes the client afterwards, `ERROR` keeps it.
    pub severity: String,
    pub code: String,
    pub message: String,
}

impl PgError {
    pub fn fatal(code: &str, message: impl Into<String>) -> PgError {
        PgError { severity: "FATAL".into(), code: code.into(), message: message.into() }
    }

    pub fn error(code: &str, message: impl Into<String>) -> PgError {
        PgError { severity: "ERROR".into(), code: code.into(), message: message.into() }
    }

    pub fn is_fatal(&self) -> bool {
        self.severity == "FATAL" || self.severity == "PANIC"
    }

    /// Appends the ErrorResponse (`E`) message to `buf`.
    pub fn encode(&self, buf: &mut BytesMut) {
        encode_fields(buf, b'E', &self.severity, &self.code, &self.message);
    }

    /// Appends the same fields as a NoticeResponse (`N`).
    pub fn encode_notice(&self, buf: &mut BytesMut) {
        encode_fields(buf, b'N', &self.severity, &self.code, &self.message);
    }

    /// Reads an ErrorResponse/NoticeResponse body (fields after the tag and length).
    pub fn parse_fields(body: &[u8]) -> PgError {
        let mut err = PgError::error("XX000", "");
        let mut rest = body;
        while let Some((&field, tail)) = rest.split_first() {
            if field == 0 {
                break;
            }
            let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
            let value = String::from_utf8_lossy(&tail[..end]).into_owned();
            match field {
                b'V' => err.severity = value,
                b'S' if err.severity == "ERROR" => err.severity = value,
                b'C' => err.code = value,
                b'M' => err.message = value,
                _ => {}
            }
            rest = tail.get(end + 1..).unwrap_or(&[]);
        }
        err
    }
}

fn encode_fields(buf: &mut BytesMut, tag: u8, severity: &str, code: &str, message: &str) {
    let len = 4 + 4 * 2 + severity.len() * 2 + code.len() + message.len() + 1;
    buf.reserve(1 + len);
    buf.put_u8(tag);
    buf.put_i32(len as i32);
    for (field, value) in [(b'S', severity), (b'V', severity), (b'C', code), (b'M', message)] {
        buf.put_u8(field);
        buf.put_slice(value.as_bytes());
        buf.put_u8(0);
    }
    buf.put_u8(0);
}

/// Malformed input found while reading what a peer sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("message of {size} bytes exceeds max_packet_size ({limit})")]
    TooLarge { size: usize, limit: usize },
    #[error("invalid message length {0}")]
    BadLength(i64),
    #[error("malformed {what} message")]
    Malformed { what: &'static str },
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.2")]
    UnsupportedVersion { major: u16, minor: u16 },
    #[error("this client's prepared statements exceed pgcorral's limit of {limit} bytes of statement text")]
    TooManyStatements { limit: usize },
}

impl ProtocolError {
    pub fn to_pg(&self) -> PgError {
        let code = match self {
            ProtocolError::TooLarge { .. } | ProtocolError::TooManyStatements { .. } => {
                sqlstate::PROGRAM_LIMIT_EXCEEDED
            }
            ProtocolError::UnsupportedVersion { .. } => sqlstate::FEATURE_NOT_SUPPORTED,
            _ => sqlstate::PROTOCOL_VIOLATION,
        };
        PgError::fatal(code, self.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_response_round_trips() {
        let err = PgError::fatal("28P01", "password authentication failed for user \"x\"");
        let mut buf = BytesMut::new();
        err.encode(&mut buf);
        assert_eq!(buf[0], b'E');
        let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        assert_eq!(len + 1, buf.len());
        assert_eq!(PgError::parse_fields(&buf[5..]), err);
    }
}
