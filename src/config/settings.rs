//! Typed configuration: the structs the rest of pgcorral reads, PgBouncer's
//! defaults, and the validation of every individual setting.
//!
//! Keys that PgBouncer knows but pgcorral does not implement yet are listed
//! in the `*_NOT_IMPLEMENTED` slices below. They are accepted (so an existing
//! `pgbouncer.ini` loads unchanged) and produce one warning each. When a key
//! gets implemented, remove it from its slice and add a match arm.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::connstr;
use super::error::{ConfigError, Location};
use crate::net::TcpSettings;
use crate::tls::{SslMode, TlsSettings};

/// When a server connection goes back to the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// After the client disconnects.
    Session,
    /// After each transaction.
    Transaction,
    /// After each statement; multi-statement transactions are refused.
    Statement,
}

impl PoolMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
            PoolMode::Statement => "statement",
        }
    }
}

/// How clients prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthType {
    Trust,
    Plain,
    Md5,
    ScramSha256,
    /// The TLS client certificate's common name is the user name.
    Cert,
    /// Per connection, as `auth_hba_file` says.
    Hba,
    /// No authentication, whatever user name the client gives.
    Any,
}

/// Settings of the `[pgbouncer]` (alias `[pgcorral]`) section.
#[derive(Debug, Clone)]
pub struct General {
    /// TCP listen addresses; `*` means all IPv4 and IPv6 addresses; empty
    /// means Unix socket only.
    pub listen_addr: Vec<String>,
    pub listen_port: u16,
    /// `None` when set to an empty value: no Unix socket.
    pub unix_socket_dir: Option<PathBuf>,
    /// File mode of the Unix socket (PgBouncer's default 0777).
    pub unix_socket_mode: u32,
    /// Group the Unix socket is given; None leaves pgcorral's own.
    pub unix_socket_group: Option<String>,
    /// Other processes may listen on the same TCP port (each with its own pidfile, logfile and
    /// Unix socket directory); the kernel spreads connections across them.
    pub so_reuseport: bool,
    /// This process's id in a fleet of poolers that forward cancel requests to each other
    /// (`[peers]`); 0: peering off.
    pub peer_id: u16,
    pub auth_type: AuthType,
    /// Already resolved against the main config file's directory.
    pub auth_file: Option<PathBuf>,
    /// pg_hba.conf-style rules for `auth_type = hba`.
    pub auth_hba_file: Option<PathBuf>,
    /// pg_ident.conf-style maps for hba `cert`/`peer` lines with `map=`.
    pub auth_ident_file: Option<PathBuf>,
    /// Users missing from `auth_file` are looked up in PostgreSQL as this user.
    pub auth_user: Option<String>,
    /// The lookup; `$1` is the user name. Returns (name, secret); a NULL secret refuses.
    pub auth_query: String,
    /// The database the lookup runs in; the client's database when unset.
    pub auth_dbname: Option<String>,
    /// Rounds of the SCRAM verifiers pgcorral derives from plaintext passwords.
    pub scram_iterations: u32,
    /// Named prepared statements kept per server connection in transaction and statement
    /// mode (least recently used closed first); 0 passes statement names through untouched.
    pub max_prepared_statements: usize,
    pub pool_mode: PoolMode,
    pub max_client_conn: usize,
    pub default_pool_size: usize,
    pub min_pool_size: usize,
    pub reserve_pool_size: usize,
    pub reserve_pool_timeout: Duration,
    /// A client waiting longer than this for a server is disconnected (0 = never).
    pub query_wait_timeout: Duration,
    /// A server older than this is closed when it comes back from a lease (0 = never).
    pub server_lifetime: Duration,
    /// A server idle longer than this is closed (0 = never).
    pub server_idle_timeout: Duration,
    /// A pool of a database reached through `*` is freed after this long with no client and
    /// no server (0 = never).
    pub autodb_idle_timeout: Duration,
    /// Any pool is freed after this long with no client and no server (0 = never).
    pub pool_idle_timeout: Duration,
    /// Connecting and logging in to PostgreSQL must finish within this.
    pub server_connect_timeout: Duration,
    /// A client must finish logging in within this (0 = no limit).
    pub client_login_timeout: Duration,
    /// After a failed server login, the longest wait before the next attempt (backoff grows
    /// to it); meanwhile clients with no server to wait for get the login error at once.
    pub server_login_retry: Duration,
    /// How long a host name's addresses are cached (see `net::dns`).
    pub dns_max_ttl: Duration,
    /// How long a failed lookup is cached.
    pub dns_nxdomain_ttl: Duration,
    /// Lend idle servers oldest first instead of most recently used first.
    pub server_round_robin: bool,
    /// A client waiting this long for a server is told so with a NOTICE (0 = never).
    pub query_wait_notify: Duration,
    /// A client holding no server for this long is disconnected (0 = never).
    pub client_idle_timeout: Duration,
    /// A client idle inside a transaction block for this long is disconnected (0 = never).
    pub idle_transaction_timeout: Duration,
    /// A query running this long disconnects its client and closes its server (0 = never).
    pub query_timeout: Duration,
    /// A transaction open this long, running or idle, disconnects its client (0 = never).
    pub transaction_timeout: Duration,
    /// A cancel request not delivered to PostgreSQL within this time disconnects the client
    /// whose query it was for (0 = wait as long as it takes).
    pub cancel_wait_timeout: Duration,
    /// An idle server unused for this long is checked with `server_check_query` before it is
    /// lent (0 = check every time).
    pub server_check_delay: Duration,
    /// The check; empty turns checking off, `<empty>` sends an empty query.
    pub server_check_query: String,
    /// Session mode: a server whose connection settings a reload changed is closed at the end
    /// of its client's current transaction, with the client, instead of at the session's end.
    pub server_fast_close: bool,
    /// 0 means unlimited.
    pub max_db_connections: usize,
    /// 0 means unlimited.
    pub max_user_connections: usize,
    /// Client connections per database (0 = unlimited).
    pub max_db_client_connections: usize,
    /// Client connections per user (0 = unlimited).
    pub max_user_client_connections: usize,
    pub server_reset_query: String,
    pub server_reset_query_always: bool,
    /// Lowercased.
    pub ignore_startup_parameters: Vec<String>,
    /// Accepted for PgBouncer compatibility and shown by SHOW CONFIG; pgcorral follows every
    /// session parameter whatever it lists (see `params`).
    pub track_extra_parameters: Vec<String>,
    pub max_packet_size: usize,
    pub logfile: Option<PathBuf>,
    pub pidfile: Option<PathBuf>,
    pub admin_users: Vec<String>,
    pub stats_users: Vec<String>,
    /// pgcorral's own key: worker threads. After loading never 0 (0 in the
    /// file means "one per CPU core" and is resolved at load time).
    pub workers: usize,
    pub verbose: u8,
    /// How often averages are computed and the stats line is logged.
    pub stats_period: Duration,
    pub log_stats: bool,
    pub log_connections: bool,
    pub log_disconnections: bool,
    pub log_pooler_errors: bool,
    /// `host:port` where `/metrics` is served; None: off.
    pub metrics_addr: Option<String>,
    /// Append the client's address to the application_name it logs in with.
    pub application_name_add_host: bool,
    /// `client_tls_*`: TLS offered to clients.
    pub client_tls: TlsSettings,
    /// `server_tls_*`: TLS towards PostgreSQL.
    pub server_tls: TlsSettings,
    /// `tcp_keepalive`, `tcp_keepidle`, `tcp_keepintvl`, `tcp_keepcnt`, `tcp_user_timeout`:
    /// set on every TCP socket when it is accepted or connected.
    pub tcp: TcpSettings,
}

