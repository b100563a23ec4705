//! Protocol-level named prepared statements in transaction and statement mode.
//!
//! A client's statements live in its own books ([`ClientStatements`]): its name maps to the
//! query and parameter types. On a server they live under a name derived from their content
//! (`pgcorral_` + 128 bits of SHA-256 of query and types), so that any server can serve any
//! client that prepared the same text, and a server keeps at most `max_prepared_statements`
//! of them ([`ServerStatements`], least recently used closed first).
//!
//! Rewriting, message by message ([`Rewriter::client_message`]):
//! - Parse of a named statement: recorded in the client's books; sent as Parse of the server
//!   name, or, when the server has it already, as a Parse and Close of a scratch name, so that
//!   the client's ParseComplete still comes from PostgreSQL in its place in the stream.
//! - Bind and Describe of a named statement: the server name; a Parse is sent first when the
//!   leased server lacks it, and its ParseComplete is swallowed.
//! - Close of a named statement: answered by PostgreSQL on a name that does not exist (Close
//!   of an unknown name is not an error), the server keeps the statement for others.
//! - Names the client never prepared pass through unchanged, so PostgreSQL's own error
//!   (`26000 prepared statement "x" does not exist`) reaches the client; a reused name gets
//!   `42P05 ... already exists` from PostgreSQL, with the client's name put back in the text.
//!
//! Nothing is invented: every response the client sees was sent by PostgreSQL, and the only
//! server messages dropped are the ParseComplete and CloseComplete of messages pgcorral added.
//! Those are matched by kind and order (one FIFO per kind), and forgotten when an error makes
//! PostgreSQL skip the rest of the batch up to Sync. Pure: no I/O, tested message by message.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use sha2::{Digest, Sha256};

use super::ProtocolError;

/// A client's statement: what is prepared and under which name servers know it.
#[derive(Debug, PartialEq, Eq)]
pub struct StatementDef {
    pub query: String,
    /// The Parse message's parameter type OIDs, as sent (big-endian bytes).
    pub param_types: Vec<u8>,
    pub server_name: String,
}

impl StatementDef {
    pub fn new(query: String, param_types: Vec<u8>) -> StatementDef {
        let mut hash = Sha256::new();
        hash.update(query.as_bytes());
        hash.update([0]);
        hash.update(&param_types);
        let digest = hash.finalize();
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        StatementDef { query, param_types, server_name: format!("pgcorral_{hex}") }
    }
}

/// A name no statement ever has: Close of it is answered CloseComplete without effect.
const NOTHING: &str = "pgcorral_nothing";
/// Takes a Parse whose statement the server already has, and is closed right after.
const SCRATCH: &str = "pgcorral_scratch";

/// What one client's statement books may hold: their texts, names and a fixed overhead per
/// statement. PostgreSQL sets no limit of its own; without one, a client could make pgcorral
/// hold any amount of memory.
pub const MAX_CLIENT_STATEMENT_BYTES: usize = 16 << 20;
const STATEMENT_OVERHEAD: usize = 128;

/// One client's named statements.
#[derive(Debug, Default)]
pub struct ClientStatements {
    by_name: HashMap<String, Arc<StatementDef>>,
    /// What the books hold, as counted against [`MAX_CLIENT_STATEMENT_BYTES`].
    bytes: usize,
}

fn weight(name: &str, def: &StatementDef) -> usize {
    name.len() + def.query.len() + def.param_types.len() + def.server_name.len() + STATEMENT_OVERHEAD
}

impl ClientStatements {
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<StatementDef>> {
        self.by_name.get(name)
    }

    /// `DEALLOCATE name`: whether the client had it.
    pub fn remove(&mut self, name: &str) -> bool {
        match self.by_name.remove_entry(name) {
            Some((name, def)) => {
                self.bytes -= weight(&name, &def);
                true
            }
            None => false,
        }
    }

    /// `DEALLOCATE ALL`, `DISCARD ALL`.
    pub fn clear(&mut self) {
        self.by_name.clear();
        self.bytes = 0;
    }

    /// Records a new statement, within [`MAX_CLIENT_STATEMENT_BYTES`].
    fn insert(&mut self, name: String, def: Arc<StatementDef>) -> Result<(), ProtocolError> {
        let added = weight(&name, &def);
        if self.bytes + added > MAX_CLIENT_STATEMENT_BYTES {
            return Err(ProtocolError::TooManyStatements { limit: MAX_CLIENT_STATEMENT_BYTES });
        }
        self.bytes += added;
        if let Some(old) = self.by_name.insert(name.clone(), def) {
            self.bytes -= weight(&name, &old);
        }
        Ok(())
    }

    /// The client's name for a server name, to put back into PostgreSQL's error messages.
    fn client_name(&self, server_name: &str) -> Option<&str> {
        self.by_name.iter().find(|(_, def)| def.server_name == server_name).map(|(name, _)| name.as_str())
    }
}

/// The statements one server connection holds (or is about to), least recently used first.
#[derive(Debug, Default)]
pub struct ServerStatements {
    /// Confirmed by ParseComplete, in use order (front: least recently used).
    present: VecDeque<String>,
    /// Parse sent, ParseComplete not yet seen.
    pending: Vec<String>,
}

impl ServerStatements {
    pub fn len(&self) -> usize {
        self.present.len()
    }

    pub fn is_empty(&self) -> bool {
        self.present.is_empty()
    }

    fn has(&self, name: &str) -> bool {
        self.pending.iter().any(|n| n == name) || self.present.iter().any(|n| n == name)
    }

    fn touch(&mut self, name: &str) {
        if let Some(at) = self.present.iter().position(|n| n == name) {
            let name = self.present.remove(at).unwrap();
            self.present.push_back(name);
        }
    }

