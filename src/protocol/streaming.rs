//! Which messages stream through and which are held whole.
//!
//! A pooler that buffers every message whole lets one client (or one huge row) make it allocate
//! up to the protocol's 1 GiB limit. pgcorral holds whole only the messages it acts on, under
//! [`MAX_HELD`]; everything else is forwarded as its bytes arrive, once its five header bytes
//! have been seen (the tag is all the protocol model needs). A Bind whose statement name must
//! be rewritten is held only up to the end of that name: the parameters behind it stream.
//! Pure decisions on a buffer's first bytes; the relay does the moving.

use super::Frame;

/// The largest message pgcorral holds whole to act on (a named Parse with its query text, a
/// Query it reads, an ErrorResponse it renames). Larger ones stream, or, where pgcorral must
/// read them and cannot (a named Parse in transaction pooling), end the session.
pub const MAX_HELD: usize = 4 << 20;

/// What must be buffered of the message at the front before it can go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// The first `n` bytes (header included); the rest streams. `n` may equal the length.
    Head(usize),
    /// Not known yet: more bytes are needed to tell (the Bind's names are not all there).
    More,
    /// A message pgcorral must read whole, above [`MAX_HELD`].
    TooLarge,
}

/// For a client message at the front of `buf` (`frame` from its header). `rewriting`: named
/// prepared statements are being mapped (transaction and statement pooling).
pub fn client_hold(frame: Frame, buf: &[u8], rewriting: bool) -> Hold {
    let whole_if_small = || if frame.len <= MAX_HELD { Hold::Head(frame.len) } else { Hold::TooLarge };
    match frame.tag {
        // Data and function arguments are never read.
        b'd' | b'F' => Hold::Head(5),
        // A Query is read (DEALLOCATE, RESET ALL) only when it is short enough to be one.
        b'Q' if frame.len > MAX_HELD => Hold::Head(5),
        b'P' | b'B' if !rewriting => Hold::Head(5),
        // The statement name comes first: an unnamed Parse is passed as it is.
        b'P' => match buf.get(5) {
            None if frame.len > 5 => Hold::More,
            Some(0) => Hold::Head(6),
            _ => whole_if_small(),
        },
        b'B' if frame.len <= MAX_HELD => Hold::Head(frame.len),
        // Portal and statement names, then parameters that may be huge.
        b'B' => {
            let body = &buf[5..];
            let mut nuls = body.iter().enumerate().filter(|(_, &b)| b == 0).map(|(at, _)| at);
            match (nuls.next(), nuls.next()) {
                (Some(_), Some(second)) => Hold::Head(5 + second + 1),
                _ if body.len() > MAX_HELD => Hold::TooLarge,
                _ => Hold::More,
            }
        }
        _ => whole_if_small(),
    }
}

/// For a server message: the few pgcorral acts on are held whole (ReadyForQuery for the
/// transaction status, ParameterStatus, CommandComplete for its tag, ErrorResponse to put a
/// client's statement name back); everything else streams after its header. A held kind above
/// [`MAX_HELD`] streams too, unread: only a misbehaving server sends one.
pub fn server_holds_whole(frame: Frame) -> bool {
    matches!(frame.tag, b'Z' | b'S' | b'C' | b'E') && frame.len <= MAX_HELD
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, len: usize) -> Frame {
        Frame { tag, len }
    }

    #[test]
    fn data_streams_after_its_header() {
        assert_eq!(client_hold(frame(b'd', 1 << 30), b"d\0\0\0\0", true), Hold::Head(5));
        assert_eq!(client_hold(frame(b'Q', MAX_HELD + 1), b"Q", true), Hold::Head(5));
        assert_eq!(client_hold(frame(b'Q', 100), b"Q", true), Hold::Head(100));
        assert_eq!(client_hold(frame(b'B', 1 << 30), b"B", false), Hold::Head(5));
    }

    #[test]
    fn a_parse_is_held_only_when_named() {
        let unnamed = b"P\0\0\0\x10\0SELECT";
        assert_eq!(client_hold(frame(b'P', 1 << 30), unnamed, true), Hold::Head(6));
        assert_eq!(client_hold(frame(b'P', 1 << 30), b"P\0\0\0\x10", true), Hold::More);
        assert_eq!(client_hold(frame(b'P', 1 << 30), b"P\0\0\0\x10s1\0", true), Hold::TooLarge);
        assert_eq!(client_hold(frame(b'P', 64), b"P\0\0\0\x10s1\0", true), Hold::Head(64));
    }

    #[test]
    fn a_large_bind_is_held_up_to_its_statement_name() {
        let head = b"B\x40\0\0\0\0s1\0\0\0";
        assert_eq!(client_hold(frame(b'B', 1 << 30), head, true), Hold::Head(5 + 4));
        assert_eq!(client_hold(frame(b'B', 1 << 30), b"B\x40\0\0\0\0s", true), Hold::More);
        let endless = [&b"B\x40\0\0\0"[..], &vec![b'x'; MAX_HELD + 1]].concat();
        assert_eq!(client_hold(frame(b'B', 1 << 30), &endless, true), Hold::TooLarge);
    }

    #[test]
    fn small_control_messages_are_held_and_huge_ones_refused() {
        assert_eq!(client_hold(frame(b'S', 5), b"S\0\0\0\x04", true), Hold::Head(5));
        assert_eq!(client_hold(frame(b'C', MAX_HELD + 1), b"C", true), Hold::TooLarge);
        assert!(server_holds_whole(frame(b'Z', 6)) && !server_holds_whole(frame(b'D', 6)));
        assert!(!server_holds_whole(frame(b'E', MAX_HELD + 1)));
    }
}
