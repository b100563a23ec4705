//! The first packet a client sends, which has no tag.
//!
//! It is a StartupMessage (protocol 3.0 and its parameters), or a request that comes before one:
//! SSLRequest, GSSENCRequest, or a CancelRequest on a connection of its own.

use super::ProtocolError;

/// PostgreSQL refuses startup packets above this size; so do we, before buffering them.
pub const MAX_STARTUP_LEN: usize = 10_000;

const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;
const PROTOCOL_3_0: u32 = 196_608;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    Ssl,
    GssEnc,
    Cancel {
        process_id: i32,
        secret_key: i32,
    },
    /// Parameters in the order sent; names as sent (PostgreSQL compares GUC names case-insensitively).
    Startup {
        params: Vec<(String, String)>,
    },
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
        CANCEL_REQUEST if body.len() == 8 => StartupPacket::Cancel {
            process_id: i32::from_be_bytes([body[0], body[1], body[2], body[3]]),
            secret_key: i32::from_be_bytes([body[4], body[5], body[6], body[7]]),
        },
        PROTOCOL_3_0 => StartupPacket::Startup { params: parse_params(body)? },
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
            StartupPacket::Cancel { process_id: 7, secret_key: 9 }
        );
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
