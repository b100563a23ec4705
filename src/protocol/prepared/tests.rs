//! The rewriter and the books, message by message.

use bytes::{BufMut, BytesMut};

use super::*;
use crate::protocol::extended::{parse_bind_head, parse_target};
use crate::protocol::fields::{put_cstr, Fields};
use crate::protocol::frame_at;
use postgres_protocol::message::frontend;

fn msg(write: impl FnOnce(&mut BytesMut)) -> BytesMut {
    let mut buf = BytesMut::new();
    write(&mut buf);
    buf
}

fn parse(name: &str, query: &str) -> BytesMut {
    msg(|b| frontend::parse(name, query, [23u32], b).unwrap())
}

fn bind(statement: &str) -> BytesMut {
    msg(|b| {
        frontend::bind(
            "",
            statement,
            [0i16],
            [Some(b"1".to_vec())],
            |v: Option<Vec<u8>>, out: &mut BytesMut| {
                out.extend_from_slice(&v.unwrap());
                Ok(postgres_protocol::IsNull::No)
            },
            [0i16],
            b,
        )
        .map_err(|_| ())
        .unwrap()
    })
}

fn sync() -> BytesMut {
    msg(frontend::sync)
}

/// (tag, statement name) of each message in `bytes`.
fn messages(bytes: &[u8]) -> Vec<(u8, String)> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(frame) = frame_at(&bytes[at..], 1 << 20).unwrap() {
        let body = &bytes[at + 5..at + frame.len];
        let name = match frame.tag {
            b'P' => Fields::new(body, "").cstr().unwrap().to_string(),
            b'B' => parse_bind_head(body).unwrap().statement.to_string(),
            b'C' | b'D' => parse_target(body).unwrap().name.to_string(),
            _ => String::new(),
        };
        out.push((frame.tag, name));
        at += frame.len;
    }
    out
}

fn sent(
    rw: &mut Rewriter,
    frame: &[u8],
    c: &mut ClientStatements,
    s: &mut ServerStatements,
) -> Vec<(u8, String)> {
    match rw.client_message(frame, c, s, 2).unwrap() {
        Rewritten::Unchanged => messages(frame),
        Rewritten::Replaced(bytes) => messages(&bytes),
    }
}

fn server(rw: &mut Rewriter, tag: u8, c: &mut ClientStatements, s: &mut ServerStatements) -> ServerVerdict {
    rw.server_message(&[tag, 0, 0, 0, 4], c, s)
}

#[test]
fn a_statement_prepared_once_serves_on_a_server_that_lacks_it() {
    let (mut c, mut s1, mut s2) =
        (ClientStatements::default(), ServerStatements::default(), ServerStatements::default());
    let mut rw = Rewriter::default();
    let sname = StatementDef::new("SELECT $1".into(), 23u32.to_be_bytes().to_vec()).server_name;
    assert_eq!(sent(&mut rw, &parse("s1", "SELECT $1"), &mut c, &mut s1), [(b'P', sname.clone())]);
    assert_eq!(sent(&mut rw, &bind("s1"), &mut c, &mut s1), [(b'B', sname.clone())]);
    sent(&mut rw, &sync(), &mut c, &mut s1);
    assert_eq!(server(&mut rw, b'1', &mut c, &mut s1), ServerVerdict::Forward);
    assert_eq!(server(&mut rw, b'2', &mut c, &mut s1), ServerVerdict::Forward);
    assert_eq!(server(&mut rw, b'Z', &mut c, &mut s1), ServerVerdict::Forward);
    assert!(rw.settled() && s1.len() == 1 && c.len() == 1);

    // The next transaction lands on another server: Parse is sent first, its answer eaten.
    let mut rw = Rewriter::default();
    assert_eq!(sent(&mut rw, &bind("s1"), &mut c, &mut s2), [(b'P', sname.clone()), (b'B', sname.clone())]);
    sent(&mut rw, &sync(), &mut c, &mut s2);
    assert_eq!(server(&mut rw, b'1', &mut c, &mut s2), ServerVerdict::Swallow);
    assert_eq!(server(&mut rw, b'2', &mut c, &mut s2), ServerVerdict::Forward);
    assert!(rw.settled() && s2.len() == 1);
    // And back on the first, nothing is added.
    let mut rw = Rewriter::default();
    assert_eq!(sent(&mut rw, &bind("s1"), &mut c, &mut s1), [(b'B', sname)]);
}

