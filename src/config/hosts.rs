//! A database's servers: libpq's `host=h1,h2` and `port=p1,p2` lists, and the two keys that
//! say how a pool chooses among them, `load_balance_hosts` (PgBouncer's) and
//! `target_session_attrs` (libpq's).

/// Which host a new server connection tries first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadBalanceHosts {
    /// The next host of the list for each new connection (PgBouncer's default).
    #[default]
    RoundRobin,
    /// The host the last connection reached, until a connection to it fails.
    Disable,
}

impl LoadBalanceHosts {
    pub fn parse(value: &str) -> Result<LoadBalanceHosts, String> {
        match value.to_ascii_lowercase().as_str() {
            "round-robin" => Ok(LoadBalanceHosts::RoundRobin),
            "disable" => Ok(LoadBalanceHosts::Disable),
            _ => Err(format!("expected round-robin or disable, got {value:?}")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LoadBalanceHosts::RoundRobin => "round-robin",
            LoadBalanceHosts::Disable => "disable",
        }
    }
}

/// What a server must be to serve the database, as libpq's `target_session_attrs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TargetSessionAttrs {
    #[default]
    Any,
    /// Accepts writes by default: not in hot standby, `default_transaction_read_only` off.
    ReadWrite,
    /// The reverse of read-write.
    ReadOnly,
    /// Not in hot standby.
    Primary,
    /// In hot standby.
    Standby,
    /// A standby if any host is one, else any server.
    PreferStandby,
}

/// What a server told about itself (`in_hot_standby` and `default_transaction_read_only`,
/// which PostgreSQL 14 and later report at login and whenever they change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerRole {
    pub in_hot_standby: bool,
    pub default_read_only: bool,
}

impl TargetSessionAttrs {
    pub fn parse(value: &str) -> Result<TargetSessionAttrs, String> {
        Ok(match value.to_ascii_lowercase().as_str() {
            "any" => TargetSessionAttrs::Any,
            "read-write" => TargetSessionAttrs::ReadWrite,
            "read-only" => TargetSessionAttrs::ReadOnly,
            "primary" => TargetSessionAttrs::Primary,
            "standby" => TargetSessionAttrs::Standby,
            "prefer-standby" => TargetSessionAttrs::PreferStandby,
            _ => {
                return Err(format!(
                    "expected any, read-write, read-only, primary, standby or prefer-standby, got {value:?}"
                ))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TargetSessionAttrs::Any => "any",
            TargetSessionAttrs::ReadWrite => "read-write",
            TargetSessionAttrs::ReadOnly => "read-only",
            TargetSessionAttrs::Primary => "primary",
            TargetSessionAttrs::Standby => "standby",
            TargetSessionAttrs::PreferStandby => "prefer-standby",
        }
    }

    /// Whether a server in `role` serves the database. `prefer-standby` takes any server:
    /// its preference is the order hosts are tried in (standbys first), not a refusal.
    pub fn accepts(self, role: ServerRole) -> bool {
        match self {
            TargetSessionAttrs::Any | TargetSessionAttrs::PreferStandby => true,
            TargetSessionAttrs::ReadWrite => !role.in_hot_standby && !role.default_read_only,
            TargetSessionAttrs::ReadOnly => role.in_hot_standby || role.default_read_only,
            TargetSessionAttrs::Primary => !role.in_hot_standby,
            TargetSessionAttrs::Standby => role.in_hot_standby,
        }
    }

    /// Whether the server's role matters at all (and must be learnt at login).
    pub fn checks_role(self) -> bool {
        self != TargetSessionAttrs::Any
    }
}

/// The `(host, port)` pairs of a `host=` list and a `port=` list, as libpq pairs them: one
/// port for every host, or one port per host. An empty or missing host is the default Unix
/// socket directory.
pub fn pair_hosts(host: Option<&str>, ports: &[u16]) -> Result<Vec<(Option<String>, u16)>, String> {
    let hosts: Vec<Option<String>> = match host {
        None => vec![None],
        Some(list) => list.split(',').map(|h| Some(h.trim().to_string()).filter(|h| !h.is_empty())).collect(),
    };
    match ports.len() {
        1 => Ok(hosts.into_iter().map(|h| (h, ports[0])).collect()),
        n if n == hosts.len() => Ok(hosts.into_iter().zip(ports.iter().copied()).collect()),
        n => Err(format!("{} hosts and {n} ports: give one port, or one per host", hosts.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_ports_pair_as_libpq_pairs_them() {
        let s = |h: &str| Some(h.to_string());
        assert_eq!(pair_hosts(Some("a"), &[5432]).unwrap(), [(s("a"), 5432)]);
        assert_eq!(
            pair_hosts(Some("a, b,c"), &[6000]).unwrap(),
            [(s("a"), 6000), (s("b"), 6000), (s("c"), 6000)]
        );
        assert_eq!(pair_hosts(Some("a,b"), &[1, 2]).unwrap(), [(s("a"), 1), (s("b"), 2)]);
        assert_eq!(pair_hosts(Some("a,,/tmp"), &[1]).unwrap(), [(s("a"), 1), (None, 1), (s("/tmp"), 1)]);
        assert_eq!(pair_hosts(None, &[5433]).unwrap(), [(None, 5433)]);
        assert!(pair_hosts(Some("a,b,c"), &[1, 2]).unwrap_err().contains("3 hosts and 2 ports"));
    }

    #[test]
    fn target_session_attrs_follow_libpq() {
        let primary = ServerRole { in_hot_standby: false, default_read_only: false };
        let standby = ServerRole { in_hot_standby: true, default_read_only: false };
        let read_only_primary = ServerRole { in_hot_standby: false, default_read_only: true };
        let table = [
            ("any", [true, true, true]),
            ("read-write", [true, false, false]),
            ("read-only", [false, true, true]),
            ("primary", [true, false, true]),
            ("standby", [false, true, false]),
            ("prefer-standby", [true, true, true]),
        ];
        for (name, expected) in table {
            let attrs = TargetSessionAttrs::parse(name).unwrap();
            assert_eq!(attrs.as_str(), name);
            let got = [primary, standby, read_only_primary].map(|role| attrs.accepts(role));
            assert_eq!(got, expected, "{name}");
        }
        assert!(TargetSessionAttrs::parse("Read-Write").is_ok());
        assert!(TargetSessionAttrs::parse("master").is_err());
        assert_eq!(LoadBalanceHosts::parse("disable").unwrap(), LoadBalanceHosts::Disable);
        assert!(LoadBalanceHosts::parse("random").is_err());
    }
}
