//! Fuzz harnesses: one function per target, each taking the fuzzer's bytes and feeding them to
//! one of pgcorral's pure decoders, panicking only when the decoder misbehaves.
//!
//! They live in the library, not in `fuzz/`, so that the stable replay test
//! (`tests/fuzz_corpus.rs`) runs the committed corpus through exactly the code the fuzz targets
//! run; each `fuzz/fuzz_targets/<name>.rs` is a one-line call to the function of that name.
//! [`TARGETS`] lists them all.
//!
//! Beyond "does not panic", a harness asserts what the caller of the decoder relies on (a frame
//! lies within the buffer, rewritten messages are whole frames, ...). Decoders that would read
//! files (`%include`, `@file` lists) get them from the input instead, so no input can make a
//! harness touch the disk.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::OnceLock;

use crate::admin::command;
use crate::auth::auth_query::bind_user;
use crate::auth::hba::{ConnKind, HbaFile, IdentMap};
use crate::auth::{
    ScramClient, ScramKeys, ScramSecret, ScramServer, Secret, SCRAM_SHA_256, SCRAM_SHA_256_PLUS,
};
use crate::config::{connstr, ini, settings, userlist, ConfigError};
use crate::protocol::backend::parse_parameter_status;
use crate::protocol::error::PgError;
use crate::protocol::extended::{parse_bind, parse_bind_head, parse_execute, parse_parse, parse_target};
use crate::protocol::frame_at;
use crate::protocol::frontend::{parse_password, parse_sasl_initial};
use crate::protocol::options::{is_parameter_name, parse_options};
use crate::protocol::prepared::{
    deallocate_target, is_discard_all, ClientStatements, Rewriter, Rewritten, ServerStatements, ServerVerdict,
};
use crate::protocol::startup::{parse_startup, Negotiation, StartupPacket, LATEST_MINOR, MAX_STARTUP_LEN};

/// Formats an error or value as the daemon would in a log line or a client's message, so
/// that its `Display` runs on whatever the decoder made of the input.
fn display(value: impl std::fmt::Display) {
    let _ = value.to_string();
}

/// A fuzz target's harness: takes any bytes, panics only on a bug.
pub type Harness = fn(&[u8]);

/// Every target: its name (as in `fuzz/fuzz_targets/` and `fuzz/corpus/`) and its harness.
pub const TARGETS: &[(&str, Harness)] = &[
    ("startup", startup),
    ("framing", framing),
    ("frontend", frontend),
    ("extended", extended),
    ("backend", backend),
    ("scram_server", scram_server),
    ("scram_client", scram_client),
    ("prepared", prepared),
    ("hba", hba),
    ("ident", ident),
    ("ini", ini),
    ("connstr", connstr),
    ("userlist", userlist),
    ("options", options),
    ("admin_command", admin_command),
    ("query", query),
    ("session", session),
    ("takeover", takeover),
];

/// The untagged first packet; the `options` parameter of a StartupMessage goes on to its parser.
pub fn startup(data: &[u8]) {
    match parse_startup(data) {
        Ok(Some((packet, len))) => {
            let declared = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
            assert_eq!(len, declared, "the packet is as long as it says");
            assert!((8..=MAX_STARTUP_LEN).contains(&len) && len <= data.len());
            if let StartupPacket::Startup { minor, mut params } = packet {
                let asked = params.len();
                let negotiation = Negotiation::of(minor, &mut params);
                assert!(negotiation.minor <= LATEST_MINOR && negotiation.minor <= minor);
                assert_eq!(asked, params.len() + negotiation.unknown_options.len());
                assert!(params.iter().all(|(name, _)| !name.starts_with("_pq_.")));
                assert_eq!(
                    negotiation.must_tell,
                    minor > LATEST_MINOR || !negotiation.unknown_options.is_empty()
                );
                let mut answer = bytes::BytesMut::new();
                crate::protocol::backend::negotiate_protocol_version(&mut answer, &negotiation);
                for (name, value) in &params {
                    assert!(!name.is_empty() && !name.contains('\0') && !value.contains('\0'));
                    if name == "options" {
                        let _ = parse_options(value);
                    }
                }
            }
        }
        Ok(None) => {
            if data.len() >= 4 {
                let declared = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
                assert!(data.len() < declared, "a complete packet was reported incomplete");
            }
        }
        Err(e) => display(e),
    }
}

