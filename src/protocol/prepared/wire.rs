//! Writing the Parse, Bind, Describe and Close messages the rewriter sends in place of the
//! client's (reading them is `protocol::extended`'s).

use bytes::{BufMut, BytesMut};

use crate::protocol::fields::put_cstr;

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
