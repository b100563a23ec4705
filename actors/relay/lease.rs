//! Leasing a server and giving it back: the Checkout (with the client watched while it waits in
//! the queue), putting the client's session parameters on the server, learning what a `SET`
//! left behind, and deciding in what state a server goes back (reused, rolled back, reset or
//! closed).

use super::client_side::holds_terminate;
use super::*;

/// The Router's answer to a Checkout, or news that it went away.
pub(super) type RouterAnswer = Result<Result<ServerOffer, PgError>, oneshot::error::RecvError>;

/// The client's session parameters could not be put on its server: the client cannot go on
/// with values it did not choose.
pub(super) fn restore_failed(error: BackendLoginError) -> Ending {
    match error {
        BackendLoginError::Server { code, message, .. } => Ending::Error(Box::new(PgError::fatal(
            &code,
            format!("could not restore session parameters: {message}"),
        ))),
        _ => Ending::ServerLost,
    }
}

impl Relay {
    /// Session mode with `server_fast_close`: the server held for the whole session was opened
    /// before a reload changed the connection settings, and no transaction is open on it.
    pub(super) fn fast_close_due(&mut self) -> bool {
        if self.session.mode() != PoolMode::Session {
            return false;
        }
        let Some(lease) = &self.lease else { return false };
        if lease.link.generation == self.pool.connection_generation() {
            return false;
        }
        self.pool.refresh_settings(&mut self.settings);
        self.settings.1.server_fast_close
            && self.session.tracker().idle()
            && lease.link.conn.inbox.is_empty()
            && lease.link.conn.outbox.is_empty()
    }

    /// Learns the session parameters now set on the leased server (read back, unless the
    /// transaction ended with a full reset) and makes them the client's, as a direct connection
    /// would have them: a `RESET` goes back to the client's startup values. The server goes
    /// back with its session known; the next lease sets what its client needs.
    pub(super) async fn settle_session(&mut self) -> Result<(), Ending> {
        self.session.settled();
        let Some(lease) = &mut self.lease else { return Ok(()) };
        let set_now = if self.session.ends_in_full_reset() {
            lease.link.session_was_reset();
            Vec::new()
        } else {
            match lease.link.learn_session().await {
                Ok(set_now) => set_now,
                Err(error) => return Err(restore_failed(error)),
            }
        };
        for (name, value) in self.params.after_reset(&self.initial_params, &set_now) {
            parameter_status(&mut self.client.outbox, &name, &value);
            if name.eq_ignore_ascii_case("application_name") {
                self.entry.set_application_name(&value);
            }
        }
        Ok(())
    }

    /// Transaction and statement modes: the server goes back as soon as the transaction is
    /// over and nothing is in flight, unless a cancel for it is still on its way.
    pub(super) fn maybe_release(&mut self) {
        // Once a cancel is delivered (CancelDelivered) or the session learned (settle_session),
        // the relay asks again.
        if let Release::Now(after) = self.session.release(self.wire()) {
            self.release(after);
        }
    }

    pub(super) fn release(&mut self, after: AfterLease) {
        if let Some(lease) = self.lease.take() {
            self.cancel.target.replace(None);
            self.give_back(lease, after);
        }
        self.session.released();
        self.entry.holds(0);
        // An idle client should hold no buffer memory.
        if self.client.inbox.is_empty() {
            self.client.inbox = BytesMut::new();
        }
    }

    /// A clean server goes straight back to the Router; one that needs work first goes to its
    /// actor.
    pub(super) fn give_back(&mut self, lease: Box<Lease>, after: AfterLease) {
        // Statements pgcorral added whose fate is unknown: the server's books cannot be
        // trusted, so neither can the server.
        let after = if lease.rewriter.settled() { self.session.vetted(after) } else { AfterLease::Close };
        if after == AfterLease::Reuse && !self.settings.1.reset_query_always {
            let router = live_shared_router(&mut self.router, &self.pool);
            router.do_send(Checkin { server: lease.server, link: lease.link, fresh: false });
        } else {
            lease.server.do_send(Return { link: lease.link, after });
        }
    }

    /// Leases a server from this worker's Router, waiting in its FIFO queue if needed, and
    /// brings the server's session parameters in line with this client's.
    pub(super) async fn acquire(&mut self) -> Result<(), Ending> {
        self.pool.refresh_settings(&mut self.settings);
        let (reply, mut answer) = oneshot::channel();
        let asked = Instant::now();
        let census = &self.pool.census;
        self.entry.waits(census.clock.stamp(asked));
        live_shared_router(&mut self.router, &self.pool).do_send(Checkout { reply });
        let notify = self.settings.1.query_wait_notify;
        let mut notice = (!notify.is_zero()).then(|| Box::pin(tokio::time::sleep(notify)));
        let mut said_goodbye = false;
        let answer = poll_fn(|cx| self.poll_wait(&mut answer, &mut notice, &mut said_goodbye, cx)).await?;
        let (server, link) = match answer {
            Ok(Ok(offer)) => offer.claim(),
            Ok(Err(error)) => return Err(Ending::Error(Box::new(error))),
            Err(_) => {
                return Err(Ending::Error(Box::new(PgError::fatal(
                    sqlstate::CONNECTION_FAILURE,
                    format!("pool {} is shutting down", self.pool.key),
                ))))
            }
        };
        let now = Instant::now();
        self.pool.stats.assigned(self.worker, now - asked);
        self.entry.holds(link.entry.id);
        link.entry.lent(self.entry.id, self.pool.census.clock.stamp(now));
        self.cancel.target.replace(Some(link.cancel.clone()));
        self.lease = Some(Box::new(Lease {
            server,
            link,
            pending_syncs: 0,
            passthrough: 0,
            rewriter: Rewriter::default(),
        }));
        self.session.leased();
        self.sync_params().await
    }

