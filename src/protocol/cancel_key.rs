//! Cancel keys: the secret half of BackendKeyData and of a CancelRequest.
//!
//! Protocol 3.0 keys are 4 bytes. Protocol 3.2 lets the server choose their length, up to 256
//! bytes (PostgreSQL 18 uses 32), so that a key cannot be guessed. pgcorral gives each client a
//! key of its own, 4 bytes or 32 as the client's protocol allows, and keeps each server's key,
//! whatever its length, to cancel on the client's behalf.
//!
//! **Peering.** Several poolers behind one load balancer forward each other the cancel requests
//! that landed on the wrong one, as PgBouncer 1.19+ does, and with its layout so that a mixed
//! fleet agrees. Read as BackendKeyData's 4-byte process id followed by the secret:
//! - the process id's 2nd and 3rd bytes hold the owner's `peer_id`, low byte first;
//! - the secret's 4th byte keeps 2 bits as a time to live, 3 when given out, less one per
//!   forward, so that a request bounced between misconfigured peers dies after 3 hops;
//! - the process id's sign bit is clear, as a real PID's.
//!
//! The rest stays random: 45 bits in a protocol 3.0 key, 253 in a 3.2 one. A 3.2 key keeps the
//! same offsets, so its extra 28 bytes are all random.

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

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Compares in time that depends on the lengths only, not on where the keys differ.
    pub fn matches(&self, other: &[u8]) -> bool {
        constant_time_eq(&self.0, other)
    }
}

/// The time-to-live bits in the secret's 4th byte.
pub const TTL_MASK: u8 = 0x03;

/// The `peer_id` a process id carries in its 2nd and 3rd bytes.
pub fn peer_of(process_id: i32) -> u16 {
    let [_, low, high, _] = process_id.to_be_bytes();
    u16::from_le_bytes([low, high])
}

/// A new client's key: random, with the sign bit of the process id clear, and with peering
/// (`own_peer` > 0) the peer id and a full time to live stamped in.
pub fn fresh_key(protocol_minor: u16, own_peer: u16) -> (i32, SecretKey) {
    let len = if protocol_minor >= 2 { LONG_SECRET_KEY_LEN } else { 4 };
    let mut secret: Vec<u8> = (0..len).map(|_| rand::random::<u8>()).collect();
    let mut pid = (rand::random::<u32>() & 0x7fff_ffff).to_be_bytes();
    if own_peer > 0 {
        [pid[1], pid[2]] = own_peer.to_le_bytes();
        secret[3] |= TTL_MASK;
    }
    (i32::from_be_bytes(pid), SecretKey(secret.into()))
}

/// What to do with a CancelRequest that arrived here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelRoute {
    /// One of this process's keys, perhaps: look it up with this secret.
    Local(Vec<u8>),
    /// Another peer's: send it this secret, one hop less to live.
    Forward { peer_id: u16, secret: Vec<u8> },
    /// Another peer's, but it has been forwarded 3 times already: dropped, so that no request
    /// circles for ever between peers that point at each other.
    Exhausted { peer_id: u16 },
}

/// Where a CancelRequest goes, given this process's `peer_id` (0: no peering, so every key is
/// local and nothing is rewritten).
pub fn route(process_id: i32, secret: &[u8], own_peer: u16) -> CancelRoute {
    let mut secret = secret.to_vec();
    if own_peer == 0 || secret.len() < 4 {
        return CancelRoute::Local(secret);
    }
    let peer_id = peer_of(process_id);
    if peer_id == own_peer {
        // The time to live was spent on the way here; the key as given out had it full.
        secret[3] |= TTL_MASK;
        return CancelRoute::Local(secret);
    }
    if secret[3] & TTL_MASK == 0 {
        return CancelRoute::Exhausted { peer_id };
    }
    secret[3] -= 1;
    CancelRoute::Forward { peer_id, secret }
}

/// How the registry files a client's key: the process id, and the secret's first 4 bytes (a
/// peer's process ids keep only 15 random bits, so the process id alone may repeat among many
/// clients; the pair does not in practice, and the registry never lets it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId {
    pub process_id: i32,
    head: [u8; 4],
}