/// Message boundaries, walking the whole input as a read buffer: once with a small
/// `max_packet_size`, once with no practical limit.
pub fn framing(data: &[u8]) {
    for max_len in [64, usize::MAX] {
        let mut at = 0;
        loop {
            let buf = &data[at..];
            match frame_at(buf, max_len) {
                Ok(Some(frame)) => {
                    assert!(frame.len >= 5 && frame.len <= buf.len() && frame.len <= max_len);
                    assert_eq!(frame.tag, buf[0]);
                    assert_eq!(frame.body(buf).len(), frame.len - 5);
                    at += frame.len;
                }
                Ok(None) => {
                    if buf.len() >= 5 {
                        let declared = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                        assert!(buf.len() < declared + 1, "a complete message was reported incomplete");
                    }
                    break;
                }
                Err(e) => {
                    display(e);
                    break;
                }
            }
        }
    }
}

/// PasswordMessage and SASLInitialResponse bodies (both tagged `p`; the login step tells them
/// apart, so both parsers see every input).
pub fn frontend(data: &[u8]) {
    match parse_password(data) {
        Ok(password) => assert_eq!(password.len() + 1, data.len()),
        Err(e) => display(e),
    }
    match parse_sasl_initial(data) {
        Ok((mechanism, first)) => {
            assert_eq!(mechanism.len() + 1 + 4 + first.len(), data.len());
            let _ = ScramServer::check_mechanism(&mechanism);
        }
        Err(e) => display(e),
    }
}

/// Extended-protocol messages as the rewriter and the console read them: the first byte is the
/// message's tag (`P`, `B`, `D`, `C`, `E`), the rest its body; any other tag tries every parser.
/// Whatever is accepted accounts for every byte of the body (PostgreSQL's `pq_getmsgend`).
pub fn extended(data: &[u8]) {
    let Some((&tag, body)) = data.split_first() else { return };
    let all = !matches!(tag, b'P' | b'B' | b'D' | b'C' | b'E');
    if all || tag == b'P' {
        if let Ok(parse) = parse_parse(body) {
            assert!(!parse.statement.contains('\0') && !parse.query.contains('\0'));
            assert_eq!(parse.param_types.len() % 4, 0);
            assert_eq!(parse.statement.len() + parse.query.len() + 4 + parse.param_types.len(), body.len());
        }
    }
    if all || tag == b'B' {
        if let Ok(head) = parse_bind_head(body) {
            assert_eq!(head.portal.len() + head.statement.len() + 2 + head.rest.len(), body.len());
            if let Ok(bind) = parse_bind(body) {
                assert_eq!((bind.portal, bind.statement), (head.portal, head.statement));
                assert!(bind.result_formats.len() * 2 <= head.rest.len());
            }
        } else {
            assert!(parse_bind(body).is_err());
        }
    }
    if all || tag == b'D' || tag == b'C' {
        if let Ok(target) = parse_target(body) {
            assert_eq!(2 + target.name.len(), body.len());
        }
    }
    if all || tag == b'E' {
        if let Ok(portal) = parse_execute(body) {
            assert_eq!(portal.len() + 1 + 4, body.len());
        }
    }
}

/// The server messages pgcorral reads itself: ErrorResponse/NoticeResponse fields (as the relay
/// and as server login read them) and ParameterStatus, all given as bodies.
pub fn backend(data: &[u8]) {
    display(crate::auth::server_error(data));
    let error = PgError::parse_fields(data);
    display(&error);
    let _ = error.is_fatal();
    // What pgcorral read it can write again, and read back the same.
    let mut written = bytes::BytesMut::new();
    error.encode(&mut written);
    assert_eq!(whole_frames(&written), [b'E']);
    assert_eq!(PgError::parse_fields(&written[5..]), error);
    if let Some((name, value)) = parse_parameter_status(data) {
        assert!(!name.contains('\0') && !value.contains('\0'));
    }
}