    /// Waits for the Router's answer while watching the client: a client that vanishes or is
    /// killed while queued leaves the queue (dropping `answer` tells the Router), and nothing it
    /// sent reaches PostgreSQL. What it sends meanwhile is kept for when a server comes. A
    /// client that closes after a Terminate said goodbye on purpose: what it sent before the
    /// Terminate runs, as PostgreSQL runs it.
    pub(super) fn poll_wait(
        &mut self,
        answer: &mut oneshot::Receiver<Result<ServerOffer, PgError>>,
        notice: &mut Option<Pin<Box<tokio::time::Sleep>>>,
        said_goodbye: &mut bool,
        cx: &mut Context<'_>,
    ) -> Poll<Result<RouterAnswer, Ending>> {
        if let Poll::Ready(reply) = Pin::new(answer).poll(cx) {
            return Poll::Ready(Ok(reply));
        }
        while let Poll::Ready(control) = self.control.poll_recv(cx) {
            if let Control::Kill(error) = control {
                return Poll::Ready(Err(Ending::Error(error)));
            }
        }
        if notice.as_mut().is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready()) {
            *notice = None;
            // query_wait_notify: tell the client why nothing happens, then keep waiting.
            PgError {
                severity: "NOTICE".into(),
                code: "00000".into(),
                message: format!(
                    "No server connection available in pool {}, client being queued",
                    self.pool.key
                ),
            }
            .encode_notice(&mut self.client.outbox);
        }
        if *said_goodbye {
            return Poll::Pending;
        }
        if self.client.poll_send(cx).is_ready_err() {
            return Poll::Ready(Err(Ending::ClientLeft));
        }
        while self.client.inbox.len() < HIGH_WATER {
            match self.client.poll_fill(cx) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                    if !holds_terminate(&self.client.inbox, self.max_packet) {
                        return Poll::Ready(Err(Ending::ClientLeft));
                    }
                    *said_goodbye = true;
                    break;
                }
                Poll::Ready(Ok(_)) => continue,
                Poll::Pending => break,
            }
        }
        Poll::Pending
    }

    /// Sends what makes the leased server's session parameters match what this client believes.
    pub(super) async fn sync_params(&mut self) -> Result<(), Ending> {
        let Some(lease) = &mut self.lease else { return Ok(()) };
        if lease.link.session_unknown {
            if let Err(error) = lease.link.learn_session().await {
                return Err(restore_failed(error));
            }
        }
        let Some(lease) = &mut self.lease else { return Ok(()) };
        if lease.link.matches_client.as_ref().is_some_and(|known| known.same_set(&self.params)) {
            return Ok(());
        }
        let link = &lease.link;
        let Some(sql) = self.params.sync_query(&link.params, &link.session, &link.baseline) else {
            lease.link.matches_client = Some(self.params.clone());
            self.params_confirmed = true;
            return Ok(());
        };
        if self.params_confirmed
            && self.session.mode() != PoolMode::Session
            && lease.link.session == self.params.session()
        {
            // Only reported parameters differ, with values a server took before, which stay
            // valid (a time zone, an application_name): sent ahead of the client's messages in
            // the same write, with no round trip of their own (asyncpg's RESET ALL on every
            // release makes this once per transaction); their answers are swallowed in
            // server_input. Unreported ones can stop being valid (a dropped text search
            // configuration) and are set first, so that no client query runs without them.
            postgres_protocol::message::frontend::query(&sql, &mut lease.link.conn.outbox).map_err(|e| {
                Ending::Error(Box::new(PgError::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string())))
            })?;
            lease.pending_syncs += 1;
            lease.link.matches_client = Some(self.params.clone());
            return Ok(());
        }
        if let Err(error) = lease.link.run(&sql).await {
            return Err(restore_failed(error));
        }
        let Some(lease) = &mut self.lease else { return Ok(()) };
        // The server's normalised spelling becomes what the client is compared with.
        for name in self.params.iter().map(|(n, _)| n.to_string()).collect::<Vec<_>>() {
            if let Some(value) = lease.link.param(&name) {
                self.params.observe(&name, value);
            }
        }
        lease.link.session = self.params.session().to_vec();
        lease.link.session_unknown = false;
        lease.link.matches_client = Some(self.params.clone());
        self.params_confirmed = true;
        Ok(())
    }

    /// The ParameterStatus values of a server of this pool: cached, or learned by leasing one
    /// (the very first client of a pool). Also surfaces a server login error to the client.
    pub async fn welcome(&mut self) -> Result<Welcome, PgError> {
        if let Some(welcome) = self.pool.welcome() {
            return Ok(welcome);
        }
        match self.acquire().await {
            Ok(()) => {}
            Err(Ending::Error(e)) => return Err(*e),
            Err(_) => return Err(PgError::fatal(sqlstate::CONNECTION_FAILURE, "server conn crashed?")),
        }
        let welcome = self.lease.as_ref().map(|l| l.link.params.clone()).unwrap_or_default();
        self.release(AfterLease::Reuse);
        Ok(self.pool.welcome().unwrap_or_else(|| Arc::new(welcome)))
    }
}