impl Default for General {
    /// PgBouncer's defaults (with `workers` still unresolved at 0).
    fn default() -> Self {
        General {
            listen_addr: Vec::new(),
            listen_port: 6432,
            unix_socket_dir: Some(PathBuf::from("/tmp")),
            unix_socket_mode: 0o777,
            so_reuseport: false,
            peer_id: 0,
            unix_socket_group: None,
            auth_type: AuthType::Md5,
            auth_file: None,
            auth_hba_file: None,
            auth_ident_file: None,
            auth_user: None,
            auth_query: DEFAULT_AUTH_QUERY.to_string(),
            auth_dbname: None,
            scram_iterations: 4096,
            max_prepared_statements: 200,
            pool_mode: PoolMode::Session,
            max_client_conn: 100,
            default_pool_size: 20,
            min_pool_size: 0,
            reserve_pool_size: 0,
            reserve_pool_timeout: Duration::from_secs(5),
            query_wait_timeout: Duration::from_secs(120),
            server_lifetime: Duration::from_secs(3600),
            server_idle_timeout: Duration::from_secs(600),
            autodb_idle_timeout: Duration::from_secs(3600),
            pool_idle_timeout: Duration::ZERO,
            server_connect_timeout: Duration::from_secs(15),
            client_login_timeout: Duration::from_secs(60),
            server_login_retry: Duration::from_secs(15),
            dns_max_ttl: Duration::from_secs(15),
            dns_nxdomain_ttl: Duration::from_secs(15),
            server_round_robin: false,
            query_wait_notify: Duration::from_secs(5),
            client_idle_timeout: Duration::ZERO,
            idle_transaction_timeout: Duration::ZERO,
            query_timeout: Duration::ZERO,
            transaction_timeout: Duration::ZERO,
            cancel_wait_timeout: Duration::from_secs(10),
            server_check_delay: Duration::from_secs(30),
            server_check_query: "select 1".to_string(),
            server_fast_close: false,
            max_db_connections: 0,
            max_user_connections: 0,
            max_db_client_connections: 0,
            max_user_client_connections: 0,
            server_reset_query: "DISCARD ALL".to_string(),
            server_reset_query_always: false,
            ignore_startup_parameters: Vec::new(),
            track_extra_parameters: vec!["IntervalStyle".to_string()],
            max_packet_size: 2_147_483_647,
            logfile: None,
            pidfile: None,
            admin_users: Vec::new(),
            stats_users: Vec::new(),
            workers: 0,
            verbose: 0,
            stats_period: Duration::from_secs(60),
            log_stats: true,
            log_connections: true,
            log_disconnections: true,
            log_pooler_errors: true,
            metrics_addr: None,
            application_name_add_host: false,
            client_tls: TlsSettings::new(SslMode::Disable),
            server_tls: TlsSettings::new(SslMode::Prefer),
            tcp: TcpSettings::default(),
        }
    }
}

/// One entry of `[databases]`.
#[derive(Debug, Clone)]
pub struct DatabaseEntry {
    /// Client-side name; `*` is the fallback for names not listed.
    pub name: String,
    /// `None`, or a value starting with `/`, means a Unix socket directory; a comma list names
    /// several servers (see `servers`).
    pub host: Option<String>,
    /// The first of `port`'s list.
    pub port: u16,
    /// Each server's (host, port), as `host=` and `port=` pair them (one port for all, or one
    /// per host).
    pub servers: Vec<(Option<String>, u16)>,
    pub load_balance_hosts: super::hosts::LoadBalanceHosts,
    pub target_session_attrs: super::hosts::TargetSessionAttrs,
    /// `None` means the same as `name` (for `*`: the client's database name).
    pub dbname: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub pool_size: Option<usize>,
    pub min_pool_size: Option<usize>,
    pub reserve_pool_size: Option<usize>,
    pub pool_mode: Option<PoolMode>,
    pub max_db_connections: Option<usize>,
    pub max_db_client_connections: Option<usize>,
    pub client_encoding: Option<String>,
    pub datestyle: Option<String>,
    pub timezone: Option<String>,
    pub application_name: Option<String>,
    pub connect_query: Option<String>,
    pub query_wait_timeout: Option<Duration>,
    pub server_lifetime: Option<Duration>,
    /// Per-database `auth_user`, `auth_query` and `auth_dbname`, overriding the global ones.
    pub auth_user: Option<String>,
    pub auth_query: Option<String>,
    pub auth_dbname: Option<String>,
}

/// One entry of `[users]`.
#[derive(Debug, Clone)]
pub struct UserEntry {
    pub name: String,
    pub pool_mode: Option<PoolMode>,
    pub pool_size: Option<usize>,
    pub reserve_pool_size: Option<usize>,
    pub max_user_connections: Option<usize>,
    pub max_user_client_connections: Option<usize>,
    pub query_wait_timeout: Option<Duration>,
    pub client_idle_timeout: Option<Duration>,
    pub idle_transaction_timeout: Option<Duration>,
    pub query_timeout: Option<Duration>,
    pub transaction_timeout: Option<Duration>,
}

/// Something in the configuration that was accepted but has no effect.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigWarning {
    pub file: String,
    /// 0 for settings from the environment.
    pub line: usize,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", Location(&self.file, self.line), self.key, self.message)
    }
}

/// A fully loaded configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The main config file.
    pub path: PathBuf,
    pub general: General,
    /// The `[pgbouncer]` keys as written (file, then environment overrides), last value
    /// winning: what `SHOW CONFIG` shows and what a reload compares.
    pub written: Vec<(String, String)>,
    /// In file order; a name defined twice keeps its first position and its
    /// last definition.
    pub databases: Vec<DatabaseEntry>,
    pub users: Vec<UserEntry>,
    /// `[peers]`, in file order, one per id (the last definition wins).
    pub peers: Vec<PeerEntry>,
    /// `(user, secret)` pairs from `auth_file`; empty without one.
    pub userlist: Vec<(String, String)>,
    /// Most `auth_file` secrets are SCRAM verifiers. With `auth_type = md5` a user with one is
    /// asked for SCRAM, so an unknown user is asked the way most users are: the question does
    /// not tell who exists.
    pub mostly_scram: bool,
    /// The iteration count of an unknown user's mock SCRAM verifier: what most users' verifiers
    /// have.
    pub mock_scram_iterations: u32,
    /// TLS contexts built from `client_tls_*` and `server_tls_*`.
    pub tls: crate::tls::TlsContexts,
    /// `auth_hba_file`, parsed; None without one.
    pub hba: Option<std::sync::Arc<crate::auth::hba::HbaFile>>,
    /// `auth_ident_file`, parsed; None without one.
    pub ident: Option<std::sync::Arc<crate::auth::hba::IdentMap>>,
}

impl Config {
    /// The entry for `name`, else the `*` fallback entry.
    pub fn database(&self, name: &str) -> Option<&DatabaseEntry> {
        self.databases
            .iter()
            .find(|db| db.name == name)
            .or_else(|| self.databases.iter().find(|db| db.name == "*"))
    }

    /// Whether `name` reaches its server through the `*` entry rather than one of its own.
    pub fn is_autodb(&self, name: &str) -> bool {
        !self.databases.iter().any(|db| db.name == name) && self.databases.iter().any(|db| db.name == "*")
    }

