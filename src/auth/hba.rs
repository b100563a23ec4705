//! Host-based access rules for `auth_type = hba`: the `auth_hba_file`
//! (pg_hba.conf syntax) and the `auth_ident_file` (pg_ident.conf syntax).
//!
//! This module only parses the two files and answers questions about them:
//! which rule governs a connection, and whether a user name map lets a
//! system or certificate name log in as a database user. Performing the
//! chosen authentication method is the caller's business.
//!
//! The accepted syntax is PostgreSQL's, restricted the way PgBouncer restricts
//! it, so that a file PgBouncer loads means the same thing here. Where
//! PgBouncer skips a line it cannot parse and carries on, pgcorral refuses the
//! whole file instead: a silently dropped `reject` line would let in
//! connections the administrator meant to keep out.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// `@file` lists may name further `@file`s; this bounds a file that
/// (directly or not) names itself.
const MAX_NESTING: usize = 10;

/// How the client reached pgcorral.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnKind {
    /// Unix-domain socket.
    Local,
    /// TCP, with or without TLS negotiated.
    Host { ssl: bool },
}

/// The authentication method a rule selects.
///
/// The file accepts any method on any connection type, as PgBouncer does, so
/// the caller must itself refuse `cert` without TLS and `peer` off a Unix
/// socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HbaMethod {
    Trust,
    Reject,
    Md5,
    ScramSha256,
    /// Cleartext password (PgBouncer's `auth_type = plain`).
    Password,
    Cert,
    Peer,
}

impl HbaMethod {
    /// The keyword as written in the file, for log lines.
    pub fn as_str(self) -> &'static str {
        match self {
            HbaMethod::Trust => "trust",
            HbaMethod::Reject => "reject",
            HbaMethod::Md5 => "md5",
            HbaMethod::ScramSha256 => "scram-sha-256",
            HbaMethod::Password => "password",
            HbaMethod::Cert => "cert",
            HbaMethod::Peer => "peer",
        }
    }
}

impl fmt::Display for HbaMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The first column of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HbaConnType {
    Local,
    Host,
    HostSsl,
    HostNoSsl,
    /// Accepted so that a file written for PostgreSQL loads, but pgcorral
    /// never negotiates GSSAPI encryption, so these rules never match.
    HostGssEnc,
    HostNoGssEnc,
}

/// Errors from reading or parsing either file; the message always says which
/// file, and for syntax errors which line.
#[derive(Debug, thiserror::Error)]
pub enum HbaError {
    #[error("could not read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}: {message}", path.display())]
    Syntax { path: PathBuf, line: usize, message: String },
}

