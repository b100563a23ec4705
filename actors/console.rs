//! The admin console: a client logged in to the database `pgbouncer` (or `pgcorral`) talks to
//! pgcorral itself instead of a server.
//!
//! It speaks the simple query protocol, as PgBouncer's console does, and also the extended
//! protocol (Parse, Bind, Describe, Execute, Sync), so that monitors written with asyncpg or
//! psycopg work unchanged. Each query is one command ([`crate::admin::command`]): `SHOW`s are
//! answered from a snapshot of the live system ([`super::inspect`]), control commands act on it
//! ([`super::control`]). `stats_users` may only run `SHOW`s. Like a relay, it takes `Kill` from
//! its ClientSession (KILL_CLIENT, shutdown).

use std::collections::HashMap;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use crate::actors::census::ClientEntry;
use crate::actors::control;
use crate::actors::inspect;
use crate::actors::registry::Shared;
use crate::actors::relay::Control;
use crate::admin::command::{self, Command};
use crate::admin::resultset::{command_complete, notice, ResultSet};
use crate::local_queue::LocalReceiver;
use crate::net::Framed;
use crate::protocol::backend::ready_for_query;
use crate::protocol::error::sqlstate;
use crate::protocol::extended::{parse_bind, parse_execute, parse_parse, parse_target};
use crate::protocol::{frame_at, PgError};

/// What a console user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `admin_users`, and `pgbouncer` over the Unix socket as pgcorral's own OS user.
    Admin,
    /// `stats_users`: `SHOW` only.
    Stats,
}

/// What a command produced.
#[derive(Debug, Clone)]
enum Answer {
    Rows(ResultSet),
    /// A command with no rows, and its CommandComplete tag.
    Done(String),
    /// An empty query.
    Empty,
}

struct Portal {
    query: String,
    formats: Vec<i16>,
    /// Computed when the portal is described, so that Execute sends the rows that
    /// RowDescription announced.
    answer: Option<Answer>,
}

pub struct Console {
    conn: Framed,
    shared: Arc<Shared>,
    role: Role,
    control: LocalReceiver<Control>,
    statements: HashMap<String, String>,
    portals: HashMap<String, Portal>,
    /// An extended-protocol message failed: everything up to the next Sync is skipped.
    skipping: bool,
    /// This session suspended the pooler: as in PgBouncer, leaving resumes it.
    suspended_here: bool,
    entry: Arc<ClientEntry>,
}

/// Console messages are small; anything larger is a confused client.
const MAX_CONSOLE_MESSAGE: usize = 1 << 20;

enum Input {
    Data(usize),
    Control(Control),
}

impl Console {
    pub fn new(
        conn: Framed,
        shared: Arc<Shared>,
        role: Role,
        control: LocalReceiver<Control>,
        entry: Arc<ClientEntry>,
    ) -> Console {
        Console {
            conn,
            shared,
            role,
            control,
            statements: HashMap::new(),
            portals: HashMap::new(),
            skipping: false,
            suspended_here: false,
            entry,
        }
    }

    /// Serves the console until the client leaves or is killed.
    pub async fn run(mut self) {
        self.serve().await;
        if self.suspended_here {
            log::info!("the admin who suspended the pooler left; resuming");
            let _ = control::resume(&self.shared, None);
        }
    }

    async fn serve(&mut self) {
        loop {
            match self.deliver().await {
                Ok(None) => {}
                Ok(Some(error)) => return self.last_words(&error).await,
                Err(_) => return,
            }
            match self.next_input().await {
                Ok(Input::Data(0)) | Err(_) => return,
                Ok(Input::Data(_)) => {}
                Ok(Input::Control(Control::Kill(error))) => return self.last_words(&error).await,
                // The console stays in the old process until it exits.
                Ok(Input::Control(Control::CancelDelivered | Control::HandOver)) => continue,
            }
            loop {
                let frame = match frame_at(&self.conn.inbox, MAX_CONSOLE_MESSAGE) {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(e) => return self.last_words(&e.to_pg()).await,
                };
                let message = self.conn.inbox.split_to(frame.len);
                let body = &message[5..];
                if frame.tag == b'X' {
                    return;
                }
                if let Err(error) = self.message(frame.tag, body).await {
                    let fatal = error.is_fatal();
                    self.error(&error);
                    if fatal {
                        self.conn.say_goodbye().await;
                        return;
                    }
                }
            }
        }
    }

    /// Sends what is queued for the client. A Kill ends the wait: an admin who stopped reading
    /// a long SHOW cannot hold the console (and the output) forever. Returns the Kill's error.
    async fn deliver(&mut self) -> std::io::Result<Option<PgError>> {
        let Console { conn, control, .. } = self;
        poll_fn(|cx| {
            while let Poll::Ready(message) = control.poll_recv(cx) {
                if let Control::Kill(error) = message {
                    return Poll::Ready(Ok(Some(*error)));
                }
            }
            conn.poll_send(cx).map_ok(|()| None)
        })
        .await
    }

