//! The version string, shared by `--version` and the console's `SHOW VERSION`.

pub const VERSION: &str = concat!("pgcorral ", env!("CARGO_PKG_VERSION"));

/// What the console's `SHOW VERSION` says: the PgBouncer release whose console this one
/// answers like (monitoring tools read its number), then pgcorral's own version.
pub const CONSOLE_VERSION: &str = concat!("PgBouncer 1.25.1 (pgcorral ", env!("CARGO_PKG_VERSION"), ")");
