//! Server to client: forwards what the server sends (streaming what it does not read), feeds the
//! protocol model every tag, swallows the answers to messages pgcorral added, watches
//! ReadyForQuery, ParameterStatus and CommandComplete, and refuses transaction blocks in
//! statement mode.

use super::lease::restore_failed;
use super::*;

impl Relay {
    /// Forwards every complete server message, watching transaction boundaries and parameters.
    pub(super) fn server_input(&mut self) -> Result<(), Ending> {
        let rewriting = self.rewrites_statements();
        let Some(lease) = &mut self.lease else { return Ok(()) };
        let mut end = 0;
        let mut refused_block = false;
        loop {
            if lease.passthrough > 0 {
                if !pass_through(&mut lease.passthrough, lease.link.conn.inbox.len(), &mut end) {
                    break;
                }
                continue;
            }
            let frame = match header_at(&lease.link.conn.inbox[end..], MAX_SERVER_MESSAGE) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    log::error!("pool {}: server sent a malformed message: {e}", self.pool.key);
                    return Err(Ending::ServerLost);
                }
            };
            let available = lease.link.conn.inbox.len() - end;
            if available < frame.len {
                if lease.pending_syncs > 0 || server_holds_whole(frame) {
                    break;
                }
                // Streams to the client as it arrives: its tag is all the model needs.
                if frame.tag == b'E' && rewriting {
                    let header = &lease.link.conn.inbox[end..end + 5];
                    lease.rewriter.server_message(header, &mut self.statements, &mut lease.link.statements);
                }
                self.session.server_message(frame.tag, None);
                if matches!(frame.tag, b'G' | b'W') {
                    lease.rewriter.syncs_ignored(self.session.take_ignored_syncs());
                }
                lease.passthrough = frame.len - available;
                end += available;
                break;
            }
            if lease.pending_syncs > 0 {
                // The answers to a parameter sync come before the client's own.
                let body = frame.body(&lease.link.conn.inbox[end..]);
                match frame.tag {
                    b'Z' => lease.pending_syncs -= 1,
                    b'S' => {
                        if let Some((name, value)) = parse_parameter_status(body) {
                            lease.link.set_param(&name, &value);
                            self.params.observe(&name, &value);
                        }
                    }
                    b'E' => return Err(restore_failed(server_error(body))),
                    _ => {}
                }
                let forwarded =
                    take_frame(&mut lease.link.conn.inbox, end, frame.len, &mut self.client.outbox);
                self.pool.stats.sent(self.worker, forwarded);
                end = 0;
                continue;
            }
            if rewriting && matches!(frame.tag, b'1' | b'3' | b'E' | b'Z') {
                let message = &lease.link.conn.inbox[end..end + frame.len];
                let verdict =
                    lease.rewriter.server_message(message, &mut self.statements, &mut lease.link.statements);
                if verdict != ServerVerdict::Forward {
                    let forwarded =
                        take_frame(&mut lease.link.conn.inbox, end, frame.len, &mut self.client.outbox);
                    self.pool.stats.sent(self.worker, forwarded);
                    if let ServerVerdict::Replace(renamed) = verdict {
                        self.session.server_message(b'E', None);
                        self.client.outbox.extend_from_slice(&renamed);
                    }
                    end = 0;
                    continue;
                }
            }
            let body = frame.body(&lease.link.conn.inbox[end..]);
            self.session.server_message(frame.tag, body.first().copied());
            match frame.tag {
                b'G' | b'W' => lease.rewriter.syncs_ignored(self.session.take_ignored_syncs()),
                b'Z' => {
                    let now = Instant::now();
                    let stats = &self.pool.stats;
                    if let Some(start) = self.query_started.take() {
                        stats.query(self.worker, now - start);
                    }
                    // Pipelined queries: the next one's time runs from this one's end.
                    if self.session.tracker().busy() {
                        self.query_started = Some(now);
                    }
                    if self.session.transaction_over() {
                        if let Some(start) = self.xact_started.take() {
                            stats.transaction(self.worker, now - start);
                        }
                    }
                    if self.session.opened_block() {
                        refused_block = true;
                        break;
                    }
                }
                b'C' => {
                    let tag = body.strip_suffix(b"\0").unwrap_or(body);
                    self.session.command_complete(tag);
                    if rewriting
                        && lease.rewriter.command_complete(
                            tag,
                            &mut self.statements,
                            &mut lease.link.statements,
                        ) == BooksAfter::Untrusted
                    {
                        self.session.distrust_books();
                    }
                    if crate::session::changes_session(tag) {
                        lease.link.session_unknown = true;
                        lease.link.matches_client = None;
                    }
                }
                b'S' => {
                    if let Some((name, value)) = parse_parameter_status(body) {
                        lease.link.set_param(&name, &value);
                        self.params.observe(&name, &value);
                        if name.eq_ignore_ascii_case("application_name") {
                            self.entry.set_application_name(&value);
                        }
                    }
                }
                _ => {}
            }
            end += frame.len;
        }
        let chunk = lease.link.conn.inbox.split_to(end);
        self.pool.stats.sent(self.worker, chunk.len());
        append(&mut self.client.outbox, chunk);
        if refused_block {
            return self.refuse_transaction_block();
        }
        self.maybe_release();
        Ok(())
    }

    /// Statement mode: a statement opened a transaction block. Its ReadyForQuery (`T`) is
    /// replaced by an error and an idle ReadyForQuery, and the server is rolled back.
    pub(super) fn refuse_transaction_block(&mut self) -> Result<(), Ending> {
        let Some(lease) = &mut self.lease else { return Ok(()) };
        let ready_len =
            frame_at(&lease.link.conn.inbox, MAX_SERVER_MESSAGE).ok().flatten().map_or(0, |f| f.len);
        lease.link.conn.inbox.advance(ready_len);
        PgError::error(
            sqlstate::FEATURE_NOT_SUPPORTED,
            "transaction blocks not allowed in statement pooling mode",
        )
        .encode(&mut self.client.outbox);
        ready_for_query(&mut self.client.outbox, b'I');
        self.session.refused_block();
        self.release(AfterLease::Rollback);
        Ok(())
    }
}