/// One line of the HBA file.
#[derive(Debug, Clone)]
pub struct HbaRule {
    /// Line number in the HBA file; for a rule continued with backslashes,
    /// the line it starts on.
    pub line: usize,
    pub conn_type: HbaConnType,
    pub method: HbaMethod,
    /// `map=` option: the `auth_ident_file` map for `cert` and `peer`.
    pub map: Option<String>,
    databases: Vec<NamePattern>,
    users: Vec<NamePattern>,
    /// `None` for `local` rules, which have no address column.
    address: Option<AddrPattern>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum NamePattern {
    All,
    SameUser,
    /// Physical replication connections; pgcorral serves none, so this
    /// never matches.
    Replication,
    Name(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AddrPattern {
    Any,
    /// `network` is stored already masked.
    Net {
        network: IpAddr,
        mask: IpAddr,
    },
}

impl HbaRule {
    /// Whether this rule applies to the connection, ignoring earlier rules.
    pub fn matches(&self, kind: ConnKind, addr: Option<IpAddr>, database: &str, user: &str) -> bool {
        let type_ok = match (self.conn_type, kind) {
            (HbaConnType::Local, ConnKind::Local) => true,
            (HbaConnType::Host, ConnKind::Host { .. }) => true,
            (HbaConnType::HostSsl, ConnKind::Host { ssl }) => ssl,
            (HbaConnType::HostNoSsl, ConnKind::Host { ssl }) => !ssl,
            _ => false,
        };
        type_ok
            && self.address_matches(addr)
            && self.databases.iter().any(|p| match p {
                NamePattern::All => true,
                NamePattern::SameUser => database == user,
                NamePattern::Replication => false,
                NamePattern::Name(n) => n == database,
            })
            && self.users.iter().any(|p| match p {
                NamePattern::All => true,
                NamePattern::Name(n) => n == user,
                // Never built for the user column.
                NamePattern::SameUser | NamePattern::Replication => false,
            })
    }

    fn address_matches(&self, addr: Option<IpAddr>) -> bool {
        match self.address {
            None | Some(AddrPattern::Any) => true,
            Some(AddrPattern::Net { network, mask }) => {
                let Some(addr) = addr else { return false };
                // A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d;
                // an administrator who wrote 10.0.0.0/8 means those clients too.
                in_net(addr, network, mask) || in_net(addr.to_canonical(), network, mask)
            }
        }
    }
}

fn in_net(addr: IpAddr, network: IpAddr, mask: IpAddr) -> bool {
    match (addr, mask) {
        (IpAddr::V4(a), IpAddr::V4(m)) => IpAddr::V4(a & m) == network,
        (IpAddr::V6(a), IpAddr::V6(m)) => IpAddr::V6(a & m) == network,
        _ => false,
    }
}

/// A parsed `auth_hba_file`.
#[derive(Debug, Clone)]
pub struct HbaFile {
    path: PathBuf,
    rules: Vec<HbaRule>,
}

impl HbaFile {
    /// Parses `text` as the contents of `path`. `path` names the file in
    /// errors and is where relative `@file` names are resolved from; those
    /// files are read.
    pub fn parse(text: &str, path: &Path) -> Result<HbaFile, HbaError> {
        HbaFile::parse_with(text, path, &mut |file| std::fs::read_to_string(file))
    }

    /// Like [`parse`](Self::parse), with `@file` lists read by `read_file` instead of from
    /// disk, so the fuzz harness can serve them from memory.
    pub(crate) fn parse_with(
        text: &str,
        path: &Path,
        read_file: &mut dyn FnMut(&Path) -> std::io::Result<String>,
    ) -> Result<HbaFile, HbaError> {
        let base = base_dir(path);
        let mut rules = Vec::new();
        for (line, record) in logical_lines(text) {
            let at = Pos { path, line };
            let fields = split_fields(&record).map_err(|m| at.err(m))?;
            if fields.is_empty() {
                continue;
            }
            rules.push(parse_rule(fields, &at, base, read_file)?);
        }
        Ok(HbaFile { path: path.to_path_buf(), rules })
    }

    /// Reads and parses the file at `path`.
    pub fn load(path: &Path) -> Result<HbaFile, HbaError> {
        let text = read(path)?;
        HbaFile::parse(&text, path)
    }

    /// First matching rule, as PostgreSQL does; None means no rule matched (the caller rejects).
    pub fn lookup(
        &self,
        kind: ConnKind,
        addr: Option<IpAddr>,
        database: &str,
        user: &str,
    ) -> Option<&HbaRule> {
        self.rules.iter().find(|r| r.matches(kind, addr, database, user))
    }

    pub fn rules(&self) -> &[HbaRule] {
        &self.rules
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A parsed `auth_ident_file`.
#[derive(Debug, Clone)]
pub struct IdentMap {
    path: PathBuf,
    entries: Vec<IdentEntry>,
}

#[derive(Debug, Clone)]
struct IdentEntry {
    map: String,
    system: SystemName,
    db_user: DbUser,
}

#[derive(Debug, Clone)]
enum SystemName {
    Exact(String),
    Regex(regex::Regex),
}

#[derive(Debug, Clone)]
enum DbUser {
    All,
    /// May contain `\1`, replaced by the system name regex's first capture.
    Name(String),
}

impl IdentMap {
    /// Parses `text` as the contents of `path` (used in error messages).
    pub fn parse(text: &str, path: &Path) -> Result<IdentMap, HbaError> {
        let mut entries = Vec::new();
        for (line, record) in logical_lines(text) {
            let at = Pos { path, line };
            let fields = split_fields(&record).map_err(|m| at.err(m))?;
            if fields.is_empty() {
                continue;
            }
            entries.push(parse_ident_entry(fields, &at)?);
        }
        Ok(IdentMap { path: path.to_path_buf(), entries })
    }

    /// Reads and parses the file at `path`.
    pub fn load(path: &Path) -> Result<IdentMap, HbaError> {
        let text = read(path)?;
        IdentMap::parse(&text, path)
    }

    /// Whether map `map` lets the system/certificate name `system_user` log in as `db_user`.
    /// Supports exact names, `/regex` system names with `\1` substitution in the db-user column, and `all`.
    pub fn allows(&self, map: &str, system_user: &str, db_user: &str) -> bool {
        self.entries.iter().filter(|e| e.map == map).any(|e| {
            let capture = match &e.system {
                SystemName::Exact(name) if name == system_user => None,
                SystemName::Exact(_) => return false,
                SystemName::Regex(re) => match re.captures(system_user) {
                    // A group that took no part in the match substitutes as
                    // empty, so `\1` can never widen what the line allows.
                    Some(caps) => Some(caps.get(1).map_or("", |m| m.as_str()).to_owned()),
                    None => return false,
                },
            };
            match &e.db_user {
                DbUser::All => true,
                DbUser::Name(name) => match capture {
                    // PostgreSQL substitutes only the first `\1`.
                    Some(cap) if name.contains("\\1") => name.replacen("\\1", &cap, 1) == db_user,
                    _ => name == db_user,
                },
            }
        })
    }

    /// Whether any line defines `map`, so a `map=` naming a missing map can
    /// be reported when the files are loaded rather than at first login.
    pub fn contains_map(&self, map: &str) -> bool {
        self.entries.iter().any(|e| e.map == map)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Where a record came from, for error messages.
struct Pos<'a> {
    path: &'a Path,
    line: usize,
}

impl Pos<'_> {
    fn err(&self, message: impl Into<String>) -> HbaError {
        HbaError::Syntax { path: self.path.to_path_buf(), line: self.line, message: message.into() }
    }
}

fn read(path: &Path) -> Result<String, HbaError> {
    std::fs::read_to_string(path).map_err(|source| HbaError::Io { path: path.to_path_buf(), source })
}

fn base_dir(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new(""))
}

/// Joins backslash-continued lines, yielding each record with the number of
/// the line it starts on. As in PostgreSQL the continuation is textual: it
/// applies inside quotes and comments, and nothing is inserted at the join.
fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut record = String::new();
    let mut start = 0;
    let mut continuing = false;
    for (i, raw) in text.lines().enumerate() {
        if !continuing {
            start = i + 1;
        }
        match raw.strip_suffix('\\') {
            Some(head) => {
                record.push_str(head);
                continuing = true;
            }
            None => {
                record.push_str(raw);
                continuing = false;
                out.push((start, std::mem::take(&mut record)));
            }
        }
    }
    if continuing {
        out.push((start, record));
    }
    out
}

/// One name or keyword. `quoted` keeps a quoted `"all"` from being the
/// keyword.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Word {
    text: String,
    quoted: bool,
}

impl Word {
    fn is_keyword(&self, kw: &str) -> bool {
        !self.quoted && self.text == kw
    }
}

/// Splits a record into whitespace-separated columns, each a comma list of
/// words. Whitespace around the commas is allowed, as PgBouncer allows it.
fn split_fields(record: &str) -> Result<Vec<Vec<Word>>, String> {
    let mut fields: Vec<Vec<Word>> = Vec::new();
    let mut chars = record.chars().peekable();
    let mut after_comma = false;
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        match chars.peek() {
            None | Some('#') => break,
            Some(',') => {
                chars.next();
                if fields.is_empty() || after_comma {
                    return Err("unexpected ',' (empty name in a list)".into());
                }
                after_comma = true;
            }
            Some(_) => {
                let word = read_word(&mut chars)?;
                match fields.last_mut() {
                    Some(list) if after_comma => list.push(word),
                    _ => fields.push(vec![word]),
                }
                after_comma = false;
            }
        }
    }
    if after_comma {
        return Err("list ends with ','".into());
    }
    Ok(fields)
}

fn read_word(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Result<Word, String> {
    let mut text = String::new();
    let mut quoted = false;
    let mut in_quote = false;
    while let Some(&c) = chars.peek() {
        if in_quote {
            chars.next();
            if c == '"' {
                // PgBouncer's reading of a doubled quote inside quotes, the
                // same convention as its auth_file.
                if chars.next_if_eq(&'"').is_some() {
                    text.push('"');
                } else {
                    in_quote = false;
                }
            } else {
                text.push(c);
            }
        } else if c.is_whitespace() || c == ',' || c == '#' {
            break;
        } else {
            chars.next();
            if c == '"' {
                in_quote = true;
                quoted = true;
            } else {
                text.push(c);
            }
        }
    }
    if in_quote {
        return Err("unterminated quoted string".into());
    }
    Ok(Word { text, quoted })
}

/// The column's only word, refusing comma lists where a list means nothing.
fn single<'w>(field: &'w [Word], what: &str, at: &Pos<'_>) -> Result<&'w Word, HbaError> {
    match field {
        [word] => Ok(word),
        _ => Err(at.err(format!("the {what} column takes a single value, not a comma list"))),
    }
}

fn parse_rule(
    fields: Vec<Vec<Word>>,
    at: &Pos<'_>,
    base: &Path,
    read_file: &mut dyn FnMut(&Path) -> std::io::Result<String>,
) -> Result<HbaRule, HbaError> {
    let mut fields = fields.into_iter();
    let type_field = fields.next().unwrap_or_default();
    let type_word = single(&type_field, "connection type", at)?;
    let conn_type = match (type_word.quoted, type_word.text.as_str()) {
        (false, "local") => HbaConnType::Local,
        (false, "host") => HbaConnType::Host,
        (false, "hostssl") => HbaConnType::HostSsl,
        (false, "hostnossl") => HbaConnType::HostNoSsl,
        (false, "hostgssenc") => HbaConnType::HostGssEnc,
        (false, "hostnogssenc") => HbaConnType::HostNoGssEnc,
        (false, kw @ ("include" | "include_if_exists" | "include_dir")) => {
            return Err(at.err(format!(
                "\"{kw}\" directives are not supported in auth_hba_file (PgBouncer does not support them)"
            )));
        }
        (_, other) => {
            return Err(at.err(format!(
                "unknown connection type \"{other}\" (expected local, host, hostssl or hostnossl)"
            )));
        }
    };

    let db_field = fields.next().ok_or_else(|| at.err("missing database column"))?;
    let mut databases = Vec::new();
    expand_names(&db_field, Column::Database, at, base, 0, &mut databases, read_file)?;

    let user_field = fields.next().ok_or_else(|| at.err("missing user column"))?;
    let mut users = Vec::new();
    expand_names(&user_field, Column::User, at, base, 0, &mut users, read_file)?;

    let address = if conn_type == HbaConnType::Local {
        None
    } else {
        let addr_field = fields.next().ok_or_else(|| at.err("missing address column"))?;
        let addr_word = single(&addr_field, "address", at)?;
        Some(parse_address(addr_word, &mut fields, at)?)
    };

    let method_field = fields.next().ok_or_else(|| at.err("missing authentication method"))?;
    let method_word = single(&method_field, "method", at)?;
    let method = parse_method(&method_word.text, at)?;

    let mut map = None;
    for option in fields {
        let word = single(&option, "option", at)?;
        let Some((name, value)) = word.text.split_once('=') else {
            return Err(
                at.err(format!("authentication option \"{}\" is not of the form name=value", word.text))
            );
        };
        match name {
            "map" if !matches!(method, HbaMethod::Cert | HbaMethod::Peer) => {
                return Err(
                    at.err(format!("map= is only valid with the cert and peer methods, not {method}"))
                );
            }
            "map" if value.is_empty() => return Err(at.err("map= needs a map name")),
            "map" if map.is_some() => return Err(at.err("map= given more than once")),
            "map" => map = Some(value.to_owned()),
            // Silently dropping an option such as clientcert=verify-full would
            // grant more than the file says.
            _ => {
                return Err(at.err(format!(
                    "unsupported authentication option \"{name}\" (only map= is supported, as in PgBouncer)"
                )));
            }
        }
    }

    Ok(HbaRule { line: at.line, conn_type, method, map, databases, users, address })
}

fn parse_method(text: &str, at: &Pos<'_>) -> Result<HbaMethod, HbaError> {
    Ok(match text {
        "trust" => HbaMethod::Trust,
        "reject" => HbaMethod::Reject,
        "md5" => HbaMethod::Md5,
        "scram-sha-256" => HbaMethod::ScramSha256,
        "password" => HbaMethod::Password,
        "cert" => HbaMethod::Cert,
        "peer" => HbaMethod::Peer,
        "pam" | "any" => {
            return Err(at.err(format!(
                "method \"{text}\" only works as the global auth_type, not in auth_hba_file (as in PgBouncer)"
            )));
        }
        "ident" | "gss" | "sspi" | "ldap" | "radius" | "bsd" | "oauth" => {
            return Err(at.err(format!("authentication method \"{text}\" is not supported by pgcorral")));
        }
        _ => return Err(at.err(format!("unknown authentication method \"{text}\""))),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Column {
    Database,
    User,
}

/// Turns the words of a database or user column into patterns, reading
/// `@file` lists (relative to `base`, the referring file's directory).
fn expand_names(
    words: &[Word],
    column: Column,
    at: &Pos<'_>,
    base: &Path,
    depth: usize,
    out: &mut Vec<NamePattern>,
    read_file: &mut dyn FnMut(&Path) -> std::io::Result<String>,
) -> Result<(), HbaError> {
    for word in words {
        if word.quoted {
            out.push(NamePattern::Name(word.text.clone()));
            continue;
        }
        if let Some(file) = word.text.strip_prefix('@') {
            if file.is_empty() {
                return Err(at.err("'@' must be followed by a file name"));
            }
            if depth >= MAX_NESTING {
                return Err(at.err(format!(
                    "@{file}: @file lists nested more than {MAX_NESTING} deep (does a file name itself?)"
                )));
            }
            let path = base.join(file);
            let text = read_file(&path)
                .map_err(|e| at.err(format!("could not read @file {}: {e}", path.display())))?;
            for (line, record) in logical_lines(&text) {
                let inner = Pos { path: &path, line };
                // Names in an @file may be separated by commas or whitespace
                // alike, so the column structure is flattened away.
                let names: Vec<Word> =
                    split_fields(&record).map_err(|m| inner.err(m))?.into_iter().flatten().collect();
                expand_names(&names, column, &inner, base_dir(&path), depth + 1, out, read_file)?;
            }
            continue;
        }
        let text = word.text.as_str();
        let pattern = match (column, text) {
            (_, "all") => NamePattern::All,
            (Column::Database, "sameuser") => NamePattern::SameUser,
            (Column::Database, "replication") => NamePattern::Replication,
            (Column::Database, "samerole" | "samegroup") => {
                return Err(at.err(format!("\"{text}\" is not supported (PgBouncer does not support it)")));
            }
            (Column::User, t) if t.starts_with('+') => {
                return Err(at.err(format!(
                    "group membership \"{t}\" is not supported (PgBouncer does not support +groupname); \
                     quote the name if it is a role whose name starts with '+'"
                )));
            }
            (_, t) if t.starts_with('/') => {
                return Err(at.err(format!(
                    "regular expression \"{t}\" is not supported in the database or user column; \
                     quote the name if it really starts with '/'"
                )));
            }
            _ => NamePattern::Name(word.text.clone()),
        };
        out.push(pattern);
    }
    Ok(())
}

/// Parses the address column; the `address mask` form consumes the next
/// column as well.
fn parse_address(
    word: &Word,
    rest: &mut impl Iterator<Item = Vec<Word>>,
    at: &Pos<'_>,
) -> Result<AddrPattern, HbaError> {
    let text = word.text.as_str();
    if !word.quoted {
        match text {
            "all" => return Ok(AddrPattern::Any),
            "samehost" | "samenet" => {
                return Err(at.err(format!(
                    "address \"{text}\" is not supported (PgBouncer does not support samehost/samenet)"
                )));
            }
            _ => {}
        }
    }
    let (ip_text, prefix) = match text.split_once('/') {
        Some((ip, prefix)) => (ip, Some(prefix)),
        None => (text, None),
    };
    let ip: IpAddr = ip_text.parse().map_err(|_| {
        let looks_like_name = ip_text.starts_with('.')
            || (!ip_text.contains(':') && ip_text.chars().any(|c| c.is_ascii_alphabetic()));
        if looks_like_name {
            at.err(format!(
                "host names are not supported in the address column (PgBouncer does not resolve them): \"{text}\""
            ))
        } else {
            at.err(format!("invalid IP address \"{text}\""))
        }
    })?;
    let max_bits = if ip.is_ipv4() { 32 } else { 128 };
    let mask = match prefix {
        Some(p) => {
            let bits = p
                .parse::<u32>()
                .ok()
                .filter(|b| *b <= max_bits && p.bytes().all(|c| c.is_ascii_digit()))
                .ok_or_else(|| at.err(format!("invalid CIDR mask in address \"{text}\"")))?;
            prefix_mask(ip, bits)
        }
        None => {
            let mask_field = rest.next().ok_or_else(|| {
                at.err(format!("address \"{text}\" needs a /prefix length or a netmask column"))
            })?;
            let mask_word = single(&mask_field, "netmask", at)?;
            let mask: IpAddr = mask_word
                .text
                .parse()
                .map_err(|_| at.err(format!("invalid netmask \"{}\"", mask_word.text)))?;
            if mask.is_ipv4() != ip.is_ipv4() {
                return Err(at.err(format!(
                    "netmask \"{}\" is not of the same address family as \"{text}\"",
                    mask_word.text
                )));
            }
            mask
        }
    };
    // PostgreSQL ignores host bits set beyond the mask rather than letting
    // the rule match nothing; masking up front does the same.
    let network = match (ip, mask) {
        (IpAddr::V4(a), IpAddr::V4(m)) => IpAddr::V4(a & m),
        (IpAddr::V6(a), IpAddr::V6(m)) => IpAddr::V6(a & m),
        _ => unreachable!("address families checked above"),
    };
    Ok(AddrPattern::Net { network, mask })
}

fn prefix_mask(ip: IpAddr, bits: u32) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(u32::MAX.checked_shl(32 - bits).unwrap_or(0).into()),
        IpAddr::V6(_) => IpAddr::V6(u128::MAX.checked_shl(128 - bits).unwrap_or(0).into()),
    }
}

fn parse_ident_entry(fields: Vec<Vec<Word>>, at: &Pos<'_>) -> Result<IdentEntry, HbaError> {
    if let Some(first) = fields.first().and_then(|f| f.first()) {
        if let kw @ ("include" | "include_if_exists" | "include_dir") = first.text.as_str() {
            if !first.quoted {
                return Err(at.err(format!(
                    "\"{kw}\" directives are not supported in auth_ident_file (PgBouncer does not support them)"
                )));
            }
        }
    }
    let [map, system, db_user] = fields.as_slice() else {
        return Err(at.err(format!(
            "expected 3 columns (map-name system-username database-username), found {}",
            fields.len()
        )));
    };
    let map = single(map, "map name", at)?.text.clone();
    let system = single(system, "system user name", at)?;
    let db_user = single(db_user, "database user name", at)?;

    // Quoting does not stop a leading '/' from meaning a regex here: quotes
    // are how a regex containing spaces or '#' is written.
    let system = match system.text.strip_prefix('/') {
        Some(pattern) => SystemName::Regex(
            regex::Regex::new(pattern)
                .map_err(|e| at.err(format!("invalid regular expression \"{pattern}\": {e}")))?,
        ),
        None => SystemName::Exact(system.text.clone()),
    };

    let db_user = if db_user.is_keyword("all") {
        DbUser::All
    } else if !db_user.quoted && db_user.text.starts_with('+') {
        return Err(at.err(format!(
            "group membership \"{}\" is not supported (PgBouncer does not support +groupname)",
            db_user.text
        )));
    } else if !db_user.quoted && db_user.text.starts_with('/') {
        return Err(at.err(format!(
            "regular expression \"{}\" is not supported in the database user column",
            db_user.text
        )));
    } else {
        DbUser::Name(db_user.text.clone())
    };

    if let (DbUser::Name(name), SystemName::Regex(re)) = (&db_user, &system) {
        if name.contains("\\1") && re.captures_len() < 2 {
            return Err(at.err(format!(
                "\"{name}\" uses \\1 but the regular expression \"{}\" has no capture group",
                re.as_str()
            )));
        }
    }
    Ok(IdentEntry { map, system, db_user })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const HOST: ConnKind = ConnKind::Host { ssl: false };
    const HOST_SSL: ConnKind = ConnKind::Host { ssl: true };

    fn hba(text: &str) -> HbaFile {
        HbaFile::parse(text, Path::new("/etc/pgcorral/hba.conf")).unwrap()
    }

    fn hba_err(text: &str) -> String {
        HbaFile::parse(text, Path::new("/etc/pgcorral/hba.conf")).unwrap_err().to_string()
    }

    fn v4(a: u8, b: u8, c: u8, d: u8) -> Option<IpAddr> {
        Some(IpAddr::V4(Ipv4Addr::new(a, b, c, d)))
    }

    fn v6(s: &str) -> Option<IpAddr> {
        Some(s.parse::<Ipv6Addr>().unwrap().into())
    }

    /// Line of the rule chosen, or 0 for no match, to keep assertions short.
    fn line(f: &HbaFile, kind: ConnKind, addr: Option<IpAddr>, db: &str, user: &str) -> usize {
        f.lookup(kind, addr, db, user).map_or(0, |r| r.line)
    }

    /// A fresh directory per test, so parallel tests do not share files.
    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pgcorral-hba-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn first_matching_rule_wins() {
        let f = hba("host all bob 10.0.0.0/8 reject\n\
                     host all all 10.0.0.0/8 md5\n\
                     host all all 0.0.0.0/0 scram-sha-256\n");
        assert_eq!(f.lookup(HOST, v4(10, 1, 2, 3), "db", "bob").unwrap().method, HbaMethod::Reject);
        assert_eq!(f.lookup(HOST, v4(10, 1, 2, 3), "db", "alice").unwrap().method, HbaMethod::Md5);
        assert_eq!(f.lookup(HOST, v4(192, 0, 2, 1), "db", "bob").unwrap().method, HbaMethod::ScramSha256);
        assert_eq!(line(&f, HOST, v6("::1"), "db", "bob"), 0, "no IPv6 rule, so no match");
    }

    #[test]
    fn ipv4_cidr() {
        let f = hba("host all all 10.0.0.0/8 trust\nhost all all 192.168.1.7/32 md5\n");
        assert_eq!(line(&f, HOST, v4(10, 255, 0, 1), "d", "u"), 1);
        assert_eq!(line(&f, HOST, v4(11, 0, 0, 1), "d", "u"), 0);
        assert_eq!(line(&f, HOST, v4(192, 168, 1, 7), "d", "u"), 2);
        assert_eq!(line(&f, HOST, v4(192, 168, 1, 8), "d", "u"), 0);
        assert_eq!(line(&f, HOST, None, "d", "u"), 0, "an address rule needs an address");

        let f = hba("host all all 0.0.0.0/0 trust\n");
        assert_eq!(line(&f, HOST, v4(203, 0, 113, 9), "d", "u"), 1);
        assert_eq!(line(&f, HOST, v6("2001:db8::1"), "d", "u"), 0, "an IPv4 rule never matches IPv6");
    }

    #[test]
    fn host_bits_beyond_the_prefix_are_ignored() {
        let f = hba("host all all 10.1.2.3/8 trust\n");
        assert_eq!(line(&f, HOST, v4(10, 9, 9, 9), "d", "u"), 1);
    }

    #[test]
    fn ipv6_cidr() {
        let f = hba("host all all 2001:db8::/32 trust\nhost all all ::1/128 md5\nhost all all ::/0 reject\n");
        assert_eq!(line(&f, HOST, v6("2001:db8:ffff::1"), "d", "u"), 1);
        assert_eq!(line(&f, HOST, v6("2001:db9::1"), "d", "u"), 3);
        assert_eq!(line(&f, HOST, v6("::1"), "d", "u"), 2);
        assert_eq!(line(&f, HOST, v4(127, 0, 0, 1), "d", "u"), 0, "an IPv6 rule never matches IPv4");

        let f = hba("host all all fe80::/10 trust\n");
        assert_eq!(line(&f, HOST, v6("febf::1"), "d", "u"), 1);
        assert_eq!(line(&f, HOST, v6("fec0::1"), "d", "u"), 0);
    }

    #[test]
    fn address_and_mask_in_two_columns() {
        let f = hba("host all all 192.168.1.0 255.255.255.0 trust\n\
                     host all all 2001:db8:: ffff:ffff:: md5\n");
        assert_eq!(line(&f, HOST, v4(192, 168, 1, 200), "d", "u"), 1);
        assert_eq!(line(&f, HOST, v4(192, 168, 2, 1), "d", "u"), 0);
        assert_eq!(line(&f, HOST, v6("2001:db8:1::1"), "d", "u"), 2);
        assert_eq!(f.rules()[0].method, HbaMethod::Trust, "the mask column is not the method");
    }

    #[test]
    fn ipv4_mapped_clients_match_ipv4_rules() {
        let f = hba("host all all 127.0.0.0/8 trust\n");
        assert_eq!(line(&f, HOST, v6("::ffff:127.0.0.1"), "d", "u"), 1);
        assert_eq!(line(&f, HOST, v6("::ffff:10.0.0.1"), "d", "u"), 0);
    }

    #[test]
    fn address_all_matches_any_tcp_client() {
        let f = hba("host all all all md5\n");
        assert_eq!(line(&f, HOST, v4(1, 2, 3, 4), "d", "u"), 1);
        assert_eq!(line(&f, HOST, v6("2001:db8::1"), "d", "u"), 1);
        assert_eq!(line(&f, HOST, None, "d", "u"), 1);
        assert_eq!(line(&f, ConnKind::Local, None, "d", "u"), 0);
    }

    #[test]
    fn connection_types() {
        let f = hba("local all all peer\n\
                     hostssl all all all cert\n\
                     hostnossl all all all reject\n");
        assert_eq!(f.lookup(ConnKind::Local, None, "d", "u").unwrap().method, HbaMethod::Peer);
        assert_eq!(f.lookup(HOST_SSL, v4(1, 1, 1, 1), "d", "u").unwrap().method, HbaMethod::Cert);
        assert_eq!(f.lookup(HOST, v4(1, 1, 1, 1), "d", "u").unwrap().method, HbaMethod::Reject);

        let f = hba("host all all all trust\n");
        assert_eq!(line(&f, HOST_SSL, v4(1, 1, 1, 1), "d", "u"), 1, "host covers TLS");
        assert_eq!(line(&f, HOST, v4(1, 1, 1, 1), "d", "u"), 1, "and plain TCP");
        assert_eq!(line(&f, ConnKind::Local, None, "d", "u"), 0, "but not Unix sockets");
        assert_eq!(f.rules()[0].conn_type, HbaConnType::Host);
    }

    #[test]
    fn gss_encryption_rules_parse_but_never_match() {
        let f = hba("hostgssenc all all all trust\nhostnogssenc all all all trust\n");
        assert_eq!(f.rules().len(), 2);
        assert_eq!(f.rules()[1].conn_type, HbaConnType::HostNoGssEnc);
        for kind in [HOST, HOST_SSL, ConnKind::Local] {
            assert_eq!(line(&f, kind, v4(1, 1, 1, 1), "d", "u"), 0);
        }
    }

    #[test]
    fn sameuser_database() {
        let f = hba("local sameuser all md5\n");
        assert_eq!(line(&f, ConnKind::Local, None, "alice", "alice"), 1);
        assert_eq!(line(&f, ConnKind::Local, None, "alice", "bob"), 0);
    }

    #[test]
    fn replication_never_matches_a_normal_connection() {
        let f = hba("local replication all trust\nlocal all all md5\n");
        assert_eq!(f.lookup(ConnKind::Local, None, "replication", "u").unwrap().method, HbaMethod::Md5);
    }

    #[test]
    fn comma_lists() {
        let f = hba("local db1,db2 alice,bob trust\nlocal db3 , db4 carol , dave md5\n");
        assert_eq!(line(&f, ConnKind::Local, None, "db2", "bob"), 1);
        assert_eq!(line(&f, ConnKind::Local, None, "db1", "carol"), 0);
        assert_eq!(line(&f, ConnKind::Local, None, "db4", "carol"), 2);
        assert_eq!(line(&f, ConnKind::Local, None, "db3", "dave"), 2);
    }

    #[test]
    fn quoted_keywords_are_plain_names() {
        let f = hba("local \"all\" all trust\n\
                     local \"sameuser\",\"replication\" \"all\" md5\n\
                     local \"my db\",\"a,b\" \"we\"\"ird\" password\n");
        assert_eq!(line(&f, ConnKind::Local, None, "all", "x"), 1);
        assert_eq!(line(&f, ConnKind::Local, None, "other", "x"), 0, "quoted all is not the keyword");
        assert_eq!(line(&f, ConnKind::Local, None, "sameuser", "all"), 2);
        assert_eq!(line(&f, ConnKind::Local, None, "replication", "all"), 2);
        assert_eq!(line(&f, ConnKind::Local, None, "x", "x"), 0, "quoted sameuser is not the keyword");
        assert_eq!(line(&f, ConnKind::Local, None, "my db", "we\"ird"), 3);
        assert_eq!(line(&f, ConnKind::Local, None, "a,b", "we\"ird"), 3);
    }

    #[test]
    fn quoted_plus_and_slash_names_are_allowed() {
        let f = hba("local all \"+admins\",\"/x\" trust\n");
        assert_eq!(line(&f, ConnKind::Local, None, "d", "+admins"), 1);
        assert_eq!(line(&f, ConnKind::Local, None, "d", "/x"), 1);
    }

    #[test]
    fn comments_blank_lines_and_continuations() {
        let f = hba("# a comment\n\
                     \n   \t\n\
                     local all all trust # trailing comment\n\
                     host all \\\n\
                     \x20   all 10.0.0.0/8 \\\n\
                     \x20   md5\n\
                     # continued comment \\\n\
                     host this is not a rule\n\
                     host all all all reject\r\n");
        assert_eq!(f.rules().len(), 3);
        assert_eq!(f.rules()[0].line, 4);
        assert_eq!(f.rules()[1].line, 5, "a continued rule has the line it starts on");
        assert_eq!(f.rules()[1].method, HbaMethod::Md5);
        assert_eq!(f.rules()[2].line, 10);
        assert_eq!(f.rules()[2].method, HbaMethod::Reject, "CRLF line endings are fine");
    }

    #[test]
    fn errors_after_a_continuation_name_its_first_line() {
        let err = hba_err("local all all trust\nhost all all \\\n  10.0.0.0/8 bogus\n");
        assert_eq!(err, "/etc/pgcorral/hba.conf:2: unknown authentication method \"bogus\"");
    }

    #[test]
    fn methods_and_map_option() {
        let f = hba("local a all trust\n\
                     local b all reject\n\
                     local c all md5\n\
                     local d all scram-sha-256\n\
                     local e all password\n\
                     hostssl f all all cert map=certmap\n\
                     local g all peer map=\"local map\"\n\
                     local h all peer\n");
        let methods: Vec<HbaMethod> = f.rules().iter().map(|r| r.method).collect();
        use HbaMethod::*;
        assert_eq!(methods, [Trust, Reject, Md5, ScramSha256, Password, Cert, Peer, Peer]);
        assert_eq!(f.rules()[5].map.as_deref(), Some("certmap"));
        assert_eq!(f.rules()[6].map.as_deref(), Some("local map"));
        assert_eq!(f.rules()[7].map, None);
        assert_eq!(HbaMethod::ScramSha256.to_string(), "scram-sha-256");
    }

    #[test]
    fn option_errors() {
        assert_eq!(
            hba_err("local all all md5 map=x\n"),
            "/etc/pgcorral/hba.conf:1: map= is only valid with the cert and peer methods, not md5"
        );
        assert!(hba_err("hostssl all all all md5 clientcert=verify-full\n")
            .starts_with("/etc/pgcorral/hba.conf:1: unsupported authentication option \"clientcert\""));
        assert!(hba_err("local all all peer mapx\n").contains("not of the form name=value"));
        assert!(hba_err("local all all peer map=\n").contains("map= needs a map name"));
        assert!(hba_err("local all all peer map=a map=b\n").contains("more than once"));
    }

    #[test]
    fn method_errors_name_file_and_line() {
        assert_eq!(
            hba_err("\n# x\nhost all all all md6\n"),
            "/etc/pgcorral/hba.conf:3: unknown authentication method \"md6\""
        );
        assert!(hba_err("local all all ldap\n").contains("\"ldap\" is not supported by pgcorral"));
        assert!(hba_err("local all all pam\n").contains("only works as the global auth_type"));
        assert!(hba_err("local all all\n").ends_with(":1: missing authentication method"));
    }

    #[test]
    fn address_errors() {
        assert_eq!(
            hba_err("local all all trust\nhost all all 10.0.0.300/8 md5\n"),
            "/etc/pgcorral/hba.conf:2: invalid IP address \"10.0.0.300/8\""
        );
        assert!(hba_err("host all all 10.0.0.0/33 md5\n").contains(":1: invalid CIDR mask"));
        assert!(hba_err("host all all ::/129 md5\n").contains("invalid CIDR mask"));
        assert!(hba_err("host all all 10.0.0.0/+8 md5\n").contains("invalid CIDR mask"));
        assert!(hba_err("host all all 10.0.0.0/ md5\n").contains("invalid CIDR mask"));
        assert!(hba_err("host all all 10.0.0.1 md5\n").contains("invalid netmask \"md5\""));
        assert!(hba_err("host all all 10.0.0.1\n").contains("needs a /prefix length or a netmask column"));
        assert!(hba_err("host all all 10.0.0.0 ffff:: md5\n").contains("same address family"));
        assert!(hba_err("host all all samehost md5\n").contains("\"samehost\" is not supported"));
        assert!(hba_err("host all all samenet md5\n").contains("\"samenet\" is not supported"));
        assert!(hba_err("host all all db.example.com md5\n").contains("host names are not supported"));
        assert!(hba_err("host all all .example.com md5\n").contains("host names are not supported"));
        assert!(hba_err("host all all \"all\" md5\n").contains("host names are not supported"));
        assert!(hba_err("host all all 10.0.0.0/8,::/0 md5\n").contains("single value"));
        assert!(hba_err("host all all\n").ends_with(":1: missing address column"));
    }

    #[test]
    fn name_errors() {
        assert!(
            hba_err("local all +admins md5\n").contains(":1: group membership \"+admins\" is not supported")
        );
        assert!(hba_err("local samerole all md5\n").contains("\"samerole\" is not supported"));
        assert!(hba_err("local samegroup all md5\n").contains("\"samegroup\" is not supported"));
        assert!(hba_err("local /^db all md5\n").contains("regular expression \"/^db\" is not supported"));
        assert!(hba_err("local all /^u md5\n").contains("regular expression"));
        assert!(hba_err(", local all all md5\n").contains("unexpected ','"));
        assert!(hba_err("local db1,\n").contains("list ends with ','"));
        assert!(hba_err("local db1,,db2 all md5\n").contains("unexpected ','"));
        assert!(hba_err("local \"db all md5\n").contains(":1: unterminated quoted string"));
        assert!(hba_err("local\n").ends_with(":1: missing database column"));
        assert!(hba_err("local all\n").ends_with(":1: missing user column"));
    }

    #[test]
    fn connection_type_errors() {
        assert_eq!(
            hba_err("hots all all all md5\n"),
            "/etc/pgcorral/hba.conf:1: unknown connection type \"hots\" (expected local, host, hostssl or hostnossl)"
        );
        for kw in ["include", "include_if_exists", "include_dir"] {
            let err = hba_err(&format!("local all all trust\n{kw} other.conf\n"));
            assert!(err.starts_with("/etc/pgcorral/hba.conf:2: "), "{err}");
            assert!(err.contains("not supported in auth_hba_file"), "{err}");
        }
    }

    #[test]
    fn at_file_lists_resolve_relative_to_the_including_file() {
        let dir = temp_dir("atfile");
        std::fs::create_dir_all(dir.join("lists")).unwrap();
        std::fs::write(dir.join("users.txt"), "alice, bob # the app\n\"all\"\ncarol \\\n dave\n").unwrap();
        // Nested @file names are relative to the list that names them.
        std::fs::write(dir.join("lists/dbs.txt"), "sales @more.txt\n").unwrap();
        std::fs::write(dir.join("lists/more.txt"), "sameuser\n").unwrap();
        let hba_path = dir.join("hba.conf");
        std::fs::write(&hba_path, "# header\nlocal @lists/dbs.txt @users.txt md5\nlocal all all reject\n")
            .unwrap();

        let f = HbaFile::load(&hba_path).unwrap();
        assert_eq!(f.path(), hba_path);
        let local = |db: &str, user: &str| f.lookup(ConnKind::Local, None, db, user).unwrap().method;
        assert_eq!(local("sales", "alice"), HbaMethod::Md5);
        assert_eq!(local("sales", "bob"), HbaMethod::Md5);
        assert_eq!(local("sales", "all"), HbaMethod::Md5, "quoted all in an @file is a name");
        assert_eq!(local("sales", "carol"), HbaMethod::Md5);
        assert_eq!(local("sales", "dave"), HbaMethod::Md5);
        assert_eq!(local("sales", "eve"), HbaMethod::Reject);
        assert_eq!(local("alice", "alice"), HbaMethod::Md5, "sameuser from the nested list");
        assert_eq!(local("other", "alice"), HbaMethod::Reject);
        assert_eq!(f.rules()[0].line, 2);

        // A quoted @name is a literal name, not a file.
        let f = hba("local \"@users.txt\" all trust\n");
        assert_eq!(line(&f, ConnKind::Local, None, "@users.txt", "u"), 1);

        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn at_file_errors() {
        let dir = temp_dir("atfile-errors");
        let hba_path = dir.join("hba.conf");

        let err = HbaFile::parse("local all all trust\nlocal all @missing.txt md5\n", &hba_path)
            .unwrap_err()
            .to_string();
        let expected =
            format!("{}:2: could not read @file {}", hba_path.display(), dir.join("missing.txt").display());
        assert!(err.starts_with(&expected), "{err}");

        // Errors inside a list name the list file and its own line.
        std::fs::write(dir.join("bad.txt"), "alice\n+admins\n").unwrap();
        let err = HbaFile::parse("local all @bad.txt md5\n", &hba_path).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{}:2: group membership", dir.join("bad.txt").display())), "{err}");

        std::fs::write(dir.join("loop.txt"), "@loop.txt\n").unwrap();
        let err = HbaFile::parse("local @loop.txt all md5\n", &hba_path).unwrap_err().to_string();
        assert!(err.contains("nested more than 10 deep"), "{err}");

        assert!(hba_err("local @ all md5\n").contains("'@' must be followed by a file name"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn load_reports_a_missing_file() {
        let dir = temp_dir("missing");
        let path = dir.join("nope.conf");
        let err = HbaFile::load(&path).unwrap_err();
        assert!(matches!(err, HbaError::Io { .. }));
        assert!(err.to_string().starts_with(&format!("could not read {}: ", path.display())));
        assert!(IdentMap::load(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn ident(text: &str) -> IdentMap {
        IdentMap::parse(text, Path::new("/etc/pgcorral/ident.conf")).unwrap()
    }

    fn ident_err(text: &str) -> String {
        IdentMap::parse(text, Path::new("/etc/pgcorral/ident.conf")).unwrap_err().to_string()
    }

    #[test]
    fn ident_exact_names_and_all() {
        let m = ident(
            "# map system db\n\
                       certs  alice.example.com  alice\n\
                       certs  alice.example.com  reporting\n\
                       certs  root               all\n\
                       other  bob                bob\n\
                       certs  \"carol x\"        \"all\"\n",
        );
        assert!(m.allows("certs", "alice.example.com", "alice"));
        assert!(m.allows("certs", "alice.example.com", "reporting"));
        assert!(!m.allows("certs", "alice.example.com", "postgres"));
        assert!(m.allows("certs", "root", "anyone"));
        assert!(!m.allows("certs", "bob", "bob"), "lines of another map do not count");
        assert!(m.allows("other", "bob", "bob"));
        assert!(!m.allows("nomap", "bob", "bob"));
        assert!(m.allows("certs", "carol x", "all"));
        assert!(!m.allows("certs", "carol x", "carol"), "quoted all is a literal name");
        assert!(m.contains_map("other"));
        assert!(!m.contains_map("nomap"));
    }

    #[test]
    fn ident_regex_with_backreference() {
        let m = ident(
            "m /^(.*)@example\\.com$ \\1\n\
                       m /@guests\\.org$ guest\n\
                       m \"/^svc (\\w+)$\" \"app_\\1\"\n\
                       m /^admin-(.*)$ all\n",
        );
        assert!(m.allows("m", "alice@example.com", "alice"));
        assert!(!m.allows("m", "alice@example.com", "bob"));
        assert!(!m.allows("m", "alice@example.org", "alice"));
        assert!(m.allows("m", "x@guests.org", "guest"));
        assert!(!m.allows("m", "x@guests.org", "x"));
        assert!(m.allows("m", "svc billing", "app_billing"), "quoted regex, quoted \\1 still substitutes");
        assert!(m.allows("m", "admin-joe", "postgres"));
        assert!(!m.allows("m", "joe", "postgres"));
    }

    #[test]
    fn ident_backslash_one_without_regex_is_literal() {
        let m = ident("m alice \\1\n");
        assert!(m.allows("m", "alice", "\\1"));
        assert!(!m.allows("m", "alice", "alice"));
    }

    #[test]
    fn ident_errors_name_file_and_line() {
        assert_eq!(
            ident_err("m a b\nm /(unclosed x\n").lines().next().unwrap(),
            "/etc/pgcorral/ident.conf:2: invalid regular expression \"(unclosed\": regex parse error:"
        );
        assert!(ident_err("m /^x$ \\1\n").contains(":1: \"\\1\" uses \\1 but the regular expression"));
        assert!(ident_err("m a\n").contains(":1: expected 3 columns"));
        assert!(ident_err("m a b c\n").contains("found 4"));
        assert!(ident_err("m a,b c\n").contains("single value"));
        assert!(ident_err("m a +group\n").contains("+groupname"));
        assert!(ident_err("m a /^x\n").contains("not supported in the database user column"));
        assert!(ident_err("include other.conf\n").contains(":1: \"include\" directives are not supported"));
        assert!(ident_err("include_dir conf.d\n").contains("not supported in auth_ident_file"));
        assert!(ident_err("m \"a b\n").contains("unterminated quoted string"));
    }

    #[test]
    fn ident_load_and_continuation() {
        let dir = temp_dir("ident");
        let path = dir.join("ident.conf");
        std::fs::write(&path, "\n# maps\nm \\\n  alice \\\n  bob\n").unwrap();
        let m = IdentMap::load(&path).unwrap();
        assert_eq!(m.path(), path);
        assert!(m.allows("m", "alice", "bob"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