    /// How long a pool of `database` may stay without clients and servers before it is freed:
    /// `autodb_idle_timeout` for a database reached through `*`, else `pool_idle_timeout`; at
    /// once for a database a reload removed. None: kept.
    pub fn pool_idle_lifetime(&self, database: &str) -> Option<Duration> {
        let general = &self.general;
        let lifetime = match self.database(database) {
            None => return Some(Duration::ZERO),
            // Kept warm with no client (see `Shared::warm_forced_pools`), so never freed.
            Some(db)
                if db.name != "*"
                    && db.user.is_some()
                    && db.min_pool_size.unwrap_or(general.min_pool_size) > 0 =>
            {
                return None
            }
            Some(_) if self.is_autodb(database) => general.autodb_idle_timeout,
            Some(_) => general.pool_idle_timeout,
        };
        (!lifetime.is_zero()).then_some(lifetime)
    }

    /// The `[users]` entry for `name`, if any.
    pub fn user(&self, name: &str) -> Option<&UserEntry> {
        self.users.iter().find(|user| user.name == name)
    }

    /// The secret for `user` from `auth_file`, if listed.
    pub fn secret(&self, user: &str) -> Option<&str> {
        self.userlist.iter().find(|(name, _)| name == user).map(|(_, secret)| secret.as_str())
    }
}

/// PgBouncer's default `auth_query`: an expired or non-login role has no secret.
pub const DEFAULT_AUTH_QUERY: &str =
    "SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END \
     FROM pg_authid WHERE rolname=$1 AND rolcanlogin";

/// The longest time any key may be set to: a century, far beyond any useful timeout and far
/// below what would overflow a clock reading plus it.
pub const MAX_SECONDS: u64 = 100 * 365 * 24 * 3600;

/// The message of every "accepted but ignored" warning.
pub const NOT_IMPLEMENTED: &str = "not implemented yet by pgcorral; ignored";

/// `[pgbouncer]` keys PgBouncer (1.18 up to current releases) knows that
/// pgcorral ignores.
pub const PGBOUNCER_NOT_IMPLEMENTED: &[&str] = &[
    "auth_ldap_options",
    "client_tls_dheparams",
    "client_tls_ecdhcurve",
    "conffile",
    "disable_pqexec",
    "dns_zone_check_period",
    "job_name",
    "listen_backlog",
    "login_notify_message",
    "pkt_buf",
    "resolv_conf",
    "sbuf_loopcnt",
    "service_name",
    "suspend_timeout",
    "syslog",
    "syslog_facility",
    "syslog_ident",
    "tcp_defer_accept",
    "tcp_socket_buffer",
    "user",
];

/// Every `[pgbouncer]` key pgcorral accepts, implemented or not.
#[cfg(test)]
pub fn known_keys() -> impl Iterator<Item = &'static str> {
    PGBOUNCER_IMPLEMENTED.iter().chain(PGBOUNCER_NOT_IMPLEMENTED).copied()
}

/// Connection-string parameters of `[databases]` that pgcorral ignores.
pub const DATABASE_NOT_IMPLEMENTED: &[&str] = &[];

/// Parameters of `[users]` entries that pgcorral ignores.
pub const USER_NOT_IMPLEMENTED: &[&str] = &[];

/// `[pgbouncer]` keys pgcorral implements; kept for error messages.
const PGBOUNCER_IMPLEMENTED: &[&str] = &[
    "peer_id",
    "tcp_keepalive",
    "tcp_keepcnt",
    "tcp_keepidle",
    "tcp_keepintvl",
    "tcp_user_timeout",
    "max_prepared_statements",
    "scram_iterations",
    "auth_dbname",
    "auth_query",
    "auth_user",
    "auth_ident_file",
    "auth_hba_file",
    "server_tls_sslmode",
    "server_tls_protocols",
    "server_tls_key_file",
    "server_tls_ciphers",
    "server_tls_cert_file",
    "server_tls_ca_file",
    "server_tls13_ciphers",
    "client_tls_sslmode",
    "client_tls_protocols",
    "client_tls_key_file",
    "client_tls_ciphers",
    "client_tls_cert_file",
    "client_tls_ca_file",
    "client_tls13_ciphers",
    "application_name_add_host",
    "metrics_addr",
    "stats_period",
    "log_stats",
    "log_connections",
    "log_disconnections",
    "log_pooler_errors",
    "admin_users",
    "query_wait_notify",
    "max_db_client_connections",
    "max_user_client_connections",
    "server_login_retry",
    "dns_max_ttl",
    "dns_nxdomain_ttl",
    "server_round_robin",
    "client_idle_timeout",
    "idle_transaction_timeout",
    "query_timeout",
    "transaction_timeout",
    "cancel_wait_timeout",
    "server_check_delay",
    "server_check_query",
    "server_fast_close",
    "client_login_timeout",
    "query_wait_timeout",
    "server_connect_timeout",
    "server_idle_timeout",
    "autodb_idle_timeout",
    "pool_idle_timeout",
    "server_lifetime",
    "auth_file",
    "auth_type",
    "default_pool_size",
    "ignore_startup_parameters",
    "listen_addr",
    "listen_port",
    "logfile",
    "max_client_conn",
    "max_db_connections",
    "max_packet_size",
    "max_user_connections",
    "min_pool_size",
    "pidfile",
    "pool_mode",
    "reserve_pool_size",
    "reserve_pool_timeout",
    "server_reset_query",
    "server_reset_query_always",
    "stats_users",
    "track_extra_parameters",
    "unix_socket_dir",
    "unix_socket_mode",
    "unix_socket_group",
    "so_reuseport",
    "verbose",
    "workers",
];

const DATABASE_IMPLEMENTED: &[&str] = &[
    "auth_user",
    "auth_query",
    "auth_dbname",
    "dbname",
    "host",
    "port",
    "user",
    "password",
    "pool_size",
    "min_pool_size",
    "reserve_pool_size",
    "reserve_pool",
    "pool_mode",
    "max_db_connections",
    "max_db_client_connections",
    "client_encoding",
    "datestyle",
    "timezone",
    "application_name",
    "connect_query",
    "query_wait_timeout",
    "server_lifetime",
    "load_balance_hosts",
    "target_session_attrs",
];

const USER_IMPLEMENTED: &[&str] = &[
    "pool_mode",
    "pool_size",
    "reserve_pool_size",
    "max_user_connections",
    "max_user_client_connections",
    "query_wait_timeout",
    "client_idle_timeout",
    "idle_transaction_timeout",
    "query_timeout",
    "transaction_timeout",
];

const PEER_KEYS: &[&str] = &["host", "port", "pool_size"];

const AUTH_TYPES_NOT_IMPLEMENTED: &[&str] = &["ldap", "pam"];

/// Linux's ceilings for TCP_KEEPIDLE/TCP_KEEPINTVL (seconds) and TCP_KEEPCNT: the kernel
/// refuses more, which PgBouncer finds out only when a connection arrives.
const MAX_KEEPALIVE_SECONDS: u32 = 32_767;
const MAX_KEEPALIVE_PROBES: u32 = 127;
/// TCP_USER_TIMEOUT is a C int of milliseconds.
const MAX_USER_TIMEOUT_MS: u32 = i32::MAX as u32;

/// One value to validate, with where it came from.
pub(crate) struct Setting<'a> {
    /// Name used in messages: a `[pgbouncer]` key, or `entry: param` for a
    /// parameter inside a connection string.
    pub key: &'a str,
    pub value: &'a str,
    pub file: &'a str,
    pub line: usize,
}