    fn confirm(&mut self, name: &str) {
        self.pending.retain(|n| n != name);
        if !self.present.iter().any(|n| n == name) {
            self.present.push_back(name.to_string());
        }
    }

    fn forget_pending(&mut self, name: &str) {
        self.pending.retain(|n| n != name);
    }

    /// `DISCARD ALL` / `DEALLOCATE ALL` ran on the server.
    pub fn clear(&mut self) {
        self.present.clear();
        self.pending.clear();
    }
}

#[derive(Debug)]
struct ParseSent {
    /// Number of ReadyForQuery the server owed before this message's batch ends.
    batch: u64,
    swallow: bool,
    server_name: Option<String>,
    /// The client name this Parse added to the books, to take back if it fails.
    client_added: Option<String>,
}

#[derive(Debug)]
struct CloseSent {
    batch: u64,
    swallow: bool,
}

/// A client's `DEALLOCATE name` sent as `DEALLOCATE pgcorral_…`: the books change only once
/// PostgreSQL confirms it (it fails in an aborted transaction, and the statement stays).
#[derive(Debug)]
struct DeallocateSent {
    batch: u64,
    client_name: String,
    server_name: String,
}

/// A Bind or Describe of a reserved name the client never prepared, sent as [`NOTHING`]: the
/// client's own spelling goes back into PostgreSQL's `does not exist` error.
#[derive(Debug)]
struct UnknownSent {
    batch: u64,
    client_name: String,
}

/// What a CommandComplete did to the statement books.
#[derive(Debug, PartialEq, Eq)]
pub enum BooksAfter {
    Exact,
    /// SQL-level PREPARE or DEALLOCATE that pgcorral did not write: the server may now hold
    /// statements under pgcorral's names that pgcorral did not prepare, or lack ones it did. It
    /// must not serve another client.
    Untrusted,
}

/// What a client message became.
#[derive(Debug, PartialEq, Eq)]
pub enum Rewritten {
    /// Send it as it is.
    Unchanged,
    /// Send these bytes instead (one or more whole messages).
    Replaced(BytesMut),
}

/// What to do with a server message.
#[derive(Debug, PartialEq, Eq)]
pub enum ServerVerdict {
    Forward,
    /// A response to a message pgcorral added: the client must not see it.
    Swallow,
    /// An ErrorResponse naming pgcorral's statement names, with the client's names put back.
    Replace(BytesMut),
}

/// The bookkeeping of one lease: which ParseComplete and CloseComplete are pgcorral's.
#[derive(Debug, Default)]
pub struct Rewriter {
    /// Messages sent that end with a ReadyForQuery (Query, Sync, FunctionCall).
    batches_sent: u64,
    /// ReadyForQuery received.
    batches_done: u64,
    parses: VecDeque<ParseSent>,
    closes: VecDeque<CloseSent>,
    deallocates: VecDeque<DeallocateSent>,
    unknown: VecDeque<UnknownSent>,
}

impl Rewriter {
    /// Nothing pgcorral added is still waiting for its answer.
    pub fn settled(&self) -> bool {
        self.parses.is_empty() && self.closes.is_empty() && self.deallocates.is_empty()
    }

    /// `n` Syncs sent were taken by a COPY reader and will never be answered: the batches
    /// after them are numbered as PostgreSQL will answer them.
    pub fn syncs_ignored(&mut self, n: u32) {
        if n == 0 {
            return;
        }
        let n = u64::from(n);
        self.batches_sent = self.batches_sent.saturating_sub(n).max(self.batches_done);
        let done = self.batches_done;
        let renumber = |batch: &mut u64| {
            if *batch > done {
                *batch = batch.saturating_sub(n).max(done);
            }
        };
        self.parses.iter_mut().for_each(|p| renumber(&mut p.batch));
        self.closes.iter_mut().for_each(|c| renumber(&mut c.batch));
    }

