//! Message boundaries in a read buffer.
//!
//! After the startup packet every message is a one-byte tag and a four-byte big-endian length
//! that counts itself but not the tag. A forwarding pooler only needs the boundaries (and the
//! body of the few messages it acts on), so framing never copies: it reports where a message
//! ends, and the caller splits or forwards that range of the buffer.

use super::ProtocolError;

/// A complete message found at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    /// Whole message length, tag included: the offset just past the message.
    pub len: usize,
}

impl Frame {
    /// The message body (after tag and length) within the buffer the frame was found in.
    pub fn body<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[5..self.len]
    }
}

/// Finds the message starting at `buf[0]`.
///
/// `Ok(None)` means more bytes are needed. A length below 4 or above `max_len` is an error, so a
/// hostile peer cannot make pgcorral buffer an arbitrary amount.
pub fn frame_at(buf: &[u8], max_len: usize) -> Result<Option<Frame>, ProtocolError> {
    match header_at(buf, max_len)? {
        Some(frame) if buf.len() >= frame.len => Ok(Some(frame)),
        _ => Ok(None),
    }
}

/// The tag and length of the message starting at `buf[0]`, as soon as its five header bytes
/// are there: what a message that streams through needs (its body is forwarded as it comes).
pub fn header_at(buf: &[u8], max_len: usize) -> Result<Option<Frame>, ProtocolError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let declared = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if declared < 4 {
        return Err(ProtocolError::BadLength(declared as i64));
    }
    let len = declared as usize + 1;
    if len > max_len {
        return Err(ProtocolError::TooLarge { size: len, limit: max_len });
    }
    Ok(Some(Frame { tag: buf[0], len }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incomplete_then_complete() {
        let msg = [b'Q', 0, 0, 0, 8, b's', b'e', b'l', 0];
        assert_eq!(frame_at(&msg[..3], 100), Ok(None));
        assert_eq!(frame_at(&msg[..8], 100), Ok(None));
        assert_eq!(frame_at(&msg, 100), Ok(Some(Frame { tag: b'Q', len: 9 })));
        assert_eq!(Frame { tag: b'Q', len: 9 }.body(&msg), b"sel\0");
        assert_eq!(header_at(&msg[..5], 100), Ok(Some(Frame { tag: b'Q', len: 9 })));
        assert_eq!(header_at(&msg[..4], 100), Ok(None));
    }

    #[test]
    fn rejects_bad_and_oversized_lengths() {
        assert_eq!(frame_at(&[b'Q', 0, 0, 0, 3], 100), Err(ProtocolError::BadLength(3)));
        assert_eq!(frame_at(&[b'Q', 0xff, 0xff, 0xff, 0xff], 100), Err(ProtocolError::BadLength(-1)));
        assert_eq!(
            frame_at(&[b'd', 0, 1, 0, 0], 1000),
            Err(ProtocolError::TooLarge { size: 65537, limit: 1000 })
        );
    }
}
