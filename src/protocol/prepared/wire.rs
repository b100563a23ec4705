//! Reading and writing the few fields of Parse, Bind, Describe and Close the rewriter needs.

use bytes::{BufMut, BytesMut};

use crate::protocol::ProtocolError;

pub(super) fn malformed(what: &'static str) -> ProtocolError {
    ProtocolError::Malformed { what }
}

pub(super) fn cstr<'a>(body: &'a [u8], what: &'static str) -> Result<(&'a str, &'a [u8]), ProtocolError> {
    let nul = body.iter().position(|&b| b == 0).ok_or_else(|| malformed(what))?;
    let text = std::str::from_utf8(&body[..nul]).map_err(|_| malformed(what))?;
    Ok((text, &body[nul + 1..]))
}

pub(super) fn read_parse(body: &[u8]) -> Result<(String, String, Vec<u8>), ProtocolError> {
    let (name, rest) = cstr(body, "Parse")?;
    let (query, rest) = cstr(rest, "Parse")?;
    if rest.len() < 2 {
        return Err(malformed("Parse"));
    }
    let count = i16::from_be_bytes([rest[0], rest[1]]);
    let types = &rest[2..];
    if count < 0 || types.len() != count as usize * 4 {
        return Err(malformed("Parse"));
    }
    Ok((name.to_string(), query.to_string(), types.to_vec()))
}

pub(super) fn read_bind(body: &[u8]) -> Result<(&str, &str, &[u8]), ProtocolError> {
    let (portal, rest) = cstr(body, "Bind")?;
    let (statement, rest) = cstr(rest, "Bind")?;
    Ok((portal, statement, rest))
}

pub(super) fn read_target(body: &[u8]) -> Result<(u8, &str), ProtocolError> {
    let (&kind, rest) = body.split_first().ok_or_else(|| malformed("Describe/Close"))?;
    let (name, _) = cstr(rest, "Describe/Close")?;
    Ok((kind, name))
}

pub(super) fn put_cstr(out: &mut BytesMut, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.put_u8(0);
}

pub(super) fn write_parse(out: &mut BytesMut, name: &str, query: &str, types: &[u8]) {
    let len = 4 + name.len() + 1 + query.len() + 1 + 2 + types.len();
    out.put_u8(b'P');
    out.put_i32(len as i32);
    put_cstr(out, name);
    put_cstr(out, query);
    out.put_i16((types.len() / 4) as i16);
    out.extend_from_slice(types);
}

/// The length of what follows a Bind's statement name, from the length the client declared:
/// a large Bind arrives with only its names, the rest streams behind the rewritten head.
pub(super) fn declared_rest(frame: &[u8], portal: &str, statement: &str) -> usize {
    let declared = i32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]) as usize;
    declared.saturating_sub(4 + portal.len() + 1 + statement.len() + 1)
}

/// A Bind of `statement`: its head, then `rest` (all or the first part of `rest_len` bytes).
pub(super) fn write_bind(out: &mut BytesMut, portal: &str, statement: &str, rest: &[u8], rest_len: usize) {
    let len = 4 + portal.len() + 1 + statement.len() + 1 + rest_len;
    out.put_u8(b'B');
    out.put_i32(len as i32);
    put_cstr(out, portal);
    put_cstr(out, statement);
    out.extend_from_slice(rest);
}

pub(super) fn write_describe(out: &mut BytesMut, kind: u8, name: &str) {
    out.put_u8(b'D');
    out.put_i32((4 + 1 + name.len() + 1) as i32);
    out.put_u8(kind);
    put_cstr(out, name);
}

pub(super) fn write_close(out: &mut BytesMut, kind: u8, name: &str) {
    out.put_u8(b'C');
    out.put_i32((4 + 1 + name.len() + 1) as i32);
    out.put_u8(kind);
    put_cstr(out, name);
}
