//! Session parameters that follow a client from server to server (PgBouncer's "varcache",
//! extended to every run-time parameter).
//!
//! In transaction mode a client meets a different server each transaction, yet must keep seeing
//! the session it built: what its startup packet (or its `options`) set, and what it changed
//! with `SET` outside a transaction or in a committed one. pgcorral learns those values two ways:
//!
//! - parameters PostgreSQL reports (ParameterStatus: client_encoding, DateStyle, TimeZone,
//!   IntervalStyle, application_name, standard_conforming_strings, default_transaction_read_only,
//!   search_path from PostgreSQL 18, ...) are watched as they pass;
//! - the others (statement_timeout, work_mem, search_path before 18, ...) are read from
//!   `pg_settings` after a transaction that ran `SET`, `RESET` or `DISCARD` (see [`SESSION_PROBE`]).
//!
//! When a client is lent a server whose values differ, pgcorral first sets them with
//! `set_config` (which, unlike `SET name TO 'a, b'`, keeps list values such as search_path
//! intact) and `RESET`s what the previous client changed and this one did not. Names compare
//! case-insensitively, as PostgreSQL's GUCs do.
//!
//! The values sit behind `Arc`s that clients with equal values share (see
//! [`TrackedParams::share`]): a server remembers the set it last matched, so the usual lease,
//! to a client whose values equal the previous one's, costs one pointer comparison.

use parking_lot::Mutex;
use std::sync::Arc;

/// Reported parameters no client can change: never tracked, never set.
const READ_ONLY: &[&str] = &[
    "server_version",
    "server_encoding",
    "integer_datetimes",
    "is_superuser",
    "session_authorization",
    "in_hot_standby",
];

/// Lists the parameters set at session level on a server: by `SET` (from a client or from
/// pgcorral) or `set_config(..., false)`.
pub const SESSION_PROBE: &str = "SELECT name, setting FROM pg_catalog.pg_settings WHERE source = 'session'";

/// The values a client believes in: every reported parameter, and the unreported ones it set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrackedParams {
    /// Reported parameters, each with the value the client was last told.
    values: Arc<Vec<(String, String)>>,
    /// Unreported parameters the client set (startup, `SET`), sorted by lower-case name.
    session: Arc<Vec<(String, String)>>,
}

/// How many distinct value sets a pool shares between its clients; clients beyond that keep
/// their own copy and are compared value by value.
const SHARED_SETS: usize = 16;

/// The value sets a pool's clients share.
#[derive(Debug, Default)]
pub struct SharedParams(Mutex<Vec<TrackedParams>>);

/// Unreported session values, as a server holds them: sorted by lower-case name.
pub fn sorted_session(mut values: Vec<(String, String)>) -> Vec<(String, String)> {
    values.sort_by_key(|(name, _)| name.to_ascii_lowercase());
    values.dedup_by(|later, earlier| later.0.eq_ignore_ascii_case(&earlier.0));
    values
}

