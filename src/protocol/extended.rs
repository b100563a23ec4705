//! The extended query protocol's client messages (Parse, Bind, Describe, Execute, Close): read
//! by the prepared-statement rewriter, which renames statements on their way to a server, and by
//! the admin console, which answers them itself (asyncpg and psycopg monitors as well as psql).
//! The views borrow from the message body.

use super::fields::Fields;
use super::ProtocolError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parse<'a> {
    pub statement: &'a str,
    pub query: &'a str,
    /// The parameter type OIDs as sent: Int32 each.
    pub param_types: &'a [u8],
}

pub fn parse_parse(body: &[u8]) -> Result<Parse<'_>, ProtocolError> {
    let mut f = Fields::new(body, "Parse");
    let statement = f.cstr()?;
    let query = f.cstr()?;
    let types = f.count()?;
    let param_types = f.take(types * 4)?;
    f.end()?;
    Ok(Parse { statement, query, param_types })
}

/// A Bind's names: all the rewriter reads (a large Bind is held only up to here, its
/// parameters stream behind it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindHead<'a> {
    pub portal: &'a str,
    pub statement: &'a str,
    /// What follows the names (all of it or, for a streamed Bind, the part at hand).
    pub rest: &'a [u8],
}

pub fn parse_bind_head(body: &[u8]) -> Result<BindHead<'_>, ProtocolError> {
    let mut f = Fields::new(body, "Bind");
    let portal = f.cstr()?;
    let statement = f.cstr()?;
    Ok(BindHead { portal, statement, rest: f.rest() })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind<'a> {
    pub portal: &'a str,
    pub statement: &'a str,
    /// Result column format codes as sent: none (all text), one (for all), or one per column.
    pub result_formats: Vec<i16>,
}

pub fn parse_bind(body: &[u8]) -> Result<Bind<'_>, ProtocolError> {
    let head = parse_bind_head(body)?;
    let mut f = Fields::new(head.rest, "Bind");
    let formats = f.count()?;
    f.take(formats * 2)?;
    for _ in 0..f.count()? {
        let len = f.i32()?;
        if len > 0 {
            f.take(len as usize)?;
        }
    }
    let result_formats = (0..f.count()?).map(|_| f.i16()).collect::<Result<_, _>>()?;
    f.end()?;
    Ok(Bind { portal: head.portal, statement: head.statement, result_formats })
}

/// Describe and Close: `S` for a prepared statement or `P` for a portal, and its name. Any
/// other kind is read as sent; PostgreSQL is the one to refuse it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target<'a> {
    pub kind: u8,
    pub name: &'a str,
}

pub fn parse_target(body: &[u8]) -> Result<Target<'_>, ProtocolError> {
    let mut f = Fields::new(body, "Describe/Close");
    let kind = f.u8()?;
    let name = f.cstr()?;
    f.end()?;
    Ok(Target { kind, name })
}

/// Execute: the portal's name (the row limit is not needed where pgcorral answers itself).
pub fn parse_execute(body: &[u8]) -> Result<&str, ProtocolError> {
    let mut f = Fields::new(body, "Execute");
    let portal = f.cstr()?;
    f.i32()?;
    f.end()?;
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
        assert_eq!(
            parse_parse(&b).unwrap(),
            Parse { statement: "s1", query: "SHOW POOLS", param_types: &25u32.to_be_bytes() }
        );

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
        assert_eq!((bind.portal, bind.statement), ("p", "s1"));
        assert_eq!(bind.result_formats, [1, 0]);

        let b = body(|buf| frontend::describe(b'S', "s1", buf).unwrap());
        assert_eq!(parse_target(&b).unwrap(), Target { kind: b'S', name: "s1" });
        let b = body(|buf| frontend::execute("p", 0, buf).unwrap());
        assert_eq!(parse_execute(&b).unwrap(), "p");
    }

    #[test]
    fn truncated_messages_are_errors_not_panics() {
        assert!(parse_parse(b"s1\0SHOW").is_err());
        assert!(parse_bind(b"p\0s\0\x00\x01").is_err());
        assert!(parse_target(b"S").is_err());
        assert!(parse_parse(b"s\0q\0\x00\x00extra").is_err(), "bytes after the last field");
        assert!(parse_target(b"").is_err());
        assert!(parse_execute(b"p\0\x00").is_err());
        let mut negative = b"s\0q\0".to_vec();
        negative.extend_from_slice(&(-1i16).to_be_bytes());
        assert!(parse_parse(&negative).is_err());
    }
}