/// Salt, keys and iteration count from a PostgreSQL 15 `CREATE ROLE ... PASSWORD 'pencil'`.
const PENCIL: &str = "SCRAM-SHA-256$4096:Qu4lWJWlYv65whAr632IHQ==$1mAOiZyjrdwY4d7yIBpmSZjyOqSJ4xLO42yIhzgiUec=:1gxad9pgpktwG6KijZI8BjLmUbBDwug9mPsnytIqJhA=";
/// Fixed nonces, so that a corpus entry can carry a valid proof or signature.
pub const FUZZ_SERVER_NONCE: &str = "SERVERNONCE";
pub const FUZZ_CLIENT_NONCE: &str = "CLIENTNONCE";
/// Stands for the hash of pgcorral's certificate in `tls-server-end-point` binding.
pub const FUZZ_CHANNEL_BINDING: &[u8] = b"0123456789abcdef0123456789abcdef";

fn pencil() -> &'static ScramSecret {
    static SECRET: OnceLock<ScramSecret> = OnceLock::new();
    SECRET.get_or_init(|| match Secret::parse(PENCIL) {
        Secret::Scram(secret) => secret,
        _ => unreachable!("PENCIL is a SCRAM verifier"),
    })
}

/// The first line and, if there is one, the rest after the first newline: the two messages
/// of a SCRAM exchange (neither may contain a newline in a real exchange).
fn two_messages(data: &[u8]) -> (&[u8], Option<&[u8]>) {
    match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], Some(&data[at + 1..])),
        None => (data, None),
    }
}

/// pgcorral's SCRAM server: client-first-message, a newline, client-final-message. The first
/// byte picks the setting: bit 0, channel binding data available (TLS); bit 1, the client
/// selected SCRAM-SHA-256-PLUS.
pub fn scram_server(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let (first, last) = two_messages(rest);
    let binding = (mode & 1 != 0).then(|| FUZZ_CHANNEL_BINDING.to_vec());
    let mut server = ScramServer::with_server_nonce(pencil().clone(), FUZZ_SERVER_NONCE.into())
        .with_channel_binding(binding);
    let mechanism = if mode & 2 != 0 { SCRAM_SHA_256_PLUS } else { SCRAM_SHA_256 };
    if let Err(e) = server.select_mechanism(mechanism) {
        display(e);
    }
    let first_ok = match server.client_first(first) {
        Ok(server_first) => {
            let text = String::from_utf8(server_first).expect("server-first-message is text");
            assert!(text.starts_with("r=") && text.contains(FUZZ_SERVER_NONCE));
            true
        }
        Err(e) => {
            display(e);
            false
        }
    };
    let Some(last) = last else { return };
    match server.client_final(last) {
        Ok(server_final) => {
            assert!(first_ok, "client-final-message accepted without a client-first-message");
            assert!(server_final.starts_with(b"v="));
            assert!(server.client_key().is_some() && server.pass_through_keys().is_some());
        }
        Err(e) => {
            display(e);
            assert!(server.client_key().is_none(), "a failed exchange yields no key");
        }
    }
}

