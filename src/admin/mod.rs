//! The admin console's plumbing: parsing commands ([`command`]), the row sets `SHOW` returns
//! ([`show`]) and their wire encoding ([`resultset`]). The console session itself, which runs
//! the commands against the live system, is `actors/console.rs`.

pub mod command;
pub mod resultset;
pub mod show;
