//! Configuration loading: reads an existing PgBouncer `pgbouncer.ini`
//! unchanged (plus its `%include`s and `auth_file`), applies `PGCORRAL_*`
//! environment overrides, and returns typed settings together with warnings
//! for everything that was accepted but is not implemented yet.
//!
//! Layout: `ini` lexes files into located entries, `connstr` splits the
//! `key=value` strings of `[databases]`/`[users]`/`[peers]`, `settings` holds
//! the types, defaults and per-value validation, `userlist` reads the auth
//! file, `env` collects environment overrides, `error` defines
//! [`ConfigError`]. This file only wires them together.
//!
//! Precedence: later lines beat earlier ones (also across includes), and the
//! environment beats the file. Every line is validated even when a later one
//! overrides it, because PgBouncer would also reject such a file.

pub mod catalog;
pub(crate) mod connstr;
pub mod diff;
mod env;
mod error;
pub mod hosts;
pub(crate) mod ini;
pub(crate) mod settings;
pub(crate) mod userlist;

use std::path::Path;

pub use error::ConfigError;
pub use settings::{AuthType, Config, ConfigWarning, DatabaseEntry, General, PeerEntry, PoolMode, UserEntry};

use ini::{Entry, Section};
use settings::{Line, Setting};

impl Config {
    /// Loads the config file at `path`, everything it includes, its
    /// `auth_file`, and the `PGCORRAL_*` environment overrides.
    pub fn load(path: &Path) -> Result<(Config, Vec<ConfigWarning>), ConfigError> {
        let entries = ini::lex_file(path)?;
        assemble(entries, path, env::from_process()?)
    }

    /// Like [`Config::load`] with the main file's contents given as `text`;
    /// `%include`s and `auth_file` are still read from disk, relative to
    /// `path`'s directory.
    pub fn parse_str(text: &str, path: &Path) -> Result<(Config, Vec<ConfigWarning>), ConfigError> {
        let entries = ini::lex_str(text, path)?;
        assemble(entries, path, env::from_process()?)
    }
}

impl Config {
    /// This configuration with one `[pgbouncer]` key changed, as the console's `SET` does;
    /// the value is checked as a file's would be.
    pub fn with_setting(&self, key: &str, value: &str) -> Result<Config, ConfigError> {
        let mut config = self.clone();
        let base_dir = self.path.parent().unwrap_or_else(|| Path::new("")).to_path_buf();
        let setting = Setting { key, value, file: "SET", line: 0 };
        settings::apply_general(&mut config.general, &setting, &base_dir)?;
        upsert(&mut config.written, key, value.to_string());
        Ok(config)
    }

    /// The value of a `[pgbouncer]` key as written, if it was.
    pub fn written(&self, key: &str) -> Option<&str> {
        self.written.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// What `SHOW CONFIG` prints for a `[pgbouncer]` key: the value in effect for keys whose
    /// written form pgcorral normalises (the `tcp_*` socket options), else the value as
    /// written; None when not written (the default applies).
    pub fn shown(&self, key: &str) -> Option<String> {
        settings::in_effect(&self.general, key).or_else(|| self.written(key).map(str::to_string))
    }
}

/// Puts `item` in place of the element with the same name, or appends it, so
/// a redefined name keeps its first position and its last value.
fn upsert<T>(items: &mut Vec<(String, T)>, name: &str, item: T) {
    match items.iter_mut().find(|(existing, _)| existing == name) {
        Some(slot) => slot.1 = item,
        None => items.push((name.to_string(), item)),
    }
}

fn assemble(
    entries: Vec<Entry>,
    path: &Path,
    overrides: Vec<env::Override>,
) -> Result<(Config, Vec<ConfigWarning>), ConfigError> {
    let base_dir = path.parent().unwrap_or_else(|| Path::new(""));
    let mut general = settings::General::default();
    // One warning per ignored key, from the occurrence that counts.
    let mut general_warnings: Vec<(String, ConfigWarning)> = Vec::new();
    let mut databases: Vec<(String, (DatabaseEntry, Vec<ConfigWarning>))> = Vec::new();
    let mut users: Vec<(String, (UserEntry, Vec<ConfigWarning>))> = Vec::new();
    let mut peers: Vec<(String, PeerEntry)> = Vec::new();
    let mut written: Vec<(String, String)> = Vec::new();

    let mut apply = |setting: &Setting<'_>| -> Result<(), ConfigError> {
        if let Some(warning) = settings::apply_general(&mut general, setting, base_dir)? {
            upsert(&mut general_warnings, setting.key, warning);
        }
        upsert(&mut written, setting.key, setting.value.to_string());
        Ok(())
    };

