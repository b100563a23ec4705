//! The first packet a client sends, which has no tag.
//!
//! It is a StartupMessage (protocol 3.x and its parameters), or a request that comes before one:
//! SSLRequest, GSSENCRequest, or a CancelRequest on a connection of its own.
//!
//! A client may ask for any minor version of protocol 3 and for protocol options (`_pq_.`
//! parameters). pgcorral speaks 3.0 and 3.2 (3.1 was never used: 3.2 differs from 3.0 only in
//! the length of cancel keys) and no option; [`Negotiation`] is what it answers, as PostgreSQL
//! 18 answers.

use super::cancel_key::MAX_SECRET_KEY_LEN;
use super::ProtocolError;

/// PostgreSQL refuses startup packets above this size; so do we, before buffering them.
pub const MAX_STARTUP_LEN: usize = 10_000;

const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;
const PROTOCOL_3: u32 = 3;
/// The newest minor version of protocol 3 pgcorral speaks.
pub const LATEST_MINOR: u16 = 2;
/// What protocol options are named with: `_pq_.` and the option.
const PROTOCOL_OPTION_PREFIX: &str = "_pq_.";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    Ssl,
    GssEnc,
    /// The key is 4 bytes in protocol 3.0, up to 256 in 3.2.
    Cancel {
        process_id: i32,
        secret_key: Vec<u8>,
    },
    /// Parameters in the order sent; names as sent (PostgreSQL compares GUC names case-insensitively).
    /// `minor` is the minor protocol version the client asked for, whatever it is.
    Startup {
        minor: u16,
        params: Vec<(String, String)>,
    },
}

/// The protocol a client and pgcorral agree on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiation {
    /// The minor version both speak: the client's, or pgcorral's newest if the client's is newer.
    pub minor: u16,
    /// The `_pq_.` options the client asked for, none of which pgcorral knows.
    pub unknown_options: Vec<String>,
    /// Whether the client must be told (NegotiateProtocolVersion): it asked for a newer minor
    /// version or for options.
    pub must_tell: bool,
}

impl Negotiation {
    /// Takes the protocol options out of `params` and decides, as PostgreSQL does.
    pub fn of(minor: u16, params: &mut Vec<(String, String)>) -> Negotiation {
        let mut unknown_options = Vec::new();
        params.retain(|(name, _)| match name.starts_with(PROTOCOL_OPTION_PREFIX) {
            true => {
                unknown_options.push(name.clone());
                false
            }
            false => true,
        });
        let must_tell = minor > LATEST_MINOR || !unknown_options.is_empty();
        Negotiation { minor: minor.min(LATEST_MINOR), unknown_options, must_tell }
    }

    /// The full version number NegotiateProtocolVersion carries (3.2: 196610).
    pub fn version(&self) -> i32 {
        ((PROTOCOL_3 << 16) | u32::from(self.minor)) as i32
    }
}

/// Finds the startup packet at the start of `buf`: `Ok(None)` until all of it has arrived,
/// then the packet and its length.
pub fn parse_startup(buf: &[u8]) -> Result<Option<(StartupPacket, usize)>, ProtocolError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let declared = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if !(8..=MAX_STARTUP_LEN as i32).contains(&declared) {
        return Err(if declared > 8 {
            ProtocolError::TooLarge { size: declared as usize, limit: MAX_STARTUP_LEN }
        } else {
            ProtocolError::BadLength(declared as i64)
        });
    }
    let len = declared as usize;
    if buf.len() < len {
        return Ok(None);
    }
    let code = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let body = &buf[8..len];
    let packet = match code {
        SSL_REQUEST if body.is_empty() => StartupPacket::Ssl,
        GSSENC_REQUEST if body.is_empty() => StartupPacket::GssEnc,
        CANCEL_REQUEST if (8..=4 + MAX_SECRET_KEY_LEN).contains(&body.len()) => StartupPacket::Cancel {
            process_id: i32::from_be_bytes([body[0], body[1], body[2], body[3]]),
            secret_key: body[4..].to_vec(),
        },
        code if code >> 16 == PROTOCOL_3 => {
            StartupPacket::Startup { minor: (code & 0xffff) as u16, params: parse_params(body)? }
        }
        SSL_REQUEST | GSSENC_REQUEST | CANCEL_REQUEST => {
            return Err(ProtocolError::Malformed { what: "startup" })
        }
        other => {
            return Err(ProtocolError::UnsupportedVersion {
                major: (other >> 16) as u16,
                minor: (other & 0xffff) as u16,
            })
        }
    };
    Ok(Some((packet, len)))
}

