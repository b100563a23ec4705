//! What a reload changes: the difference between the running configuration and a new one,
//! one line per change for the log, and the keys that only a restart can change, which the
//! running values keep.

use super::catalog;
use super::Config;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// One line per change, as logged.
    pub changes: Vec<String>,
    /// `[pgbouncer]` keys whose new value needs a restart; the running value stays.
    pub need_restart: Vec<String>,
    /// `[databases]` entries that are gone: their pools' clients finish, and their servers
    /// close as they come back.
    pub removed_databases: Vec<String>,
}

fn shown(value: Option<&str>) -> String {
    match value {
        Some(v) => format!("{v:?}"),
        None => "(default)".into(),
    }
}

pub fn diff(old: &Config, new: &Config) -> Diff {
    let mut d = Diff::default();
    let mut keys: Vec<&str> = old.written.iter().chain(&new.written).map(|(k, _)| k.as_str()).collect();
    keys.sort();
    keys.dedup();
    for key in keys {
        let (before, after) = (old.written(key), new.written(key));
        if before == after {
            continue;
        }
        if catalog::reloadable(key) {
            d.changes.push(format!("{key}: {} -> {}", shown(before), shown(after)));
        } else {
            d.changes.push(format!(
                "{key}: {} -> {} needs a restart; keeping {}",
                shown(before),
                shown(after),
                shown(before)
            ));
            d.need_restart.push(key.to_string());
        }
    }
    for db in &new.databases {
        match old.databases.iter().find(|o| o.name == db.name) {
            None => d.changes.push(format!("database {} added", db.name)),
            Some(o) if format!("{o:?}") != format!("{db:?}") => {
                d.changes.push(format!("database {} changed", db.name))
            }
            Some(_) => {}
        }
    }
    for db in &old.databases {
        if !new.databases.iter().any(|n| n.name == db.name) {
            d.changes
                .push(format!("database {} removed; its clients finish, then its servers close", db.name));
            d.removed_databases.push(db.name.clone());
        }
    }
    for user in &new.users {
        match old.users.iter().find(|o| o.name == user.name) {
            None => d.changes.push(format!("user {} added", user.name)),
            Some(o) if format!("{o:?}") != format!("{user:?}") => {
                d.changes.push(format!("user {} changed", user.name))
            }
            Some(_) => {}
        }
    }
    for user in &old.users {
        if !new.users.iter().any(|n| n.name == user.name) {
            d.changes.push(format!("user {} removed", user.name));
        }
    }
    if old.userlist != new.userlist {
        // Never the secrets themselves.
        let names = |c: &Config| c.userlist.iter().map(|(u, _)| u.clone()).collect::<Vec<_>>();
        let (before, after) = (names(old), names(new));
        let added = after.iter().filter(|u| !before.contains(u)).count();
        let removed = before.iter().filter(|u| !after.contains(u)).count();
        d.changes.push(format!(
            "auth_file: {} users ({added} added, {removed} removed, the rest possibly with new secrets)",
            after.len()
        ));
    }
    d
}

/// Keeps the running values of the keys a reload may not change.
pub fn keep_restart_only(old: &Config, new: &mut Config, keys: &[String]) {
    for key in keys {
        let g = &mut new.general;
        let o = &old.general;
        match key.as_str() {
            "listen_addr" => g.listen_addr = o.listen_addr.clone(),
            "listen_port" => g.listen_port = o.listen_port,
            "unix_socket_dir" => g.unix_socket_dir = o.unix_socket_dir.clone(),
            "pidfile" => g.pidfile = o.pidfile.clone(),
            "workers" => g.workers = o.workers,
            "metrics_addr" => g.metrics_addr = o.metrics_addr.clone(),
            // The keys already given out carry the running id.
            "peer_id" => g.peer_id = o.peer_id,
            "so_reuseport" => g.so_reuseport = o.so_reuseport,
            _ => {}
        }
        new.written.retain(|(k, _)| k != key);
        if let Some(value) = old.written(key) {
            new.written.push((key.clone(), value.to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(text: &str) -> Config {
        Config::parse_str(text, Path::new("/nonexistent/pgbouncer.ini")).expect("valid").0
    }

    #[test]
    fn one_line_per_change_and_restart_keys_kept() {
        let old = config(
            "[databases]\na = host=x\nb = host=y\n[users]\nu = pool_size=2\n\
             [pgbouncer]\nlisten_port = 6432\ndefault_pool_size = 10\n",
        );
        let mut new = config(
            "[databases]\na = host=z\nc = host=y\n[users]\nu = pool_size=3\n\
             [pgbouncer]\nlisten_port = 7000\ndefault_pool_size = 20\nquery_timeout = 5\n",
        );
        let d = diff(&old, &new);
        assert_eq!(
            d.changes,
            [
                "default_pool_size: \"10\" -> \"20\"",
                "listen_port: \"6432\" -> \"7000\" needs a restart; keeping \"6432\"",
                "query_timeout: (default) -> \"5\"",
                "database a changed",
                "database c added",
                "database b removed; its clients finish, then its servers close",
                "user u changed",
            ]
        );
        assert_eq!(d.need_restart, ["listen_port"]);
        assert_eq!(d.removed_databases, ["b"]);
        keep_restart_only(&old, &mut new, &d.need_restart);
        assert_eq!(new.general.listen_port, 6432);
        assert_eq!(new.written("listen_port"), Some("6432"));
        assert_eq!(new.general.default_pool_size, 20, "reloadable keys change");
        assert_eq!(diff(&old, &old), Diff::default());
    }
}
