// A raw protocol client for tests that must send exactly what a misbehaving (or merely unusual)
// client sends: pipelines, Terminate in the same write as a query, names in pgcorral's own
// namespace, COPY messages in any order. Blocking std sockets with a read deadline, so a test
// that waits for an answer pgcorral never sends fails instead of hanging.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use postgres_protocol::message::frontend;

/// How long any single answer may take before the test calls it lost.
pub const ANSWER_DEADLINE: Duration = Duration::from_secs(15);

pub struct RawClient {
    pub stream: TcpStream,
}

/// One backend message: tag and body.
#[derive(Debug, Clone)]
pub struct Msg {
    pub tag: u8,
    pub body: Vec<u8>,
}

impl Msg {
    /// The SQLSTATE of an ErrorResponse or NoticeResponse.
    pub fn sqlstate(&self) -> Option<String> {
        self.field(b'C')
    }

    pub fn field(&self, code: u8) -> Option<String> {
        let mut rest = &self.body[..];
        while let Some((&c, tail)) = rest.split_first() {
            if c == 0 {
                return None;
            }
            let end = tail.iter().position(|&b| b == 0)?;
            if c == code {
                return Some(String::from_utf8_lossy(&tail[..end]).into_owned());
            }
            rest = &tail[end + 1..];
        }
        None
    }

    /// The text columns of a DataRow.
    pub fn columns(&self) -> Vec<Option<String>> {
        let b = &self.body;
        let count = i16::from_be_bytes([b[0], b[1]]) as usize;
        let mut at = 2;
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            let len = i32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
            at += 4;
            if len < 0 {
                out.push(None);
            } else {
                out.push(Some(String::from_utf8_lossy(&b[at..at + len as usize]).into_owned()));
                at += len as usize;
            }
        }
        out
    }
}

impl RawClient {
    /// Sends only the startup packet: the test speaks the authentication exchange itself.
    pub fn start(port: u16, user: &str, db: &str) -> RawClient {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to pgcorral");
        stream.set_read_timeout(Some(ANSWER_DEADLINE)).unwrap();
        let mut client = RawClient { stream };
        let mut buf = BytesMut::new();
        frontend::startup_message([("user", user), ("database", db)], &mut buf).unwrap();
        client.send(&buf);
        client
    }

