//! Cancel keys: the secret half of BackendKeyData and of a CancelRequest.
//!
//! Protocol 3.0 keys are 4 bytes. Protocol 3.2 lets the server choose their length, up to 256
//! bytes (PostgreSQL 18 uses 32), so that a key cannot be guessed. pgcorral gives each client a
//! key of its own, 4 bytes or 32 as the client's protocol allows, and keeps each server's key,
//! whatever its length, to cancel on the client's behalf.

use std::sync::Arc;

use bytes::{BufMut, BytesMut};

use crate::auth::constant_time_eq;

/// The longest key protocol 3.2 allows.
pub const MAX_SECRET_KEY_LEN: usize = 256;
/// The length of the keys pgcorral gives protocol 3.2 clients: PostgreSQL 18's.
pub const LONG_SECRET_KEY_LEN: usize = 32;
/// CancelRequest's code in place of a protocol version.
const CANCEL_REQUEST_CODE: i32 = 80_877_102;

/// A cancel key's secret. Never printed: whoever reads it can cancel the session's queries.
/// Shared, not copied: a server's key goes with every lease of it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey(Arc<[u8]>);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey({} bytes)", self.0.len())
    }
}

impl SecretKey {
    /// A key as a server or a client sent it: 4 to 256 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<SecretKey> {
        (4..=MAX_SECRET_KEY_LEN).contains(&bytes.len()).then(|| SecretKey(bytes.into()))
    }

    /// A fresh random key for a client: 32 bytes in protocol 3.2 and later, 4 before.
    pub fn random(protocol_minor: u16) -> SecretKey {
        let len = if protocol_minor >= 2 { LONG_SECRET_KEY_LEN } else { 4 };
        let bytes: Vec<u8> = (0..len).map(|_| rand::random::<u8>()).collect();
        SecretKey(bytes.into())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Compares in time that depends on the lengths only, not on where the keys differ.
    pub fn matches(&self, other: &[u8]) -> bool {
        constant_time_eq(&self.0, other)
    }
}

/// Writes a CancelRequest for `process_id` with `key`, as a client (pgcorral, to a server).
pub fn write_cancel_request(buf: &mut BytesMut, process_id: i32, key: &SecretKey) {
    buf.put_i32((12 + key.0.len()) as i32);
    buf.put_i32(CANCEL_REQUEST_CODE);
    buf.put_i32(process_id);
    buf.put_slice(&key.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_as_long_as_the_protocol_allows_and_never_printed() {
        assert_eq!(SecretKey::random(0).as_bytes().len(), 4);
        assert_eq!(SecretKey::random(2).as_bytes().len(), 32);
        assert_ne!(SecretKey::random(2), SecretKey::random(2));
        let key = SecretKey::from_bytes(&[7; 32]).unwrap();
        assert_eq!(format!("{key:?}"), "SecretKey(32 bytes)");
        assert!(SecretKey::from_bytes(&[1, 2, 3]).is_none());
        assert!(SecretKey::from_bytes(&[0; 257]).is_none());
        assert!(key.matches(&[7; 32]));
        assert!(!key.matches(&[7; 31]));
        assert!(!key.matches(&[7; 4]));
    }

    #[test]
    fn a_cancel_request_carries_the_whole_key() {
        let mut buf = BytesMut::new();
        write_cancel_request(&mut buf, 42, &SecretKey::from_bytes(&[9; 32]).unwrap());
        assert_eq!(&buf[..4], &44i32.to_be_bytes());
        assert_eq!(&buf[4..8], &80_877_102i32.to_be_bytes());
        assert_eq!(&buf[8..12], &42i32.to_be_bytes());
        assert_eq!(&buf[12..], &[9; 32]);
        let mut short = BytesMut::new();
        write_cancel_request(&mut short, 42, &SecretKey::from_bytes(&[1, 2, 3, 4]).unwrap());
        let mut theirs = BytesMut::new();
        postgres_protocol::message::frontend::cancel_request(42, 0x0102_0304, &mut theirs);
        assert_eq!(short, theirs, "4-byte keys: exactly protocol 3.0's CancelRequest");
    }
}