    /// Rewrites one client message (`frame`: tag, length and body). `capacity` is
    /// `max_prepared_statements`.
    pub fn client_message(
        &mut self,
        frame: &[u8],
        client: &mut ClientStatements,
        server: &mut ServerStatements,
        capacity: usize,
    ) -> Result<Rewritten, ProtocolError> {
        let tag = frame[0];
        let body = &frame[5..];
        let batch = self.batches_sent;
        let out = match tag {
            b'Q' => {
                self.batches_sent += 1;
                // A Query too long to be a DEALLOCATE streams and arrives here unterminated.
                let Ok((query, _)) = cstr(body, "Query") else { return Ok(Rewritten::Unchanged) };
                // DISCARD ALL and DEALLOCATE ALL are judged by their CommandComplete
                // ([`Rewriter::command_complete`]): inside a transaction block they fail.
                let Some(Some(name)) = deallocate_target(query) else { return Ok(Rewritten::Unchanged) };
                let Some(def) = client.get(&name).cloned() else { return Ok(Rewritten::Unchanged) };
                if !server.present.iter().any(|n| *n == def.server_name) {
                    // Not on this server (yet): forgotten here, PostgreSQL's answer comes from a
                    // statement that certainly exists nowhere (26000), as DEALLOCATE would give
                    // were it not known at all. Rare: drivers DEALLOCATE outside transactions,
                    // which the relay answers without a server.
                    return Ok(Rewritten::Unchanged);
                }
                let sql = format!("DEALLOCATE {}", def.server_name);
                self.deallocates.push_back(DeallocateSent {
                    batch,
                    client_name: name,
                    server_name: def.server_name.clone(),
                });
                let mut out = BytesMut::new();
                out.put_u8(b'Q');
                out.put_i32((4 + sql.len() + 1) as i32);
                put_cstr(&mut out, &sql);
                return Ok(Rewritten::Replaced(out));
            }
            b'S' | b'F' => {
                self.batches_sent += 1;
                return Ok(Rewritten::Unchanged);
            }
            b'P' => {
                // An unnamed Parse may arrive as its first byte only: its query streams.
                if body.first() == Some(&0) {
                    self.parses.push_back(ParseSent {
                        batch,
                        swallow: false,
                        server_name: None,
                        client_added: None,
                    });
                    return Ok(Rewritten::Unchanged);
                }
                let (name, query, types) = read_parse(body)?;
                let mut out = BytesMut::new();
                if let Some(existing) = client.get(&name).cloned() {
                    // A reused name: PostgreSQL itself refuses the second Parse of a name it
                    // has; the error's text gets the client's name back on its way out.
                    self.ensure(&existing, server, capacity, batch, &mut out);
                    write_parse(&mut out, &existing.server_name, &existing.query, &existing.param_types);
                    self.parses.push_back(ParseSent {
                        batch,
                        swallow: false,
                        server_name: None,
                        client_added: None,
                    });
                    return Ok(Rewritten::Replaced(out));
                }
                let def = Arc::new(StatementDef::new(query, types));
                client.insert(name.clone(), def.clone())?;
                if server.has(&def.server_name) {
                    write_parse(&mut out, SCRATCH, &def.query, &def.param_types);
                    write_close(&mut out, b'S', SCRATCH);
                    self.parses.push_back(ParseSent {
                        batch,
                        swallow: false,
                        server_name: None,
                        client_added: Some(name),
                    });
                    self.closes.push_back(CloseSent { batch, swallow: true });
                    server.touch(&def.server_name);
                } else {
                    self.make_room(server, capacity, batch, &mut out);
                    write_parse(&mut out, &def.server_name, &def.query, &def.param_types);
                    server.pending.push(def.server_name.clone());
                    self.parses.push_back(ParseSent {
                        batch,
                        swallow: false,
                        server_name: Some(def.server_name.clone()),
                        client_added: Some(name),
                    });
                }
                out
            }
            b'B' => {
                let (portal, statement, rest) = read_bind(body)?;
                let mut out = BytesMut::new();
                let Some(def) = client.get(statement).cloned() else {
                    if !is_reserved(statement) {
                        return Ok(Rewritten::Unchanged);
                    }
                    self.unknown.push_back(UnknownSent { batch, client_name: statement.to_string() });
                    write_bind(&mut out, portal, NOTHING, rest, declared_rest(frame, portal, statement));
                    return Ok(Rewritten::Replaced(out));
                };
                self.ensure(&def, server, capacity, batch, &mut out);
                write_bind(&mut out, portal, &def.server_name, rest, declared_rest(frame, portal, statement));
                out
            }
            b'D' | b'C' => {
                let (kind, name) = read_target(body)?;
                if tag == b'C' {
                    let forwarded_name = match client.get(name) {
                        Some(_) if kind == b'S' => {
                            client.remove(name);
                            NOTHING
                        }
                        // Closing a statement one never prepared is a no-op in PostgreSQL;
                        // under a reserved name it would close pgcorral's.
                        None if kind == b'S' && is_reserved(name) => NOTHING,
                        _ => {
                            self.closes.push_back(CloseSent { batch, swallow: false });
                            return Ok(Rewritten::Unchanged);
                        }
                    };
                    self.closes.push_back(CloseSent { batch, swallow: false });
                    let mut out = BytesMut::new();
                    write_close(&mut out, kind, forwarded_name);
                    out
                } else {
                    let mut out = BytesMut::new();
                    let Some(def) = client.get(name).cloned().filter(|_| kind == b'S') else {
                        if kind != b'S' || !is_reserved(name) {
                            return Ok(Rewritten::Unchanged);
                        }
                        self.unknown.push_back(UnknownSent { batch, client_name: name.to_string() });
                        write_describe(&mut out, kind, NOTHING);
                        return Ok(Rewritten::Replaced(out));
                    };
                    self.ensure(&def, server, capacity, batch, &mut out);
                    write_describe(&mut out, kind, &def.server_name);
                    out
                }
            }
            _ => return Ok(Rewritten::Unchanged),
        };
        Ok(Rewritten::Replaced(out))
    }

    /// Prepares `def` on the server first when it lacks it (its ParseComplete swallowed).
    fn ensure(
        &mut self,
        def: &StatementDef,
        server: &mut ServerStatements,
        capacity: usize,
        batch: u64,
        out: &mut BytesMut,
    ) {
        if server.has(&def.server_name) {
            server.touch(&def.server_name);
            return;
        }
        self.make_room(server, capacity, batch, out);
        write_parse(out, &def.server_name, &def.query, &def.param_types);
        server.pending.push(def.server_name.clone());
        self.parses.push_back(ParseSent {
            batch,
            swallow: true,
            server_name: Some(def.server_name.clone()),
            client_added: None,
        });
    }

    /// Closes the least recently used statements while the server is at `capacity`.
    fn make_room(&mut self, server: &mut ServerStatements, capacity: usize, batch: u64, out: &mut BytesMut) {
        while capacity > 0 && server.present.len() + server.pending.len() >= capacity {
            let Some(oldest) = server.present.pop_front() else { break };
            write_close(out, b'S', &oldest);
            self.closes.push_back(CloseSent { batch, swallow: true });
        }
    }

