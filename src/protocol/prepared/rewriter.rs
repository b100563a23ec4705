//! The rewriter of one lease: client messages to server names (with the Parse a server lacks
//! put first), and the server's answers judged as PostgreSQL's own or answers to what pgcorral
//! added. Pure: it keeps FIFOs of what it sent, per kind, and the batch (Sync) each belongs to.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};

use super::wire::*;
use super::{
    deallocate_target, is_reserved, ClientStatements, ServerStatements, StatementDef, NOTHING, SCRATCH,
    SERVER_PREFIX,
};
use crate::protocol::extended::{parse_bind_head, parse_parse, parse_target, BindHead, Target};
use crate::protocol::fields::{put_cstr, Fields};
use crate::protocol::ProtocolError;

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
    /// SQL-level PREPARE or DEALLOCATE that pgcorral did not write, or dynamic SQL that may have
    /// run them (`DO`, a function or procedure created in this lease): the server may now hold
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
                let Ok(query) = Fields::new(body, "Query").cstr() else { return Ok(Rewritten::Unchanged) };
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
                let parse = parse_parse(body)?;
                let (name, query, types) =
                    (parse.statement.to_string(), parse.query.to_string(), parse.param_types.to_vec());
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
                let BindHead { portal, statement, rest } = parse_bind_head(body)?;
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
                let Target { kind, name } = parse_target(body)?;
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
            // Dynamic SQL: a DO block, or a temporary function created and called in this lease,
            // may have run PREPARE or DEALLOCATE on pgcorral's names with no tag of its own.
            b"DO" | b"CREATE FUNCTION" | b"CREATE PROCEDURE" => BooksAfter::Untrusted,
            _ => BooksAfter::Exact,
        }
    }
}

/// An ErrorResponse whose fields mention a `pgcorral_` statement name, rewritten with the
/// client's name for it (`unknown`: the client's spelling of a name sent as [`NOTHING`]).
/// Each field is scanned once, left to right: a client's name may itself start with
/// `pgcorral_` (one pgcorral behind another), and is never searched again.
pub(super) fn rename_in_error(
    frame: &[u8],
    client: &ClientStatements,
    unknown: Option<&str>,
) -> Option<BytesMut> {
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