impl Setting<'_> {
    fn invalid(&self, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_string(),
            line: self.line,
            key: self.key.to_string(),
            message: message.into(),
        }
    }

    fn warning(&self, message: &str) -> ConfigWarning {
        ConfigWarning {
            file: self.file.to_string(),
            line: self.line,
            key: self.key.to_string(),
            message: message.to_string(),
        }
    }

    fn usize(&self) -> Result<usize, ConfigError> {
        self.value
            .parse()
            .map_err(|_| self.invalid(format!("expected a non-negative integer, got {:?}", self.value)))
    }

    fn port(&self) -> Result<u16, ConfigError> {
        match self.value.parse::<u16>() {
            Ok(port) if port != 0 => Ok(port),
            _ => {
                Err(self.invalid(format!("expected a port number between 1 and 65535, got {:?}", self.value)))
            }
        }
    }

    /// `port=`: one port, or a comma list (one per host).
    fn ports(&self) -> Result<Vec<u16>, ConfigError> {
        self.value
            .split(',')
            .map(|p| match p.trim().parse::<u16>() {
                Ok(port) if port != 0 => Ok(port),
                _ => {
                    Err(self
                        .invalid(format!("expected port numbers between 1 and 65535, got {:?}", self.value)))
                }
            })
            .collect()
    }

    fn bool(&self) -> Result<bool, ConfigError> {
        match self.value.to_ascii_lowercase().as_str() {
            "1" | "yes" | "true" | "on" => Ok(true),
            "0" | "no" | "false" | "off" => Ok(false),
            _ => Err(self.invalid(format!(
                "expected a boolean (1/0, yes/no, true/false, on/off), got {:?}",
                self.value
            ))),
        }
    }

    /// A time in seconds, at most [`MAX_SECONDS`]: every timeout is added to the clock, and no
    /// configured value may make that overflow.
    fn seconds(&self) -> Result<Duration, ConfigError> {
        self.value
            .parse::<f64>()
            .ok()
            .filter(|secs| secs.is_finite() && *secs <= MAX_SECONDS as f64)
            .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
            .ok_or_else(|| {
                self.invalid(format!(
                    "expected a non-negative number of seconds up to {MAX_SECONDS} (a century) such as 5 or 0.5, got {:?}",
                    self.value
                ))
            })
    }

    fn pool_mode(&self) -> Result<PoolMode, ConfigError> {
        match self.value.to_ascii_lowercase().as_str() {
            "session" => Ok(PoolMode::Session),
            "transaction" => Ok(PoolMode::Transaction),
            "statement" => Ok(PoolMode::Statement),
            _ => Err(self
                .invalid(format!("expected one of session, transaction, statement, got {:?}", self.value))),
        }
    }

    fn auth_type(&self) -> Result<AuthType, ConfigError> {
        let value = self.value.to_ascii_lowercase();
        match value.as_str() {
            "trust" => Ok(AuthType::Trust),
            "plain" => Ok(AuthType::Plain),
            "md5" => Ok(AuthType::Md5),
            "scram-sha-256" => Ok(AuthType::ScramSha256),
            "cert" => Ok(AuthType::Cert),
            "hba" => Ok(AuthType::Hba),
            "any" => Ok(AuthType::Any),
            other if AUTH_TYPES_NOT_IMPLEMENTED.contains(&other) => Err(self.invalid(format!(
                "auth_type = {other} is not implemented yet; \
                 supported: trust, plain, md5, scram-sha-256, cert, hba, any"
            ))),
            _ => Err(self.invalid(format!(
                "expected one of trust, plain, md5, scram-sha-256, cert, hba, any, got {:?}",
                self.value
            ))),
        }
    }

    fn sslmode(&self) -> Result<SslMode, ConfigError> {
        SslMode::parse(self.value).ok_or_else(|| {
            self.invalid(format!(
                "expected one of disable, allow, prefer, require, verify-ca, verify-full, got {:?}",
                self.value
            ))
        })
    }

    fn path(&self) -> Option<PathBuf> {
        (!self.value.is_empty()).then(|| PathBuf::from(self.value))
    }

    /// `host:port`, or empty for none.
    fn host_port(&self) -> Result<Option<String>, ConfigError> {
        if self.value.is_empty() {
            return Ok(None);
        }
        match self.value.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) => {
                Ok(Some(self.value.to_string()))
            }
            _ => {
                Err(self.invalid(format!("expected host:port such as 127.0.0.1:9127, got {:?}", self.value)))
            }
        }
    }

    /// PgBouncer's `tcp_keepalive` is an integer where anything but 0 means on; the boolean
    /// words other keys take are accepted too.
    fn on_off(&self) -> Result<bool, ConfigError> {
        match self.value.parse::<i64>() {
            Ok(n) => Ok(n != 0),
            Err(_) => self
                .bool()
                .map_err(|_| self.invalid(format!("expected 1 (on) or 0 (off), got {:?}", self.value))),
        }
    }

    /// A whole number from 0 to `max`, 0 meaning the operating system's default.
    fn system_or(&self, max: u32, unit: &str) -> Result<Option<u32>, ConfigError> {
        match self.value.parse::<u32>() {
            Ok(0) => Ok(None),
            Ok(n) if n <= max => Ok(Some(n)),
            _ => Err(self.invalid(format!(
                "expected a whole number of {unit} from 1 to {max}, or 0 for the system's default, got {:?}",
                self.value
            ))),
        }
    }

    fn u8(&self) -> Result<u8, ConfigError> {
        self.value
            .parse()
            .map_err(|_| self.invalid(format!("expected an integer between 0 and 255, got {:?}", self.value)))
    }
}

fn secs(n: u32) -> Duration {
    Duration::from_secs(n.into())
}

/// What `SHOW CONFIG` prints for `key` when pgcorral's value in effect can differ from what
/// was written (`tcp_keepalive = on` is in effect as 1); None for every other key.
pub(crate) fn in_effect(general: &General, key: &str) -> Option<String> {
    let tcp = &general.tcp;
    let seconds = |d: Option<Duration>| d.map_or(0, |d| d.as_secs());
    let value = match key {
        "tcp_keepalive" => u64::from(tcp.keepalive),
        "tcp_keepidle" => seconds(tcp.keepidle),
        "tcp_keepintvl" => seconds(tcp.keepintvl),
        "tcp_keepcnt" => tcp.keepcnt.map_or(0, u64::from),
        "tcp_user_timeout" => tcp.user_timeout.map_or(0, |d| d.as_millis() as u64),
        _ => return None,
    };
    Some(value.to_string())
}

/// Splits a comma list, trimming spaces and dropping empty items.
fn list(value: &str) -> Vec<String> {
    value.split(',').map(str::trim).filter(|item| !item.is_empty()).map(str::to_string).collect()
}