/// pgcorral's SCRAM client logging in to a server: server-first-message, a newline,
/// server-final-message. The client holds pass-through keys for the `pencil` verifier and
/// the nonce [`FUZZ_CLIENT_NONCE`]. (With a password instead, a server-first-message's
/// iteration count sets how long salting takes: a hostile server could ask for 4 billion.)
pub fn scram_client(data: &[u8]) {
    static KEYS: OnceLock<ScramKeys> = OnceLock::new();
    let keys = KEYS.get_or_init(|| ScramKeys::from_password("pencil", &pencil().salt, pencil().iterations));
    let (first, last) = two_messages(data);
    let mut client = ScramClient::with_keys_and_nonce(keys, FUZZ_CLIENT_NONCE);
    let first_ok = match client.server_first(first) {
        Ok(client_final) => {
            assert!(client_final.starts_with(format!("c=biws,r={FUZZ_CLIENT_NONCE}").as_bytes()));
            true
        }
        Err(e) => {
            display(e);
            false
        }
    };
    let Some(last) = last else { return };
    match client.server_final(last) {
        Ok(()) => assert!(first_ok, "server-final-message accepted without a server-first-message"),
        Err(e) => display(e),
    }
}

/// Frames `body` as a message with `tag`.
fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(tag);
    out.extend_from_slice(&(4 + body.len() as i32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Asserts that `bytes` is one or more whole messages and returns their tags.
fn whole_frames(bytes: &[u8]) -> Vec<u8> {
    let mut tags = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        match frame_at(&bytes[at..], usize::MAX) {
            Ok(Some(frame)) => {
                tags.push(frame.tag);
                at += frame.len;
            }
            other => panic!("output is not whole frames at offset {at}: {other:?} in {bytes:02x?}"),
        }
    }
    assert!(!tags.is_empty(), "an empty replacement");
    tags
}

/// The prepared-statement rewriter over one lease after another, with one client's books and
/// one server's. The first byte is `max_prepared_statements` (mod 4; 0 is no limit). Then
/// messages, each as: an op byte (bit 0: from the server, else from the client; bit 1: a new
/// lease starts first, if the current one has nothing outstanding), the tag, a length byte and
/// that many body bytes (fewer at the end of the input).
pub fn prepared(data: &[u8]) {
    let Some((&first, mut rest)) = data.split_first() else { return };
    let capacity = usize::from(first % 4);
    let mut client = ClientStatements::default();
    let mut server = ServerStatements::default();
    let mut rewriter = Rewriter::default();
    while let [op, tag, len, tail @ ..] = rest {
        let len = usize::from(*len).min(tail.len());
        let (body, tail) = tail.split_at(len);
        rest = tail;
        if op & 2 != 0 && rewriter.settled() {
            rewriter = Rewriter::default();
        }
        let message = frame(*tag, body);
        if op & 1 == 0 {
            // A name in pgcorral's namespace that this client never prepared must not reach a
            // server: it could be a statement pgcorral keeps there for other clients.
            let foreign = statement_named(&message)
                .filter(|name| name.starts_with("pgcorral_") && client.get(name).is_none())
                .map(str::to_owned);
            match rewriter.client_message(&message, &mut client, &mut server, capacity) {
                Ok(Rewritten::Replaced(out)) => {
                    for tag in whole_frames(&out) {
                        assert!(b"PBDCQ".contains(&tag), "the rewriter invented a {:?} message", tag as char);
                    }
                    if let Some(name) = foreign.filter(|n| n != "pgcorral_nothing") {
                        let mut at = 0;
                        while let Ok(Some(frame)) = frame_at(&out[at..], usize::MAX) {
                            let named = statement_named(&out[at..at + frame.len]);
                            assert!(
                                named != Some(&name),
                                "a foreign reserved name reached the server: {name}"
                            );
                            at += frame.len;
                        }
                    }
                }
                Ok(Rewritten::Unchanged) => {
                    assert!(foreign.is_none(), "a foreign reserved name went through unchanged: {foreign:?}")
                }
                Err(_) => {}
            }
        } else if let ServerVerdict::Replace(out) =
            rewriter.server_message(&message, &mut client, &mut server)
        {
            assert_eq!(whole_frames(&out), [b'E'], "a replaced server message is one ErrorResponse");
        }
    }
}

/// The session machine (with the protocol model inside) fed any sequence of client and server
/// tags: it never panics, its backlog stays within what was sent, and a server it calls free
/// owes nothing it was told about. Byte pairs: (direction and mode bits, tag).
pub fn session(data: &[u8]) {
    use crate::config::PoolMode;
    use crate::session::{Release, Session, Wire};
    let mode = match data.first().map(|b| b % 3) {
        Some(0) => PoolMode::Session,
        Some(1) => PoolMode::Statement,
        _ => PoolMode::Transaction,
    };
    let mut session = Session::new(mode);
    session.leased();
    let wire = Wire { clean: true, cancel_in_flight: false };
    let mut sent = 0usize;
    for pair in data.get(1..).unwrap_or_default().chunks_exact(2) {
        let (how, tag) = (pair[0], pair[1]);
        match how % 4 {
            0 => {
                sent += 1;
                session.client_message(tag, (how & 4 != 0).then_some(&b"RESET ALL"[..]));
            }
            1 => session.server_message(tag, Some(b"ITE"[usize::from(how >> 2) % 3])),
            2 => session.command_complete(&[tag]),
            _ => {
                if let Release::Now(_) = session.release(wire) {
                    assert!(session.tracker().idle(), "released with the protocol model not idle");
                    session.released();
                    session.leased();
                }
            }
        }
        assert!(session.tracker().backlog() <= sent, "more unanswered entries than messages sent");
        let _ = session.clock(true, &Default::default());
        let _ = session.on_exit(wire, how & 8 != 0);
    }
}

/// The statement a Bind, or a Describe or Close of a statement, names.
fn statement_named(message: &[u8]) -> Option<&str> {
    let body = message.get(5..)?;
    let rest = match message[0] {
        b'B' => &body[body.iter().position(|&b| b == 0)? + 1..],
        b'D' | b'C' if body.first() == Some(&b'S') => &body[1..],
        _ => return None,
    };
    std::str::from_utf8(&rest[..rest.iter().position(|&b| b == 0)?]).ok()
}

/// Where the file-based harnesses pretend their files are: a directory that does not exist,
/// so that nothing resolves to a real file.
const FUZZ_DIR: &str = "/nonexistent/pgcorral-fuzz";

/// Text for the file formats: invalid UTF-8 becomes U+FFFD, as a file's contents cannot be
/// anything but a `str` by the time they are parsed. The part up to the first NUL is the main
/// file; the rest is what every included file contains.
fn main_and_included(data: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(data);
    match text.split_once('\0') {
        Some((main, included)) => (main.to_string(), included.to_string()),
        None => (text.into_owned(), String::new()),
    }
}

/// Includes that include themselves are bounded only by the nesting limit, which with several
/// per file is exponential in it; real files are the administrator's, fuzz inputs are not.
const MAX_READS: usize = 16;

/// `auth_hba_file`, then a few connections looked up in it. `@file` lists read the part after
/// the first NUL.
pub fn hba(data: &[u8]) {
    let (main, included) = main_and_included(data);
    let mut reads = 0;
    let mut read_file = |_: &Path| {
        reads += 1;
        if reads > MAX_READS {
            return Err(std::io::Error::other("too many reads for one fuzz input"));
        }
        Ok(included.clone())
    };
    let path = Path::new(FUZZ_DIR).join("pg_hba.conf");
    let file = match HbaFile::parse_with(&main, &path, &mut read_file) {
        Ok(file) => file,
        Err(e) => return display(e),
    };
    let v4 = Some(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)));
    let mapped = Some(IpAddr::V6(Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped()));
    let v6 = Some(IpAddr::V6(Ipv6Addr::LOCALHOST));
    for (kind, addr) in [
        (ConnKind::Local, None),
        (ConnKind::Host { ssl: false }, v4),
        (ConnKind::Host { ssl: true }, mapped),
        (ConnKind::Host { ssl: false }, v6),
        (ConnKind::Host { ssl: false }, None),
    ] {
        for (database, user) in [("app", "alice"), ("alice", "alice")] {
            if let Some(rule) = file.lookup(kind, addr, database, user) {
                display(rule.method);
            }
        }
    }
}