    for entry in &entries {
        let line = Line { name: &entry.key, value: &entry.value, file: &entry.file, line: entry.line };
        match entry.section {
            Section::PgBouncer => {
                apply(&Setting { key: &entry.key, value: &entry.value, file: &entry.file, line: entry.line })?
            }
            Section::Databases => upsert(&mut databases, &entry.key, settings::parse_database(&line)?),
            Section::Users => upsert(&mut users, &entry.key, settings::parse_user(&line)?),
            Section::Peers => {
                // By id, not by spelling: `01` and `1` name one peer.
                let peer = settings::parse_peer(&line)?;
                upsert(&mut peers, &peer.peer_id.to_string(), peer)
            }
        }
    }
    for o in &overrides {
        let file = o.location();
        apply(&Setting { key: &o.key, value: &o.value, file: &file, line: 0 })?;
    }

    if general.workers == 0 {
        general.workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    }
    let userlist = match &general.auth_file {
        Some(auth_file) => userlist::load(auth_file)?,
        None => Vec::new(),
    };

    let mut warnings: Vec<ConfigWarning> = general_warnings.into_iter().map(|(_, w)| w).collect();
    let databases: Vec<DatabaseEntry> = databases
        .into_iter()
        .map(|(_, (db, db_warnings))| {
            warnings.extend(db_warnings);
            db
        })
        .collect();
    let users = users
        .into_iter()
        .map(|(_, (user, user_warnings))| {
            warnings.extend(user_warnings);
            user
        })
        .collect();
    let peers = peers.into_iter().map(|(_, peer)| peer).collect();

    let tls = crate::tls::TlsContexts::build(&general.client_tls, &general.server_tls)?;
    let hba = match &general.auth_hba_file {
        Some(file) => Some(std::sync::Arc::new(crate::auth::hba::HbaFile::load(file)?)),
        None if general.auth_type == AuthType::Hba => {
            return Err(ConfigError::Syntax {
                file: path.display().to_string(),
                line: 0,
                message: "auth_type = hba needs auth_hba_file".into(),
            })
        }
        None => None,
    };
    if general.auth_type == AuthType::Any {
        // `any` ignores the client's user name: only a database that logs in as a user of its
        // own may be reached so, or anyone would get any role PostgreSQL lets pgcorral use.
        let unforced = databases.iter().find(|db: &&DatabaseEntry| db.user.is_none());
        if let Some(db) = unforced {
            return Err(ConfigError::Syntax {
                file: path.display().to_string(),
                line: 0,
                message: format!(
                    "auth_type = any requires a forced user: database \"{}\" has no user=",
                    db.name
                ),
            });
        }
    }
    let ident = match &general.auth_ident_file {
        Some(file) => Some(std::sync::Arc::new(crate::auth::hba::IdentMap::load(file)?)),
        None => None,
    };
    let scram_secrets = userlist.iter().filter(|(_, secret)| secret.starts_with("SCRAM-SHA-256$")).count();
    let mostly_scram = scram_secrets * 2 > userlist.len();
    let mock_scram_iterations = typical_scram_iterations(&userlist, general.scram_iterations);
    let config = Config {
        path: path.to_path_buf(),
        general,
        written,
        databases,
        users,
        peers,
        userlist,
        mostly_scram,
        mock_scram_iterations,
        tls,
        hba,
        ident,
    };
    Ok((config, warnings))
}