/// Applies one `[pgbouncer]` setting to `general`. Returns a warning when the
/// key is known to PgBouncer but ignored by pgcorral. `base_dir` is the
/// directory of the main config file, for relative `auth_file` paths.
pub(crate) fn apply_general(
    general: &mut General,
    setting: &Setting<'_>,
    base_dir: &Path,
) -> Result<Option<ConfigWarning>, ConfigError> {
    let s = setting;
    match s.key {
        "listen_addr" => general.listen_addr = list(s.value),
        "listen_port" => general.listen_port = s.port()?,
        "unix_socket_dir" => general.unix_socket_dir = s.path(),
        "so_reuseport" => general.so_reuseport = s.bool()?,
        "peer_id" => {
            general.peer_id = match s.value.parse::<u16>() {
                Ok(id) if id <= MAX_PEER_ID => id,
                _ => {
                    return Err(s.invalid(format!(
                        "expected 0 (no peering) or a peer id up to {MAX_PEER_ID}, got {:?}",
                        s.value
                    )))
                }
            }
        }
        "unix_socket_mode" => {
            general.unix_socket_mode = u32::from_str_radix(s.value.trim_start_matches("0o"), 8)
                .ok()
                .filter(|mode| *mode <= 0o777)
                .ok_or_else(|| {
                    s.invalid(format!("expected an octal file mode such as 0770, got {:?}", s.value))
                })?
        }
        "unix_socket_group" => {
            general.unix_socket_group = Some(s.value.trim()).filter(|g| !g.is_empty()).map(str::to_string)
        }
        "auth_type" => general.auth_type = s.auth_type()?,
        "auth_file" => general.auth_file = s.path().map(|p| base_dir.join(p)),
        "auth_user" => general.auth_user = (!s.value.is_empty()).then(|| s.value.to_string()),
        "auth_query" => general.auth_query = s.value.to_string(),
        "auth_dbname" => general.auth_dbname = (!s.value.is_empty()).then(|| s.value.to_string()),
        "max_prepared_statements" => general.max_prepared_statements = s.usize()?,
        "scram_iterations" => {
            let max = crate::auth::kdf::MAX_ITERATIONS;
            general.scram_iterations =
                s.usize()?.try_into().ok().filter(|n| (1..=max).contains(n)).ok_or_else(|| {
                    s.invalid(format!("expected a number of rounds from 1 to {max}, got {:?}", s.value))
                })?
        }
        "auth_hba_file" => general.auth_hba_file = s.path().map(|p| base_dir.join(p)),
        "auth_ident_file" => general.auth_ident_file = s.path().map(|p| base_dir.join(p)),
        "pool_mode" => general.pool_mode = s.pool_mode()?,
        "max_client_conn" => general.max_client_conn = s.usize()?,
        "default_pool_size" => general.default_pool_size = s.usize()?,
        "min_pool_size" => general.min_pool_size = s.usize()?,
        "reserve_pool_size" => general.reserve_pool_size = s.usize()?,
        "reserve_pool_timeout" => general.reserve_pool_timeout = s.seconds()?,
        "query_wait_timeout" => general.query_wait_timeout = s.seconds()?,
        "server_lifetime" => general.server_lifetime = s.seconds()?,
        "server_idle_timeout" => general.server_idle_timeout = s.seconds()?,
        "autodb_idle_timeout" => general.autodb_idle_timeout = s.seconds()?,
        "pool_idle_timeout" => general.pool_idle_timeout = s.seconds()?,
        "server_connect_timeout" => general.server_connect_timeout = s.seconds()?,
        "client_login_timeout" => general.client_login_timeout = s.seconds()?,
        "server_login_retry" => general.server_login_retry = s.seconds()?,
        "dns_max_ttl" => general.dns_max_ttl = s.seconds()?,
        "dns_nxdomain_ttl" => general.dns_nxdomain_ttl = s.seconds()?,
        "server_round_robin" => general.server_round_robin = s.bool()?,
        "query_wait_notify" => general.query_wait_notify = s.seconds()?,
        "client_idle_timeout" => general.client_idle_timeout = s.seconds()?,
        "idle_transaction_timeout" => general.idle_transaction_timeout = s.seconds()?,
        "query_timeout" => general.query_timeout = s.seconds()?,
        "transaction_timeout" => general.transaction_timeout = s.seconds()?,
        "cancel_wait_timeout" => general.cancel_wait_timeout = s.seconds()?,
        "server_check_delay" => general.server_check_delay = s.seconds()?,
        "server_check_query" => general.server_check_query = s.value.to_string(),
        "server_fast_close" => general.server_fast_close = s.bool()?,
        "max_db_connections" => general.max_db_connections = s.usize()?,
        "max_user_connections" => general.max_user_connections = s.usize()?,
        "max_db_client_connections" => general.max_db_client_connections = s.usize()?,
        "max_user_client_connections" => general.max_user_client_connections = s.usize()?,
        "server_reset_query" => general.server_reset_query = s.value.to_string(),
        "server_reset_query_always" => general.server_reset_query_always = s.bool()?,
        "ignore_startup_parameters" => {
            general.ignore_startup_parameters = list(&s.value.to_ascii_lowercase())
        }
        "track_extra_parameters" => general.track_extra_parameters = list(s.value),
        "max_packet_size" => general.max_packet_size = s.usize()?,
        "logfile" => general.logfile = s.path(),
        "pidfile" => general.pidfile = s.path(),
        "admin_users" => general.admin_users = list(s.value),
        "stats_users" => general.stats_users = list(s.value),
        "workers" => general.workers = s.usize()?,
        "verbose" => general.verbose = s.u8()?,
        "stats_period" => general.stats_period = s.seconds()?,
        "log_stats" => general.log_stats = s.bool()?,
        "log_connections" => general.log_connections = s.bool()?,
        "log_disconnections" => general.log_disconnections = s.bool()?,
        "log_pooler_errors" => general.log_pooler_errors = s.bool()?,
        "metrics_addr" => general.metrics_addr = s.host_port()?,
        "application_name_add_host" => general.application_name_add_host = s.bool()?,
        "client_tls_sslmode" => general.client_tls.sslmode = s.sslmode()?,
        "client_tls_key_file" => general.client_tls.key_file = s.path().map(|p| base_dir.join(p)),
        "client_tls_cert_file" => general.client_tls.cert_file = s.path().map(|p| base_dir.join(p)),
        "client_tls_ca_file" => general.client_tls.ca_file = s.path().map(|p| base_dir.join(p)),
        "client_tls_protocols" => general.client_tls.protocols = s.value.to_string(),
        "client_tls_ciphers" => general.client_tls.ciphers = s.value.to_string(),
        "client_tls13_ciphers" => general.client_tls.tls13_ciphers = s.value.to_string(),
        "server_tls_sslmode" => general.server_tls.sslmode = s.sslmode()?,
        "server_tls_key_file" => general.server_tls.key_file = s.path().map(|p| base_dir.join(p)),
        "server_tls_cert_file" => general.server_tls.cert_file = s.path().map(|p| base_dir.join(p)),
        "server_tls_ca_file" => general.server_tls.ca_file = s.path().map(|p| base_dir.join(p)),
        "server_tls_protocols" => general.server_tls.protocols = s.value.to_string(),
        "server_tls_ciphers" => general.server_tls.ciphers = s.value.to_string(),
        "server_tls13_ciphers" => general.server_tls.tls13_ciphers = s.value.to_string(),
        "tcp_keepalive" => general.tcp.keepalive = s.on_off()?,
        "tcp_keepidle" => general.tcp.keepidle = s.system_or(MAX_KEEPALIVE_SECONDS, "seconds")?.map(secs),
        "tcp_keepintvl" => general.tcp.keepintvl = s.system_or(MAX_KEEPALIVE_SECONDS, "seconds")?.map(secs),
        "tcp_keepcnt" => general.tcp.keepcnt = s.system_or(MAX_KEEPALIVE_PROBES, "probes")?,
        "tcp_user_timeout" => {
            general.tcp.user_timeout =
                s.system_or(MAX_USER_TIMEOUT_MS, "milliseconds")?.map(|ms| Duration::from_millis(ms.into()))
        }
        key if PGBOUNCER_NOT_IMPLEMENTED.contains(&key) => {
            return Ok(Some(s.warning(NOT_IMPLEMENTED)));
        }
        _ => {
            return Err(s.invalid(format!(
                "unknown setting (neither a PgBouncer nor a pgcorral key); \
                 pgcorral implements: {}",
                PGBOUNCER_IMPLEMENTED.join(", ")
            )))
        }
    }
    Ok(None)
}