/// `auth_ident_file`, then a few questions to map `m`.
pub fn ident(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let map = match IdentMap::parse(&text, &Path::new(FUZZ_DIR).join("pg_ident.conf")) {
        Ok(map) => map,
        Err(e) => return display(e),
    };
    let _ = map.contains_map("m");
    for (system, db_user) in [("alice", "alice"), ("alice@example.com", "alice"), ("", "")] {
        let _ = map.allows("m", system, db_user);
    }
}

/// `pgbouncer.ini`: lexed (with `%include`s reading the part after the first NUL), then every
/// entry's value read as the loader reads it, without the steps that open files (auth_file,
/// TLS keys, HBA files).
pub fn ini(data: &[u8]) {
    let (main, included) = main_and_included(data);
    let mut reads = 0;
    let mut read_file = |_: &Path| {
        reads += 1;
        if reads > MAX_READS {
            return Err(ConfigError::Syntax {
                file: "fuzz".into(),
                line: 0,
                message: "too many reads".into(),
            });
        }
        Ok(included.clone())
    };
    let dir = Path::new(FUZZ_DIR);
    let entries = match ini::lex_str_with(&main, &dir.join("pgbouncer.ini"), &mut read_file) {
        Ok(entries) => entries,
        Err(e) => return display(e),
    };
    let mut general = settings::General::default();
    for entry in &entries {
        let line =
            settings::Line { name: &entry.key, value: &entry.value, file: &entry.file, line: entry.line };
        let result = match entry.section {
            ini::Section::PgBouncer => {
                let setting = settings::Setting {
                    key: &entry.key,
                    value: &entry.value,
                    file: &entry.file,
                    line: entry.line,
                };
                settings::apply_general(&mut general, &setting, dir).map(|w| w.map(|w| w.to_string()))
            }
            ini::Section::Databases => {
                settings::parse_database(&line).map(|(_, w)| w.first().map(|w| w.to_string()))
            }
            ini::Section::Users => settings::parse_user(&line).map(|(_, w)| w.first().map(|w| w.to_string())),
            ini::Section::Peers => settings::parse_peer(&line).map(|peer| Some(format!("{peer:?}"))),
        };
        if let Err(e) = result {
            display(e);
        }
    }
}