fn parse_params(body: &[u8]) -> Result<Vec<(String, String)>, ProtocolError> {
    let malformed = ProtocolError::Malformed { what: "startup" };
    let mut params = Vec::new();
    let mut parts = body.split(|&b| b == 0);
    loop {
        let name = parts.next().ok_or(malformed.clone())?;
        if name.is_empty() {
            break;
        }
        let value = parts.next().ok_or(malformed.clone())?;
        let name = std::str::from_utf8(name).map_err(|_| malformed.clone())?;
        let value = std::str::from_utf8(value).map_err(|_| malformed.clone())?;
        params.push((name.to_string(), value.to_string()));
    }
    // Everything after the terminating empty name must be nothing at all.
    if parts.any(|p| !p.is_empty()) {
        return Err(malformed);
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROTOCOL_3_0: u32 = 196_608;

    fn packet(code: u32, body: &[u8]) -> Vec<u8> {
        let mut v = ((body.len() + 8) as i32).to_be_bytes().to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn startup_parameters() {
        let p = packet(PROTOCOL_3_0, b"user\0alice\0database\0app\0\0");
        let (parsed, len) = parse_startup(&p).unwrap().unwrap();
        assert_eq!(len, p.len());
        assert_eq!(
            parsed,
            StartupPacket::Startup {
                minor: 0,
                params: vec![("user".into(), "alice".into()), ("database".into(), "app".into())]
            }
        );
        assert_eq!(parse_startup(&p[..p.len() - 1]), Ok(None));
    }

    #[test]
    fn requests_before_startup() {
        assert_eq!(parse_startup(&packet(SSL_REQUEST, b"")).unwrap().unwrap().0, StartupPacket::Ssl);
        assert_eq!(parse_startup(&packet(GSSENC_REQUEST, b"")).unwrap().unwrap().0, StartupPacket::GssEnc);
        let cancel = packet(CANCEL_REQUEST, &[0, 0, 0, 7, 0, 0, 0, 9]);
        assert_eq!(
            parse_startup(&cancel).unwrap().unwrap().0,
            StartupPacket::Cancel { process_id: 7, secret_key: vec![0, 0, 0, 9] }
        );
        let mut long = vec![0, 0, 0, 7];
        long.extend_from_slice(&[5; 256]);
        assert_eq!(
            parse_startup(&packet(CANCEL_REQUEST, &long)).unwrap().unwrap().0,
            StartupPacket::Cancel { process_id: 7, secret_key: vec![5; 256] },
            "protocol 3.2: keys up to 256 bytes"
        );
        long.push(5);
        assert!(parse_startup(&packet(CANCEL_REQUEST, &long)).is_err(), "257 bytes is no key");
    }

    fn negotiate(minor: u16, names: &[&str]) -> (Negotiation, Vec<String>) {
        let mut params: Vec<(String, String)> =
            names.iter().map(|n| (n.to_string(), "v".to_string())).collect();
        let n = Negotiation::of(minor, &mut params);
        (n, params.into_iter().map(|(name, _)| name).collect())
    }

    #[test]
    fn any_minor_version_of_protocol_3_is_negotiated_down_as_postgresql_18_does() {
        for (minor, agreed, tell) in
            [(0, 0, false), (1, 1, false), (2, 2, false), (3, 2, true), (9999, 2, true)]
        {
            let p = packet((3 << 16) | minor as u32, b"user\0a\0\0");
            let (StartupPacket::Startup { minor: asked, params }, _) = parse_startup(&p).unwrap().unwrap()
            else {
                panic!("a startup message")
            };
            assert_eq!(asked, minor);
            let n = Negotiation::of(asked, &mut params.clone());
            assert_eq!((n.minor, n.must_tell), (agreed, tell), "3.{minor}");
        }
        let (n, left) = negotiate(2, &["user", "_pq_.compression", "database", "_pq_.x"]);
        assert_eq!(n.unknown_options, ["_pq_.compression", "_pq_.x"]);
        assert!(n.must_tell, "options are answered even in the newest version");
        assert_eq!(left, ["user", "database"], "options are no run-time parameters");
        assert_eq!(n.version(), 196_610);
        assert_eq!(negotiate(0, &["user"]).0.version(), 196_608);
    }

    #[test]
    fn malformed_packets_are_refused() {
        assert!(matches!(
            parse_startup(&packet(0x0002_0000, b"")),
            Err(ProtocolError::UnsupportedVersion { major: 2, minor: 0 })
        ));
        assert!(parse_startup(&packet(PROTOCOL_3_0, b"user\0alice")).is_err());
        assert!(parse_startup(&packet(PROTOCOL_3_0, b"user\0alice\0\0junk")).is_err());
        assert!(parse_startup(&[0, 0, 0, 2]).is_err());
        assert!(parse_startup(&[0x7f, 0, 0, 0]).is_err());
        assert!(parse_startup(&packet(CANCEL_REQUEST, &[1, 2, 3])).is_err());
    }
}
