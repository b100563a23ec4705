//! Every `[pgbouncer]` key with PgBouncer's default as `SHOW CONFIG` prints it, and whether a
//! reload (or the console's `SET`) may change it while running.
//!
//! Keys that are not reloadable are read once at start (sockets, the process, the worker
//! threads): a reload that changes one reports it and keeps the running value.

/// (key, default as printed, reloadable). `None`: no default (PgBouncer shows NULL).
pub const KEYS: &[(&str, Option<&str>, bool)] = &[
    ("admin_users", Some(""), true),
    ("application_name_add_host", Some("0"), true),
    ("auth_dbname", None, true),
    ("auth_file", None, true),
    ("auth_hba_file", Some(""), true),
    ("auth_ident_file", Some(""), true),
    ("auth_ldap_options", Some(""), true),
    (
        "auth_query",
        Some("SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END FROM pg_authid WHERE rolname=$1 AND rolcanlogin"),
        true,
    ),
    ("auth_type", Some("md5"), true),
    ("auth_user", None, true),
    ("autodb_idle_timeout", Some("3600"), true),
    ("cancel_wait_timeout", Some("10"), true),
    ("client_idle_timeout", Some("0"), true),
    ("client_login_timeout", Some("60"), true),
    ("client_tls13_ciphers", None, true),
    ("client_tls_ca_file", Some(""), true),
    ("client_tls_cert_file", Some(""), true),
    ("client_tls_ciphers", Some("default"), true),
    ("client_tls_dheparams", Some("auto"), true),
    ("client_tls_ecdhcurve", Some("auto"), true),
    ("client_tls_key_file", Some(""), true),
    ("client_tls_protocols", Some("secure"), true),
    ("client_tls_sslmode", Some("disable"), true),
    ("conffile", None, true),
    ("default_pool_size", Some("20"), true),
    ("disable_pqexec", Some("0"), false),
    ("dns_max_ttl", Some("15"), true),
    ("dns_nxdomain_ttl", Some("15"), true),
    ("dns_zone_check_period", Some("0"), true),
    ("idle_transaction_timeout", Some("0"), true),
    ("ignore_startup_parameters", Some(""), true),
    ("job_name", Some("pgbouncer"), false),
    ("listen_addr", Some(""), false),
    ("listen_backlog", Some("128"), false),
    ("listen_port", Some("6432"), false),
    ("log_connections", Some("1"), true),
    ("log_disconnections", Some("1"), true),
    ("log_pooler_errors", Some("1"), true),
    ("log_stats", Some("1"), true),
    ("logfile", Some(""), true),
    ("login_notify_message", Some(""), true),
    ("max_client_conn", Some("100"), true),
    ("max_db_client_connections", Some("0"), true),
    ("max_db_connections", Some("0"), true),
    ("max_packet_size", Some("2147483647"), true),
    ("max_prepared_statements", Some("200"), true),
    ("max_user_client_connections", Some("0"), true),
    ("max_user_connections", Some("0"), true),
    ("metrics_addr", Some(""), false),
    ("min_pool_size", Some("0"), true),
    ("peer_id", Some("0"), false),
    ("pidfile", Some(""), false),
    ("pkt_buf", Some("4096"), false),
    ("pool_idle_timeout", Some("0"), true),
    ("pool_mode", Some("session"), true),
    ("query_timeout", Some("0"), true),
    ("query_wait_notify", Some("5"), true),
    ("query_wait_timeout", Some("120"), true),
    ("reserve_pool_size", Some("0"), true),
    ("reserve_pool_timeout", Some("5"), true),
    ("resolv_conf", Some(""), false),
    ("sbuf_loopcnt", Some("5"), true),
    ("scram_iterations", Some("4096"), true),
    ("server_check_delay", Some("30"), true),
    ("server_check_query", Some("select 1"), true),
    ("server_connect_timeout", Some("15"), true),
    ("server_fast_close", Some("0"), true),
    ("server_idle_timeout", Some("600"), true),
    ("server_lifetime", Some("3600"), true),
    ("server_login_retry", Some("15"), true),
    ("server_reset_query", Some("DISCARD ALL"), true),
    ("server_reset_query_always", Some("0"), true),
    ("server_round_robin", Some("0"), true),
    ("server_tls13_ciphers", None, true),
    ("server_tls_ca_file", Some(""), true),
    ("server_tls_cert_file", Some(""), true),
    ("server_tls_ciphers", Some("default"), true),
    ("server_tls_key_file", Some(""), true),
    ("server_tls_protocols", Some("secure"), true),
    ("server_tls_sslmode", Some("prefer"), true),
    ("service_name", None, false),
    ("so_reuseport", Some("0"), false),
    ("stats_period", Some("60"), true),
    ("stats_users", Some(""), true),
    ("suspend_timeout", Some("10"), true),
    ("syslog", Some("0"), true),
    ("syslog_facility", Some("daemon"), true),
    ("syslog_ident", Some("pgbouncer"), true),
    ("tcp_defer_accept", Some("1"), true),
    ("tcp_keepalive", Some("1"), true),
    ("tcp_keepcnt", Some("0"), true),
    ("tcp_keepidle", Some("0"), true),
    ("tcp_keepintvl", Some("0"), true),
    ("tcp_socket_buffer", Some("0"), true),
    ("tcp_user_timeout", Some("0"), true),
    ("track_extra_parameters", Some("IntervalStyle"), true),
    ("transaction_timeout", Some("0"), true),
    ("unix_socket_dir", Some("/tmp"), false),
    ("unix_socket_group", Some(""), false),
    ("unix_socket_mode", Some("0777"), false),
    ("user", None, false),
    ("verbose", Some("0"), true),
    ("workers", Some("0"), false),
];

/// Whether `key` may change while running; unknown keys are not.
pub fn reloadable(key: &str) -> bool {
    KEYS.iter().any(|(k, _, reloadable)| *k == key && *reloadable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorted_unique_and_covering_every_known_key() {
        let keys: Vec<&str> = KEYS.iter().map(|(k, _, _)| *k).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(keys, sorted, "SHOW CONFIG lists keys in order, once each");
        for key in super::super::settings::known_keys() {
            assert!(keys.contains(&key), "{key} missing from the catalog");
        }
        assert!(reloadable("default_pool_size"));
        assert!(!reloadable("listen_port"));
        assert!(!reloadable("no_such_key"));
    }
}