#[test]
fn a_second_client_parsing_the_same_text_gets_its_parse_complete_from_postgres() {
    let (mut a, mut b, mut s) =
        (ClientStatements::default(), ClientStatements::default(), ServerStatements::default());
    let mut rw = Rewriter::default();
    sent(&mut rw, &parse("x", "SELECT $1"), &mut a, &mut s);
    server(&mut rw, b'1', &mut a, &mut s);
    let out = sent(&mut rw, &parse("y", "SELECT $1"), &mut b, &mut s);
    assert_eq!(out, [(b'P', SCRATCH.into()), (b'C', SCRATCH.into())]);
    assert_eq!(server(&mut rw, b'1', &mut b, &mut s), ServerVerdict::Forward);
    assert_eq!(server(&mut rw, b'3', &mut b, &mut s), ServerVerdict::Swallow);
    assert!(rw.settled() && s.len() == 1 && b.len() == 1);
}

#[test]
fn close_is_answered_without_touching_the_server_statement() {
    let (mut c, mut s) = (ClientStatements::default(), ServerStatements::default());
    let mut rw = Rewriter::default();
    sent(&mut rw, &parse("s1", "SELECT 1"), &mut c, &mut s);
    server(&mut rw, b'1', &mut c, &mut s);
    let close = msg(|b| frontend::close(b'S', "s1", b).unwrap());
    assert_eq!(sent(&mut rw, &close, &mut c, &mut s), [(b'C', NOTHING.into())]);
    assert_eq!(server(&mut rw, b'3', &mut c, &mut s), ServerVerdict::Forward);
    assert!(c.is_empty() && s.len() == 1);
    // An unknown name passes through: PostgreSQL answers it.
    assert_eq!(rw.client_message(&bind("nope"), &mut c, &mut s, 2).unwrap(), Rewritten::Unchanged);
}

#[test]
fn the_least_recently_used_statement_is_closed_at_capacity() {
    let (mut c, mut s) = (ClientStatements::default(), ServerStatements::default());
    let mut rw = Rewriter::default();
    for (i, q) in ["SELECT 1", "SELECT 2"].iter().enumerate() {
        sent(&mut rw, &parse(&format!("s{i}"), q), &mut c, &mut s);
        server(&mut rw, b'1', &mut c, &mut s);
    }
    sent(&mut rw, &bind("s0"), &mut c, &mut s); // s0 becomes the most recently used
    let third = sent(&mut rw, &parse("s2", "SELECT 3"), &mut c, &mut s);
    let evicted = c.get("s1").unwrap().server_name.clone();
    assert_eq!(third[0], (b'C', evicted));
    assert_eq!(third[1].0, b'P');
    assert_eq!(server(&mut rw, b'3', &mut c, &mut s), ServerVerdict::Swallow);
    assert_eq!(server(&mut rw, b'1', &mut c, &mut s), ServerVerdict::Forward);
    assert_eq!(s.len(), 2);
}

#[test]
fn an_error_forgets_what_postgres_skips_until_sync() {
    let (mut c, mut s) = (ClientStatements::default(), ServerStatements::default());
    let mut rw = Rewriter::default();
    sent(&mut rw, &parse("bad", "SELEC 1"), &mut c, &mut s);
    sent(&mut rw, &bind("bad"), &mut c, &mut s);
    sent(&mut rw, &sync(), &mut c, &mut s);
    let error = msg(|b| {
        b.put_u8(b'E');
        b.put_i32(4 + 1 + 6 + 1);
        b.put_u8(b'C');
        put_cstr(b, "42601");
        b.put_u8(0);
    });
    assert_eq!(rw.server_message(&error, &mut c, &mut s), ServerVerdict::Forward);
    assert_eq!(server(&mut rw, b'Z', &mut c, &mut s), ServerVerdict::Forward);
    assert!(rw.settled(), "the failed Parse is not waited for");
    assert!(c.is_empty() && s.is_empty(), "a statement that failed to parse does not exist");
}

