//! Messages pgcorral writes to clients as if it were PostgreSQL.
//!
//! Only the login phase and pgcorral's own interventions need these; query results are
//! forwarded from servers untouched.

use bytes::{BufMut, BytesMut};

fn begin(buf: &mut BytesMut, tag: u8) -> usize {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_i32(0);
    at
}

fn finish(buf: &mut BytesMut, at: usize) {
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn auth(buf: &mut BytesMut, code: i32, data: &[u8]) {
    let at = begin(buf, b'R');
    buf.put_i32(code);
    buf.put_slice(data);
    finish(buf, at);
}

pub fn authentication_ok(buf: &mut BytesMut) {
    auth(buf, 0, &[]);
}

pub fn authentication_cleartext(buf: &mut BytesMut) {
    auth(buf, 3, &[]);
}

pub fn authentication_md5(buf: &mut BytesMut, salt: [u8; 4]) {
    auth(buf, 5, &salt);
}

/// AuthenticationSASL listing the mechanisms offered.
pub fn authentication_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    let at = begin(buf, b'R');
    buf.put_i32(10);
    for m in mechanisms {
        buf.put_slice(m.as_bytes());
        buf.put_u8(0);
    }
    buf.put_u8(0);
    finish(buf, at);
}

pub fn authentication_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    auth(buf, 11, data);
}

pub fn authentication_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    auth(buf, 12, data);
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    let at = begin(buf, b'S');
    buf.put_slice(name.as_bytes());
    buf.put_u8(0);
    buf.put_slice(value.as_bytes());
    buf.put_u8(0);
    finish(buf, at);
}

/// BackendKeyData: a key of 4 bytes for protocol 3.0 clients, longer for 3.2 ones.
pub fn backend_key_data(buf: &mut BytesMut, process_id: i32, secret_key: &[u8]) {
    let at = begin(buf, b'K');
    buf.put_i32(process_id);
    buf.put_slice(secret_key);
    finish(buf, at);
}

/// NegotiateProtocolVersion: the version pgcorral will speak with the client and the protocol
/// options it does not know.
pub fn negotiate_protocol_version(buf: &mut BytesMut, negotiation: &super::startup::Negotiation) {
    let at = begin(buf, b'v');
    buf.put_i32(negotiation.version());
    buf.put_i32(negotiation.unknown_options.len() as i32);
    for option in &negotiation.unknown_options {
        buf.put_slice(option.as_bytes());
        buf.put_u8(0);
    }
    finish(buf, at);
}

pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    let at = begin(buf, b'Z');
    buf.put_u8(status);
    finish(buf, at);
}

/// Reads a ParameterStatus body into (name, value).
pub fn parse_parameter_status(body: &[u8]) -> Option<(String, String)> {
    let mut parts = body.split(|&b| b == 0);
    let name = std::str::from_utf8(parts.next()?).ok()?;
    let value = std::str::from_utf8(parts.next()?).ok()?;
    Some((name.to_string(), value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::message::backend::Message;

    #[test]
    fn written_messages_parse_as_postgres_protocol_reads_them() {
        let mut buf = BytesMut::new();
        authentication_md5(&mut buf, [1, 2, 3, 4]);
        parameter_status(&mut buf, "TimeZone", "UTC");
        backend_key_data(&mut buf, 42, &7i32.to_be_bytes());
        ready_for_query(&mut buf, b'I');
        match Message::parse(&mut buf).unwrap().unwrap() {
            Message::AuthenticationMd5Password(b) => assert_eq!(b.salt(), [1, 2, 3, 4]),
            _ => panic!("expected md5 request"),
        }
        match Message::parse(&mut buf).unwrap().unwrap() {
            Message::ParameterStatus(b) => {
                assert_eq!(b.name().unwrap(), "TimeZone");
                assert_eq!(b.value().unwrap(), "UTC");
            }
            _ => panic!("expected ParameterStatus"),
        }
        match Message::parse(&mut buf).unwrap().unwrap() {
            Message::BackendKeyData(b) => assert_eq!((b.process_id(), b.secret_key()), (42, 7)),
            _ => panic!("expected BackendKeyData"),
        }
        match Message::parse(&mut buf).unwrap().unwrap() {
            Message::ReadyForQuery(b) => assert_eq!(b.status(), b'I'),
            _ => panic!("expected ReadyForQuery"),
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn parameter_status_body() {
        assert_eq!(
            parse_parameter_status(b"DateStyle\0ISO, MDY\0"),
            Some(("DateStyle".into(), "ISO, MDY".into()))
        );
        assert_eq!(parse_parameter_status(b"x"), None);
    }
}
