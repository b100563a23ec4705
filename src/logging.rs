//! Logging to stderr (unless `-q`) and to `logfile` (when set), through env_logger.
//!
//! Verbosity follows PgBouncer: the `verbose` key plus one per `-v`; 0 logs info and above,
//! 1 adds debug, 2 or more adds trace. `RUST_LOG` overrides it for debugging.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::Mutex;

struct Tee {
    stderr: bool,
    file: Option<Mutex<File>>,
}

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.stderr {
            let _ = io::stderr().write_all(buf);
        }
        if let Some(file) = &self.file {
            let _ = file.lock().unwrap().write_all(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub fn init(verbosity: u8, quiet: bool, logfile: Option<&Path>) -> io::Result<()> {
    let file = match logfile {
        Some(path) => Some(Mutex::new(OpenOptions::new().create(true).append(true).open(path)?)),
        None => None,
    };
    let level = match verbosity {
        0 => log::LevelFilter::Info,
        1 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    let mut builder = env_logger::Builder::new();
    builder.filter_level(level);
    // Dependencies stay at info unless RUST_LOG asks otherwise.
    builder.filter_module("actix", log::LevelFilter::Info);
    builder.filter_module("tokio_postgres", log::LevelFilter::Info);
    if let Ok(spec) = std::env::var("RUST_LOG") {
        builder.parse_filters(&spec);
    }
    builder.target(env_logger::Target::Pipe(Box::new(Tee { stderr: !quiet, file })));
    builder.format_timestamp_millis();
    let _ = builder.try_init();
    Ok(())
}