#[test]
fn a_reused_name_gets_postgres_error_with_the_clients_name() {
    let (mut c, mut s) = (ClientStatements::default(), ServerStatements::default());
    let mut rw = Rewriter::default();
    sent(&mut rw, &parse("s1", "SELECT 1"), &mut c, &mut s);
    server(&mut rw, b'1', &mut c, &mut s);
    let sname = c.get("s1").unwrap().server_name.clone();
    assert_eq!(sent(&mut rw, &parse("s1", "SELECT 2"), &mut c, &mut s), [(b'P', sname.clone())]);
    let text = format!("prepared statement \"{sname}\" already exists");
    let error = msg(|b| {
        let mut body = BytesMut::new();
        body.put_u8(b'C');
        put_cstr(&mut body, "42P05");
        body.put_u8(b'M');
        put_cstr(&mut body, &text);
        body.put_u8(0);
        b.put_u8(b'E');
        b.put_i32(4 + body.len() as i32);
        b.extend_from_slice(&body);
    });
    let ServerVerdict::Replace(renamed) = rw.server_message(&error, &mut c, &mut s) else {
        panic!("not renamed")
    };
    let renamed = String::from_utf8_lossy(&renamed).into_owned();
    assert!(renamed.contains("prepared statement \"s1\" already exists"), "{renamed}");
    assert_eq!(c.get("s1").unwrap().query, "SELECT 1", "the first definition stands");
}

#[test]
fn a_renamed_bind_is_the_bind_postgres_protocol_would_write() {
    let (mut c, mut s) = (ClientStatements::default(), ServerStatements::default());
    let mut rw = Rewriter::default();
    sent(&mut rw, &parse("s1", "SELECT $1"), &mut c, &mut s);
    server(&mut rw, b'1', &mut c, &mut s);
    let sname = c.get("s1").unwrap().server_name.clone();
    let Rewritten::Replaced(out) = rw.client_message(&bind("s1"), &mut c, &mut s, 2).unwrap() else {
        panic!()
    };
    assert_eq!(out, bind(&sname));
}

#[test]
fn deallocate_is_read_as_postgres_reads_it() {
    assert_eq!(deallocate_target("DEALLOCATE s1"), Some(Some("s1".into())));
    assert_eq!(deallocate_target("deallocate prepare _PG3_0;"), Some(Some("_pg3_0".into())));
    assert_eq!(deallocate_target("DEALLOCATE \"MiXed\""), Some(Some("MiXed".into())));
    assert_eq!(deallocate_target("DEALLOCATE ALL"), Some(None));
    assert_eq!(deallocate_target("DEALLOCATE a; DROP TABLE t"), None);
    assert_eq!(deallocate_target("SELECT 1"), None);
    assert!(is_discard_all(" discard all; ") && is_discard_all("DEALLOCATE ALL"));
    assert!(!is_discard_all("DISCARD PLANS"));
}

fn query(sql: &str) -> BytesMut {
    msg(|b| frontend::query(sql, b).unwrap())
}

fn error_naming(code: &str, text: &str) -> BytesMut {
    msg(|b| {
        let mut body = BytesMut::new();
        body.put_u8(b'C');
        put_cstr(&mut body, code);
        body.put_u8(b'M');
        put_cstr(&mut body, text);
        body.put_u8(0);
        b.put_u8(b'E');
        b.put_i32(4 + body.len() as i32);
        b.extend_from_slice(&body);
    })
}

