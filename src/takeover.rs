//! Online restart (`pgcorral -R`): what the old and the new process say to each other over the
//! takeover socket, `<unix_socket_dir>/.s.PGSQL.<port>.takeover`. The messages only, without
//! I/O; `actors/takeover.rs` runs the exchange.
//!
//! The new process connects and asks to take over. The old one hands over its listening
//! sockets (so not one queued connection is lost), then each client as soon as it is idle
//! between transactions: its socket, passed alongside the message with SCM_RIGHTS, and what its
//! session holds ([`MovedClient`]). It says [`Message::Done`] when no client is left to move.
//! Meanwhile the new process sends it the cancel requests for the clients still there.
//!
//! A message is a kind byte, a 4-byte big-endian body length, and the body. How many file
//! descriptors travel with it follows from its kind.

use thiserror::Error;

/// Both sides must speak the same version; a new binary that changes the format bumps it.
pub const VERSION: u32 = 1;
/// The longest body either side accepts: a client's statement books are capped at 16 MiB.
pub const MAX_BODY: usize = 64 << 20;

const TAKEOVER: u8 = b'T';
const LISTENERS: u8 = b'L';
const CLIENT: u8 = b'C';
const DONE: u8 = b'D';
const CANCEL: u8 = b'X';
const REFUSED: u8 = b'R';

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TakeoverError {
    #[error("takeover message {kind:?} is malformed: {what}")]
    Malformed { kind: char, what: &'static str },
    #[error("unknown takeover message {0:?}")]
    UnknownKind(char),
    #[error("takeover message of {0} bytes is over the limit")]
    TooLong(usize),
}

/// What a listening socket handed over is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    Tcp,
    Unix,
    /// `metrics_addr`'s HTTP socket.
    Metrics,
}

/// One named prepared statement of a client, as the client defined it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MovedStatement {
    pub name: String,
    pub query: String,
    pub param_types: Vec<u8>,
}

/// A client's session parameters: the reported ones with the value it was last told, and the
/// unreported ones it set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParamSet {
    pub reported: Vec<(String, String)>,
    pub session: Vec<(String, String)>,
}

/// Everything an idle client's session holds that the new process needs to go on serving it
/// as if nothing happened: who it is, its cancel key, its parameters (now, and as it logged in,
/// for `RESET`), and its prepared statements.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MovedClient {
    pub database: String,
    pub user: String,
    pub application_name: String,
    pub process_id: i32,
    pub secret_key: Vec<u8>,
    pub params: ParamSet,
    pub initial_params: ParamSet,
    pub statements: Vec<MovedStatement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// New → old: hand everything over.
    Takeover { version: u32 },
    /// Old → new: the listening sockets, one descriptor each, in this order.
    Listeners(Vec<ListenerKind>),
    /// Old → new: one idle client; its socket is the one descriptor.
    Client(Box<MovedClient>),
    /// Old → new: no client is left to move; the old process exits.
    Done,
    /// New → old: a cancel request for a key the new process does not know.
    Cancel { process_id: i32, secret_key: Vec<u8> },
    /// Old → new: no takeover, and why.
    Refused(String),
}

