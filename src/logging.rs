//! Logging to stderr (unless `-q`) and to `logfile` (when set), through env_logger.
//!
//! Every reload reopens `logfile` ([`reopen`]), so that logrotate can move the file away and
//! send SIGHUP, as with PgBouncer.
//!
//! Verbosity follows PgBouncer: the `verbose` key plus one per `-v`; 0 logs info and above,
//! 1 adds debug, 2 or more adds trace. `RUST_LOG` overrides it for debugging.

use parking_lot::Mutex;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};

struct Tee {
    stderr: bool,
}

/// The open logfile, shared by the logger and [`reopen`].
static LOGFILE: Mutex<Option<File>> = Mutex::new(None);

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.stderr {
            let _ = io::stderr().write_all(buf);
        }
        if let Some(file) = LOGFILE.lock().as_mut() {
            let _ = file.write_all(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// Opens `logfile` afresh (or stops writing one); the old file stays in use if the new one
/// cannot be opened.
pub fn reopen(logfile: Option<&Path>) {
    let file = match logfile.map(open) {
        Some(Ok(file)) => Some(file),
        Some(Err(e)) => return log::error!("cannot reopen logfile: {e}"),
        None => None,
    };
    *LOGFILE.lock() = file;
}

/// One record, one line: names a client chose (a user or database name before authentication,
/// an application_name) may hold newlines or terminal escapes, and must not forge log lines.
fn escape_controls(message: &str) -> std::borrow::Cow<'_, str> {
    if !message.chars().any(char::is_control) {
        return message.into();
    }
    let mut escaped = String::with_capacity(message.len() + 8);
    for c in message.chars() {
        if c.is_control() {
            escaped.extend(c.escape_default());
        } else {
            escaped.push(c);
        }
    }
    escaped.into()
}

/// `-v` flags given on the command line, added to `verbose` whenever it changes.
static CLI_VERBOSITY: AtomicU8 = AtomicU8::new(0);

fn level(verbosity: u8) -> log::LevelFilter {
    match verbosity {
        0 => log::LevelFilter::Info,
        1 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    }
}

/// A reload changed `verbose`: log more or less from now on.
pub fn set_verbose(verbose: u8) {
    if std::env::var_os("RUST_LOG").is_none() {
        log::set_max_level(level(verbose.saturating_add(CLI_VERBOSITY.load(Ordering::Relaxed))));
    }
}

/// `verbose` is the configuration's, `cli_verbosity` the number of `-v` flags.
pub fn init(verbose: u8, cli_verbosity: u8, quiet: bool, logfile: Option<&Path>) -> io::Result<()> {
    CLI_VERBOSITY.store(cli_verbosity, Ordering::Relaxed);
    let verbosity = verbose.saturating_add(cli_verbosity);
    *LOGFILE.lock() = logfile.map(open).transpose()?;
    let mut builder = env_logger::Builder::new();
    // Everything passes the filter; the global maximum level (which a reload can change)
    // decides what is logged.
    builder.filter_level(log::LevelFilter::Trace);
    // Dependencies stay at info unless RUST_LOG asks otherwise.
    builder.filter_module("actix", log::LevelFilter::Info);
    builder.filter_module("tokio_postgres", log::LevelFilter::Info);
    if let Ok(spec) = std::env::var("RUST_LOG") {
        builder.parse_filters(&spec);
    }
    builder.target(env_logger::Target::Pipe(Box::new(Tee { stderr: !quiet })));
    builder.format(|buf, record| {
        let message = record.args().to_string();
        let (time, level, target) = (buf.timestamp_millis(), record.level(), record.target());
        writeln!(buf, "[{time} {level:<5} {target}] {}", escape_controls(&message))
    });
    let _ = builder.try_init();
    if std::env::var_os("RUST_LOG").is_none() {
        log::set_max_level(level(verbosity));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::escape_controls;

    #[test]
    fn control_characters_cannot_start_a_log_line() {
        assert_eq!(escape_controls("user \"app\""), "user \"app\"");
        assert_eq!(escape_controls("user \"a\nFATAL forged\""), "user \"a\\nFATAL forged\"");
        assert_eq!(escape_controls("\r\u{1b}[31mred\t"), "\\r\\u{1b}[31mred\\t");
        assert_eq!(escape_controls("naïve ünïcode"), "naïve ünïcode");
    }
}
