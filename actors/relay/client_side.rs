//! Client to server: frames what the client sends, holds whole only what pgcorral must read
//! (`protocol::streaming`), leases a server at the first message of a transaction, answers a
//! `DEALLOCATE` of pgcorral's books without a server, runs messages through the prepared-
//! statement rewriter, and stops reading at Terminate.

use super::*;

/// A message pgcorral must read whole to act on, above what it holds for one client.
pub(super) fn too_large_to_read(frame: Frame) -> PgError {
    let what = match frame.tag {
        b'P' => "a named Parse (prepared statement) in transaction pooling",
        _ => "a protocol message pgcorral reads",
    };
    PgError::fatal(
        sqlstate::PROGRAM_LIMIT_EXCEEDED,
        format!("{what} of {} bytes is above pgcorral's limit of {MAX_HELD} bytes", frame.len),
    )
}

/// Whether the whole messages at the front of `buf` include a Terminate.
pub(super) fn holds_terminate(buf: &[u8], max_packet: usize) -> bool {
    let mut at = 0;
    while let Ok(Some(frame)) = frame_at(&buf[at..], max_packet) {
        if frame.tag == b'X' {
            return true;
        }
        at += frame.len;
    }
    false
}

/// Parse messages in a run of whole messages pgcorral wrote.
pub(super) fn count_parses(bytes: &[u8]) -> u64 {
    let mut at = 0;
    let mut parses = 0;
    while let Ok(Some(frame)) = frame_at(&bytes[at..], usize::MAX) {
        parses += u64::from(frame.tag == b'P');
        at += frame.len;
    }
    parses
}

impl Relay {
    /// Forwards every complete client message, leasing a server first if none is held.
    pub(super) async fn client_input(&mut self) -> Result<(), Ending> {
        let mut end = 0;
        loop {
            if self.client_passthrough > 0 {
                if !pass_through(&mut self.client_passthrough, self.client.inbox.len(), &mut end) {
                    break;
                }
                continue;
            }
            let frame = match header_at(&self.client.inbox[end..], self.max_packet) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => return Err(Ending::Error(Box::new(e.to_pg()))),
            };
            let available = self.client.inbox.len() - end;
            let head = match client_hold(frame, &self.client.inbox[end..], self.rewrites_statements()) {
                Hold::Head(head) if available >= head => head,
                Hold::Head(_) | Hold::More => break,
                Hold::TooLarge => return Err(Ending::Error(Box::new(too_large_to_read(frame)))),
            };
            let whole = available >= frame.len;
            if frame.tag == b'X' {
                // PostgreSQL reads nothing after Terminate.
                self.client.inbox.truncate(end);
                self.session.terminate();
                break;
            }

            if self.lease.is_none() {
                if frame.tag == b'Q'
                    && whole
                    && self.rewrites_statements()
                    && self.deallocate_locally(frame.len)
                {
                    continue;
                }
                // Only at a message boundary with nothing pending: `end` is 0 here. Boxed: the
                // checkout's state would otherwise sit in every idle client's future.
                Box::pin(self.acquire()).await?;
            }
            let query =
                (frame.tag == b'Q' && whole).then(|| &self.client.inbox[end + 5..end + frame.len - 1]);
            self.session.client_message(frame.tag, query);
            let ignored_syncs = self.session.take_ignored_syncs();
            let rewritten = self.rewrites_statements()
                && matches!(frame.tag, b'P' | b'B' | b'D' | b'C' | b'Q' | b'S' | b'F')
                && self.rewrite_client_message(end, head.max(available.min(frame.len)))?;
            if let Some(lease) = &mut self.lease {
                lease.rewriter.syncs_ignored(ignored_syncs);
            }
            if rewritten {
                end = 0;
                self.client_passthrough = frame.len - head.max(available.min(frame.len));
                continue;
            }
            let here = available.min(frame.len);
            end += here;
            self.client_passthrough = frame.len - here;
        }
        self.forward_to_server(end);
        Ok(())
    }

    /// Runs the message at `end` through the prepared-statement books. When it must change
    /// (renamed, preceded by a Parse the server lacks, ...), sends what precedes it, then its
    /// replacement, and returns true; otherwise it stays in the run being forwarded.
    pub(super) fn rewrite_client_message(&mut self, end: usize, len: usize) -> Result<bool, Ending> {
        let Some(lease) = &mut self.lease else { return Ok(false) };
        let capacity = self.settings.1.max_prepared_statements;
        let frame = &self.client.inbox[end..end + len];
        let rewritten = lease
            .rewriter
            .client_message(frame, &mut self.statements, &mut lease.link.statements, capacity)
            .map_err(|e| Ending::Error(Box::new(e.to_pg())))?;
        let tag = frame[0];
        if tag == b'P' || tag == b'C' || tag == b'Q' {
            self.entry.set_prepared(self.statements.len());
        }
        let stats = &self.pool.stats;
        match tag {
            b'P' => stats.client_parse(self.worker),
            b'B' => stats.bind(self.worker),
            _ => {}
        }
        let server_parses = match &rewritten {
            Rewritten::Unchanged => u64::from(tag == b'P'),
            Rewritten::Replaced(bytes) => count_parses(bytes),
        };
        if server_parses > 0 {
            stats.server_parse(self.worker, server_parses);
        }
        let Rewritten::Replaced(bytes) = rewritten else { return Ok(false) };
        self.forward_to_server(end);
        self.client.inbox.advance(len);
        self.pool.stats.received(self.worker, len);
        if let Some(lease) = &mut self.lease {
            append(&mut lease.link.conn.outbox, bytes);
            lease.link.entry.set_prepared(lease.link.statements.len());
        }
        Ok(true)
    }

    /// `DEALLOCATE name` or `DEALLOCATE ALL` outside a transaction, for statements pgcorral
    /// keeps the books of: answered here (the statements stay on servers for other clients),
    /// with no server leased. Returns whether the message at the front was consumed.
    pub(super) fn deallocate_locally(&mut self, len: usize) -> bool {
        let body = &self.client.inbox[5..len];
        let query = std::str::from_utf8(&body[..body.len().saturating_sub(1)]).unwrap_or("");
        let Some(target) = deallocate_target(query) else { return false };
        let tag = match target {
            None => {
                self.statements.clear();
                "DEALLOCATE ALL"
            }
            Some(name) if self.statements.remove(&name) => "DEALLOCATE",
            Some(_) => return false,
        };
        self.client.inbox.advance(len);
        command_complete(&mut self.client.outbox, tag);
        ready_for_query(&mut self.client.outbox, b'I');
        self.entry.set_prepared(self.statements.len());
        true
    }

    pub(super) fn forward_to_server(&mut self, len: usize) {
        if len == 0 {
            return;
        }
        self.pool.stats.received(self.worker, len);
        // PgBouncer's query and transaction times run while a server works for the client,
        // not while the client waits for one.
        if self.query_started.is_none() {
            let now = Instant::now();
            self.query_started = Some(now);
            self.xact_started.get_or_insert(now);
        }
        let chunk = self.client.inbox.split_to(len);
        if let Some(lease) = &mut self.lease {
            append(&mut lease.link.conn.outbox, chunk);
        }
    }
}
