//! pgcorral: a PostgreSQL connection pooler built as an actor system on actix, reading
//! PgBouncer's configuration unchanged.
//!
//! `src/` holds the plumbing (wire protocol, configuration, authentication, sockets, process
//! handling); `actors/` holds the live system. README's architecture section has the map.

pub mod admin;
pub mod auth;
pub mod config;
pub mod daemon;
#[doc(hidden)]
pub mod fuzzing;
pub mod local_queue;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod params;
pub mod protocol;
pub mod session;
pub mod stats;
pub mod takeover;
pub mod tls;
pub mod version;

#[path = "../actors/mod.rs"]
pub mod actors;