impl TrackedParams {
    /// What a new client is told and believes: the pool's welcome values, overridden by the
    /// parameters from its startup packet; those PostgreSQL does not report are kept apart,
    /// to be set on each server it is lent. Returns (all ParameterStatus to send, tracked).
    pub fn for_new_client(
        welcome: &[(String, String)],
        startup: &[(String, String)],
    ) -> (Vec<(String, String)>, TrackedParams) {
        let mut reported: Vec<(String, String)> = welcome.to_vec();
        let mut session = Vec::new();
        for (name, value) in startup {
            let value = unquote(value);
            match reported.iter_mut().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
                Some(_) if is_read_only(name) => {}
                // The server's spelling wins when it means the same ("utf-8" vs "UTF8").
                Some(entry) if same_value(name, &entry.1, &value) => {}
                Some(entry) => entry.1 = value,
                None => {
                    session.retain(|(n, _): &(String, String)| !n.eq_ignore_ascii_case(name));
                    session.push((name.clone(), value));
                }
            }
        }
        let values = reported.iter().filter(|(n, _)| !is_read_only(n)).cloned().collect();
        let tracked = TrackedParams { values: Arc::new(values), session: Arc::new(sorted_session(session)) };
        (reported, tracked)
    }

    /// The same values, as the copy other clients with equal values hold when there is one.
    pub fn share(self, shared: &SharedParams) -> TrackedParams {
        let mut sets = shared.0.lock();
        if let Some(known) = sets.iter().find(|known| **known == self) {
            return known.clone();
        }
        if sets.len() < SHARED_SETS {
            sets.push(self.clone());
        }
        self
    }

    /// The reported values, as an online restart carries them (with [`Self::session`]).
    pub fn reported(&self) -> &[(String, String)] {
        &self.values
    }

    /// The values a client had in the process that handed it over.
    pub fn from_parts(reported: Vec<(String, String)>, session: Vec<(String, String)>) -> TrackedParams {
        TrackedParams { values: Arc::new(reported), session: Arc::new(sorted_session(session)) }
    }

    /// True when both are the very same shared set of values (not merely equal ones).
    pub fn same_set(&self, other: &TrackedParams) -> bool {
        Arc::ptr_eq(&self.values, &other.values) && Arc::ptr_eq(&self.session, &other.session)
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Records a ParameterStatus the client saw; ignored unless the name is tracked.
    pub fn observe(&mut self, name: &str, value: &str) {
        let Some(index) = self.values.iter().position(|(n, v)| n.eq_ignore_ascii_case(name) && v != value)
        else {
            return;
        };
        Arc::make_mut(&mut self.values)[index].1 = value.to_string();
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.values.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// The unreported parameters this client set, sorted by lower-case name.
    pub fn session(&self) -> &[(String, String)] {
        &self.session
    }

    /// What the client's session holds after a transaction that ran `SET`/`RESET`/`DISCARD`,
    /// as PostgreSQL would have it had the client been connected directly: `set_now` are the
    /// parameters the server lists as set in the session (name, value). A reported parameter
    /// no longer set there went back to its default, which for this client is the value it
    /// started with (`initial`); so did an unreported one. Returns the reported parameters
    /// whose value this changes, to be told to the client.
    pub fn after_reset(
        &mut self,
        initial: &TrackedParams,
        set_now: &[(String, String)],
    ) -> Vec<(String, String)> {
        let is_set = |name: &str| set_now.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
        let mut restored = Vec::new();
        for (name, start) in initial.values.iter() {
            if !is_set(name) && self.get(name).is_some_and(|now| now != start) {
                restored.push((name.clone(), start.clone()));
            }
        }
        for (name, value) in &restored {
            self.observe(name, value);
        }
        let reported = |name: &str| self.values.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
        let mut session: Vec<(String, String)> =
            initial.session.iter().filter(|(n, _)| !is_set(n)).cloned().collect();
        session.extend(set_now.iter().filter(|(n, _)| !reported(n)).cloned());
        let session = sorted_session(session);
        if *self.session != session {
            self.session = Arc::new(session);
        }
        restored
    }

    /// What makes a server match this client, as one simple-protocol query: `set_config` for
    /// each value that differs (`server_params` for reported parameters, `server_session` for
    /// the unreported ones set there), `RESET` for what the server has set and the client
    /// has not (or back to the connection's `baseline`, what `connect_query` set). `None`
    /// when they already match.
    pub fn sync_query(
        &self,
        server_params: &[(String, String)],
        server_session: &[(String, String)],
        baseline: &[(String, String)],
    ) -> Option<String> {
        let mut sets = Vec::new();
        for (name, want) in self.values.iter() {
            let have = server_params.iter().find(|(n, _)| n.eq_ignore_ascii_case(name));
            if !have.is_some_and(|(_, have)| same_value(name, have, want)) {
                sets.push((name, want));
            }
        }
        let mut resets = Vec::new();
        for (name, want) in self.session.iter() {
            let have = server_session.iter().find(|(n, _)| n.eq_ignore_ascii_case(name));
            if have.is_none_or(|(_, have)| have != want) {
                sets.push((name, want));
            }
        }
        for (name, _) in server_session {
            if !self.session.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)) {
                match baseline.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
                    Some((_, start)) => sets.push((name, start)),
                    None => resets.push(name),
                }
            }
        }
        if sets.is_empty() && resets.is_empty() {
            return None;
        }
        let mut sql = String::new();
        if !sets.is_empty() {
            let calls: Vec<String> = sets
                .iter()
                .map(|(name, value)| {
                    format!("pg_catalog.set_config({}, {}, false)", quote_literal(name), quote_literal(value))
                })
                .collect();
            sql.push_str(&format!("SELECT {};", calls.join(", ")));
        }
        for name in resets {
            sql.push_str(&format!("RESET {};", quote_ident(name)));
        }
        Some(sql)
    }
}

/// Whether a simple-protocol query ends by putting every parameter back to its default (`RESET
/// ALL` or `DISCARD ALL` last, as asyncpg's pool release does), so that what the session holds
/// afterwards is known without asking the server. A query with a comment never qualifies: a
/// statement hidden in one would make the text lie about what ran.
pub fn ends_with_full_reset(query: &str) -> bool {
    // Runs on every simple query: most end in something other than ALL, and are let go
    // without a scan of their text.
    let tail = query.trim_end_matches(|c: char| c == ';' || c.is_whitespace()).as_bytes();
    if !tail.len().checked_sub(3).is_some_and(|at| tail[at..].eq_ignore_ascii_case(b"ALL")) {
        return false;
    }
    if query.contains("--") || query.contains("/*") {
        return false;
    }
    let Some(last) = query.split(';').map(str::trim).rfind(|statement| !statement.is_empty()) else {
        return false;
    };
    let mut words = last.split_whitespace();
    matches!(
        (words.next(), words.next(), words.next()),
        (Some(verb), Some(all), None)
            if (verb.eq_ignore_ascii_case("RESET") || verb.eq_ignore_ascii_case("DISCARD"))
                && all.eq_ignore_ascii_case("ALL")
    )
}

