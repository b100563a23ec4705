//! The live system: one actor per client session, server connection, pool and (per worker)
//! router, under a supervisor. See README's architecture section for who sends what to whom.

pub mod census;
pub mod client;
pub mod client_login;
pub mod console;
pub mod control;
pub mod hosts;
pub mod inspect;
pub mod listener;
pub mod messages;
pub mod metrics_server;
pub mod peers;
pub mod pool;
pub mod registry;
pub mod relay;
pub mod replication;
pub mod router;
pub mod server;
pub mod server_open;
pub mod supervisor;
pub mod takeover;