    /// Logs in with a cleartext or trust exchange (the pooler under test uses `auth_type =
    /// plain` or `trust`) and reads up to the first ReadyForQuery.
    pub fn connect(port: u16, user: &str, password: &str, db: &str) -> RawClient {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to pgcorral");
        stream.set_read_timeout(Some(ANSWER_DEADLINE)).unwrap();
        stream.set_nodelay(true).unwrap();
        let mut client = RawClient { stream };
        let mut buf = BytesMut::new();
        frontend::startup_message([("user", user), ("database", db)], &mut buf).unwrap();
        client.send(&buf);
        loop {
            let m = client.read();
            match m.tag {
                b'R' if m.body[..4] == [0, 0, 0, 3] => {
                    let mut buf = BytesMut::new();
                    frontend::password_message(password.as_bytes(), &mut buf).unwrap();
                    client.send(&buf);
                }
                b'R' if m.body[..4] == [0, 0, 0, 0] => {}
                b'R' => panic!("the raw client speaks only cleartext and trust: {m:?}"),
                b'E' => panic!("login failed: {:?}", m.field(b'M')),
                b'Z' => return client,
                _ => {}
            }
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write to pgcorral");
    }

    /// The next message; panics if none comes within [`ANSWER_DEADLINE`].
    pub fn read(&mut self) -> Msg {
        self.try_read().unwrap_or_else(|e| panic!("no answer from pgcorral: {e}"))
    }

    pub fn try_read(&mut self) -> std::io::Result<Msg> {
        let mut head = [0u8; 5];
        self.stream.read_exact(&mut head)?;
        let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        self.stream.read_exact(&mut body)?;
        Ok(Msg { tag: head[0], body })
    }

    /// Messages up to and including the next ReadyForQuery.
    pub fn until_ready(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        loop {
            let m = self.read();
            let done = m.tag == b'Z';
            out.push(m);
            if done {
                return out;
            }
        }
    }

    /// Runs one simple query and returns every message up to its ReadyForQuery.
    pub fn simple(&mut self, sql: &str) -> Vec<Msg> {
        self.send(&query(sql));
        self.until_ready()
    }
}

/// A startup packet asking for protocol `major.minor` with `params`.
pub fn startup(major: u16, minor: u16, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = BytesMut::new();
    body.put_u16(major);
    body.put_u16(minor);
    for (name, value) in params {
        body.put_slice(name.as_bytes());
        body.put_u8(0);
        body.put_slice(value.as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    packet
}

/// The next message on `stream`; panics if there is none.
pub fn read_msg(stream: &mut TcpStream) -> Msg {
    let mut head = [0u8; 5];
    stream.read_exact(&mut head).expect("a message");
    let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0u8; len - 4];
    stream.read_exact(&mut body).expect("a message body");
    Msg { tag: head[0], body }
}

/// A session logged in with a protocol version of the test's choosing, and the cancel key it
/// was given, whatever its length.
pub struct KeyedSession {
    pub stream: TcpStream,
    pub process_id: i32,
    pub key: Vec<u8>,
}

impl KeyedSession {
    /// Logs in over protocol `3.minor` with a cleartext or trust exchange.
    pub fn login(
        addr: impl std::net::ToSocketAddrs,
        minor: u16,
        user: &str,
        password: &str,
        db: &str,
    ) -> KeyedSession {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        stream.write_all(&startup(3, minor, &[("user", user), ("database", db)])).unwrap();
        let mut key_data = None;
        loop {
            let m = read_msg(&mut stream);
            match m.tag {
                b'R' if m.body[..4] == [0, 0, 0, 3] => {
                    let mut buf = BytesMut::new();
                    frontend::password_message(password.as_bytes(), &mut buf).unwrap();
                    stream.write_all(&buf).unwrap();
                }
                b'K' => key_data = Some(m.body),
                b'E' => panic!("login failed: {:?}", m.field(b'M')),
                b'Z' => break,
                _ => {}
            }
        }
        let body = key_data.expect("BackendKeyData");
        KeyedSession {
            stream,
            process_id: i32::from_be_bytes(body[..4].try_into().unwrap()),
            key: body[4..].to_vec(),
        }
    }

    /// Sends `sql`, runs `meanwhile` once it has had a moment to start (a cancel, say), and
    /// reads until ReadyForQuery; returns the SQLSTATE it ended with (None: it ran to the end)
    /// and how long it took.
    pub fn query_while(&mut self, sql: &str, meanwhile: impl FnOnce(&Self)) -> (Option<String>, Duration) {
        let started = std::time::Instant::now();
        self.stream.write_all(&query(sql)).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        meanwhile(self);
        let mut error = None;
        loop {
            let m = read_msg(&mut self.stream);
            match m.tag {
                b'E' => error = m.sqlstate(),
                b'Z' => return (error, started.elapsed()),
                _ => {}
            }
        }
    }
}

/// Sends a CancelRequest with a key of any length to `addr`, and waits until it is closed.
pub fn send_cancel(addr: impl std::net::ToSocketAddrs, process_id: i32, key: &[u8]) {
    let mut request = ((12 + key.len()) as i32).to_be_bytes().to_vec();
    request.extend_from_slice(&80_877_102i32.to_be_bytes());
    request.extend_from_slice(&process_id.to_be_bytes());
    request.extend_from_slice(key);
    let mut stream = TcpStream::connect(addr).expect("connect for a cancel");
    stream.set_read_timeout(Some(ANSWER_DEADLINE)).unwrap();
    stream.write_all(&request).unwrap();
    let _ = stream.read(&mut [0u8; 1]);
}

/// The tags of `messages`, as a string for readable assertions ("12DCZ").
pub fn tags(messages: &[Msg]) -> String {
    messages.iter().map(|m| m.tag as char).collect()
}

pub fn query(sql: &str) -> BytesMut {
    let mut b = BytesMut::new();
    frontend::query(sql, &mut b).unwrap();
    b
}

pub fn parse(name: &str, sql: &str) -> BytesMut {
    let mut b = BytesMut::new();
    frontend::parse(name, sql, std::iter::empty(), &mut b).unwrap();
    b
}

/// Bind with text parameters and text results.
pub fn bind(statement: &str, params: &[&str]) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u8(b'B');
    let mut body = BytesMut::new();
    body.put_u8(0); // unnamed portal
    body.extend_from_slice(statement.as_bytes());
    body.put_u8(0);
    body.put_i16(0); // all parameters in text
    body.put_i16(params.len() as i16);
    for p in params {
        body.put_i32(p.len() as i32);
        body.extend_from_slice(p.as_bytes());
    }
    body.put_i16(0); // all results in text
    b.put_i32(4 + body.len() as i32);
    b.extend_from_slice(&body);
    b
}

pub fn describe_statement(name: &str) -> BytesMut {
    let mut b = BytesMut::new();
    frontend::describe(b'S', name, &mut b).unwrap();
    b
}

pub fn close_statement(name: &str) -> BytesMut {
    let mut b = BytesMut::new();
    frontend::close(b'S', name, &mut b).unwrap();
    b
}

pub fn execute() -> BytesMut {
    let mut b = BytesMut::new();
    frontend::execute("", 0, &mut b).unwrap();
    b
}

pub fn sync() -> BytesMut {
    let mut b = BytesMut::new();
    frontend::sync(&mut b);
    b
}

pub fn terminate() -> BytesMut {
    let mut b = BytesMut::new();
    frontend::terminate(&mut b);
    b
}

pub fn copy_data(data: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u8(b'd');
    b.put_i32(4 + data.len() as i32);
    b.extend_from_slice(data);
    b
}

pub fn copy_done() -> BytesMut {
    let mut b = BytesMut::new();
    frontend::copy_done(&mut b);
    b
}

/// Several messages as one write.
pub fn batch(parts: &[BytesMut]) -> Vec<u8> {
    parts.iter().flat_map(|p| p.iter().copied()).collect()
}