/// Where a `[databases]`/`[users]`/`[peers]` line is, and what it says.
pub(crate) struct Line<'a> {
    pub name: &'a str,
    pub value: &'a str,
    pub file: &'a str,
    pub line: usize,
}

impl Line<'_> {
    fn invalid(&self, message: String) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_string(),
            line: self.line,
            key: self.name.to_string(),
            message,
        }
    }

    fn pairs(&self) -> Result<Vec<(String, String)>, ConfigError> {
        connstr::parse(self.value).map_err(|err| self.invalid(format!("bad connection string: {err}")))
    }

    /// Runs `apply` for each parameter with a [`Setting`] named
    /// `entry: param`, collecting one warning per ignored parameter.
    fn each_param(
        &self,
        kind: &str,
        implemented: &[&str],
        not_implemented: &[&str],
        mut apply: impl FnMut(&str, &Setting<'_>) -> Result<(), ConfigError>,
    ) -> Result<Vec<ConfigWarning>, ConfigError> {
        let mut warnings: Vec<ConfigWarning> = Vec::new();
        for (param, value) in self.pairs()? {
            let key = format!("{}: {param}", self.name);
            let setting = Setting { key: &key, value: &value, file: self.file, line: self.line };
            if implemented.contains(&param.as_str()) {
                apply(&param, &setting)?;
            } else if not_implemented.contains(&param.as_str()) {
                if !warnings.iter().any(|w| w.key == key) {
                    warnings.push(setting.warning(NOT_IMPLEMENTED));
                }
            } else {
                return Err(self.invalid(format!(
                    "unknown parameter {param:?} in the settings of {kind} {:?}; known: {}",
                    self.name,
                    implemented.iter().chain(not_implemented).copied().collect::<Vec<_>>().join(", ")
                )));
            }
        }
        Ok(warnings)
    }
}

/// Parses one `[databases]` line.
pub(crate) fn parse_database(line: &Line<'_>) -> Result<(DatabaseEntry, Vec<ConfigWarning>), ConfigError> {
    if line.name.eq_ignore_ascii_case("pgbouncer") {
        return Err(
            line.invalid("the database name \"pgbouncer\" is reserved for the admin console".to_string())
        );
    }
    let mut db = DatabaseEntry {
        name: line.name.to_string(),
        host: None,
        port: 5432,
        servers: Vec::new(),
        load_balance_hosts: Default::default(),
        target_session_attrs: Default::default(),
        dbname: None,
        user: None,
        password: None,
        pool_size: None,
        min_pool_size: None,
        reserve_pool_size: None,
        pool_mode: None,
        max_db_connections: None,
        max_db_client_connections: None,
        client_encoding: None,
        datestyle: None,
        timezone: None,
        application_name: None,
        connect_query: None,
        query_wait_timeout: None,
        server_lifetime: None,
        auth_user: None,
        auth_query: None,
        auth_dbname: None,
    };
    let mut ports = vec![db.port];
    let warnings =
        line.each_param("database", DATABASE_IMPLEMENTED, DATABASE_NOT_IMPLEMENTED, |param, s| {
            let text = Some(s.value.to_string());
            match param {
                "dbname" => db.dbname = text,
                "host" => db.host = text,
                "port" => ports = s.ports()?,
                "load_balance_hosts" => {
                    db.load_balance_hosts =
                        super::hosts::LoadBalanceHosts::parse(s.value).map_err(|e| s.invalid(e))?
                }
                "target_session_attrs" => {
                    db.target_session_attrs =
                        super::hosts::TargetSessionAttrs::parse(s.value).map_err(|e| s.invalid(e))?
                }
                "user" => db.user = text,
                "password" => db.password = text,
                "pool_size" => db.pool_size = Some(s.usize()?),
                "min_pool_size" => db.min_pool_size = Some(s.usize()?),
                // `reserve_pool` is the older spelling PgBouncer still accepts.
                "reserve_pool_size" | "reserve_pool" => db.reserve_pool_size = Some(s.usize()?),
                "pool_mode" => db.pool_mode = Some(s.pool_mode()?),
                "max_db_connections" => db.max_db_connections = Some(s.usize()?),
                "max_db_client_connections" => db.max_db_client_connections = Some(s.usize()?),
                "client_encoding" => db.client_encoding = text,
                "datestyle" => db.datestyle = text,
                "timezone" => db.timezone = text,
                "application_name" => db.application_name = text,
                "connect_query" => db.connect_query = text,
                "auth_user" => db.auth_user = text,
                "auth_query" => db.auth_query = text,
                "auth_dbname" => db.auth_dbname = text,
                "query_wait_timeout" => db.query_wait_timeout = Some(s.seconds()?),
                "server_lifetime" => db.server_lifetime = Some(s.seconds()?),
                _ => unreachable!("{param} is listed in DATABASE_IMPLEMENTED"),
            }
            Ok(())
        })?;
    db.port = ports[0];
    db.servers = super::hosts::pair_hosts(db.host.as_deref(), &ports).map_err(|e| line.invalid(e))?;
    Ok((db, warnings))
}

/// Parses one `[users]` line.
pub(crate) fn parse_user(line: &Line<'_>) -> Result<(UserEntry, Vec<ConfigWarning>), ConfigError> {
    let mut user = UserEntry {
        name: line.name.to_string(),
        pool_mode: None,
        pool_size: None,
        reserve_pool_size: None,
        max_user_connections: None,
        max_user_client_connections: None,
        query_wait_timeout: None,
        client_idle_timeout: None,
        idle_transaction_timeout: None,
        query_timeout: None,
        transaction_timeout: None,
    };
    let warnings = line.each_param("user", USER_IMPLEMENTED, USER_NOT_IMPLEMENTED, |param, s| {
        match param {
            "pool_mode" => user.pool_mode = Some(s.pool_mode()?),
            "pool_size" => user.pool_size = Some(s.usize()?),
            "reserve_pool_size" => user.reserve_pool_size = Some(s.usize()?),
            "max_user_connections" => user.max_user_connections = Some(s.usize()?),
            "max_user_client_connections" => user.max_user_client_connections = Some(s.usize()?),
            "query_wait_timeout" => user.query_wait_timeout = Some(s.seconds()?),
            "client_idle_timeout" => user.client_idle_timeout = Some(s.seconds()?),
            "idle_transaction_timeout" => user.idle_transaction_timeout = Some(s.seconds()?),
            "query_timeout" => user.query_timeout = Some(s.seconds()?),
            "transaction_timeout" => user.transaction_timeout = Some(s.seconds()?),
            _ => unreachable!("{param} is listed in USER_IMPLEMENTED"),
        }
        Ok(())
    })?;
    Ok((user, warnings))
}

/// The largest `peer_id` (and `[peers]` key): PgBouncer's documented maximum, so that a mixed
/// fleet agrees on which ids exist.
pub const MAX_PEER_ID: u16 = 16383;

/// One `[peers]` line: where another pooler of the fleet takes the cancel requests for the
/// sessions it owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerEntry {
    pub peer_id: u16,
    /// A host name or address, or a directory holding the peer's Unix socket.
    pub host: String,
    /// Default 6432, as PgBouncer.
    pub port: u16,
    /// How many cancel requests may be on their way to this peer at once; `None`:
    /// `default_pool_size`.
    pub pool_size: Option<usize>,
}

