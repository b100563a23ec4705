//! The PostgreSQL v3 wire protocol as a pooler needs it.
//!
//! postgres-protocol only speaks the client side; a pooler must also frame what clients send,
//! read startup packets, and write the backend messages a server would (authentication
//! requests, ParameterStatus, errors). Everything here is pure: no sockets, only bytes.
//!
//! - [`framing`]: finding message boundaries in a read buffer, with the `max_packet_size` cap.
//! - [`startup`]: the untagged first packet (StartupMessage, SSLRequest, GSSENCRequest, CancelRequest),
//!   and the protocol version negotiated with it.
//! - [`cancel_key`]: cancel keys of 4 bytes (protocol 3.0) or up to 256 (3.2).
//! - [`options`]: the `options` startup parameter's `-c name=value` switches.
//! - [`backend`]: writers for the messages pgcorral sends to clients as if it were PostgreSQL.
//! - [`frontend`]: the few client messages pgcorral reads itself (password, SASL) and writes to servers.
//! - [`extended`]: the extended-protocol messages pgcorral reads (the rewriter, the console).
//! - [`fields`]: the one field-by-field reader of message bodies.
//! - [`error`]: `PgError`, an ErrorResponse with its SQLSTATE, and the protocol's own errors.
//! - [`prepared`]: named prepared statements across servers in transaction mode.
//! - [`streaming`]: which messages stream through and which are held whole (bounded memory).
//! - [`tracker`]: the transaction-boundary state machine that decides when a server can be released.

pub mod backend;
pub mod cancel_key;
pub mod error;
pub mod extended;
pub mod fields;
pub mod framing;
pub mod frontend;
pub mod options;
pub mod prepared;
pub mod startup;
pub mod streaming;
pub mod tracker;

pub use error::{PgError, ProtocolError};
pub use framing::{frame_at, header_at, Frame};
pub use tracker::TxnTracker;
