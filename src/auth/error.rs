//! Errors raised by the SCRAM exchanges: [`AuthError`] while authenticating
//! a client connecting to pgcorral, [`ScramClientError`] while pgcorral
//! logs in to a server.
//!
//! The client-facing side needs to tell the outcomes apart so it can pick
//! the right SQLSTATE (28P01 for a wrong password, 08P01 for a malformed
//! exchange, 28000 for a channel binding failure) without inspecting
//! strings; [`AuthError::sqlstate`] does that mapping the way PostgreSQL's
//! auth-scram.c does.

/// Why client authentication failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The client proved knowledge of a different password.
    #[error("password authentication failed")]
    WrongPassword,
    /// The client sent a SASL message that does not follow RFC 5802, or sent
    /// it at the wrong point of the exchange, or mixed up the channel binding
    /// flag and the mechanism it picked.
    #[error("malformed SCRAM message: {0}")]
    Protocol(String),
    /// The client picked a SASL mechanism pgcorral did not offer.
    #[error("unsupported SASL mechanism \"{0}\"")]
    UnsupportedMechanism(String),
    /// The client asked for a channel binding type other than
    /// `tls-server-end-point`, the only one PostgreSQL and pgcorral know.
    #[error("unsupported SCRAM channel-binding type \"{0}\"")]
    UnsupportedChannelBindingType(String),
    /// The client sent the GS2 flag `y` ("I can bind, but you cannot") to a
    /// server that offered SCRAM-SHA-256-PLUS: someone in between may have
    /// stripped the -PLUS mechanism from the offer.
    #[error(
        "SCRAM channel binding negotiation error: the client supports SCRAM channel binding but thinks \
         the server does not, however this server does support channel binding"
    )]
    ChannelBindingNegotiation,
    /// The channel binding data the client signed is not that of the TLS
    /// connection pgcorral holds: the client is talking to someone else's
    /// certificate, i.e. through a man in the middle.
    #[error("SCRAM channel binding check failed")]
    ChannelBindingMismatch,
}

impl AuthError {
    /// The SQLSTATE PostgreSQL reports for this failure: 28P01
    /// (invalid_password), 28000 (invalid_authorization_specification) for
    /// the channel binding checks, 08P01 (protocol_violation) otherwise.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            AuthError::WrongPassword => "28P01",
            AuthError::ChannelBindingNegotiation | AuthError::ChannelBindingMismatch => "28000",
            AuthError::Protocol(_)
            | AuthError::UnsupportedMechanism(_)
            | AuthError::UnsupportedChannelBindingType(_) => "08P01",
        }
    }
}

/// Why pgcorral's own SCRAM exchange with a server failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramClientError {
    /// The server sent a message that does not follow RFC 5802, or sent it
    /// at the wrong point of the exchange.
    #[error("malformed SCRAM message from server: {0}")]
    Protocol(String),
    /// The server ended the exchange with `e=`.
    #[error("server reported SCRAM error \"{0}\"")]
    ServerError(String),
    /// server-final-message carries no signature, so the server has not
    /// shown that it knows the password.
    #[error("server-final-message has no server signature")]
    MissingServerSignature,
    /// The server's signature is not the one the password (or ServerKey)
    /// gives: it does not know the password, or is not the server we think.
    #[error("server signature does not match")]
    WrongServerSignature,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_follow_postgres() {
        assert_eq!(AuthError::WrongPassword.sqlstate(), "28P01");
        assert_eq!(AuthError::ChannelBindingNegotiation.sqlstate(), "28000");
        assert_eq!(AuthError::ChannelBindingMismatch.sqlstate(), "28000");
        assert_eq!(AuthError::Protocol("x".into()).sqlstate(), "08P01");
        assert_eq!(AuthError::UnsupportedMechanism("x".into()).sqlstate(), "08P01");
        assert_eq!(AuthError::UnsupportedChannelBindingType("x".into()).sqlstate(), "08P01");
    }
}
