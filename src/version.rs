//! The version string, shared by `--version` and the console's `SHOW VERSION`.

pub const VERSION: &str = concat!("pgcorral ", env!("CARGO_PKG_VERSION"));