#[test]
fn deallocate_and_discard_keep_the_books_once_postgres_confirms() {
    let (mut c, mut s) = (ClientStatements::default(), ServerStatements::default());
    let mut rw = Rewriter::default();
    sent(&mut rw, &parse("s1", "SELECT 1"), &mut c, &mut s);
    server(&mut rw, b'1', &mut c, &mut s);
    let sname = c.get("s1").unwrap().server_name.clone();
    let Rewritten::Replaced(out) = rw.client_message(&query("DEALLOCATE s1"), &mut c, &mut s, 2).unwrap()
    else {
        panic!("not rewritten")
    };
    assert!(String::from_utf8_lossy(&out).contains(&format!("DEALLOCATE {sname}")));
    assert!(!rw.settled() && c.len() == 1, "nothing changes before PostgreSQL answers");
    assert_eq!(rw.command_complete(b"DEALLOCATE", &mut c, &mut s), BooksAfter::Exact);
    server(&mut rw, b'Z', &mut c, &mut s);
    assert!(rw.settled() && c.is_empty() && s.is_empty());

    sent(&mut rw, &parse("s2", "SELECT 2"), &mut c, &mut s);
    server(&mut rw, b'1', &mut c, &mut s);
    assert_eq!(rw.client_message(&query("DISCARD ALL"), &mut c, &mut s, 2).unwrap(), Rewritten::Unchanged);
    assert_eq!(c.len(), 1, "DISCARD ALL fails inside a transaction block: wait for its answer");
    assert_eq!(rw.command_complete(b"DISCARD ALL", &mut c, &mut s), BooksAfter::Exact);
    assert!(c.is_empty() && s.is_empty());
}

#[test]
fn a_failing_deallocate_keeps_the_statement() {
    let (mut c, mut s) = (ClientStatements::default(), ServerStatements::default());
    let mut rw = Rewriter::default();
    sent(&mut rw, &parse("s1", "SELECT 1"), &mut c, &mut s);
    sent(&mut rw, &sync(), &mut c, &mut s);
    server(&mut rw, b'1', &mut c, &mut s);
    server(&mut rw, b'Z', &mut c, &mut s);
    rw.client_message(&query("DEALLOCATE s1"), &mut c, &mut s, 2).unwrap();
    let aborted = error_naming("25P02", "current transaction is aborted");
    assert_eq!(rw.server_message(&aborted, &mut c, &mut s), ServerVerdict::Forward);
    server(&mut rw, b'Z', &mut c, &mut s);
    assert!(rw.settled() && c.len() == 1 && s.len() == 1);
}

#[test]
fn sql_prepare_foreign_deallocate_and_dynamic_sql_make_the_books_untrusted() {
    let (mut c, mut s) = (ClientStatements::default(), ServerStatements::default());
    let mut rw = Rewriter::default();
    assert_eq!(rw.command_complete(b"PREPARE", &mut c, &mut s), BooksAfter::Untrusted);
    assert_eq!(rw.command_complete(b"DEALLOCATE", &mut c, &mut s), BooksAfter::Untrusted);
    for dynamic in [&b"DO"[..], b"CREATE FUNCTION", b"CREATE PROCEDURE"] {
        assert_eq!(rw.command_complete(dynamic, &mut c, &mut s), BooksAfter::Untrusted);
    }
    assert_eq!(
        rw.command_complete(b"CALL", &mut c, &mut s),
        BooksAfter::Exact,
        "stored procedures do not churn"
    );
    assert_eq!(rw.command_complete(b"SELECT 1", &mut c, &mut s), BooksAfter::Exact);
}