/// The iteration count most users' SCRAM verifiers have: a stored verifier's own, or
/// `scram_iterations` for a plaintext secret (pgcorral derives its verifier). An unknown user's
/// mock verifier uses it, so that the `i=` of a server-first message does not tell who exists.
fn typical_scram_iterations(userlist: &[(String, String)], derived: u32) -> u32 {
    use crate::auth::Secret;
    let mut counts: std::collections::BTreeMap<u32, usize> = std::collections::BTreeMap::new();
    for (_, secret) in userlist {
        match Secret::parse(secret) {
            Secret::Scram(verifier) => *counts.entry(verifier.iterations).or_default() += 1,
            Secret::Plain(_) => *counts.entry(derived).or_default() += 1,
            Secret::Md5(_) => {}
        }
    }
    // Ties go to the larger count of iterations: the map iterates in ascending order, and
    // max_by_key keeps the last of equal keys.
    counts.into_iter().max_by_key(|&(_, n)| n).map_or(derived, |(iterations, _)| iterations)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// Parses `text` as `pgbouncer.ini` in the current directory, with an
    /// empty environment so tests cannot see each other's `set_var`.
    fn parse_at(text: &str, path: &Path) -> Result<(Config, Vec<ConfigWarning>), ConfigError> {
        parse_with_env(text, path, &[])
    }

    fn parse(text: &str) -> Result<(Config, Vec<ConfigWarning>), ConfigError> {
        parse_at(text, Path::new("pgbouncer.ini"))
    }

    #[test]
    fn an_unknown_users_mock_verifier_has_the_iterations_most_users_have() {
        let key = "A".repeat(43) + "=";
        let verifier = |i: u32| format!("SCRAM-SHA-256${i}:c2FsdA==${key}:{key}");
        let list = |secrets: &[String]| -> Vec<(String, String)> {
            secrets.iter().enumerate().map(|(n, s)| (format!("u{n}"), s.clone())).collect()
        };
        let md5 = "md5".to_string() + &"0".repeat(32);
        assert_eq!(typical_scram_iterations(&[], 4096), 4096, "nobody: scram_iterations");
        let mostly_stored = list(&[verifier(40000), verifier(40000), "plain".into(), md5.clone()]);
        assert_eq!(typical_scram_iterations(&mostly_stored, 4096), 40000);
        let mostly_derived = list(&[verifier(40000), "a".into(), "b".into(), md5.clone(), md5]);
        assert_eq!(typical_scram_iterations(&mostly_derived, 4096), 4096, "md5 secrets do not count");
        let tied = list(&[verifier(10000), verifier(20000)]);
        assert_eq!(typical_scram_iterations(&tied, 4096), 20000);
    }

    fn parse_with_env(
        text: &str,
        path: &Path,
        vars: &[(&str, &str)],
    ) -> Result<(Config, Vec<ConfigWarning>), ConfigError> {
        let vars = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assemble(ini::lex_str(text, path)?, path, env::collect(Some(vars))?)
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    fn shown(warnings: &[ConfigWarning]) -> Vec<String> {
        warnings.iter().map(ToString::to_string).collect()
    }

    /// A fresh directory under the system temp dir, unique per call.
    fn temp_dir(tag: &str) -> PathBuf {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "pgcorral-config-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    const SCRAM: &str = "SCRAM-SHA-256$4096:c2FsdHNhbHQ=$c3RvcmVka2V5:c2VydmVya2V5";

    const REALISTIC: &str = "\
[databases]
mydb = host=postgres port=5432 dbname=mydb
analytics = host=replica.internal port=5432 dbname=mydb pool_size=10 pool_mode=session
* = host=127.0.0.1
[pgbouncer]
listen_addr = *
listen_port = 6432
auth_type = scram-sha-256
auth_file = AUTH_FILE
pool_mode = transaction
max_client_conn = 1000
default_pool_size = 20
reserve_pool_size = 5
reserve_pool_timeout = 3
server_idle_timeout = 600
server_lifetime = 3600
log_connections = 1
[users]
batch = pool_mode=session max_user_connections=5
";

    #[test]
    fn defaults() {
        let (config, warnings) = parse("").unwrap();
        assert!(warnings.is_empty());
        let g = &config.general;
        assert!(g.listen_addr.is_empty());
        assert_eq!(g.listen_port, 6432);
        assert_eq!(g.unix_socket_dir, Some(PathBuf::from("/tmp")));
        assert_eq!(g.auth_type, AuthType::Md5);
        assert_eq!(g.auth_file, None);
        assert_eq!(g.pool_mode, PoolMode::Session);
        assert_eq!(g.max_client_conn, 100);
        assert_eq!(g.default_pool_size, 20);
        assert_eq!(g.min_pool_size, 0);
        assert_eq!(g.reserve_pool_size, 0);
        assert_eq!(g.reserve_pool_timeout, Duration::from_secs(5));
        assert_eq!(g.max_db_connections, 0);
        assert_eq!(g.max_user_connections, 0);
        assert_eq!(g.server_reset_query, "DISCARD ALL");
        assert!(!g.server_reset_query_always);
        assert!(g.ignore_startup_parameters.is_empty());
        assert_eq!(g.track_extra_parameters, ["IntervalStyle"]);
        assert_eq!(g.max_packet_size, 2_147_483_647);
        assert_eq!(g.logfile, None);
        assert_eq!(g.pidfile, None);
        assert!(g.admin_users.is_empty());
        assert!(g.stats_users.is_empty());
        assert_eq!(g.workers, std::thread::available_parallelism().unwrap().get());
        assert_eq!(g.verbose, 0);
        assert!(config.databases.is_empty());
        assert!(config.users.is_empty());
        assert!(config.userlist.is_empty());
        assert!(config.database("any").is_none());
        assert_eq!(config.path, PathBuf::from("pgbouncer.ini"));
    }

    #[test]
    fn realistic_pgbouncer_ini() {
        let dir = temp_dir("realistic");
        let auth_file = dir.join("userlist.txt");
        std::fs::write(
            &auth_file,
            format!("\"app\" \"md5d8a5d2a3e8b9b0a45c6d1c9b3c5f7e21\"\n\"batch\" \"{SCRAM}\"\n"),
        )
        .unwrap();
        let text = REALISTIC.replace("AUTH_FILE", auth_file.to_str().unwrap());
        let (config, warnings) = parse_at(&text, &dir.join("pgbouncer.ini")).unwrap();

        let g = &config.general;
        assert_eq!(g.listen_addr, ["*"]);
        assert_eq!(g.listen_port, 6432);
        assert_eq!(g.auth_type, AuthType::ScramSha256);
        assert_eq!(g.auth_file.as_deref(), Some(auth_file.as_path()));
        assert_eq!(g.pool_mode, PoolMode::Transaction);
        assert_eq!(g.max_client_conn, 1000);
        assert_eq!(g.default_pool_size, 20);
        assert_eq!(g.reserve_pool_size, 5);
        assert_eq!(g.reserve_pool_timeout, Duration::from_secs(3));

        let names: Vec<_> = config.databases.iter().map(|db| db.name.as_str()).collect();
        assert_eq!(names, ["mydb", "analytics", "*"]);
        let mydb = config.database("mydb").unwrap();
        assert_eq!(mydb.host.as_deref(), Some("postgres"));
        assert_eq!(mydb.port, 5432);
        assert_eq!(mydb.dbname.as_deref(), Some("mydb"));
        assert_eq!(mydb.pool_mode, None);
        let analytics = config.database("analytics").unwrap();
        assert_eq!(analytics.host.as_deref(), Some("replica.internal"));
        assert_eq!(analytics.pool_size, Some(10));
        assert_eq!(analytics.pool_mode, Some(PoolMode::Session));

        let batch = config.user("batch").unwrap();
        assert_eq!(batch.pool_mode, Some(PoolMode::Session));
        assert_eq!(batch.max_user_connections, Some(5));
        assert_eq!(batch.pool_size, None);
        assert!(config.user("app").is_none());

        assert_eq!(config.secret("batch"), Some(SCRAM));
        assert_eq!(config.secret("app"), Some("md5d8a5d2a3e8b9b0a45c6d1c9b3c5f7e21"));
        assert_eq!(config.secret("nobody"), None);

        assert_eq!(shown(&warnings), Vec::<String>::new(), "every key of this file is implemented");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn star_fallback_lookup() {
        let (config, _) = parse("[databases]\nexact = host=a\n* = host=fallback port=5433\n").unwrap();
        assert_eq!(config.database("exact").unwrap().host.as_deref(), Some("a"));
        let fallback = config.database("other").unwrap();
        assert_eq!(fallback.name, "*");
        assert_eq!(fallback.host.as_deref(), Some("fallback"));
        assert_eq!(fallback.port, 5433);
        assert_eq!(fallback.dbname, None);
        // Database names are case-sensitive.
        assert_eq!(config.database("EXACT").unwrap().name, "*");

        let (config, _) = parse("[databases]\nexact = host=a\n").unwrap();
        assert!(config.database("other").is_none());
    }

    #[test]
    fn last_duplicate_wins() {
        let (config, warnings) = parse(
            "[pgbouncer]\nlisten_port = 1111\ntcp_socket_buffer = 1\n\
             [databases]\na = host=first\nb = host=b\n\
             [PGBOUNCER]\nLISTEN_PORT = 2222\ntcp_socket_buffer = 2\n\
             [databases]\na = host=second target_session_attrs=any\n\
             [users]\nu = pool_size=1\nu = pool_size=2\n",
        )
        .unwrap();
        assert_eq!(config.general.listen_port, 2222);
        let names: Vec<_> = config.databases.iter().map(|db| db.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(config.database("a").unwrap().host.as_deref(), Some("second"));
        assert_eq!(config.users.len(), 1);
        assert_eq!(config.user("u").unwrap().pool_size, Some(2));
        assert_eq!(
            shown(&warnings),
            ["pgbouncer.ini:9: tcp_socket_buffer: not implemented yet by pgcorral; ignored",]
        );
    }

    #[test]
    fn comments_and_literal_values() {
        let (config, _) = parse(
            "; leading comment\n# another\n[pgbouncer]\n  ; indented comment\n\
             server_reset_query = SELECT 1 ; not a comment\n\
             logfile = C:\\logs\\pgb.log\n\
             admin_users = \"quoted\", plain\n",
        )
        .unwrap();
        let g = &config.general;
        assert_eq!(g.server_reset_query, "SELECT 1 ; not a comment");
        assert_eq!(g.logfile, Some(PathBuf::from("C:\\logs\\pgb.log")));
        assert_eq!(g.admin_users, ["\"quoted\"", "plain"]);
    }

    #[test]
    fn quoted_connection_strings() {
        let (config, _) = parse(
            "[databases]\n\"Weird Name\" = host=h user=app password='p@ss w\\'rd' \
             connect_query='SET search_path = ''a'', b' application_name = 'my app'\n",
        )
        .unwrap();
        let db = config.database("Weird Name").unwrap();
        assert_eq!(db.password.as_deref(), Some("p@ss w'rd"));
        assert_eq!(db.connect_query.as_deref(), Some("SET search_path = 'a', b"));
        assert_eq!(db.application_name.as_deref(), Some("my app"));
        assert_eq!(db.user.as_deref(), Some("app"));
    }

    #[test]
    fn unknown_key_error_has_file_and_line() {
        let e = err("[pgbouncer]\nlisten_port = 6432\nfrobnicate = 1\n");
        assert!(
            e.starts_with(
                "pgbouncer.ini:3: frobnicate: unknown setting (neither a PgBouncer nor a pgcorral key)"
            ),
            "{e}"
        );
        let e = err("[databases]\nmydb = host=a colour=blue\n");
        assert!(
            e.starts_with(
                "pgbouncer.ini:2: mydb: unknown parameter \"colour\" in the settings of database \"mydb\""
            ),
            "{e}"
        );
        let e = err("[users]\nbob = colour=blue\n");
        assert!(e.contains("in the settings of user \"bob\""), "{e}");
        let e = err("[pgbouncer]\n[extras]\nx = 1\n");
        assert!(e.starts_with("pgbouncer.ini:2: unknown section [extras]"), "{e}");
    }

    #[test]
    fn bad_value_error() {
        let text = format!("[pgbouncer]\n{}default_pool_size = twenty\n", "\n".repeat(10));
        assert_eq!(
            err(&text),
            "pgbouncer.ini:12: default_pool_size: expected a non-negative integer, got \"twenty\""
        );
        assert!(err("[pgbouncer]\nlisten_port = 99999\n").contains("listen_port: expected a port"));
        assert!(err("[pgbouncer]\nmax_client_conn = -5\n").contains("got \"-5\""));
        assert!(err("[pgbouncer]\npool_mode = sometimes\n").contains("pool_mode: expected one of"));
        assert!(err("[databases]\nx = port=0\n").contains("x: port: expected port numbers"));
        // An overridden bad line is still an error: PgBouncer rejects it too.
        assert!(err("[pgbouncer]\nlisten_port = x\nlisten_port = 1\n").contains(":2: listen_port"));
        assert_eq!(
            err("[pgbouncer]\nauth_type = pam\n"),
            "pgbouncer.ini:2: auth_type: auth_type = pam is not implemented yet; \
             supported: trust, plain, md5, scram-sha-256, cert, hba, any"
        );
        assert!(err("[pgbouncer]\nauth_type = hba\n").ends_with("auth_type = hba needs auth_hba_file"));
        let any = "[pgbouncer]\nauth_type = any\n[databases]\nforced = host=h user=app\n";
        assert!(parse(any).is_ok(), "every database logs in as its own user");
        assert!(err(&format!("{any}open = host=h\n"))
            .ends_with("auth_type = any requires a forced user: database \"open\" has no user="));
    }

    #[test]
    fn not_implemented_warns_once_per_key() {
        let (config, warnings) = parse(
            "[pgbouncer]\ntcp_socket_buffer = 3600\ndns_zone_check_period = 600\n\
             client_tls_dheparams = auto\ntcp_socket_buffer = 10\n\
             [databases]\nd = host=a,b load_balance_hosts=disable target_session_attrs=read-write\n\
             [users]\nu = query_timeout=5 pool_size=3\n[peers]\n1 = host=/tmp/p1\n01 = host=/tmp/p2\n",
        )
        .unwrap();
        assert_eq!(
            shown(&warnings),
            [
                "pgbouncer.ini:5: tcp_socket_buffer: not implemented yet by pgcorral; ignored",
                "pgbouncer.ini:3: dns_zone_check_period: not implemented yet by pgcorral; ignored",
                "pgbouncer.ini:4: client_tls_dheparams: not implemented yet by pgcorral; ignored",
            ]
        );
        assert_eq!(config.peers.len(), 1, "01 and 1 name one peer");
        assert_eq!(config.peers[0].host, "/tmp/p2", "the last definition wins");
        assert_eq!(config.user("u").unwrap().pool_size, Some(3));
        assert_eq!(config.user("u").unwrap().query_timeout, Some(std::time::Duration::from_secs(5)));

        // Every key of the list is accepted in a real file.
        let mut text = String::from("[pgbouncer]\n");
        for key in settings::PGBOUNCER_NOT_IMPLEMENTED {
            text.push_str(&format!("{key} = 1\n"));
        }
        let (_, warnings) = parse(&text).unwrap();
        assert_eq!(warnings.len(), settings::PGBOUNCER_NOT_IMPLEMENTED.len());
        assert!(warnings.iter().all(|w| w.message == settings::NOT_IMPLEMENTED));
    }

    #[test]
    fn include_files() {
        let dir = temp_dir("include");
        std::fs::create_dir_all(dir.join("conf.d")).unwrap();
        std::fs::write(
            dir.join("conf.d/databases.ini"),
            "[databases]\nincluded = host=inc pool_mode=statement\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("conf.d/tuning.ini"),
            "[pgbouncer]\ndefault_pool_size = 7\ntcp_socket_buffer = 1\n",
        )
        .unwrap();
        let main = dir.join("pgbouncer.ini");
        std::fs::write(
            &main,
            "[pgbouncer]\ndefault_pool_size = 3\n%include conf.d/tuning.ini\n\
             %include conf.d/databases.ini\nmain = host=m\n",
        )
        .unwrap();
        let (config, warnings) = Config::load(&main).unwrap();
        assert_eq!(config.general.default_pool_size, 7);
        assert_eq!(config.database("included").unwrap().pool_mode, Some(PoolMode::Statement));
        assert_eq!(config.database("main").unwrap().host.as_deref(), Some("m"));
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].file.ends_with("tuning.ini"));
        assert_eq!(warnings[0].line, 3);

        // Errors inside an include point into the included file.
        std::fs::write(dir.join("conf.d/tuning.ini"), "[pgbouncer]\n\nverbose = loud\n").unwrap();
        let e = Config::load(&main).unwrap_err().to_string();
        assert!(e.contains("tuning.ini:3: verbose: expected an integer"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn auth_file_relative_to_config_dir() {
        let dir = temp_dir("authfile");
        std::fs::create_dir_all(dir.join("secrets")).unwrap();
        std::fs::write(
            dir.join("secrets/userlist.txt"),
            "; users\n\"alice\" \"md545f2603610af569b6155c45067268c6b\"\n\"bob\" \"pw\"\n",
        )
        .unwrap();
        let main = dir.join("pgbouncer.ini");
        std::fs::write(&main, "[pgbouncer]\nauth_file = secrets/userlist.txt\n").unwrap();
        let (config, _) = Config::load(&main).unwrap();
        assert_eq!(config.general.auth_file, Some(dir.join("secrets/userlist.txt")));
        assert_eq!(config.userlist.len(), 2);
        assert_eq!(config.secret("alice"), Some("md545f2603610af569b6155c45067268c6b"));
        assert_eq!(config.secret("bob"), Some("pw"));

        let e = parse_at("[pgbouncer]\nauth_file = missing.txt\n", &main).unwrap_err();
        match e {
            ConfigError::Io { path, .. } => assert!(path.ends_with("missing.txt"), "{path}"),
            other => panic!("expected Io, got {other}"),
        }

        std::fs::write(dir.join("secrets/userlist.txt"), "\"ok\" \"x\"\nbroken\n").unwrap();
        let e = Config::load(&main).unwrap_err().to_string();
        assert!(e.contains("userlist.txt:2: expected a line of the form"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn env_override_from_process_environment() {
        // Only this test sets PGCORRAL_LISTEN_PORT; every test that asserts
        // listen_port goes through `parse`, which ignores the process env.
        std::env::set_var("PGCORRAL_LISTEN_PORT", "7432");
        let result = Config::parse_str("[pgbouncer]\nlisten_port = 6432\n", Path::new("p.ini"));
        std::env::remove_var("PGCORRAL_LISTEN_PORT");
        assert_eq!(result.unwrap().0.general.listen_port, 7432);
    }

    #[test]
    fn env_overrides_are_validated_like_file_values() {
        let path = Path::new("pgbouncer.ini");
        let text = "[pgbouncer]\nlisten_port = 6432\nadmin_users = a\n";
        let (config, warnings) = parse_with_env(
            text,
            path,
            &[
                ("PGCORRAL_ADMIN_USERS", "root, ops"),
                ("PGCORRAL_POOL_MODE", "transaction"),
                ("PGCORRAL_TCP_SOCKET_BUFFER", "1"),
                ("PGCORRAL_WORKERS", "3"),
            ],
        )
        .unwrap();
        assert_eq!(config.general.listen_port, 6432);
        assert_eq!(config.general.admin_users, ["root", "ops"]);
        assert_eq!(config.general.pool_mode, PoolMode::Transaction);
        assert_eq!(config.general.workers, 3);
        assert_eq!(
            shown(&warnings),
            ["environment:PGCORRAL_TCP_SOCKET_BUFFER: tcp_socket_buffer: not implemented yet by pgcorral; ignored"]
        );

        let e = parse_with_env(text, path, &[("PGCORRAL_LISTEN_PORT", "seven")]).unwrap_err().to_string();
        assert_eq!(
            e,
            "environment:PGCORRAL_LISTEN_PORT: listen_port: expected a port number between 1 and 65535, got \"seven\""
        );
        let e = parse_with_env(text, path, &[("PGCORRAL_NO_SUCH_KEY", "1")]).unwrap_err().to_string();
        assert!(e.starts_with("environment:PGCORRAL_NO_SUCH_KEY: no_such_key: unknown setting"), "{e}");

        // Relative auth_file from the environment resolves like the file's.
        let dir = temp_dir("envauth");
        std::fs::write(dir.join("users.txt"), "\"u\" \"s\"\n").unwrap();
        let (config, _) =
            parse_with_env("", &dir.join("pgbouncer.ini"), &[("PGCORRAL_AUTH_FILE", "users.txt")]).unwrap();
        assert_eq!(config.secret("u"), Some("s"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn pool_mode_per_database_and_user() {
        let (config, _) = parse(
            "[pgbouncer]\npool_mode = session\n\
             [databases]\nt = pool_mode=transaction\ns = pool_mode=STATEMENT\nn = host=x\n\
             [users]\nbatch = pool_mode=session\nreport = pool_mode=transaction pool_size=4\n",
        )
        .unwrap();
        assert_eq!(config.general.pool_mode, PoolMode::Session);
        assert_eq!(config.database("t").unwrap().pool_mode, Some(PoolMode::Transaction));
        assert_eq!(config.database("s").unwrap().pool_mode, Some(PoolMode::Statement));
        assert_eq!(config.database("n").unwrap().pool_mode, None);
        assert_eq!(config.user("batch").unwrap().pool_mode, Some(PoolMode::Session));
        assert_eq!(config.user("report").unwrap().pool_mode, Some(PoolMode::Transaction));
        assert!(err("[users]\nx = pool_mode=never\n").contains("x: pool_mode: expected one of"));
    }

    #[test]
    fn tcp_socket_options() {
        let (config, warnings) = parse("").unwrap();
        assert!(warnings.is_empty());
        assert_eq!(config.general.tcp, crate::net::TcpSettings::default());
        let shown: Vec<Option<String>> =
            ["tcp_keepalive", "tcp_keepidle", "tcp_keepintvl", "tcp_keepcnt", "tcp_user_timeout"]
                .iter()
                .map(|key| config.shown(key))
                .collect();
        assert_eq!(shown, ["1", "0", "0", "0", "0"].map(|v| Some(v.to_string())));

        let (config, warnings) = parse(
            "[pgbouncer]\ntcp_keepalive = yes\ntcp_keepidle = 007\ntcp_keepintvl = 3\n\
             tcp_keepcnt = 4\ntcp_user_timeout = 9000\nlisten_port = 6000\n",
        )
        .unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        let tcp = config.general.tcp;
        assert!(tcp.keepalive);
        assert_eq!(tcp.keepidle, Some(Duration::from_secs(7)));
        assert_eq!(tcp.keepintvl, Some(Duration::from_secs(3)));
        assert_eq!(tcp.keepcnt, Some(4));
        assert_eq!(tcp.user_timeout, Some(Duration::from_millis(9000)));
        assert_eq!(config.shown("tcp_keepalive").as_deref(), Some("1"), "the value in effect, not \"yes\"");
        assert_eq!(config.shown("tcp_keepidle").as_deref(), Some("7"));
        assert_eq!(config.shown("tcp_user_timeout").as_deref(), Some("9000"));
        assert_eq!(config.shown("listen_port").as_deref(), Some("6000"), "other keys as written");
        assert_eq!(config.shown("default_pool_size"), None);

        let (config, _) = parse("[pgbouncer]\ntcp_keepalive = 0\ntcp_keepidle = 0\n").unwrap();
        assert!(!config.general.tcp.keepalive);
        assert_eq!(config.general.tcp.keepidle, None);
        assert_eq!(config.shown("tcp_keepalive").as_deref(), Some("0"));

        assert_eq!(
            err("[pgbouncer]\n\ntcp_keepidle = 1h\n"),
            "pgbouncer.ini:3: tcp_keepidle: expected a whole number of seconds from 1 to 32767, \
             or 0 for the system's default, got \"1h\""
        );
        assert!(err("[pgbouncer]\ntcp_keepalive = maybe\n")
            .starts_with("pgbouncer.ini:2: tcp_keepalive: expected 1 (on) or 0 (off)"));

        // SET on the console validates and applies like the file.
        let set = config.with_setting("tcp_keepcnt", "9").unwrap();
        assert_eq!(set.general.tcp.keepcnt, Some(9));
        assert_eq!(set.shown("tcp_keepcnt").as_deref(), Some("9"));
        assert!(config.with_setting("tcp_keepcnt", "128").unwrap_err().to_string().contains("from 1 to 127"));
    }

    #[test]
    fn unix_socket_dir_and_workers() {
        let (config, _) =
            parse("[pgcorral]\nunix_socket_dir =\nworkers = 4\nlisten_addr = 127.0.0.1, ::1\n").unwrap();
        assert_eq!(config.general.unix_socket_dir, None);
        assert_eq!(config.general.workers, 4);
        assert_eq!(config.general.listen_addr, ["127.0.0.1", "::1"]);
    }
}