/// A libpq `key=value` connection string from `[databases]`.
pub fn connstr(data: &[u8]) {
    match connstr::parse(&String::from_utf8_lossy(data)) {
        Ok(pairs) => {
            for (key, value) in pairs {
                assert!(!key.is_empty() && !value.is_empty());
                assert_eq!(key, key.to_ascii_lowercase());
            }
        }
        Err(e) => drop(e),
    }
}

/// `userlist.txt`, each secret then classified as plain, md5 or SCRAM.
pub fn userlist(data: &[u8]) {
    match userlist::parse(&String::from_utf8_lossy(data), "userlist.txt") {
        Ok(users) => {
            for (i, (user, secret)) in users.iter().enumerate() {
                assert!(users[..i].iter().all(|(u, _)| u != user), "user {user:?} listed twice");
                let _ = Secret::parse(secret);
            }
        }
        Err(e) => display(e),
    }
}

/// The `options` startup parameter.
pub fn options(data: &[u8]) {
    match parse_options(&String::from_utf8_lossy(data)) {
        Ok(settings) => {
            for (name, _) in settings {
                assert!(is_parameter_name(&name), "{name:?} accepted as a parameter name");
            }
        }
        Err(e) => display(e),
    }
}

/// A query sent to the admin console.
pub fn admin_command(data: &[u8]) {
    match command::parse(&String::from_utf8_lossy(data)) {
        Ok(command) => {
            let _ = command.read_only();
        }
        Err(e) => display(e),
    }
}