#[test]
fn a_client_name_in_pgcorrals_namespace_is_renamed_once() {
    // A client (or a pgcorral in front of this one) names its statement exactly as
    // pgcorral names statements on servers, and reuses it: the error names it once.
    let (mut c, mut s) = (ClientStatements::default(), ServerStatements::default());
    let mut rw = Rewriter::default();
    let own = StatementDef::new("SELECT 1".into(), 23u32.to_be_bytes().to_vec()).server_name;
    sent(&mut rw, &parse(&own, "SELECT 1"), &mut c, &mut s);
    server(&mut rw, b'1', &mut c, &mut s);
    let sname = c.get(&own).unwrap().server_name.clone();
    sent(&mut rw, &parse(&own, "SELECT 1"), &mut c, &mut s);
    let error = error_naming("42P05", &format!("prepared statement \"{sname}\" already exists"));
    let ServerVerdict::Replace(renamed) = rw.server_message(&error, &mut c, &mut s) else {
        panic!("not renamed")
    };
    let renamed = String::from_utf8_lossy(&renamed).into_owned();
    assert!(renamed.contains(&format!("prepared statement \"{own}\" already exists")), "{renamed}");
}

#[test]
fn reserved_names_the_client_never_prepared_never_reach_a_server() {
    let (mut a, mut b, mut s) =
        (ClientStatements::default(), ClientStatements::default(), ServerStatements::default());
    let mut rw = Rewriter::default();
    sent(&mut rw, &parse("mine", "SELECT 1"), &mut a, &mut s);
    server(&mut rw, b'1', &mut a, &mut s);
    let victim = a.get("mine").unwrap().server_name.clone();
    // Client b guesses a's server name: Bind, Describe and Close go to a name that exists
    // nowhere, and the error speaks of b's own spelling.
    assert_eq!(sent(&mut rw, &bind(&victim), &mut b, &mut s), [(b'B', NOTHING.into())]);
    let describe = msg(|m| frontend::describe(b'S', &victim, m).unwrap());
    assert_eq!(sent(&mut rw, &describe, &mut b, &mut s), [(b'D', NOTHING.into())]);
    let close = msg(|m| frontend::close(b'S', &victim, m).unwrap());
    assert_eq!(sent(&mut rw, &close, &mut b, &mut s), [(b'C', NOTHING.into())]);
    let error = error_naming("26000", &format!("prepared statement \"{NOTHING}\" does not exist"));
    let ServerVerdict::Replace(renamed) = rw.server_message(&error, &mut b, &mut s) else {
        panic!("not renamed")
    };
    let renamed = String::from_utf8_lossy(&renamed).into_owned();
    assert!(renamed.contains(&format!("\"{victim}\" does not exist")), "{renamed}");
    assert_eq!(s.len(), 1, "a's statement stays");
    // Other unknown names still reach PostgreSQL as they are, for its own error.
    assert_eq!(rw.client_message(&bind("nope"), &mut b, &mut s, 2).unwrap(), Rewritten::Unchanged);
}

#[test]
fn a_clients_books_are_bounded() {
    let (mut c, mut s) = (ClientStatements::default(), ServerStatements::default());
    let mut rw = Rewriter::default();
    let text = "x".repeat(1 << 20);
    let mut refused = None;
    for i in 0..40 {
        match rw.client_message(&parse(&format!("s{i}"), &format!("SELECT '{text}'")), &mut c, &mut s, 0) {
            Ok(_) => server(&mut rw, b'1', &mut c, &mut s),
            Err(e) => {
                refused = Some((i, e));
                break;
            }
        };
    }
    let (at, error) = refused.expect("the books stop growing");
    assert!(at >= 15 && c.len() == at, "16 MiB of statements fit, then no more ({at})");
    assert_eq!(error.to_pg().code, "54000");
    // What is deallocated makes room again.
    assert!(c.remove("s0"));
    assert!(rw.client_message(&parse("again", &format!("SELECT '{text}'")), &mut c, &mut s, 0).is_ok());
}

#[test]
fn names_are_content_addressed_and_fit_namedatalen() {
    let a = StatementDef::new("SELECT 1".into(), vec![]);
    assert_eq!(a.server_name, StatementDef::new("SELECT 1".into(), vec![]).server_name);
    assert_ne!(a.server_name, StatementDef::new("SELECT 1".into(), 23u32.to_be_bytes().to_vec()).server_name);
    assert!(a.server_name.len() < 64);
}
