//! Replication connections (`replication=true` for physical streaming and base backups,
//! `replication=database` for logical replication), passed through as PgBouncer 1.23 does:
//! pgcorral authenticates the client as usual, opens a server connection of the client's own
//! with the same replication mode (through the pool's hosts and `target_session_attrs`), and
//! from then on copies bytes both ways untouched until either side closes or the client is
//! killed. The pair is never pooled; the server connection ends with the client.
//!
//! Such connections take no pool slot: PostgreSQL bounds them by `max_wal_senders`, apart from
//! `max_connections`, and `max_client_conn` bounds the clients.

use std::future::poll_fn;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use crate::actors::pool::PoolShared;
use crate::actors::relay::Control;
use crate::local_queue::LocalReceiver;
use crate::net::Framed;
use crate::protocol::backend;
use crate::protocol::cancel_key::SecretKey;
use crate::protocol::PgError;

/// What a client asked for with its `replication` startup parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Replication {
    #[default]
    None,
    /// `replication=true` (or on, yes, 1): the physical replication protocol.
    Physical,
    /// `replication=database`: logical replication, connected to a database.
    Logical,
}

impl Replication {
    /// The value as PostgreSQL reads it; anything else is refused, as PostgreSQL refuses it.
    pub fn parse(value: &str) -> Result<Replication, String> {
        match value.to_ascii_lowercase().as_str() {
            "database" => Ok(Replication::Logical),
            "true" | "on" | "yes" | "1" => Ok(Replication::Physical),
            "false" | "off" | "no" | "0" => Ok(Replication::None),
            _ => Err(format!("invalid value for parameter \"replication\": \"{value}\"")),
        }
    }

    /// The startup parameter sent to the server.
    pub fn startup_value(self) -> Option<&'static str> {
        match self {
            Replication::None => None,
            Replication::Physical => Some("true"),
            Replication::Logical => Some("database"),
        }
    }

    /// SHOW CLIENTS' and SHOW SERVERS' `replication` column.
    pub fn shown(self) -> &'static str {
        match self {
            Replication::None => "none",
            Replication::Physical => "physical",
            Replication::Logical => "logical",
        }
    }
}

/// A logged-in replication client and its own server connection.
pub struct ReplicationPipe {
    pub client: Framed,
    pub server: Framed,
    pub control_rx: LocalReceiver<Control>,
    /// The client's place in its pool (SHOW POOLS counts it), given up when the pipe ends.
    pub member: crate::actors::pool::PoolMember,
}

/// Opens the client's server connection: the pool's startup parameters, the client's own
/// (`application_name` names a logical subscription's walsender), and the replication mode.
/// Queues the welcome for the client: the server's ParameterStatus, pgcorral's
/// BackendKeyData, ReadyForQuery.
pub async fn open(
    pool: &PoolShared,
    mode: Replication,
    client_settings: &[(String, String)],
    client: &mut Framed,
    key: (i32, &SecretKey),
) -> Result<Framed, PgError> {
    let settings = pool.settings();
    let mut params = settings.startup_params.clone();
    for (name, value) in client_settings {
        params.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        params.push((name.clone(), value.clone()));
    }
    params.push(("replication".into(), mode.startup_value().unwrap_or("false").into()));
    let (server, outcome) = super::server_open::walk(&settings, pool, &params).await?;
    let mut hello = BytesMut::new();
    for (name, value) in &outcome.params {
        backend::parameter_status(&mut hello, name, value);
    }
    backend::backend_key_data(&mut hello, key.0, key.1.as_bytes());
    backend::ready_for_query(&mut hello, b'I');
    client.outbox.extend_from_slice(&hello);
    Ok(server)
}

impl ReplicationPipe {
    /// Copies bytes both ways until one side closes or the client is killed; returns why.
    pub async fn run(mut self) -> String {
        // What each side sent ahead of the pipe (pipelined after the startup packet, or after
        // the server's ReadyForQuery) goes first.
        let client_ahead = std::mem::take(&mut self.client.inbox);
        self.server.outbox.extend_from_slice(&client_ahead);
        let server_ahead = std::mem::take(&mut self.server.inbox);
        self.client.outbox.extend_from_slice(&server_ahead);
        if let Err(e) = self.client.send().await {
            return format!("client gone: {e}");
        }
        if let Err(e) = self.server.send().await {
            return format!("server gone: {e}");
        }
        let copy = tokio::io::copy_bidirectional(&mut self.client.socket, &mut self.server.socket);
        // A replication client holds its server for its whole life: it stays through an
        // online restart, so a handover nudge changes nothing.
        let control_rx = &mut self.control_rx;
        let control = async move {
            loop {
                match poll_fn(|cx| control_rx.poll_recv(cx)).await {
                    Control::HandOver => continue,
                    other => return other,
                }
            }
        };
        let reason = tokio::select! {
            copied = copy => match copied {
                Ok((up, down)) => format!("replication connection closed ({up} bytes sent, {down} received)"),
                Err(e) => format!("replication connection ended: {e}"),
            },
            control = control => match control {
                Control::Kill(error) => {
                    let mut buf = BytesMut::new();
                    error.encode(&mut buf);
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.client.socket.write_all(&buf)).await;
                    error.message
                }
                Control::CancelDelivered | Control::HandOver => "replication connection ended".into(),
            },
        };
        let _ = self.server.socket.shutdown().await;
        reason
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replication_parameter_reads_as_postgresql_reads_it() {
        for (value, mode) in [
            ("true", Replication::Physical),
            ("ON", Replication::Physical),
            ("1", Replication::Physical),
            ("database", Replication::Logical),
            ("off", Replication::None),
            ("0", Replication::None),
        ] {
            assert_eq!(Replication::parse(value), Ok(mode), "{value}");
        }
        assert!(Replication::parse("maybe")
            .unwrap_err()
            .contains("invalid value for parameter \"replication\""));
        assert_eq!(Replication::Logical.startup_value(), Some("database"));
        assert_eq!(Replication::Physical.shown(), "physical");
    }
}
