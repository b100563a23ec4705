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
//!   A name in pgcorral's own namespace (`pgcorral_…`) the client never prepared goes to a name
//!   that exists nowhere instead: no client reaches the statements pgcorral keeps for others.
//! - `DEALLOCATE`, `DEALLOCATE ALL` and `DISCARD ALL` change the books once PostgreSQL confirms
//!   them ([`Rewriter::command_complete`]); SQL-level `PREPARE`, a `DEALLOCATE` pgcorral did
//!   not write, or dynamic SQL that might have run them (`DO`, `CREATE FUNCTION`/`PROCEDURE`),
//!   makes the server's books untrusted ([`BooksAfter::Untrusted`]).
//!
//! Files: this one holds the books, `rewriter` the per-lease rewriting, `wire` the few message
//! fields read and written.
//!
//! Nothing is invented: every response the client sees was sent by PostgreSQL, and the only
//! server messages dropped are the ParseComplete and CloseComplete of messages pgcorral added.
//! Those are matched by kind and order (one FIFO per kind), and forgotten when an error makes
//! PostgreSQL skip the rest of the batch up to Sync. Pure: no I/O, tested message by message.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::ProtocolError;

mod rewriter;
#[cfg(test)]
mod tests;
mod wire;

pub use rewriter::{BooksAfter, Rewriter, Rewritten, ServerVerdict};

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

    /// Every statement: (client's name, definition), for an online restart to carry.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &StatementDef)> {
        self.by_name.iter().map(|(name, def)| (name.as_str(), def.as_ref()))
    }

    /// The books of a client handed over by the process this one took over from: (name,
    /// query, parameter types) each, within the same limit.
    pub fn restore(
        statements: impl IntoIterator<Item = (String, String, Vec<u8>)>,
    ) -> Result<ClientStatements, ProtocolError> {
        let mut books = ClientStatements::default();
        for (name, query, param_types) in statements {
            books.insert(name, Arc::new(StatementDef::new(query, param_types)))?;
        }
        Ok(books)
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