    /// Judges one server message (`frame`: tag, length and body).
    pub fn server_message(
        &mut self,
        frame: &[u8],
        client: &mut ClientStatements,
        server: &mut ServerStatements,
    ) -> ServerVerdict {
        match frame[0] {
            b'1' => {
                let Some(sent) = self.parses.pop_front() else { return ServerVerdict::Forward };
                if let Some(name) = &sent.server_name {
                    server.confirm(name);
                }
                if sent.swallow {
                    ServerVerdict::Swallow
                } else {
                    ServerVerdict::Forward
                }
            }
            b'3' => match self.closes.pop_front() {
                Some(sent) if sent.swallow => ServerVerdict::Swallow,
                _ => ServerVerdict::Forward,
            },
            b'Z' => {
                self.batches_done += 1;
                let done = self.batches_done;
                while self.unknown.front().is_some_and(|u| u.batch < done) {
                    self.unknown.pop_front();
                }
                ServerVerdict::Forward
            }
            b'E' => {
                // PostgreSQL skips everything up to the batch's Sync: what was sent in the
                // current batch and not answered yet will never be.
                let current = self.batches_done;
                while self.parses.front().is_some_and(|p| p.batch == current) {
                    let sent = self.parses.pop_front().unwrap();
                    if let Some(name) = &sent.server_name {
                        server.forget_pending(name);
                    }
                    if let Some(name) = &sent.client_added {
                        client.remove(name);
                    }
                }
                while self.closes.front().is_some_and(|c| c.batch == current) {
                    self.closes.pop_front();
                }
                while self.deallocates.front().is_some_and(|d| d.batch == current) {
                    self.deallocates.pop_front();
                }
                let unknown = match self.unknown.front() {
                    Some(u) if u.batch == current => self.unknown.pop_front().map(|u| u.client_name),
                    _ => None,
                };
                rename_in_error(frame, client, unknown.as_deref())
                    .map_or(ServerVerdict::Forward, ServerVerdict::Replace)
            }
            _ => ServerVerdict::Forward,
        }
    }
}

impl Rewriter {
    /// Judges a CommandComplete tag (without its NUL) for what it did to prepared statements.
    pub fn command_complete(
        &mut self,
        tag: &[u8],
        client: &mut ClientStatements,
        server: &mut ServerStatements,
    ) -> BooksAfter {
        match tag {
            b"DISCARD ALL" | b"DEALLOCATE ALL" => {
                client.clear();
                server.clear();
                BooksAfter::Exact
            }
            b"DEALLOCATE" => match self.deallocates.pop_front() {
                Some(sent) => {
                    client.remove(&sent.client_name);
                    server.present.retain(|n| *n != sent.server_name);
                    BooksAfter::Exact
                }
                None => BooksAfter::Untrusted,
            },
            b"PREPARE" => BooksAfter::Untrusted,
            _ => BooksAfter::Exact,
        }
    }
}

/// A name in pgcorral's own namespace on servers. Clients may use such names for their own
/// statements (they are mapped like any other), but one the client never prepared must not
/// reach a server, where it could be pgcorral's.
fn is_reserved(name: &str) -> bool {
    name.starts_with(SERVER_PREFIX)
}

const SERVER_PREFIX: &str = "pgcorral_";

/// The statement a `DEALLOCATE [PREPARE] name` query names (`Some(None)` for `ALL`), as
/// PostgreSQL reads it: unquoted names fold to lower case. None for any other query.
pub fn deallocate_target(query: &str) -> Option<Option<String>> {
    let q = query.trim().trim_end_matches(';').trim_end();
    let rest = strip_keyword(q, "DEALLOCATE")?;
    let rest = strip_keyword(rest, "PREPARE").unwrap_or(rest);
    if rest.eq_ignore_ascii_case("ALL") {
        return Some(None);
    }
    if let Some(quoted) = rest.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        return (!quoted.is_empty()).then(|| Some(quoted.replace("\"\"", "\"")));
    }
    let ident = rest.chars().all(|c| c.is_alphanumeric() || c == '_' || c == '$') && !rest.is_empty();
    ident.then(|| Some(rest.to_lowercase()))
}

/// `DISCARD ALL` or `DEALLOCATE ALL` alone.
pub fn is_discard_all(query: &str) -> bool {
    let q = query.trim().trim_end_matches(';').trim_end();
    strip_keyword(q, "DISCARD").is_some_and(|r| r.eq_ignore_ascii_case("ALL"))
        || deallocate_target(q) == Some(None)
}

/// `text` without a leading case-insensitive `keyword` and the blanks after it.
fn strip_keyword<'a>(text: &'a str, keyword: &str) -> Option<&'a str> {
    let head = text.get(..keyword.len())?;
    let rest = &text[keyword.len()..];
    (head.eq_ignore_ascii_case(keyword) && rest.starts_with(char::is_whitespace)).then(|| rest.trim_start())
}

/// An ErrorResponse whose fields mention a `pgcorral_` statement name, rewritten with the
/// client's name for it (`unknown`: the client's spelling of a name sent as [`NOTHING`]).
/// Each field is scanned once, left to right: a client's name may itself start with
/// `pgcorral_` (one pgcorral behind another), and is never searched again.
fn rename_in_error(frame: &[u8], client: &ClientStatements, unknown: Option<&str>) -> Option<BytesMut> {
    let text = frame.get(5..)?;
    if !text.windows(SERVER_PREFIX.len()).any(|w| w == SERVER_PREFIX.as_bytes()) {
        return None;
    }
    let mut body = BytesMut::with_capacity(text.len());
    let mut rest = text;
    let mut renamed = false;
    while let Some((&code, tail)) = rest.split_first() {
        if code == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0)?;
        let value = String::from_utf8_lossy(&tail[..end]);
        let mut out = String::with_capacity(value.len());
        let mut scan = value.as_ref();
        while let Some(at) = scan.find(SERVER_PREFIX) {
            out.push_str(&scan[..at]);
            let name_len = scan[at..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(scan.len() - at);
            let name = &scan[at..at + name_len];
            let replacement = match client.client_name(name) {
                Some(client_name) => Some(client_name),
                None if name == NOTHING => unknown,
                None => None,
            };
            renamed |= replacement.is_some();
            out.push_str(replacement.unwrap_or(name));
            scan = &scan[at + name_len..];
        }
        out.push_str(scan);
        body.put_u8(code);
        put_cstr(&mut body, &out);
        rest = &tail[end + 1..];
    }
    if !renamed {
        return None;
    }
    body.put_u8(0);
    let mut message = BytesMut::with_capacity(body.len() + 5);
    message.put_u8(b'E');
    message.put_i32(4 + body.len() as i32);
    message.extend_from_slice(&body);
    Some(message)
}

