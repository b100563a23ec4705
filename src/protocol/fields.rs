//! Reading a message body field by field: the one reader for every message pgcorral parses
//! beyond its frame (the extended protocol's messages, a server's login messages and rows).
//! Anything truncated or not terminated is a [`ProtocolError`] naming the message, never a
//! panic: bodies come from peers pgcorral does not trust.

use bytes::{BufMut, BytesMut};

use super::ProtocolError;

/// The fields of one message body, read in order.
pub struct Fields<'a> {
    body: &'a [u8],
    /// The message's name, for errors.
    what: &'static str,
}

impl<'a> Fields<'a> {
    pub fn new(body: &'a [u8], what: &'static str) -> Self {
        Fields { body, what }
    }

    pub fn malformed(&self) -> ProtocolError {
        ProtocolError::Malformed { what: self.what }
    }

    /// A NUL-terminated UTF-8 string.
    pub fn cstr(&mut self) -> Result<&'a str, ProtocolError> {
        let nul = self.body.iter().position(|&b| b == 0).ok_or_else(|| self.malformed())?;
        let text = std::str::from_utf8(&self.body[..nul]).map_err(|_| self.malformed())?;
        self.body = &self.body[nul + 1..];
        Ok(text)
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.body.len() < n {
            return Err(self.malformed());
        }
        let (head, tail) = self.body.split_at(n);
        self.body = tail;
        Ok(head)
    }

    pub fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }

    pub fn i16(&mut self) -> Result<i16, ProtocolError> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    pub fn i32(&mut self) -> Result<i32, ProtocolError> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// An Int16 count of the items that follow; negative is malformed.
    pub fn count(&mut self) -> Result<usize, ProtocolError> {
        usize::try_from(self.i16()?).map_err(|_| self.malformed())
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.body)
    }

    /// The end of the message: bytes left over are malformed, as PostgreSQL's `pq_getmsgend`.
    pub fn end(&self) -> Result<(), ProtocolError> {
        match self.body.is_empty() {
            true => Ok(()),
            false => Err(self.malformed()),
        }
    }
}

/// Appends `s` as a NUL-terminated string.
pub fn put_cstr(out: &mut BytesMut, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.put_u8(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_in_order_then_the_end() {
        let mut body = BytesMut::new();
        put_cstr(&mut body, "name");
        body.put_i16(2);
        body.put_i32(-7);
        body.put_u8(b'S');
        let mut f = Fields::new(&body, "Test");
        assert_eq!(f.cstr().unwrap(), "name");
        assert_eq!(f.count().unwrap(), 2);
        assert_eq!(f.i32().unwrap(), -7);
        assert!(f.end().is_err());
        assert_eq!(f.u8().unwrap(), b'S');
        f.end().unwrap();
    }

    #[test]
    fn truncation_and_bad_text_are_errors_naming_the_message() {
        let malformed = Err(ProtocolError::Malformed { what: "Test" });
        assert_eq!(Fields::new(b"no terminator", "Test").cstr(), malformed);
        assert_eq!(Fields::new(b"\xff\xfe\0", "Test").cstr(), malformed);
        assert_eq!(Fields::new(b"\x00", "Test").i16(), malformed.clone().map(|_: &str| 0));
        assert_eq!(Fields::new(b"\xff\xff", "Test").count(), malformed.clone().map(|_: &str| 0));
        assert_eq!(Fields::new(b"abc", "Test").take(4), malformed.map(|_: &str| &b""[..]));
    }
}
