//! Tracked session parameters (PgBouncer's "varcache").
//!
//! In transaction mode a client meets a different server each transaction, yet must keep seeing
//! the session parameters it set: client_encoding, DateStyle, TimeZone, IntervalStyle,
//! standard_conforming_strings, application_name and `track_extra_parameters`. Each client keeps
//! the values it believes in; when it is lent a server whose reported values differ, pgcorral
//! sends the `SET`s first. Names compare case-insensitively, as PostgreSQL's GUCs do.
//!
//! The values sit behind an `Arc` that clients with equal values share (see
//! [`TrackedParams::share`]): a server remembers the set it last matched, so the usual lease,
//! to a client whose values equal the previous one's, costs one pointer comparison.

use std::sync::{Arc, Mutex};

/// The parameters PgBouncer always tracks, with PostgreSQL's own spelling.
pub const ALWAYS_TRACKED: &[&str] =
    &["client_encoding", "DateStyle", "TimeZone", "standard_conforming_strings", "application_name"];

/// The values a client believes in, for the tracked names only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrackedParams {
    values: Arc<Vec<(String, String)>>,
}

/// How many distinct value sets a pool shares between its clients; clients beyond that keep
/// their own copy and are compared value by value.
const SHARED_SETS: usize = 16;

/// The value sets a pool's clients share.
#[derive(Debug, Default)]
pub struct SharedParams(Mutex<Vec<TrackedParams>>);

impl TrackedParams {
    /// The names tracked under a given `track_extra_parameters`.
    pub fn names(extra: &[String]) -> Vec<String> {
        let mut names: Vec<String> = ALWAYS_TRACKED.iter().map(|s| s.to_string()).collect();
        for name in extra {
            if !names.iter().any(|n| n.eq_ignore_ascii_case(name)) {
                names.push(name.clone());
            }
        }
        names
    }

    /// What a new client is told and believes: the pool's welcome values, overridden by the
    /// tracked parameters from its startup packet. Returns (all ParameterStatus to send, tracked).
    pub fn for_new_client(
        welcome: &[(String, String)],
        startup: &[(String, String)],
        names: &[String],
    ) -> (Vec<(String, String)>, TrackedParams) {
        let mut reported: Vec<(String, String)> = welcome.to_vec();
        for (name, value) in startup {
            let Some(canonical) = names.iter().find(|n| n.eq_ignore_ascii_case(name)) else {
                continue;
            };
            let value = unquote(value);
            match reported.iter_mut().find(|(n, _)| n.eq_ignore_ascii_case(canonical)) {
                // The server's spelling wins when it means the same ("utf-8" vs "UTF8").
                Some(entry) if same_value(canonical, &entry.1, &value) => {}
                Some(entry) => entry.1 = value,
                None => reported.push((canonical.clone(), value)),
            }
        }
        let values = names
            .iter()
            .filter_map(|n| {
                reported.iter().find(|(r, _)| r.eq_ignore_ascii_case(n)).map(|(_, v)| (n.clone(), v.clone()))
            })
            .collect();
        (reported, TrackedParams { values: Arc::new(values) })
    }

    /// The same values, as the copy other clients with equal values hold when there is one.
    pub fn share(self, shared: &SharedParams) -> TrackedParams {
        let mut sets = shared.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(known) = sets.iter().find(|known| **known == self) {
            return known.clone();
        }
        if sets.len() < SHARED_SETS {
            sets.push(self.clone());
        }
        self
    }

    /// True when both are the very same shared set of values (not merely equal ones).
    pub fn same_set(&self, other: &TrackedParams) -> bool {
        Arc::ptr_eq(&self.values, &other.values)
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

    /// The `SET` statements that make a server with `server_value` for each name match this
    /// client, as one simple-protocol query; `None` when they already match.
    pub fn sync_query<'a>(&self, server_value: impl Fn(&str) -> Option<&'a str>) -> Option<String> {
        let mut sql = String::new();
        for (name, want) in self.values.iter() {
            if server_value(name).is_some_and(|have| same_value(name, have, want)) {
                continue;
            }
            sql.push_str(&format!("SET {} TO {};", quote_ident(name), quote_literal(want)));
        }
        (!sql.is_empty()).then_some(sql)
    }
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

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn new_client_sees_welcome_overridden_by_its_startup() {
        let names = TrackedParams::names(&["IntervalStyle".into()]);
        let welcome = pairs(&[
            ("server_version", "15.8"),
            ("client_encoding", "UTF8"),
            ("TimeZone", "Etc/UTC"),
            ("IntervalStyle", "postgres"),
            ("application_name", ""),
        ]);
        let startup = pairs(&[("client_encoding", "'utf-8'"), ("timezone", "Europe/Paris"), ("user", "x")]);
        let (reported, tracked) = TrackedParams::for_new_client(&welcome, &startup, &names);
        assert!(reported.contains(&("client_encoding".into(), "UTF8".into())));
        assert!(reported.contains(&("TimeZone".into(), "Europe/Paris".into())));
        assert!(reported.contains(&("server_version".into(), "15.8".into())));
        assert_eq!(tracked.get("timezone"), Some("Europe/Paris"));
        assert_eq!(tracked.get("IntervalStyle"), Some("postgres"));
        assert_eq!(tracked.get("server_version"), None);
    }

    #[test]
    fn sync_query_sets_only_what_differs() {
        let names = TrackedParams::names(&[]);
        let welcome = pairs(&[("client_encoding", "UTF8"), ("TimeZone", "UTC"), ("DateStyle", "ISO, MDY")]);
        let (_, mut tracked) = TrackedParams::for_new_client(&welcome, &[], &names);
        let server = welcome.clone();
        let lookup =
            |n: &str| server.iter().find(|(k, _)| k.eq_ignore_ascii_case(n)).map(|(_, v)| v.as_str());
        assert_eq!(tracked.sync_query(lookup), None);
        tracked.observe("TimeZone", "Asia/Tokyo");
        tracked.observe("unknown", "x");
        assert_eq!(tracked.sync_query(lookup).unwrap(), "SET \"TimeZone\" TO E'Asia/Tokyo';");
        tracked.observe("client_encoding", "utf-8");
        assert_eq!(tracked.sync_query(lookup).unwrap(), "SET \"TimeZone\" TO E'Asia/Tokyo';");
    }

    #[test]
    fn clients_with_equal_values_share_one_set_until_one_changes() {
        let names = TrackedParams::names(&[]);
        let welcome = pairs(&[("client_encoding", "UTF8"), ("TimeZone", "UTC")]);
        let shared = SharedParams::default();
        let a = TrackedParams::for_new_client(&welcome, &[], &names).1.share(&shared);
        let mut b = TrackedParams::for_new_client(&welcome, &[], &names).1.share(&shared);
        assert!(a.same_set(&b));
        b.observe("TimeZone", "UTC");
        assert!(a.same_set(&b), "an unchanged value keeps the shared set");
        b.observe("TimeZone", "Asia/Tokyo");
        assert!(!a.same_set(&b));
        assert_eq!(a.get("TimeZone"), Some("UTC"));
        let paris = pairs(&[("timezone", "Europe/Paris")]);
        let c = TrackedParams::for_new_client(&welcome, &paris, &names).1.share(&shared);
        assert!(!c.same_set(&a));
        let d = TrackedParams::for_new_client(&welcome, &paris, &names).1.share(&shared);
        assert!(c.same_set(&d));
    }

    #[test]
    fn literals_are_quoted_safely() {
        assert_eq!(quote_literal("it's \\ ok"), "E'it''s \\\\ ok'");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(unquote("'utf-8'"), "utf-8");
    }
}