fn malformed(what: &'static str) -> ProtocolError {
    ProtocolError::Malformed { what }
}

fn cstr<'a>(body: &'a [u8], what: &'static str) -> Result<(&'a str, &'a [u8]), ProtocolError> {
    let nul = body.iter().position(|&b| b == 0).ok_or_else(|| malformed(what))?;
    let text = std::str::from_utf8(&body[..nul]).map_err(|_| malformed(what))?;
    Ok((text, &body[nul + 1..]))
}

fn read_parse(body: &[u8]) -> Result<(String, String, Vec<u8>), ProtocolError> {
    let (name, rest) = cstr(body, "Parse")?;
    let (query, rest) = cstr(rest, "Parse")?;
    if rest.len() < 2 {
        return Err(malformed("Parse"));
    }
    let count = i16::from_be_bytes([rest[0], rest[1]]);
    let types = &rest[2..];
    if count < 0 || types.len() != count as usize * 4 {
        return Err(malformed("Parse"));
    }
    Ok((name.to_string(), query.to_string(), types.to_vec()))
}

fn read_bind(body: &[u8]) -> Result<(&str, &str, &[u8]), ProtocolError> {
    let (portal, rest) = cstr(body, "Bind")?;
    let (statement, rest) = cstr(rest, "Bind")?;
    Ok((portal, statement, rest))
}

fn read_target(body: &[u8]) -> Result<(u8, &str), ProtocolError> {
    let (&kind, rest) = body.split_first().ok_or_else(|| malformed("Describe/Close"))?;
    let (name, _) = cstr(rest, "Describe/Close")?;
    Ok((kind, name))
}

fn put_cstr(out: &mut BytesMut, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.put_u8(0);
}

fn write_parse(out: &mut BytesMut, name: &str, query: &str, types: &[u8]) {
    let len = 4 + name.len() + 1 + query.len() + 1 + 2 + types.len();
    out.put_u8(b'P');
    out.put_i32(len as i32);
    put_cstr(out, name);
    put_cstr(out, query);
    out.put_i16((types.len() / 4) as i16);
    out.extend_from_slice(types);
}

/// The length of what follows a Bind's statement name, from the length the client declared:
/// a large Bind arrives with only its names, the rest streams behind the rewritten head.
fn declared_rest(frame: &[u8], portal: &str, statement: &str) -> usize {
    let declared = i32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]) as usize;
    declared.saturating_sub(4 + portal.len() + 1 + statement.len() + 1)
}

/// A Bind of `statement`: its head, then `rest` (all or the first part of `rest_len` bytes).
fn write_bind(out: &mut BytesMut, portal: &str, statement: &str, rest: &[u8], rest_len: usize) {
    let len = 4 + portal.len() + 1 + statement.len() + 1 + rest_len;
    out.put_u8(b'B');
    out.put_i32(len as i32);
    put_cstr(out, portal);
    put_cstr(out, statement);
    out.extend_from_slice(rest);
}

fn write_describe(out: &mut BytesMut, kind: u8, name: &str) {
    out.put_u8(b'D');
    out.put_i32((4 + 1 + name.len() + 1) as i32);
    out.put_u8(kind);
    put_cstr(out, name);
}