impl Message {
    /// How many descriptors travel with this message.
    pub fn descriptors(&self) -> usize {
        match self {
            Message::Listeners(kinds) => kinds.len(),
            Message::Client(_) => 1,
            _ => 0,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        let kind = match self {
            Message::Takeover { version } => {
                put_u32(&mut body, *version);
                TAKEOVER
            }
            Message::Listeners(kinds) => {
                put_u32(&mut body, kinds.len() as u32);
                for kind in kinds {
                    body.push(match kind {
                        ListenerKind::Tcp => b't',
                        ListenerKind::Unix => b'u',
                        ListenerKind::Metrics => b'm',
                    });
                }
                LISTENERS
            }
            Message::Client(client) => {
                encode_client(&mut body, client);
                CLIENT
            }
            Message::Done => DONE,
            Message::Cancel { process_id, secret_key } => {
                put_u32(&mut body, *process_id as u32);
                put_bytes(&mut body, secret_key);
                CANCEL
            }
            Message::Refused(reason) => {
                put_bytes(&mut body, reason.as_bytes());
                REFUSED
            }
        };
        let mut out = Vec::with_capacity(5 + body.len());
        out.push(kind);
        put_u32(&mut out, body.len() as u32);
        out.extend_from_slice(&body);
        out
    }

    /// The message at the start of `buf`, and its length; None while it is incomplete.
    pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, TakeoverError> {
        let Some(header) = buf.get(..5) else { return Ok(None) };
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if len > MAX_BODY {
            return Err(TakeoverError::TooLong(len));
        }
        let Some(body) = buf.get(5..5 + len) else { return Ok(None) };
        let kind = header[0];
        let mut r = Reader { buf: body, kind: kind as char };
        let message = match kind {
            TAKEOVER => Message::Takeover { version: r.u32()? },
            LISTENERS => {
                let count = r.u32()? as usize;
                let mut kinds = Vec::with_capacity(count.min(r.buf.len()));
                for _ in 0..count {
                    kinds.push(match r.u8()? {
                        b't' => ListenerKind::Tcp,
                        b'u' => ListenerKind::Unix,
                        b'm' => ListenerKind::Metrics,
                        _ => return Err(r.malformed("unknown listener kind")),
                    });
                }
                Message::Listeners(kinds)
            }
            CLIENT => Message::Client(Box::new(decode_client(&mut r)?)),
            DONE => Message::Done,
            CANCEL => Message::Cancel { process_id: r.u32()? as i32, secret_key: r.bytes()?.to_vec() },
            REFUSED => Message::Refused(r.string()?),
            other => return Err(TakeoverError::UnknownKind(other as char)),
        };
        if !r.buf.is_empty() {
            return Err(r.malformed("bytes after the end"));
        }
        Ok(Some((message, 5 + len)))
    }
}

fn put_u32(out: &mut Vec<u8>, n: u32) {
    out.extend_from_slice(&n.to_be_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_u32(out, bytes.len() as u32);
    out.extend_from_slice(bytes);
}

fn put_pairs(out: &mut Vec<u8>, pairs: &[(String, String)]) {
    put_u32(out, pairs.len() as u32);
    for (name, value) in pairs {
        put_bytes(out, name.as_bytes());
        put_bytes(out, value.as_bytes());
    }
}

fn encode_client(out: &mut Vec<u8>, c: &MovedClient) {
    put_bytes(out, c.database.as_bytes());
    put_bytes(out, c.user.as_bytes());
    put_bytes(out, c.application_name.as_bytes());
    put_u32(out, c.process_id as u32);
    put_bytes(out, &c.secret_key);
    for set in [&c.params, &c.initial_params] {
        put_pairs(out, &set.reported);
        put_pairs(out, &set.session);
    }
    put_u32(out, c.statements.len() as u32);
    for s in &c.statements {
        put_bytes(out, s.name.as_bytes());
        put_bytes(out, s.query.as_bytes());
        put_bytes(out, &s.param_types);
    }
}

fn decode_client(r: &mut Reader<'_>) -> Result<MovedClient, TakeoverError> {
    let mut c = MovedClient {
        database: r.string()?,
        user: r.string()?,
        application_name: r.string()?,
        process_id: r.u32()? as i32,
        secret_key: r.bytes()?.to_vec(),
        ..MovedClient::default()
    };
    for set in [&mut c.params, &mut c.initial_params] {
        set.reported = r.pairs()?;
        set.session = r.pairs()?;
    }
    let count = r.u32()? as usize;
    for _ in 0..count {
        c.statements.push(MovedStatement {
            name: r.string()?,
            query: r.string()?,
            param_types: r.bytes()?.to_vec(),
        });
    }
    Ok(c)
}

/// Reads a body front to back; every read is bounded by what is left.
struct Reader<'a> {
    buf: &'a [u8],
    kind: char,
}

impl<'a> Reader<'a> {
    fn malformed(&self, what: &'static str) -> TakeoverError {
        TakeoverError::Malformed { kind: self.kind, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], TakeoverError> {
        if self.buf.len() < n {
            return Err(self.malformed("cut short"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, TakeoverError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, TakeoverError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn bytes(&mut self) -> Result<&'a [u8], TakeoverError> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    fn string(&mut self) -> Result<String, TakeoverError> {
        let bytes = self.bytes()?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.malformed("a name that is not UTF-8"))
    }

    fn pairs(&mut self) -> Result<Vec<(String, String)>, TakeoverError> {
        let count = self.u32()? as usize;
        // Each pair takes at least 8 bytes: a huge count cannot allocate beyond the body.
        let mut pairs = Vec::with_capacity(count.min(self.buf.len() / 8));
        for _ in 0..count {
            pairs.push((self.string()?, self.string()?));
        }
        Ok(pairs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn client() -> MovedClient {
        MovedClient {
            database: "app".into(),
            user: "app_user".into(),
            application_name: "worker".into(),
            process_id: 0x0102_0304,
            secret_key: vec![9; 32],
            params: ParamSet {
                reported: vec![("TimeZone".into(), "UTC".into())],
                session: vec![("search_path".into(), "app, public".into())],
            },
            initial_params: ParamSet {
                reported: vec![("TimeZone".into(), "Europe/Paris".into())],
                session: vec![],
            },
            statements: vec![MovedStatement {
                name: "s1".into(),
                query: "SELECT $1::int".into(),
                param_types: vec![0, 0, 0, 23],
            }],
        }
    }

    #[test]
    fn every_message_reads_back_as_written() {
        let messages = [
            Message::Takeover { version: VERSION },
            Message::Listeners(vec![ListenerKind::Tcp, ListenerKind::Unix, ListenerKind::Metrics]),
            Message::Client(Box::new(client())),
            Message::Done,
            Message::Cancel { process_id: -5, secret_key: vec![1, 2, 3, 4] },
            Message::Refused("already shutting down".into()),
        ];
        let mut stream = Vec::new();
        for m in &messages {
            stream.extend(m.encode());
        }
        let mut at = 0;
        for m in &messages {
            let (read, len) = Message::decode(&stream[at..]).unwrap().unwrap();
            assert_eq!(&read, m);
            at += len;
        }
        assert_eq!(at, stream.len());
        assert_eq!(Message::Client(Box::new(client())).descriptors(), 1);
        assert_eq!(Message::Listeners(vec![ListenerKind::Tcp; 3]).descriptors(), 3);
    }

    #[test]
    fn incomplete_and_malformed_messages_are_told_apart() {
        let whole = Message::Client(Box::new(client())).encode();
        for cut in 0..whole.len() {
            assert_eq!(Message::decode(&whole[..cut]), Ok(None), "cut at {cut}");
        }
        let mut lying = whole.clone();
        lying[5..9].copy_from_slice(&u32::MAX.to_be_bytes()); // a database name "4 GiB" long
        assert!(matches!(Message::decode(&lying), Err(TakeoverError::Malformed { .. })));
        let mut huge = vec![CLIENT];
        huge.extend_from_slice(&(MAX_BODY as u32 + 1).to_be_bytes());
        assert_eq!(Message::decode(&huge), Err(TakeoverError::TooLong(MAX_BODY + 1)));
        assert_eq!(Message::decode(&[b'?', 0, 0, 0, 0]), Err(TakeoverError::UnknownKind('?')));
        let mut trailing = Message::Done.encode();
        trailing[4] = 1;
        trailing.push(0);
        assert!(matches!(Message::decode(&trailing), Err(TakeoverError::Malformed { .. })));
    }

    proptest! {
        /// Whatever the bytes, decoding ends with a message, a wait for more, or an error,
        /// and never reads or allocates beyond what it was given.
        #[test]
        fn decoding_arbitrary_bytes_is_safe(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(Some((message, len))) = Message::decode(&bytes) {
                prop_assert!(len <= bytes.len());
                prop_assert_eq!(Message::decode(&message.encode()).unwrap().unwrap().0, message);
            }
        }

        #[test]
        fn moved_clients_survive_the_trip(
            database in ".{0,20}", user in ".{0,20}", pid in any::<i32>(),
            secret in proptest::collection::vec(any::<u8>(), 4..40),
            set in proptest::collection::vec((".{0,10}", ".{0,10}"), 0..5),
            statements in proptest::collection::vec((".{0,10}", ".{0,40}", proptest::collection::vec(any::<u8>(), 0..8)), 0..5),
        ) {
            let moved = MovedClient {
                database, user, application_name: String::new(), process_id: pid, secret_key: secret,
                params: ParamSet { reported: set.clone(), session: set.clone() },
                initial_params: ParamSet { reported: set, session: vec![] },
                statements: statements.into_iter().map(|(name, query, param_types)| MovedStatement { name, query, param_types }).collect(),
            };
            let m = Message::Client(Box::new(moved));
            prop_assert_eq!(Message::decode(&m.encode()).unwrap().unwrap().0, m);
        }
    }
}
