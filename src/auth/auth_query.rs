//! `auth_user` + `auth_query`: the secret of a user missing from `auth_file`, looked up in
//! PostgreSQL itself over a short-lived connection as `auth_user`.
//!
//! The query runs with the simple protocol, `$1` replaced by the user name as a quoted
//! literal (the user name comes from an unauthenticated client, so quoting is what stands
//! between it and SQL; see [`bind_user`]). The first row's second column is the secret;
//! no row, or NULL (the default query's answer for an expired `rolvaliduntil`), means the
//! user cannot log in.

use std::time::Duration;

use super::backend_login::{login, query_rows, BackendLoginError, LoginRequest};
use super::secret::Secret;
use crate::net::{Framed, ServerAddr, TcpSettings};
use crate::tls::{negotiate_server_tls, ServerTls};

/// Where and how to run one lookup.
pub struct AuthQuery<'a> {
    pub addr: &'a ServerAddr,
    pub tls: &'a ServerTls,
    pub tcp: &'a TcpSettings,
    pub auth_user: &'a str,
    /// `auth_user`'s own secret from `auth_file`.
    pub auth_secret: Option<&'a Secret>,
    pub dbname: &'a str,
    pub query: &'a str,
    pub timeout: Duration,
}

/// Why a lookup could not be answered (as opposed to "no such user").
#[derive(Debug, thiserror::Error)]
pub enum AuthQueryError {
    #[error("auth_query connection to {addr} failed: {detail}")]
    Connect { addr: String, detail: String },
    #[error("auth_query as \"{user}\" failed: {source}")]
    Query {
        user: String,
        #[source]
        source: BackendLoginError,
    },
    #[error("auth_query timed out")]
    Timeout,
}

impl AuthQuery<'_> {
    /// The stored secret of `user`, None when PostgreSQL has none for it.
    pub async fn fetch(&self, user: &str) -> Result<Option<String>, AuthQueryError> {
        tokio::time::timeout(self.timeout, self.run(user)).await.map_err(|_| AuthQueryError::Timeout)?
    }

    async fn run(&self, user: &str) -> Result<Option<String>, AuthQueryError> {
        let connect_error = |detail: String| AuthQueryError::Connect { addr: self.addr.to_string(), detail };
        let host = match self.addr {
            ServerAddr::Tcp { host, .. } => host.as_str(),
            ServerAddr::Unix { .. } => "",
        };
        let socket = self.addr.connect_with(self.tcp).await.map_err(|e| connect_error(e.to_string()))?;
        let mut conn =
            Framed::new(negotiate_server_tls(socket, self.tls, host).await.map_err(connect_error)?);
        let query_error = |source| AuthQueryError::Query { user: self.auth_user.to_string(), source };
        let request = LoginRequest {
            user: self.auth_user,
            database: self.dbname,
            password: self.auth_secret,
            params: &[],
            scram_keys: None,
            protocol_minor: 0,
        };
        login(&mut conn, &request).await.map_err(query_error)?;
        let rows = query_rows(&mut conn, &bind_user(self.query, user), 1).await.map_err(query_error)?;
        Ok(rows.into_iter().next().and_then(|row| row.into_iter().nth(1).flatten()))
    }
}

/// `query` with each `$1` replaced by `user` as a SQL string literal. Quotes are doubled; a
/// name holding a backslash is written as an `E'...'` literal with the backslash doubled, so
/// the result means the same whatever `standard_conforming_strings` is.
pub fn bind_user(query: &str, user: &str) -> String {
    let quoted = if user.contains('\\') {
        format!("E'{}'", user.replace('\\', "\\\\").replace('\'', "''"))
    } else {
        format!("'{}'", user.replace('\'', "''"))
    };
    // `$1` followed by a digit would be `$10` and up, which a one-parameter query cannot have.
    let mut out = String::with_capacity(query.len() + quoted.len());
    let mut rest = query;
    while let Some(at) = rest.find("$1") {
        let after = &rest[at + 2..];
        out.push_str(&rest[..at]);
        if after.starts_with(|c: char| c.is_ascii_digit()) {
            out.push_str("$1");
        } else {
            out.push_str(&quoted);
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_name_is_bound_as_a_literal() {
        assert_eq!(bind_user("SELECT u, p FROM t WHERE u=$1", "bob"), "SELECT u, p FROM t WHERE u='bob'");
        assert_eq!(bind_user("WHERE u=$1", "o'brien"), "WHERE u='o''brien'");
        assert_eq!(bind_user("WHERE u=$1", "a\\'; DROP TABLE x; --"), "WHERE u=E'a\\\\''; DROP TABLE x; --'");
        assert_eq!(bind_user("$1 $10 $1", "x"), "'x' $10 'x'");
    }
}