fn write_close(out: &mut BytesMut, kind: u8, name: &str) {
    out.put_u8(b'C');
    out.put_i32((4 + 1 + name.len() + 1) as i32);
    out.put_u8(kind);
    put_cstr(out, name);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame_at;
    use postgres_protocol::message::frontend;

    fn msg(write: impl FnOnce(&mut BytesMut)) -> BytesMut {
        let mut buf = BytesMut::new();
        write(&mut buf);
        buf
    }

    fn parse(name: &str, query: &str) -> BytesMut {
        msg(|b| frontend::parse(name, query, [23u32], b).unwrap())
    }

    fn bind(statement: &str) -> BytesMut {
        msg(|b| {
            frontend::bind(
                "",
                statement,
                [0i16],
                [Some(b"1".to_vec())],
                |v: Option<Vec<u8>>, out: &mut BytesMut| {
                    out.extend_from_slice(&v.unwrap());
                    Ok(postgres_protocol::IsNull::No)
                },
                [0i16],
                b,
            )
            .map_err(|_| ())
            .unwrap()
        })
    }

    fn sync() -> BytesMut {
        msg(frontend::sync)
    }

    /// (tag, statement name) of each message in `bytes`.
    fn messages(bytes: &[u8]) -> Vec<(u8, String)> {
        let mut out = Vec::new();
        let mut at = 0;
        while let Some(frame) = frame_at(&bytes[at..], 1 << 20).unwrap() {
            let body = &bytes[at + 5..at + frame.len];
            let name = match frame.tag {
                b'P' => cstr(body, "").unwrap().0.to_string(),
                b'B' => read_bind(body).unwrap().1.to_string(),
                b'C' | b'D' => read_target(body).unwrap().1.to_string(),
                _ => String::new(),
            };
            out.push((frame.tag, name));
            at += frame.len;
        }
        out
    }

    fn sent(
        rw: &mut Rewriter,
        frame: &[u8],
        c: &mut ClientStatements,
        s: &mut ServerStatements,
    ) -> Vec<(u8, String)> {
        match rw.client_message(frame, c, s, 2).unwrap() {
            Rewritten::Unchanged => messages(frame),
            Rewritten::Replaced(bytes) => messages(&bytes),
        }
    }

    fn server(
        rw: &mut Rewriter,
        tag: u8,
        c: &mut ClientStatements,
        s: &mut ServerStatements,
    ) -> ServerVerdict {
        rw.server_message(&[tag, 0, 0, 0, 4], c, s)
    }

    #[test]
    fn a_statement_prepared_once_serves_on_a_server_that_lacks_it() {
        let (mut c, mut s1, mut s2) =
            (ClientStatements::default(), ServerStatements::default(), ServerStatements::default());
        let mut rw = Rewriter::default();
        let sname = StatementDef::new("SELECT $1".into(), 23u32.to_be_bytes().to_vec()).server_name;
        assert_eq!(sent(&mut rw, &parse("s1", "SELECT $1"), &mut c, &mut s1), [(b'P', sname.clone())]);
        assert_eq!(sent(&mut rw, &bind("s1"), &mut c, &mut s1), [(b'B', sname.clone())]);
        sent(&mut rw, &sync(), &mut c, &mut s1);
        assert_eq!(server(&mut rw, b'1', &mut c, &mut s1), ServerVerdict::Forward);
        assert_eq!(server(&mut rw, b'2', &mut c, &mut s1), ServerVerdict::Forward);
        assert_eq!(server(&mut rw, b'Z', &mut c, &mut s1), ServerVerdict::Forward);
        assert!(rw.settled() && s1.len() == 1 && c.len() == 1);

        // The next transaction lands on another server: Parse is sent first, its answer eaten.
        let mut rw = Rewriter::default();
        assert_eq!(
            sent(&mut rw, &bind("s1"), &mut c, &mut s2),
            [(b'P', sname.clone()), (b'B', sname.clone())]
        );
        sent(&mut rw, &sync(), &mut c, &mut s2);
        assert_eq!(server(&mut rw, b'1', &mut c, &mut s2), ServerVerdict::Swallow);
        assert_eq!(server(&mut rw, b'2', &mut c, &mut s2), ServerVerdict::Forward);
        assert!(rw.settled() && s2.len() == 1);
        // And back on the first, nothing is added.
        let mut rw = Rewriter::default();
        assert_eq!(sent(&mut rw, &bind("s1"), &mut c, &mut s1), [(b'B', sname)]);
    }

    #[test]
    fn a_second_client_parsing_the_same_text_gets_its_parse_complete_from_postgres() {
        let (mut a, mut b, mut s) =
            (ClientStatements::default(), ClientStatements::default(), ServerStatements::default());
        let mut rw = Rewriter::default();
        sent(&mut rw, &parse("x", "SELECT $1"), &mut a, &mut s);
        server(&mut rw, b'1', &mut a, &mut s);
        let out = sent(&mut rw, &parse("y", "SELECT $1"), &mut b, &mut s);
        assert_eq!(out, [(b'P', SCRATCH.into()), (b'C', SCRATCH.into())]);
        assert_eq!(server(&mut rw, b'1', &mut b, &mut s), ServerVerdict::Forward);
        assert_eq!(server(&mut rw, b'3', &mut b, &mut s), ServerVerdict::Swallow);
        assert!(rw.settled() && s.len() == 1 && b.len() == 1);
    }

    #[test]
    fn close_is_answered_without_touching_the_server_statement() {
        let (mut c, mut s) = (ClientStatements::default(), ServerStatements::default());
        let mut rw = Rewriter::default();
        sent(&mut rw, &parse("s1", "SELECT 1"), &mut c, &mut s);
        server(&mut rw, b'1', &mut c, &mut s);
        let close = msg(|b| frontend::close(b'S', "s1", b).unwrap());
        assert_eq!(sent(&mut rw, &close, &mut c, &mut s), [(b'C', NOTHING.into())]);
        assert_eq!(server(&mut rw, b'3', &mut c, &mut s), ServerVerdict::Forward);
        assert!(c.is_empty() && s.len() == 1);
        // An unknown name passes through: PostgreSQL answers it.
        assert_eq!(rw.client_message(&bind("nope"), &mut c, &mut s, 2).unwrap(), Rewritten::Unchanged);
    }

    #[test]
    fn the_least_recently_used_statement_is_closed_at_capacity() {
        let (mut c, mut s) = (ClientStatements::default(), ServerStatements::default());
        let mut rw = Rewriter::default();
        for (i, q) in ["SELECT 1", "SELECT 2"].iter().enumerate() {
            sent(&mut rw, &parse(&format!("s{i}"), q), &mut c, &mut s);
            server(&mut rw, b'1', &mut c, &mut s);
        }
        sent(&mut rw, &bind("s0"), &mut c, &mut s); // s0 becomes the most recently used
        let third = sent(&mut rw, &parse("s2", "SELECT 3"), &mut c, &mut s);
        let evicted = c.get("s1").unwrap().server_name.clone();
        assert_eq!(third[0], (b'C', evicted));
        assert_eq!(third[1].0, b'P');
        assert_eq!(server(&mut rw, b'3', &mut c, &mut s), ServerVerdict::Swallow);
        assert_eq!(server(&mut rw, b'1', &mut c, &mut s), ServerVerdict::Forward);
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn an_error_forgets_what_postgres_skips_until_sync() {
        let (mut c, mut s) = (ClientStatements::default(), ServerStatements::default());
        let mut rw = Rewriter::default();
        sent(&mut rw, &parse("bad", "SELEC 1"), &mut c, &mut s);
        sent(&mut rw, &bind("bad"), &mut c, &mut s);
        sent(&mut rw, &sync(), &mut c, &mut s);
        let error = msg(|b| {
            b.put_u8(b'E');
            b.put_i32(4 + 1 + 6 + 1);
            b.put_u8(b'C');
            put_cstr(b, "42601");
            b.put_u8(0);
        });
        assert_eq!(rw.server_message(&error, &mut c, &mut s), ServerVerdict::Forward);
        assert_eq!(server(&mut rw, b'Z', &mut c, &mut s), ServerVerdict::Forward);
        assert!(rw.settled(), "the failed Parse is not waited for");
        assert!(c.is_empty() && s.is_empty(), "a statement that failed to parse does not exist");
    }

    #[test]
    fn a_reused_name_gets_postgres_error_with_the_clients_name() {
        let (mut c, mut s) = (ClientStatements::default(), ServerStatements::default());
        let mut rw = Rewriter::default();
        sent(&mut rw, &parse("s1", "SELECT 1"), &mut c, &mut s);
        server(&mut rw, b'1', &mut c, &mut s);
        let sname = c.get("s1").unwrap().server_name.clone();
        assert_eq!(sent(&mut rw, &parse("s1", "SELECT 2"), &mut c, &mut s), [(b'P', sname.clone())]);
        let text = format!("prepared statement \"{sname}\" already exists");
        let error = msg(|b| {
            let mut body = BytesMut::new();
            body.put_u8(b'C');
            put_cstr(&mut body, "42P05");
            body.put_u8(b'M');
            put_cstr(&mut body, &text);
            body.put_u8(0);
            b.put_u8(b'E');
            b.put_i32(4 + body.len() as i32);
            b.extend_from_slice(&body);
        });
        let ServerVerdict::Replace(renamed) = rw.server_message(&error, &mut c, &mut s) else {
            panic!("not renamed")
        };
        let renamed = String::from_utf8_lossy(&renamed).into_owned();
        assert!(renamed.contains("prepared statement \"s1\" already exists"), "{renamed}");
        assert_eq!(c.get("s1").unwrap().query, "SELECT 1", "the first definition stands");
    }

    #[test]
    fn a_renamed_bind_is_the_bind_postgres_protocol_would_write() {
        let (mut c, mut s) = (ClientStatements::default(), ServerStatements::default());
        let mut rw = Rewriter::default();
        sent(&mut rw, &parse("s1", "SELECT $1"), &mut c, &mut s);
        server(&mut rw, b'1', &mut c, &mut s);
        let sname = c.get("s1").unwrap().server_name.clone();
        let Rewritten::Replaced(out) = rw.client_message(&bind("s1"), &mut c, &mut s, 2).unwrap() else {
            panic!()
        };
        assert_eq!(out, bind(&sname));
    }

    #[test]
    fn deallocate_is_read_as_postgres_reads_it() {
        assert_eq!(deallocate_target("DEALLOCATE s1"), Some(Some("s1".into())));
        assert_eq!(deallocate_target("deallocate prepare _PG3_0;"), Some(Some("_pg3_0".into())));
        assert_eq!(deallocate_target("DEALLOCATE \"MiXed\""), Some(Some("MiXed".into())));
        assert_eq!(deallocate_target("DEALLOCATE ALL"), Some(None));
        assert_eq!(deallocate_target("DEALLOCATE a; DROP TABLE t"), None);
        assert_eq!(deallocate_target("SELECT 1"), None);
        assert!(is_discard_all(" discard all; ") && is_discard_all("DEALLOCATE ALL"));
        assert!(!is_discard_all("DISCARD PLANS"));
    }

    fn query(sql: &str) -> BytesMut {
        msg(|b| frontend::query(sql, b).unwrap())
    }

    fn error_naming(code: &str, text: &str) -> BytesMut {
        msg(|b| {
            let mut body = BytesMut::new();
            body.put_u8(b'C');
            put_cstr(&mut body, code);
            body.put_u8(b'M');
            put_cstr(&mut body, text);
            body.put_u8(0);
            b.put_u8(b'E');
            b.put_i32(4 + body.len() as i32);
            b.extend_from_slice(&body);
        })
    }

    #[test]
    fn deallocate_and_discard_keep_the_books_once_postgres_confirms() {
        let (mut c, mut s) = (ClientStatements::default(), ServerStatements::default());
        let mut rw = Rewriter::default();
        sent(&mut rw, &parse("s1", "SELECT 1"), &mut c, &mut s);
        server(&mut rw, b'1', &mut c, &mut s);
        let sname = c.get("s1").unwrap().server_name.clone();
        let Rewritten::Replaced(out) = rw.client_message(&query("DEALLOCATE s1"), &mut c, &mut s, 2).unwrap()
        else {
            panic!("not rewritten")
        };
        assert!(String::from_utf8_lossy(&out).contains(&format!("DEALLOCATE {sname}")));
        assert!(!rw.settled() && c.len() == 1, "nothing changes before PostgreSQL answers");
        assert_eq!(rw.command_complete(b"DEALLOCATE", &mut c, &mut s), BooksAfter::Exact);
        server(&mut rw, b'Z', &mut c, &mut s);
        assert!(rw.settled() && c.is_empty() && s.is_empty());

        sent(&mut rw, &parse("s2", "SELECT 2"), &mut c, &mut s);
        server(&mut rw, b'1', &mut c, &mut s);
        assert_eq!(
            rw.client_message(&query("DISCARD ALL"), &mut c, &mut s, 2).unwrap(),
            Rewritten::Unchanged
        );
        assert_eq!(c.len(), 1, "DISCARD ALL fails inside a transaction block: wait for its answer");
        assert_eq!(rw.command_complete(b"DISCARD ALL", &mut c, &mut s), BooksAfter::Exact);
        assert!(c.is_empty() && s.is_empty());
    }

    #[test]
    fn a_failing_deallocate_keeps_the_statement() {
        let (mut c, mut s) = (ClientStatements::default(), ServerStatements::default());
        let mut rw = Rewriter::default();
        sent(&mut rw, &parse("s1", "SELECT 1"), &mut c, &mut s);
        sent(&mut rw, &sync(), &mut c, &mut s);
        server(&mut rw, b'1', &mut c, &mut s);
        server(&mut rw, b'Z', &mut c, &mut s);
        rw.client_message(&query("DEALLOCATE s1"), &mut c, &mut s, 2).unwrap();
        let aborted = error_naming("25P02", "current transaction is aborted");
        assert_eq!(rw.server_message(&aborted, &mut c, &mut s), ServerVerdict::Forward);
        server(&mut rw, b'Z', &mut c, &mut s);
        assert!(rw.settled() && c.len() == 1 && s.len() == 1);
    }

    #[test]
    fn sql_prepare_and_foreign_deallocate_make_the_books_untrusted() {
        let (mut c, mut s) = (ClientStatements::default(), ServerStatements::default());
        let mut rw = Rewriter::default();
        assert_eq!(rw.command_complete(b"PREPARE", &mut c, &mut s), BooksAfter::Untrusted);
        assert_eq!(rw.command_complete(b"DEALLOCATE", &mut c, &mut s), BooksAfter::Untrusted);
        assert_eq!(rw.command_complete(b"SELECT 1", &mut c, &mut s), BooksAfter::Exact);
    }

    #[test]
    fn a_client_name_in_pgcorrals_namespace_is_renamed_once() {
        // A client (or a pgcorral in front of this one) names its statement exactly as
        // pgcorral names statements on servers, and reuses it: the error names it once.
        let (mut c, mut s) = (ClientStatements::default(), ServerStatements::default());
        let mut rw = Rewriter::default();
        let own = StatementDef::new("SELECT 1".into(), 23u32.to_be_bytes().to_vec()).server_name;
        sent(&mut rw, &parse(&own, "SELECT 1"), &mut c, &mut s);
        server(&mut rw, b'1', &mut c, &mut s);
        let sname = c.get(&own).unwrap().server_name.clone();
        sent(&mut rw, &parse(&own, "SELECT 1"), &mut c, &mut s);
        let error = error_naming("42P05", &format!("prepared statement \"{sname}\" already exists"));
        let ServerVerdict::Replace(renamed) = rw.server_message(&error, &mut c, &mut s) else {
            panic!("not renamed")
        };
        let renamed = String::from_utf8_lossy(&renamed).into_owned();
        assert!(renamed.contains(&format!("prepared statement \"{own}\" already exists")), "{renamed}");
    }

    #[test]
    fn reserved_names_the_client_never_prepared_never_reach_a_server() {
        let (mut a, mut b, mut s) =
            (ClientStatements::default(), ClientStatements::default(), ServerStatements::default());
        let mut rw = Rewriter::default();
        sent(&mut rw, &parse("mine", "SELECT 1"), &mut a, &mut s);
        server(&mut rw, b'1', &mut a, &mut s);
        let victim = a.get("mine").unwrap().server_name.clone();
        // Client b guesses a's server name: Bind, Describe and Close go to a name that exists
        // nowhere, and the error speaks of b's own spelling.
        assert_eq!(sent(&mut rw, &bind(&victim), &mut b, &mut s), [(b'B', NOTHING.into())]);
        let describe = msg(|m| frontend::describe(b'S', &victim, m).unwrap());
        assert_eq!(sent(&mut rw, &describe, &mut b, &mut s), [(b'D', NOTHING.into())]);
        let close = msg(|m| frontend::close(b'S', &victim, m).unwrap());
        assert_eq!(sent(&mut rw, &close, &mut b, &mut s), [(b'C', NOTHING.into())]);
        let error = error_naming("26000", &format!("prepared statement \"{NOTHING}\" does not exist"));
        let ServerVerdict::Replace(renamed) = rw.server_message(&error, &mut b, &mut s) else {
            panic!("not renamed")
        };
        let renamed = String::from_utf8_lossy(&renamed).into_owned();
        assert!(renamed.contains(&format!("\"{victim}\" does not exist")), "{renamed}");
        assert_eq!(s.len(), 1, "a's statement stays");
        // Other unknown names still reach PostgreSQL as they are, for its own error.
        assert_eq!(rw.client_message(&bind("nope"), &mut b, &mut s, 2).unwrap(), Rewritten::Unchanged);
    }

    #[test]
    fn a_clients_books_are_bounded() {
        let (mut c, mut s) = (ClientStatements::default(), ServerStatements::default());
        let mut rw = Rewriter::default();
        let text = "x".repeat(1 << 20);
        let mut refused = None;
        for i in 0..40 {
            match rw.client_message(&parse(&format!("s{i}"), &format!("SELECT '{text}'")), &mut c, &mut s, 0)
            {
                Ok(_) => server(&mut rw, b'1', &mut c, &mut s),
                Err(e) => {
                    refused = Some((i, e));
                    break;
                }
            };
        }
        let (at, error) = refused.expect("the books stop growing");
        assert!(at >= 15 && c.len() == at, "16 MiB of statements fit, then no more ({at})");
        assert_eq!(error.to_pg().code, "54000");
        // What is deallocated makes room again.
        assert!(c.remove("s0"));
        assert!(rw.client_message(&parse("again", &format!("SELECT '{text}'")), &mut c, &mut s, 0).is_ok());
    }

    #[test]
    fn names_are_content_addressed_and_fit_namedatalen() {
        let a = StatementDef::new("SELECT 1".into(), vec![]);
        assert_eq!(a.server_name, StatementDef::new("SELECT 1".into(), vec![]).server_name);
        assert_ne!(
            a.server_name,
            StatementDef::new("SELECT 1".into(), 23u32.to_be_bytes().to_vec()).server_name
        );
        assert!(a.server_name.len() < 64);
    }
}
