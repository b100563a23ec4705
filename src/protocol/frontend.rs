//! Client messages pgcorral reads itself during login: PasswordMessage and the SASL messages,
//! which share the tag `p` and are told apart by the authentication step in progress.

use super::ProtocolError;

fn malformed() -> ProtocolError {
    ProtocolError::Malformed { what: "password" }
}

/// The body of a PasswordMessage: a NUL-terminated string.
pub fn parse_password(body: &[u8]) -> Result<String, ProtocolError> {
    let (text, rest) = body.split_last().ok_or_else(malformed)?;
    if *text != 0 || rest.contains(&0) {
        return Err(malformed());
    }
    String::from_utf8(rest.to_vec()).map_err(|_| malformed())
}

/// The body of a SASLInitialResponse: mechanism name, then the length-prefixed first message.
pub fn parse_sasl_initial(body: &[u8]) -> Result<(String, Vec<u8>), ProtocolError> {
    let nul = body.iter().position(|&b| b == 0).ok_or_else(malformed)?;
    let mechanism = std::str::from_utf8(&body[..nul]).map_err(|_| malformed())?.to_string();
    let rest = &body[nul + 1..];
    if rest.len() < 4 {
        return Err(malformed());
    }
    let len = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
    let data = &rest[4..];
    if len < 0 || len as usize != data.len() {
        return Err(malformed());
    }
    Ok((mechanism, data.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_message() {
        assert_eq!(parse_password(b"secret\0").unwrap(), "secret");
        assert!(parse_password(b"secret").is_err());
        assert!(parse_password(b"sec\0ret\0").is_err());
        assert!(parse_password(b"").is_err());
    }

    #[test]
    fn sasl_initial_response() {
        let mut body = b"SCRAM-SHA-256\0".to_vec();
        body.extend_from_slice(&5i32.to_be_bytes());
        body.extend_from_slice(b"n,,ab");
        assert_eq!(parse_sasl_initial(&body).unwrap(), ("SCRAM-SHA-256".into(), b"n,,ab".to_vec()));
        body.pop();
        assert!(parse_sasl_initial(&body).is_err());
    }
}