/// The messages of an online restart's takeover socket, as the new process reads the old
/// one's (and back): each message read must write back as the same bytes' meaning, and a
/// malformed or cut stream must end in an error or a wait, never a panic or a huge allocation.
pub fn takeover(data: &[u8]) {
    let mut rest = data;
    loop {
        match crate::takeover::Message::decode(rest) {
            Ok(Some((message, len))) => {
                assert!(len > 0 && len <= rest.len());
                let again = crate::takeover::Message::decode(&message.encode());
                assert_eq!(again.map(|m| m.map(|(m, _)| m)), Ok(Some(message)));
                rest = &rest[len..];
            }
            Ok(None) => return,
            Err(e) => return display(e),
        }
    }
}

/// The text of a client's simple query, as pgcorral looks at it on its way: a trailing full
/// reset (`RESET ALL`, `DISCARD ALL`), `DEALLOCATE name`; and a name bound into `auth_query`,
/// which must come out as one SQL string literal holding exactly that name.
pub fn query(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = crate::params::ends_with_full_reset(&text);
    let _ = is_discard_all(&text);
    let _ = deallocate_target(&text);
    let bound = bind_user("$1", &text);
    assert_eq!(read_literal(&bound).as_deref(), Some(&*text), "{text:?} bound as {bound}");
}

/// The value of a SQL string literal that makes up all of `sql` (`'...'` or `E'...'`), read
/// as PostgreSQL's lexer reads it; None if `sql` is anything else, or a literal whose meaning
/// depends on `standard_conforming_strings`.
fn read_literal(sql: &str) -> Option<String> {
    let (escapes, body) = match sql.strip_prefix("E'") {
        Some(body) => (true, body),
        None => (false, sql.strip_prefix('\'')?),
    };
    let mut value = String::new();
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        match c {
            // Any other escape (`\n`, `\x41`, ...) would stand for something else.
            '\\' if escapes => match chars.next()? {
                c @ ('\\' | '\'') => value.push(c),
                _ => return None,
            },
            // Read differently with standard_conforming_strings off.
            '\\' => return None,
            '\'' => match chars.next() {
                Some('\'') => value.push('\''),
                None => return Some(value),
                Some(_) => return None,
            },
            c => value.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(target: &str, name: &str) -> Vec<u8> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target).join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// The SCRAM seeds carry proofs computed for the fixed nonces here (fuzz/seeds.py); if those
    /// change, the seeds only reach the error paths, and fuzzing starts far from a real login.
    #[test]
    fn scram_seeds_complete_their_exchange() {
        for (name, plus) in [("seed-plain", false), ("seed-plus", true)] {
            let data = seed("scram_server", name);
            let (first, last) = two_messages(&data[1..]);
            let mut server = ScramServer::with_server_nonce(pencil().clone(), FUZZ_SERVER_NONCE.into())
                .with_channel_binding(plus.then(|| FUZZ_CHANNEL_BINDING.to_vec()));
            server.select_mechanism(if plus { SCRAM_SHA_256_PLUS } else { SCRAM_SHA_256 }).unwrap();
            server.client_first(first).unwrap();
            server.client_final(last.unwrap()).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let data = seed("scram_client", "seed-valid");
        let (first, last) = two_messages(&data);
        let keys = ScramKeys::from_password("pencil", &pencil().salt, pencil().iterations);
        let mut client = ScramClient::with_keys_and_nonce(&keys, FUZZ_CLIENT_NONCE);
        client.server_first(first).unwrap();
        client.server_final(last.unwrap()).unwrap();
    }

    #[test]
    fn every_harness_takes_empty_and_arbitrary_input() {
        for (_, harness) in TARGETS {
            harness(b"");
            harness(b"\0\xff\n\x01");
        }
    }

    #[test]
    fn literals_are_read_as_postgres_reads_them() {
        assert_eq!(read_literal("'a''b'").as_deref(), Some("a'b"));
        assert_eq!(read_literal(r"E'a\\b\'c'").as_deref(), Some(r"a\b'c"));
        assert_eq!(read_literal(r"'a\b'"), None, "depends on standard_conforming_strings");
        assert_eq!(read_literal(r"E'a\nb'"), None, "an escape that stands for another character");
        assert_eq!(read_literal("'a' || 'b'"), None);
        assert_eq!(read_literal("'open"), None);
    }
}
