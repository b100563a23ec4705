//! The extended query protocol's client messages (Parse, Bind, Describe, Execute, Close),
//! read where pgcorral answers them itself: the admin console, which serves asyncpg and
//! psycopg monitors as well as psql.

use super::ProtocolError;

fn malformed(what: &'static str) -> ProtocolError {
    ProtocolError::Malformed { what }
}

/// Reads message fields in order, failing on anything truncated.
struct Fields<'a> {
    body: &'a [u8],
    what: &'static str,
}

impl<'a> Fields<'a> {
    fn cstr(&mut self) -> Result<String, ProtocolError> {
        let nul = self.body.iter().position(|&b| b == 0).ok_or_else(|| malformed(self.what))?;
        let text = std::str::from_utf8(&self.body[..nul]).map_err(|_| malformed(self.what))?.to_string();
        self.body = &self.body[nul + 1..];
        Ok(text)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.body.len() < n {
            return Err(malformed(self.what));
        }
        let (head, tail) = self.body.split_at(n);
        self.body = tail;
        Ok(head)
    }

    fn i16(&mut self) -> Result<i16, ProtocolError> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self) -> Result<i32, ProtocolError> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn count(&mut self) -> Result<usize, ProtocolError> {
        usize::try_from(self.i16()?).map_err(|_| malformed(self.what))
    }

    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parse {
    pub statement: String,
    pub query: String,
}

pub fn parse_parse(body: &[u8]) -> Result<Parse, ProtocolError> {
    let mut f = Fields { body, what: "Parse" };
    let statement = f.cstr()?;
    let query = f.cstr()?;
    let types = f.count()?;
    f.take(types * 4)?;
    Ok(Parse { statement, query })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub portal: String,
    pub statement: String,
    /// Result column format codes as sent: none (all text), one (for all), or one per column.
    pub result_formats: Vec<i16>,
}

pub fn parse_bind(body: &[u8]) -> Result<Bind, ProtocolError> {
    let mut f = Fields { body, what: "Bind" };
    let portal = f.cstr()?;
    let statement = f.cstr()?;
    let formats = f.count()?;
    f.take(formats * 2)?;
    for _ in 0..f.count()? {
        let len = f.i32()?;
        if len > 0 {
            f.take(len as usize)?;
        }
    }
    let result_formats = (0..f.count()?).map(|_| f.i16()).collect::<Result<_, _>>()?;
    Ok(Bind { portal, statement, result_formats })
}

/// Describe and Close: `S` for a prepared statement or `P` for a portal, and its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub kind: u8,
    pub name: String,
}

pub fn parse_target(body: &[u8]) -> Result<Target, ProtocolError> {
    let mut f = Fields { body, what: "Describe/Close" };
    let kind = f.u8()?;
    if kind != b'S' && kind != b'P' {
        return Err(malformed("Describe/Close"));
    }
    Ok(Target { kind, name: f.cstr()? })
}

/// Execute: the portal's name (the row limit is not needed where pgcorral answers itself).
pub fn parse_execute(body: &[u8]) -> Result<String, ProtocolError> {
    let mut f = Fields { body, what: "Execute" };
    let portal = f.cstr()?;
    f.i32()?;
    Ok(portal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use postgres_protocol::message::frontend;

    /// The body of the one message `write` puts in a buffer (tag and length stripped).
    fn body(write: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
        let mut buf = BytesMut::new();
        write(&mut buf);
        buf[5..].to_vec()
    }

    #[test]
    fn messages_as_postgres_protocol_writes_them() {
        let b = body(|buf| frontend::parse("s1", "SHOW POOLS", [25u32], buf).unwrap());
        assert_eq!(parse_parse(&b).unwrap(), Parse { statement: "s1".into(), query: "SHOW POOLS".into() });

        let b = body(|buf| {
            frontend::bind(
                "p",
                "s1",
                [1i16],
                [Some(b"x".to_vec())],
                |v: Option<Vec<u8>>, out: &mut BytesMut| match v {
                    Some(v) => {
                        out.extend_from_slice(&v);
                        Ok(postgres_protocol::IsNull::No)
                    }
                    None => Ok(postgres_protocol::IsNull::Yes),
                },
                [1i16, 0],
                buf,
            )
            .map_err(|_| ())
            .unwrap()
        });
        let bind = parse_bind(&b).unwrap();
        assert_eq!((bind.portal.as_str(), bind.statement.as_str()), ("p", "s1"));
        assert_eq!(bind.result_formats, [1, 0]);

        let b = body(|buf| frontend::describe(b'S', "s1", buf).unwrap());
        assert_eq!(parse_target(&b).unwrap(), Target { kind: b'S', name: "s1".into() });
        let b = body(|buf| frontend::execute("p", 0, buf).unwrap());
        assert_eq!(parse_execute(&b).unwrap(), "p");
    }

    #[test]
    fn truncated_messages_are_errors_not_panics() {
        assert!(parse_parse(b"s1\0SHOW").is_err());
        assert!(parse_bind(b"p\0s\0\x00\x01").is_err());
        assert!(parse_target(b"X\0").is_err());
        assert!(parse_target(b"").is_err());
        assert!(parse_execute(b"p\0\x00").is_err());
        let mut negative = b"s\0q\0".to_vec();
        negative.extend_from_slice(&(-1i16).to_be_bytes());
        assert!(parse_parse(&negative).is_err());
    }
}