impl KeyId {
    /// None for a secret shorter than any key pgcorral gives out.
    pub fn of(process_id: i32, secret: &[u8]) -> Option<KeyId> {
        Some(KeyId { process_id, head: secret.get(..4)?.try_into().ok()? })
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
        assert_eq!(fresh_key(0, 0).1.as_bytes().len(), 4);
        assert_eq!(fresh_key(2, 0).1.as_bytes().len(), 32);
        assert_eq!(fresh_key(2, 9).1.as_bytes().len(), 32);
        assert_ne!(fresh_key(2, 0).1, fresh_key(2, 0).1);
        let key = SecretKey::from_bytes(&[7; 32]).unwrap();
        assert_eq!(format!("{key:?}"), "SecretKey(32 bytes)");
        assert!(SecretKey::from_bytes(&[1, 2, 3]).is_none());
        assert!(SecretKey::from_bytes(&[0; 257]).is_none());
        assert!(key.matches(&[7; 32]));
        assert!(!key.matches(&[7; 31]));
        assert!(!key.matches(&[7; 4]));
    }

    #[test]
    fn without_peering_every_key_is_local_and_untouched() {
        for _ in 0..100 {
            let (pid, key) = fresh_key(0, 0);
            assert!(pid >= 0, "a process id is positive, as a real PID");
            assert_eq!(route(pid, key.as_bytes(), 0), CancelRoute::Local(key.as_bytes().to_vec()));
        }
    }

    #[test]
    fn a_peer_stamps_its_id_where_pgbouncer_does() {
        // PgBouncer reads key[1] + key[2] << 8 of the 8 bytes pid ++ secret, and the TTL from
        // key[7] & 3.
        for (own, minor) in [(1u16, 0u16), (2, 2), (258, 0), (16383, 2)] {
            let (pid, key) = fresh_key(minor, own);
            let mut wire = pid.to_be_bytes().to_vec();
            wire.extend_from_slice(key.as_bytes());
            assert_eq!(wire[1] as u16 + ((wire[2] as u16) << 8), own);
            assert_eq!(wire[7] & TTL_MASK, TTL_MASK);
            assert_eq!(wire[0] & 0x80, 0);
            assert_eq!(peer_of(pid), own);
            assert_eq!(route(pid, key.as_bytes(), own), CancelRoute::Local(key.as_bytes().to_vec()));
        }
    }

    #[test]
    fn a_forwarded_request_loses_one_hop_and_dies_after_three() {
        let (pid, key) = fresh_key(0, 7);
        let mut secret = key.as_bytes().to_vec();
        for hops_left in (0..3u8).rev() {
            match route(pid, &secret, 1) {
                CancelRoute::Forward { peer_id, secret: next } => {
                    assert_eq!(peer_id, 7);
                    assert_eq!(next[3] & TTL_MASK, hops_left);
                    assert_eq!((&next[..3], next[3] & !TTL_MASK), (&secret[..3], secret[3] & !TTL_MASK));
                    secret = next;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(route(pid, &secret, 1), CancelRoute::Exhausted { peer_id: 7 });
        // The owner restores the spent hops before it compares keys.
        assert_eq!(route(pid, &secret, 7), CancelRoute::Local(key.as_bytes().to_vec()));
    }

    proptest::proptest! {
        /// Whatever a stranger sends: a request is rewritten only in its TTL bits, and no
        /// chain of peers forwards it more than 3 times.
        #[test]
        fn no_request_is_forwarded_more_than_three_times(
            pid in proptest::num::i32::ANY,
            secret in proptest::collection::vec(proptest::num::u8::ANY, 4..40),
            peers in proptest::collection::vec(1u16..=16383, 1..8),
        ) {
            let mut secret = secret;
            let mut forwards = 0;
            for own in peers.iter().cycle().take(20) {
                match route(pid, &secret, *own) {
                    CancelRoute::Local(local) => {
                        proptest::prop_assert_eq!(peer_of(pid), *own);
                        proptest::prop_assert_eq!(local[3], secret[3] | TTL_MASK);
                        break;
                    }
                    CancelRoute::Exhausted { peer_id } => {
                        proptest::prop_assert_eq!(peer_id, peer_of(pid));
                        break;
                    }
                    CancelRoute::Forward { peer_id, secret: next } => {
                        proptest::prop_assert_eq!(peer_id, peer_of(pid));
                        proptest::prop_assert_eq!(next[3], secret[3] - 1);
                        proptest::prop_assert_eq!(&next[..3], &secret[..3]);
                        proptest::prop_assert_eq!(&next[4..], &secret[4..]);
                        forwards += 1;
                        proptest::prop_assert!(forwards <= 3);
                        secret = next;
                    }
                }
            }
        }
    }

    #[test]
    fn key_ids_need_four_bytes() {
        assert!(KeyId::of(1, &[1, 2, 3]).is_none());
        assert_eq!(KeyId::of(1, &[1, 2, 3, 4, 5]), KeyId::of(1, &[1, 2, 3, 4, 6]));
        assert_ne!(KeyId::of(1, &[1, 2, 3, 4]), KeyId::of(2, &[1, 2, 3, 4]));
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