fn peer_id(value: &str) -> Option<u16> {
    value.parse::<u16>().ok().filter(|id| (1..=MAX_PEER_ID).contains(id))
}

/// Parses one `[peers]` line: `<peer_id> = host=... [port=...] [pool_size=...]`.
pub(crate) fn parse_peer(line: &Line<'_>) -> Result<PeerEntry, ConfigError> {
    let Some(id) = peer_id(line.name) else {
        return Err(
            line.invalid(format!("expected a peer id between 1 and {MAX_PEER_ID}, got {:?}", line.name))
        );
    };
    let mut peer = PeerEntry { peer_id: id, host: String::new(), port: 6432, pool_size: None };
    line.each_param("peer", PEER_KEYS, &[], |param, s| {
        match param {
            "host" => peer.host = s.value.to_string(),
            "port" => peer.port = s.port()?,
            "pool_size" => peer.pool_size = Some(s.usize()?),
            _ => unreachable!("{param} is listed in PEER_KEYS"),
        }
        Ok(())
    })?;
    if peer.host.is_empty() {
        return Err(line.invalid("a peer needs host=".to_string()));
    }
    Ok(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setting<'a>(key: &'a str, value: &'a str) -> Setting<'a> {
        Setting { key, value, file: "pgbouncer.ini", line: 7 }
    }

    fn apply(key: &str, value: &str) -> Result<(General, Option<ConfigWarning>), ConfigError> {
        let mut general = General::default();
        let warning = apply_general(&mut general, &setting(key, value), Path::new("/etc/pgb"))?;
        Ok((general, warning))
    }

    fn err(key: &str, value: &str) -> String {
        apply(key, value).unwrap_err().to_string()
    }

    #[test]
    fn value_forms() {
        assert_eq!(
            apply("reserve_pool_timeout", "0.5").unwrap().0.reserve_pool_timeout,
            Duration::from_millis(500)
        );
        assert!(apply("server_reset_query_always", "on").unwrap().0.server_reset_query_always);
        assert!(!apply("server_reset_query_always", "0").unwrap().0.server_reset_query_always);
        assert_eq!(
            apply("auth_file", "users.txt").unwrap().0.auth_file,
            Some(PathBuf::from("/etc/pgb/users.txt"))
        );
        assert_eq!(
            apply("auth_file", "/abs/users.txt").unwrap().0.auth_file,
            Some(PathBuf::from("/abs/users.txt"))
        );
        assert_eq!(apply("unix_socket_dir", "").unwrap().0.unix_socket_dir, None);
        assert_eq!(apply("admin_users", " a, ,b ,").unwrap().0.admin_users, ["a", "b"]);
        assert_eq!(
            apply("ignore_startup_parameters", "Extra_Float_Digits, options")
                .unwrap()
                .0
                .ignore_startup_parameters,
            ["extra_float_digits", "options"]
        );
        assert_eq!(
            apply("track_extra_parameters", "search_path, IntervalStyle").unwrap().0.track_extra_parameters,
            ["search_path", "IntervalStyle"]
        );
        assert_eq!(apply("auth_type", "SCRAM-SHA-256").unwrap().0.auth_type, AuthType::ScramSha256);
        assert_eq!(apply("pool_mode", "statement").unwrap().0.pool_mode, PoolMode::Statement);
    }

    #[test]
    fn bad_values() {
        assert_eq!(
            err("default_pool_size", "twenty"),
            "pgbouncer.ini:7: default_pool_size: expected a non-negative integer, got \"twenty\""
        );
        assert!(err("max_client_conn", "-1").contains("non-negative integer, got \"-1\""));
        assert!(err("listen_port", "70000").contains("between 1 and 65535, got \"70000\""));
        assert!(err("listen_port", "0").contains("between 1 and 65535"));
        assert!(err("pool_mode", "sessions").contains("session, transaction, statement"));
        assert!(err("reserve_pool_timeout", "-1").contains("seconds"));
        assert!(err("reserve_pool_timeout", "inf").contains("seconds"));
        assert!(err("server_reset_query_always", "maybe").contains("boolean"));
        assert!(err("verbose", "300").contains("between 0 and 255"));
        assert!(err("auth_type", "password").contains("expected one of trust"));
        assert_eq!(
            err("auth_type", "ldap"),
            "pgbouncer.ini:7: auth_type: auth_type = ldap is not implemented yet; \
             supported: trust, plain, md5, scram-sha-256, cert, hba, any"
        );
        assert!(err("frobnicate", "1").starts_with("pgbouncer.ini:7: frobnicate: unknown setting"));
    }

    #[test]
    fn tcp_values() {
        let tcp = |key, value| apply(key, value).unwrap().0.tcp;
        for (value, on) in
            [("1", true), ("0", false), ("3600", true), ("-1", true), ("off", false), ("Yes", true)]
        {
            assert_eq!(tcp("tcp_keepalive", value).keepalive, on, "tcp_keepalive = {value}");
        }
        assert_eq!(tcp("tcp_keepidle", "32767").keepidle, Some(Duration::from_secs(32767)));
        assert_eq!(tcp("tcp_keepidle", "0").keepidle, None);
        assert_eq!(tcp("tcp_keepintvl", "1").keepintvl, Some(Duration::from_secs(1)));
        assert_eq!(tcp("tcp_keepcnt", "127").keepcnt, Some(127));
        assert_eq!(
            tcp("tcp_user_timeout", "2147483647").user_timeout,
            Some(Duration::from_millis(2_147_483_647))
        );
        assert_eq!(tcp("tcp_user_timeout", "0").user_timeout, None);

        assert_eq!(
            err("tcp_keepalive", "sometimes"),
            "pgbouncer.ini:7: tcp_keepalive: expected 1 (on) or 0 (off), got \"sometimes\""
        );
        assert_eq!(
            err("tcp_keepintvl", "32768"),
            "pgbouncer.ini:7: tcp_keepintvl: expected a whole number of seconds from 1 to 32767, \
             or 0 for the system's default, got \"32768\""
        );
        for bad in ["-1", "1.5", "", "10s"] {
            assert!(err("tcp_keepidle", bad).contains("whole number of seconds"), "{bad:?}");
        }
        assert!(err("tcp_keepcnt", "128").contains("whole number of probes from 1 to 127"));
        assert!(err("tcp_user_timeout", "2147483648").contains("milliseconds from 1 to 2147483647"));
    }

    #[test]
    fn every_not_implemented_key_warns() {
        for key in PGBOUNCER_NOT_IMPLEMENTED {
            assert!(!PGBOUNCER_IMPLEMENTED.contains(key), "{key} is in both lists");
            let warning = apply(key, "whatever").unwrap().1.unwrap();
            assert_eq!(
                warning.to_string(),
                format!("pgbouncer.ini:7: {key}: not implemented yet by pgcorral; ignored")
            );
        }
        for key in PGBOUNCER_IMPLEMENTED {
            // Implemented keys never warn (values chosen to be valid for all).
            let value = if *key == "auth_type" {
                "md5"
            } else if *key == "pool_mode" {
                "session"
            } else if *key == "metrics_addr" {
                "127.0.0.1:9127"
            } else if key.ends_with("_sslmode") {
                "prefer"
            } else if key.ends_with("_protocols") {
                "secure"
            } else {
                "1"
            };
            assert!(apply(key, value).unwrap().1.is_none(), "{key}");
        }
    }

    fn line<'a>(name: &'a str, value: &'a str) -> Line<'a> {
        Line { name, value, file: "pgbouncer.ini", line: 3 }
    }

    #[test]
    fn database_entries() {
        let (db, warnings) = parse_database(&line(
            "Analytics",
            "host=/var/run/postgresql port=6543 dbname=ana user=u password='p w' \
             pool_size=10 min_pool_size=1 reserve_pool=2 pool_mode=Transaction \
             max_db_connections=50 client_encoding=UTF8 datestyle=ISO timezone=UTC \
             application_name=app connect_query='SELECT 1'",
        ))
        .unwrap();
        assert!(warnings.is_empty());
        assert_eq!(db.name, "Analytics");
        assert_eq!(db.host.as_deref(), Some("/var/run/postgresql"));
        assert_eq!(db.port, 6543);
        assert_eq!(db.dbname.as_deref(), Some("ana"));
        assert_eq!(db.password.as_deref(), Some("p w"));
        assert_eq!(db.pool_size, Some(10));
        assert_eq!(db.min_pool_size, Some(1));
        assert_eq!(db.reserve_pool_size, Some(2));
        assert_eq!(db.pool_mode, Some(PoolMode::Transaction));
        assert_eq!(db.max_db_connections, Some(50));
        assert_eq!(db.connect_query.as_deref(), Some("SELECT 1"));
        assert_eq!(db.application_name.as_deref(), Some("app"));

        let (db, _) = parse_database(&line("foodb", "")).unwrap();
        assert_eq!((db.host, db.port, db.dbname), (None, 5432, None));
    }

    #[test]
    fn database_errors_and_warnings() {
        let err = parse_database(&line("mydb", "host=a bogus=1")).unwrap_err().to_string();
        assert!(
            err.starts_with(
                "pgbouncer.ini:3: mydb: unknown parameter \"bogus\" in the settings of database \"mydb\""
            ),
            "{err}"
        );
        let err = parse_database(&line("mydb", "port=x")).unwrap_err().to_string();
        assert_eq!(err, "pgbouncer.ini:3: mydb: port: expected port numbers between 1 and 65535, got \"x\"");
        let err = parse_database(&line("mydb", "host=a,b,c port=1,2")).unwrap_err().to_string();
        assert!(err.ends_with("3 hosts and 2 ports: give one port, or one per host"), "{err}");
        let err = parse_database(&line("mydb", "host=a load_balance_hosts=random")).unwrap_err().to_string();
        assert!(err.contains("load_balance_hosts: expected round-robin or disable"), "{err}");
        let err =
            parse_database(&line("mydb", "host=a target_session_attrs=master")).unwrap_err().to_string();
        assert!(err.contains("target_session_attrs: expected any, read-write"), "{err}");
        let (db, _) = parse_database(&line(
            "mydb",
            "host=p,s1,s2 port=5432,5433,5434 load_balance_hosts=disable target_session_attrs=prefer-standby",
        ))
        .unwrap();
        let s = |h: &str| Some(h.to_string());
        assert_eq!(db.servers, [(s("p"), 5432), (s("s1"), 5433), (s("s2"), 5434)]);
        assert_eq!((db.host.as_deref(), db.port), (Some("p,s1,s2"), 5432), "SHOW DATABASES shows the lists");
        assert_eq!(db.load_balance_hosts, crate::config::hosts::LoadBalanceHosts::Disable);
        assert_eq!(db.target_session_attrs, crate::config::hosts::TargetSessionAttrs::PreferStandby);
        let err = parse_database(&line("mydb", "pool_mode=fast")).unwrap_err().to_string();
        assert!(err.contains("mydb: pool_mode: expected one of session"), "{err}");
        let err = parse_database(&line("mydb", "host='x")).unwrap_err().to_string();
        assert!(err.contains("mydb: bad connection string: unterminated"), "{err}");
        let err = parse_database(&line("pgbouncer", "host=a")).unwrap_err().to_string();
        assert!(err.contains("reserved"), "{err}");

        let (db, warnings) = parse_database(&line(
            "mydb",
            "host=a target_session_attrs=any target_session_attrs=read-write \
             server_lifetime=10 query_wait_timeout=2.5 auth_user=x",
        ))
        .unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            db.target_session_attrs,
            crate::config::hosts::TargetSessionAttrs::ReadWrite,
            "the last wins"
        );
        assert_eq!(db.auth_user.as_deref(), Some("x"));
        assert_eq!(db.server_lifetime, Some(Duration::from_secs(10)));
        assert_eq!(db.query_wait_timeout, Some(Duration::from_millis(2500)));
    }

    #[test]
    fn user_entries() {
        let (user, warnings) =
            parse_user(&line("Batch", "pool_mode=session max_user_connections=5 pool_size=2")).unwrap();
        assert!(warnings.is_empty());
        assert_eq!(user.name, "Batch");
        assert_eq!(user.pool_mode, Some(PoolMode::Session));
        assert_eq!(user.max_user_connections, Some(5));
        assert_eq!(user.pool_size, Some(2));
        let (user, warnings) = parse_user(&line(
            "b",
            "query_timeout=5 transaction_timeout=6 idle_transaction_timeout=7 client_idle_timeout=8 \
             query_wait_timeout=9 reserve_pool_size=2",
        ))
        .unwrap();
        assert!(warnings.is_empty());
        let secs = |s| Some(Duration::from_secs(s));
        assert_eq!(
            (user.query_timeout, user.transaction_timeout, user.idle_transaction_timeout),
            (secs(5), secs(6), secs(7))
        );
        assert_eq!((user.client_idle_timeout, user.query_wait_timeout), (secs(8), secs(9)));
        assert_eq!(user.reserve_pool_size, Some(2));
        let err = parse_user(&line("b", "query_timeout=soon")).unwrap_err().to_string();
        assert!(err.contains("b: query_timeout: expected a non-negative number of seconds"), "{err}");
        // Every timeout is added to the clock: none may overflow it.
        for huge in ["1e30", "18446744073709551615", "3155760001"] {
            let err = parse_user(&line("b", &format!("query_timeout={huge}"))).unwrap_err().to_string();
            assert!(err.contains("up to 3153600000 (a century)"), "{huge}: {err}");
        }
        let (century, _) = parse_user(&line("b", "query_timeout=3153600000")).unwrap();
        assert_eq!(century.query_timeout, Some(Duration::from_secs(MAX_SECONDS)));
        let err = parse_user(&line("b", "host=x")).unwrap_err().to_string();
        assert!(err.contains("unknown parameter \"host\" in the settings of user \"b\""), "{err}");
        let err = parse_user(&line("b", "pool_mode=transactional")).unwrap_err().to_string();
        assert!(err.contains("b: pool_mode: expected one of"), "{err}");
    }

    #[test]
    fn peers() {
        let peer = parse_peer(&line("1", "host=/tmp/p1 port=5555 pool_size=3")).unwrap();
        assert_eq!(peer, PeerEntry { peer_id: 1, host: "/tmp/p1".into(), port: 5555, pool_size: Some(3) });
        let defaults = parse_peer(&line("16383", "host=10.0.0.2")).unwrap();
        assert_eq!((defaults.peer_id, defaults.port, defaults.pool_size), (16383, 6432, None));
        let err = parse_peer(&line("16384", "host=a")).unwrap_err().to_string();
        assert!(err.contains("expected a peer id between 1 and 16383"), "{err}");
        assert!(parse_peer(&line("0", "host=a")).is_err());
        assert!(parse_peer(&line("x", "host=a")).is_err());
        assert!(parse_peer(&line("2", "port=1")).unwrap_err().to_string().contains("host="));
        assert!(parse_peer(&line("2", "host=a dbname=x")).is_err());
    }
}
