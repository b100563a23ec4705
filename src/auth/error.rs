//! Errors raised while authenticating a client connecting to pgcorral.
//!
//! These are the outcomes the client-facing side needs to tell apart so it
//! can pick the right SQLSTATE (28P01 for a wrong password, 08P01 for a
//! malformed exchange) without inspecting strings.

/// Why client authentication failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The client proved knowledge of a different password.
    #[error("password authentication failed")]
    WrongPassword,
    /// The client sent a SASL message that does not follow RFC 5802, or sent
    /// it at the wrong point of the exchange.
    #[error("malformed SCRAM message: {0}")]
    Protocol(String),
    /// The client picked a SASL mechanism pgcorral did not offer.
    #[error("unsupported SASL mechanism \"{0}\"")]
    UnsupportedMechanism(String),
    /// The client asked for SCRAM channel binding, which pgcorral does not
    /// offer yet.
    #[error("SCRAM channel binding is not supported")]
    ChannelBindingUnsupported,
}
