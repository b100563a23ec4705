//! A console answer as rows and columns, and its encoding as RowDescription, DataRow and
//! CommandComplete, in text or (for extended-protocol clients that ask) binary format.

use bytes::{BufMut, BytesMut};

/// The column types PgBouncer's console uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    Text,
    Int4,
    Int8,
    Numeric,
    Bytea,
}

impl ColumnType {
    pub fn oid(self) -> u32 {
        match self {
            ColumnType::Text => 25,
            ColumnType::Int4 => 23,
            ColumnType::Int8 => 20,
            ColumnType::Numeric => 1700,
            ColumnType::Bytea => 17,
        }
    }

    fn size(self) -> i16 {
        match self {
            ColumnType::Int4 => 4,
            ColumnType::Int8 => 8,
            ColumnType::Text | ColumnType::Numeric | ColumnType::Bytea => -1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    Text(String),
    Int(i64),
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::Text(s.to_string())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::Text(s)
    }
}

impl From<Option<String>> for Value {
    fn from(s: Option<String>) -> Value {
        s.map_or(Value::Null, Value::Text)
    }
}

macro_rules! int_value {
    ($($t:ty),*) => {$(
        impl From<$t> for Value {
            fn from(n: $t) -> Value {
                Value::Int(n as i64)
            }
        }
    )*};
}
int_value!(i32, i64, u16, u32, u64, usize);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultSet {
    pub columns: Vec<(&'static str, ColumnType)>,
    pub rows: Vec<Vec<Value>>,
    /// The CommandComplete tag, e.g. `SHOW`.
    pub tag: String,
}

impl ResultSet {
    pub fn new(columns: &[(&'static str, ColumnType)]) -> ResultSet {
        ResultSet { columns: columns.to_vec(), rows: Vec::new(), tag: "SHOW".into() }
    }

    /// Appends a row; a row of the wrong width is a bug in the caller.
    pub fn push(&mut self, row: Vec<Value>) {
        debug_assert_eq!(row.len(), self.columns.len(), "row width of a {} answer", self.tag);
        self.rows.push(row);
    }

    /// Column values by name, for tests and for `/metrics`.
    pub fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|(n, _)| *n == name)
    }

    /// Whether column `index` is sent in binary, given a Bind's result format codes.
    fn binary(formats: &[i16], index: usize) -> bool {
        match formats {
            [] => false,
            [one] => *one == 1,
            many => many.get(index) == Some(&1),
        }
    }

    pub fn encode_description(&self, buf: &mut BytesMut, formats: &[i16]) {
        buf.put_u8(b'T');
        let at = buf.len();
        buf.put_i32(0);
        buf.put_i16(self.columns.len() as i16);
        for (index, (name, ty)) in self.columns.iter().enumerate() {
            buf.put_slice(name.as_bytes());
            buf.put_u8(0);
            buf.put_u32(0); // table oid
            buf.put_i16(0); // column number
            buf.put_u32(ty.oid());
            buf.put_i16(ty.size());
            buf.put_i32(-1); // type modifier
            buf.put_i16(Self::binary(formats, index) as i16);
        }
        finish(buf, at);
    }

    pub fn encode_rows(&self, buf: &mut BytesMut, formats: &[i16]) {
        for row in &self.rows {
            buf.put_u8(b'D');
            let at = buf.len();
            buf.put_i32(0);
            buf.put_i16(row.len() as i16);
            for (index, (value, (_, ty))) in row.iter().zip(&self.columns).enumerate() {
                encode_value(buf, value, *ty, Self::binary(formats, index));
            }
            finish(buf, at);
        }
    }

    pub fn encode_complete(&self, buf: &mut BytesMut) {
        command_complete(buf, &self.tag);
    }

    /// The whole answer to a simple Query.
    pub fn encode(&self, buf: &mut BytesMut) {
        self.encode_description(buf, &[]);
        self.encode_rows(buf, &[]);
        self.encode_complete(buf);
    }
}

/// A NoticeResponse with a DETAIL field (`SHOW HELP`'s usage text).
pub fn notice(buf: &mut BytesMut, message: &str, detail: &str) {
    buf.put_u8(b'N');
    let at = buf.len();
    buf.put_i32(0);
    for (field, value) in
        [(b'S', "NOTICE"), (b'V', "NOTICE"), (b'C', "00000"), (b'M', message), (b'D', detail)]
    {
        buf.put_u8(field);
        buf.put_slice(value.as_bytes());
        buf.put_u8(0);
    }
    buf.put_u8(0);
    finish(buf, at);
}

pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    buf.put_u8(b'C');
    let at = buf.len();
    buf.put_i32(0);
    buf.put_slice(tag.as_bytes());
    buf.put_u8(0);
    finish(buf, at);
}

fn finish(buf: &mut BytesMut, at: usize) {
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn encode_value(buf: &mut BytesMut, value: &Value, ty: ColumnType, binary: bool) {
    let text = match value {
        Value::Null => {
            buf.put_i32(-1);
            return;
        }
        Value::Text(t) => t.clone(),
        Value::Int(n) => n.to_string(),
    };
    if !binary {
        buf.put_i32(text.len() as i32);
        buf.put_slice(text.as_bytes());
        return;
    }
    let as_int = || match value {
        Value::Int(n) => *n,
        _ => text.trim().parse().unwrap_or(0),
    };
    match ty {
        ColumnType::Text | ColumnType::Bytea => {
            buf.put_i32(text.len() as i32);
            buf.put_slice(text.as_bytes());
        }
        ColumnType::Int4 => {
            buf.put_i32(4);
            buf.put_i32(as_int() as i32);
        }
        ColumnType::Int8 => {
            buf.put_i32(8);
            buf.put_i64(as_int());
        }
        ColumnType::Numeric => {
            let numeric = numeric_binary(as_int());
            buf.put_i32(numeric.len() as i32);
            buf.put_slice(&numeric);
        }
    }
}

/// An integer in PostgreSQL's binary numeric format: base-10000 digits, most significant
/// first, with the weight of the first digit.
fn numeric_binary(n: i64) -> Vec<u8> {
    let mut magnitude = n.unsigned_abs();
    let mut digits = Vec::new();
    while magnitude > 0 {
        digits.push((magnitude % 10_000) as i16);
        magnitude /= 10_000;
    }
    digits.reverse();
    let weight = digits.len() as i16 - 1;
    // Trailing zero digits are implied by the weight.
    while digits.last() == Some(&0) {
        digits.pop();
    }
    let mut out = Vec::with_capacity(8 + digits.len() * 2);
    out.extend_from_slice(&(digits.len() as i16).to_be_bytes());
    out.extend_from_slice(&(if digits.is_empty() { 0 } else { weight }).to_be_bytes());
    out.extend_from_slice(&(if n < 0 { 0x4000u16 } else { 0 }).to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    for d in digits {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::message::backend::{DataRowBody, Message};

    fn sample() -> ResultSet {
        let mut set =
            ResultSet::new(&[("name", ColumnType::Text), ("n", ColumnType::Int8), ("x", ColumnType::Int4)]);
        set.push(vec!["a".into(), 7u64.into(), Value::Null]);
        set
    }

    fn values(row: &DataRowBody) -> Vec<Option<Vec<u8>>> {
        use fallible_iterator::FallibleIterator;
        let buf = row.buffer();
        row.ranges().map(|r| Ok(r.map(|r| buf[r].to_vec()))).collect().unwrap()
    }

    #[test]
    fn text_answer_parses_as_postgres_sends_it() {
        let mut buf = BytesMut::new();
        sample().encode(&mut buf);
        match Message::parse(&mut buf).unwrap().unwrap() {
            Message::RowDescription(d) => {
                use fallible_iterator::FallibleIterator;
                let fields: Vec<(String, u32, i16)> = d
                    .fields()
                    .map(|f| Ok((f.name().to_string(), f.type_oid(), f.format())))
                    .collect()
                    .unwrap();
                assert_eq!(fields, [("name".into(), 25, 0), ("n".into(), 20, 0), ("x".into(), 23, 0)]);
            }
            _ => panic!("expected RowDescription"),
        }
        match Message::parse(&mut buf).unwrap().unwrap() {
            Message::DataRow(row) => {
                assert_eq!(values(&row), [Some(b"a".to_vec()), Some(b"7".to_vec()), None])
            }
            _ => panic!("expected DataRow"),
        }
        match Message::parse(&mut buf).unwrap().unwrap() {
            Message::CommandComplete(c) => assert_eq!(c.tag().unwrap(), "SHOW"),
            _ => panic!("expected CommandComplete"),
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn binary_columns_where_asked() {
        let mut buf = BytesMut::new();
        sample().encode_rows(&mut buf, &[1]);
        match Message::parse(&mut buf).unwrap().unwrap() {
            Message::DataRow(row) => {
                assert_eq!(values(&row), [Some(b"a".to_vec()), Some(7i64.to_be_bytes().to_vec()), None])
            }
            _ => panic!("expected DataRow"),
        }
    }

    #[test]
    fn numeric_binary_matches_postgres() {
        // 123456789 = 1|2345|6789: three digits, weight 2.
        assert_eq!(numeric_binary(123_456_789), [0, 3, 0, 2, 0, 0, 0, 0, 0, 1, 0x09, 0x29, 0x1a, 0x85]);
        assert_eq!(numeric_binary(0), [0, 0, 0, 0, 0, 0, 0, 0]);
        // 20000 = 2|0000: trailing zero digit dropped, weight 1.
        assert_eq!(numeric_binary(20_000), [0, 1, 0, 1, 0, 0, 0, 0, 0, 2]);
        assert_eq!(&numeric_binary(-5)[4..6], &[0x40, 0]);
    }
}