    /// An error that ends the session, sent with what is still queued if the client takes it
    /// within [`crate::net::GOODBYE_DEADLINE`].
    async fn last_words(&mut self, error: &PgError) {
        error.encode(&mut self.conn.outbox);
        self.conn.say_goodbye().await;
    }

    /// Sends an error, and logs it when `log_pooler_errors` is on, as PgBouncer does.
    fn error(&mut self, error: &PgError) {
        if self.shared.config().general.log_pooler_errors {
            log::warn!("{} pooler error: {}", self.entry.describe(), error.message);
        }
        error.encode(&mut self.conn.outbox);
    }

    async fn next_input(&mut self) -> std::io::Result<Input> {
        let Console { conn, control, .. } = self;
        poll_fn(|cx| {
            if let Poll::Ready(control) = control.poll_recv(cx) {
                return Poll::Ready(Ok(Input::Control(control)));
            }
            conn.poll_fill(cx).map_ok(Input::Data)
        })
        .await
    }

    /// Handles one client message; an error is sent as an ErrorResponse (and, in the
    /// extended protocol, everything up to the next Sync is skipped).
    async fn message(&mut self, tag: u8, body: &[u8]) -> Result<(), PgError> {
        if self.skipping && tag != b'S' {
            return Ok(());
        }
        let extended_error = |console: &mut Console, error: PgError| {
            console.skipping = true;
            error
        };
        match tag {
            b'Q' => {
                let query = String::from_utf8_lossy(body.strip_suffix(&[0]).unwrap_or(body)).into_owned();
                match self.execute(&query).await {
                    Ok(answer) => self.send_answer(&answer, &[], true),
                    Err(error) => self.error(&error),
                }
                ready_for_query(&mut self.conn.outbox, b'I');
                Ok(())
            }
            b'P' => {
                let parse = parse_parse(body).map_err(|e| extended_error(self, e.to_pg()))?;
                self.statements.insert(parse.statement.to_string(), parse.query.to_string());
                self.conn.outbox.extend_from_slice(&[b'1', 0, 0, 0, 4]);
                Ok(())
            }
            b'B' => {
                let bind = parse_bind(body).map_err(|e| extended_error(self, e.to_pg()))?;
                let Some(query) = self.statements.get(bind.statement).cloned() else {
                    let error = PgError::error(
                        "26000",
                        format!("prepared statement \"{}\" does not exist", bind.statement),
                    );
                    return Err(extended_error(self, error));
                };
                self.portals.insert(
                    bind.portal.to_string(),
                    Portal { query, formats: bind.result_formats, answer: None },
                );
                self.conn.outbox.extend_from_slice(&[b'2', 0, 0, 0, 4]);
                Ok(())
            }
            b'D' => {
                let target = parse_target(body).map_err(|e| extended_error(self, e.to_pg()))?;
                self.describe(target.kind, target.name).await.map_err(|e| extended_error(self, e))
            }
            b'E' => {
                let portal = parse_execute(body).map_err(|e| extended_error(self, e.to_pg()))?;
                self.execute_portal(portal).await.map_err(|e| extended_error(self, e))
            }
            b'C' => {
                let target = parse_target(body).map_err(|e| extended_error(self, e.to_pg()))?;
                match target.kind {
                    b'S' => self.statements.remove(target.name),
                    b'P' => self.portals.remove(target.name).map(|p| p.query),
                    _ => return Err(extended_error(self, invalid_kind("CLOSE", target.kind))),
                };
                self.conn.outbox.extend_from_slice(&[b'3', 0, 0, 0, 4]);
                Ok(())
            }
            b'S' => {
                self.skipping = false;
                self.portals.remove("");
                ready_for_query(&mut self.conn.outbox, b'I');
                Ok(())
            }
            b'H' => Ok(()),
            other => Err(PgError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                format!("unexpected message type '{}' on the admin console", other as char),
            )),
        }
    }

    async fn describe(&mut self, kind: u8, name: &str) -> Result<(), PgError> {
        let (query, formats) = match kind {
            b'S' => {
                let query = self.statements.get(name).cloned().ok_or_else(|| {
                    PgError::error("26000", format!("prepared statement \"{name}\" does not exist"))
                })?;
                // A statement has no parameters; its columns are those of its answer now.
                self.conn.outbox.extend_from_slice(&[b't', 0, 0, 0, 6, 0, 0]);
                (query, Vec::new())
            }
            b'P' => {
                let portal = self
                    .portals
                    .get(name)
                    .ok_or_else(|| PgError::error("34000", format!("portal \"{name}\" does not exist")))?;
                (portal.query.clone(), portal.formats.clone())
            }
            other => return Err(invalid_kind("DESCRIBE", other)),
        };
        // Only SHOW has rows; a control command must not run just because it was described.
        let answer = match command::parse(&query) {
            Ok(Command::Show(_)) => Some(self.execute(&query).await?),
            _ => None,
        };
        match &answer {
            Some(Answer::Rows(rows)) => rows.encode_description(&mut self.conn.outbox, &formats),
            _ => self.conn.outbox.extend_from_slice(&[b'n', 0, 0, 0, 4]),
        }
        if kind == b'P' {
            if let Some(portal) = self.portals.get_mut(name) {
                portal.answer = answer;
            }
        }
        Ok(())
    }

    async fn execute_portal(&mut self, name: &str) -> Result<(), PgError> {
        let portal = self
            .portals
            .get_mut(name)
            .ok_or_else(|| PgError::error("34000", format!("portal \"{name}\" does not exist")))?;
        let (query, formats, described) =
            (portal.query.clone(), portal.formats.clone(), portal.answer.take());
        let answer = match described {
            Some(answer) => answer,
            None => self.execute(&query).await?,
        };
        // Rows after a Describe went without a second RowDescription; without one, the
        // client asked for none either.
        self.send_answer(&answer, &formats, false);
        Ok(())
    }

    fn send_answer(&mut self, answer: &Answer, formats: &[i16], with_description: bool) {
        match answer {
            Answer::Rows(rows) => {
                if with_description {
                    rows.encode_description(&mut self.conn.outbox, formats);
                }
                rows.encode_rows(&mut self.conn.outbox, formats);
                rows.encode_complete(&mut self.conn.outbox);
            }
            Answer::Done(tag) => command_complete(&mut self.conn.outbox, tag),
            Answer::Empty => self.conn.outbox.extend_from_slice(&[b'I', 0, 0, 0, 4]),
        }
    }

    /// Runs one console command; each counts as one transaction of the admin database, as
    /// in PgBouncer's `SHOW STATS`.
    async fn execute(&mut self, query: &str) -> Result<Answer, PgError> {
        self.shared.console_stats.transaction(0, Duration::ZERO);
        self.shared.console_stats.query(0, Duration::ZERO);
        let command = command::parse(query).map_err(|e| PgError::error(sqlstate::PROTOCOL_VIOLATION, e.0))?;
        if self.role == Role::Stats && !command.read_only() {
            return Err(PgError::error(sqlstate::PROTOCOL_VIOLATION, "admin access needed"));
        }
        let shared = &self.shared;
        let done = |tag: &str| Ok(Answer::Done(tag.to_string()));
        match command {
            Command::Empty => Ok(Answer::Empty),
            Command::Show(what) => {
                let shown = inspect::show(shared, &what)?;
                if let Some((message, detail)) = shown.notice {
                    notice(&mut self.conn.outbox, &message, &detail);
                }
                Ok(shown.rows.map_or(Answer::Done("SHOW".into()), Answer::Rows))
            }
            Command::Pause(db) => {
                control::pause(shared, db.as_deref()).await?;
                done("PAUSE")
            }
            Command::Resume(db) => {
                control::resume_all(shared, db.as_deref()).await?;
                self.suspended_here = false;
                done("RESUME")
            }
            Command::Suspend => {
                control::suspend(shared).await?;
                self.suspended_here = true;
                done("SUSPEND")
            }
            Command::Disable(db) => {
                control::disable(shared, &db, true)?;
                done("DISABLE")
            }
            Command::Enable(db) => {
                control::disable(shared, &db, false)?;
                done("ENABLE")
            }
            Command::Reconnect(db) => {
                control::reconnect(shared, db.as_deref())?;
                done("RECONNECT")
            }
            Command::Kill(db) => {
                control::kill(shared, db.as_deref())?;
                done("KILL")
            }
            Command::KillClient(id) => {
                control::kill_client(shared, id)?;
                done("KILL_CLIENT")
            }
            Command::WaitClose(db) => {
                control::wait_close(shared, db.as_deref()).await?;
                done("WAIT_CLOSE")
            }
            Command::Reload => {
                control::reload(shared).await?;
                done("RELOAD")
            }
            Command::Shutdown(mode) => {
                control::shutdown(shared, mode)?;
                done("SHUTDOWN")
            }
            Command::Set { key, value } => Ok(Answer::Done(control::set(shared, &key, &value)?)),
        }
    }
}

/// PostgreSQL's answer to a Describe or Close of neither a statement nor a portal.
fn invalid_kind(message: &str, kind: u8) -> PgError {
    PgError::error(sqlstate::PROTOCOL_VIOLATION, format!("invalid {message} message subtype {kind}"))
}