/// A CommandComplete tag (without its NUL) that a full reset answers with: `RESET` (which
/// `RESET name` also gives, hence [`ends_with_full_reset`] on the query) or `DISCARD ALL`.
pub fn is_full_reset_tag(tag: &[u8]) -> bool {
    tag == b"RESET" || tag == b"DISCARD ALL"
}

fn is_read_only(name: &str) -> bool {
    READ_ONLY.iter().any(|r| r.eq_ignore_ascii_case(name))
}

/// asyncpg sends `client_encoding='utf-8'` with the quotes.
fn unquote(value: &str) -> String {
    let v = value.trim();
    if v.len() >= 2 && v.starts_with('\'') && v.ends_with('\'') {
        v[1..v.len() - 1].replace("''", "'")
    } else {
        v.to_string()
    }
}

/// Encoding names are compared the way PostgreSQL resolves them: case, `-` and `_` ignored.
fn same_value(name: &str, a: &str, b: &str) -> bool {
    if name.eq_ignore_ascii_case("client_encoding") {
        let norm = |s: &str| {
            s.chars().filter(|c| c.is_ascii_alphanumeric()).collect::<String>().to_ascii_lowercase()
        };
        norm(a) == norm(b)
    } else {
        a == b
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// An E'' literal means the same whatever standard_conforming_strings is on the server.
fn quote_literal(value: &str) -> String {
    format!("E'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_ending_in_reset_all_or_discard_all_resets_everything() {
        let asyncpg_release = "SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;";
        assert!(ends_with_full_reset(asyncpg_release));
        assert!(ends_with_full_reset("discard   all"));
        assert!(ends_with_full_reset("SET work_mem = '1MB'; RESET ALL ;  "));
        assert!(!ends_with_full_reset("RESET ALL; SET work_mem = '1MB'"), "a SET after the reset stays");
        assert!(!ends_with_full_reset("RESET work_mem"));
        assert!(!ends_with_full_reset("DISCARD PLANS"));
        assert!(!ends_with_full_reset("DEALLOCATE ALL"), "statements only, parameters stay");
        assert!(!ends_with_full_reset("SELECT 1 -- ; RESET ALL"), "the reset is a comment");
        assert!(!ends_with_full_reset("SET a.b = 1 /* ; */; RESET ALL"));
        assert!(!ends_with_full_reset("SELECT 'x; RESET ALL'"));
        assert!(!ends_with_full_reset(" ; ;"));
        assert!(is_full_reset_tag(b"RESET") && is_full_reset_tag(b"DISCARD ALL"));
        assert!(!is_full_reset_tag(b"SET") && !is_full_reset_tag(b"DISCARD PLANS"));
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn new_client_sees_welcome_overridden_by_its_startup() {
        let welcome = pairs(&[
            ("server_version", "15.8"),
            ("client_encoding", "UTF8"),
            ("TimeZone", "Etc/UTC"),
            ("IntervalStyle", "postgres"),
            ("application_name", ""),
        ]);
        let startup = pairs(&[
            ("client_encoding", "'utf-8'"),
            ("timezone", "Europe/Paris"),
            ("server_version", "99"),
            ("search_path", "app, public"),
            ("Statement_Timeout", "5s"),
        ]);
        let (reported, tracked) = TrackedParams::for_new_client(&welcome, &startup);
        assert!(reported.contains(&("client_encoding".into(), "UTF8".into())));
        assert!(reported.contains(&("TimeZone".into(), "Europe/Paris".into())));
        assert!(reported.contains(&("server_version".into(), "15.8".into())), "read-only stays");
        assert!(!reported.iter().any(|(n, _)| n == "search_path"), "unreported ones are not announced");
        assert_eq!(tracked.get("timezone"), Some("Europe/Paris"));
        assert_eq!(tracked.get("IntervalStyle"), Some("postgres"));
        assert_eq!(tracked.get("server_version"), None);
        assert_eq!(tracked.session(), pairs(&[("search_path", "app, public"), ("Statement_Timeout", "5s")]));
    }

    #[test]
    fn sync_query_sets_only_what_differs_and_resets_what_the_client_never_set() {
        let welcome = pairs(&[("client_encoding", "UTF8"), ("TimeZone", "UTC"), ("DateStyle", "ISO, MDY")]);
        let (_, mut tracked) = TrackedParams::for_new_client(&welcome, &[]);
        assert_eq!(tracked.sync_query(&welcome, &[], &[]), None);
        tracked.observe("TimeZone", "Asia/Tokyo");
        tracked.observe("unknown", "x");
        assert_eq!(
            tracked.sync_query(&welcome, &[], &[]).unwrap(),
            "SELECT pg_catalog.set_config(E'TimeZone', E'Asia/Tokyo', false);"
        );
        tracked.observe("client_encoding", "utf-8");
        let server_session = pairs(&[("work_mem", "8MB")]);
        assert_eq!(
            tracked.sync_query(&welcome, &server_session, &[]).unwrap(),
            "SELECT pg_catalog.set_config(E'TimeZone', E'Asia/Tokyo', false);RESET \"work_mem\";"
        );
    }

    #[test]
    fn unreported_values_are_set_whole_even_lists() {
        let welcome = pairs(&[("TimeZone", "UTC")]);
        let startup = pairs(&[("search_path", "\"$user\", app"), ("work_mem", "8MB")]);
        let (_, tracked) = TrackedParams::for_new_client(&welcome, &startup);
        let sql = tracked.sync_query(&welcome, &pairs(&[("work_mem", "8MB")]), &[]).unwrap();
        assert_eq!(sql, "SELECT pg_catalog.set_config(E'search_path', E'\"$user\", app', false);");
        let server = pairs(&[("search_path", "\"$user\", app"), ("work_mem", "8MB")]);
        assert_eq!(tracked.sync_query(&welcome, &server, &[]), None);
        let (_, plain) = TrackedParams::for_new_client(&welcome, &[]);
        let baseline = pairs(&[("search_path", "app")]);
        assert_eq!(
            plain.sync_query(&welcome, &server, &baseline).unwrap(),
            "SELECT pg_catalog.set_config(E'search_path', E'app', false);RESET \"work_mem\";",
            "a client that set nothing gets connect_query's values back, not PostgreSQL's defaults"
        );
    }

    #[test]
    fn reset_brings_back_what_the_client_started_with() {
        let welcome = pairs(&[("TimeZone", "UTC"), ("application_name", "")]);
        let startup = pairs(&[("application_name", "api"), ("statement_timeout", "5s")]);
        let (_, initial) = TrackedParams::for_new_client(&welcome, &startup);
        let mut now = initial.clone();
        // SET TimeZone + SET work_mem, then a probe that lists both (and pgcorral's own sets).
        now.observe("TimeZone", "Asia/Tokyo");
        let set = pairs(&[
            ("TimeZone", "Asia/Tokyo"),
            ("application_name", "api"),
            ("statement_timeout", "5000"),
            ("work_mem", "8192"),
        ]);
        assert!(now.after_reset(&initial, &set).is_empty());
        assert_eq!(now.session(), pairs(&[("statement_timeout", "5000"), ("work_mem", "8192")]));
        assert_eq!(now.get("TimeZone"), Some("Asia/Tokyo"));
        // RESET ALL: the server reported application_name '' and nothing is set any more.
        now.observe("application_name", "");
        now.observe("TimeZone", "UTC");
        let restored = now.after_reset(&initial, &[]);
        assert_eq!(restored, pairs(&[("application_name", "api")]));
        assert_eq!(now.get("application_name"), Some("api"));
        assert_eq!(now.session(), pairs(&[("statement_timeout", "5s")]));
        assert_eq!(now, initial);
    }

    #[test]
    fn clients_with_equal_values_share_one_set_until_one_changes() {
        let welcome = pairs(&[("client_encoding", "UTF8"), ("TimeZone", "UTC")]);
        let shared = SharedParams::default();
        let a = TrackedParams::for_new_client(&welcome, &[]).1.share(&shared);
        let mut b = TrackedParams::for_new_client(&welcome, &[]).1.share(&shared);
        assert!(a.same_set(&b));
        b.observe("TimeZone", "UTC");
        assert!(a.same_set(&b), "an unchanged value keeps the shared set");
        b.observe("TimeZone", "Asia/Tokyo");
        assert!(!a.same_set(&b));
        assert_eq!(a.get("TimeZone"), Some("UTC"));
        let paris = pairs(&[("timezone", "Europe/Paris")]);
        let c = TrackedParams::for_new_client(&welcome, &paris).1.share(&shared);
        assert!(!c.same_set(&a));
        let d = TrackedParams::for_new_client(&welcome, &paris).1.share(&shared);
        assert!(c.same_set(&d));
        let e = TrackedParams::for_new_client(&welcome, &pairs(&[("work_mem", "1MB")])).1.share(&shared);
        assert!(!e.same_set(&a), "unreported values count too");
    }

    #[test]
    fn literals_are_quoted_safely() {
        assert_eq!(quote_literal("it's \\ ok"), "E'it''s \\\\ ok'");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(unquote("'utf-8'"), "utf-8");
    }
}
