#!/usr/bin/env python3
"""Writes the seed corpus, fuzz/corpus/<target>/seed-*: a few small valid inputs per target in
the layout its harness in src/fuzzing.rs expects, so that fuzzing starts from real messages and
files and the replay test (tests/fuzz_corpus.rs) exercises the paths that succeed.

Run it again after changing a harness's input layout; it only rewrites seed-* files.
SCRAM seeds carry valid proofs and signatures for the fixed nonces in src/fuzzing.rs.
"""

import base64
import hashlib
import hmac
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")
REPO = os.path.dirname(HERE)


def write(target, name, data):
    if isinstance(data, str):
        data = data.encode()
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def cstr(s):
    return (s.encode() if isinstance(s, str) else s) + b"\0"


def msg(tag, body):
    return tag.encode() + struct.pack(">i", 4 + len(body)) + body


def parse_body(name, query, types=()):
    return cstr(name) + cstr(query) + struct.pack(">h", len(types)) + b"".join(struct.pack(">I", t) for t in types)


def bind_body(portal, statement, params=(b"1",)):
    body = cstr(portal) + cstr(statement) + struct.pack(">h", 1) + struct.pack(">h", 0)
    body += struct.pack(">h", len(params))
    for p in params:
        body += struct.pack(">i", -1) if p is None else struct.pack(">i", len(p)) + p
    return body + struct.pack(">h", 1) + struct.pack(">h", 0)


def target_body(kind, name):
    return kind.encode() + cstr(name)


def execute_body(portal, rows=0):
    return cstr(portal) + struct.pack(">i", rows)


def startup_packet(code, body):
    return struct.pack(">iI", 8 + len(body), code) + body


def params(*pairs):
    return b"".join(cstr(k) + cstr(v) for k, v in pairs) + b"\0"


def startup():
    v30 = 196608
    write("startup", "psql", startup_packet(v30, params(
        ("user", "alice"), ("database", "app"), ("application_name", "psql"), ("client_encoding", "UTF8"))))
    write("startup", "options", startup_packet(v30, params(
        ("user", "bob"), ("options", "-c search_path=app -cstatement_timeout=5s --work-mem=8MB"))))
    write("startup", "ssl", startup_packet(80877103, b""))
    write("startup", "gssenc", startup_packet(80877104, b""))
    write("startup", "cancel", startup_packet(80877102, struct.pack(">ii", 4242, -7)))
    write("startup", "v3_2", startup_packet(196610, params(("user", "alice"), ("_pq_.x", "1"))))


def framing():
    write("framing", "extended_batch", msg("P", parse_body("s1", "SELECT $1", [23])) + msg("B", bind_body("", "s1"))
          + msg("D", target_body("P", "")) + msg("E", execute_body("")) + msg("S", b""))
    write("framing", "query", msg("Q", cstr("SELECT 1")) + msg("X", b""))
    write("framing", "server_answer", msg("1", b"") + msg("2", b"") + msg("C", cstr("SELECT 1")) + msg("Z", b"I"))
    write("framing", "partial", msg("Q", cstr("SELECT pg_sleep(1)"))[:12])


def frontend():
    write("frontend", "password", cstr("secret"))
    write("frontend", "md5_password", cstr("md5" + hashlib.md5(b"secretalice").hexdigest()))
    first = b"n,,n=,r=rOprNGfwEbeRWgbNEkqO"
    write("frontend", "sasl_initial", cstr("SCRAM-SHA-256") + struct.pack(">i", len(first)) + first)
    first = b"p=tls-server-end-point,,n=,r=rOprNGfwEbeRWgbNEkqO"
    write("frontend", "sasl_initial_plus", cstr("SCRAM-SHA-256-PLUS") + struct.pack(">i", len(first)) + first)
    write("frontend", "sasl_initial_no_data", cstr("SCRAM-SHA-256") + struct.pack(">i", -1))


def extended():
    write("extended", "parse", b"P" + parse_body("s1", "SHOW POOLS", [25]))
    write("extended", "bind", b"B" + bind_body("p1", "s1", [b"x", None]))
    write("extended", "describe", b"D" + target_body("S", "s1"))
    write("extended", "close", b"C" + target_body("P", "p1"))
    write("extended", "execute", b"E" + execute_body("p1", 100))


def fields(*pairs):
    return b"".join(k.encode() + cstr(v) for k, v in pairs) + b"\0"


def backend():
    write("backend", "fatal", fields(("S", "FATAL"), ("V", "FATAL"), ("C", "28P01"),
                                     ("M", 'password authentication failed for user "alice"'), ("F", "auth.c"),
                                     ("L", "326"), ("R", "auth_failed")))
    write("backend", "error_42p05", fields(("S", "ERROR"), ("V", "ERROR"), ("C", "42P05"),
                                           ("M", 'prepared statement "s1" already exists')))
    write("backend", "notice_localized", fields(("S", "AVISO"), ("V", "WARNING"), ("C", "01000"), ("M", "é")))
    write("backend", "parameter_status", cstr("TimeZone") + cstr("Europe/Paris"))


# The pencil verifier of src/fuzzing.rs (PostgreSQL 15, CREATE ROLE ... PASSWORD 'pencil').
SALT_B64 = "Qu4lWJWlYv65whAr632IHQ=="
ITERATIONS = 4096
SALTED = hashlib.pbkdf2_hmac("sha256", b"pencil", base64.b64decode(SALT_B64), ITERATIONS)
CLIENT_KEY = hmac.new(SALTED, b"Client Key", "sha256").digest()
SERVER_KEY = hmac.new(SALTED, b"Server Key", "sha256").digest()
STORED_KEY = hashlib.sha256(CLIENT_KEY).digest()
SERVER_NONCE = "SERVERNONCE"
CLIENT_NONCE = "CLIENTNONCE"
BINDING = b"0123456789abcdef0123456789abcdef"


def b64(b):
    return base64.b64encode(b).decode()


def proof(auth_message):
    signature = hmac.new(STORED_KEY, auth_message.encode(), "sha256").digest()
    return bytes(a ^ b for a, b in zip(CLIENT_KEY, signature))


def client_exchange(gs2, client_nonce, binding=b""):
    bare = f"n=,r={client_nonce}"
    nonce = client_nonce + SERVER_NONCE
    server_first = f"r={nonce},s={SALT_B64},i={ITERATIONS}"
    without_proof = f"c={b64(gs2.encode() + binding)},r={nonce}"
    auth = f"{bare},{server_first},{without_proof}"
    return f"{gs2}{bare}\n{without_proof},p={b64(proof(auth))}"


def scram_server():
    # First byte: bit 0 channel binding data available, bit 1 SCRAM-SHA-256-PLUS selected.
    write("scram_server", "plain", b"\0" + client_exchange("n,,", "rOprNGfwEbeRWgbNEkqO").encode())
    write("scram_server", "y_flag_without_tls", b"\0" + client_exchange("y,,", "abc").encode())
    write("scram_server", "plus", b"\3" + client_exchange("p=tls-server-end-point,,", "xyz", BINDING).encode())
    write("scram_server", "y_flag_downgrade", b"\1" + client_exchange("y,,", "abc").encode())
    write("scram_server", "wrong_proof", b"\0n,,n=,r=abc,x=ext\nc=biws,r=abcSERVERNONCE,p=" + b64(bytes(32)).encode())
    write("scram_server", "first_only", b"\0n,,n=alice,r=abc")


def scram_client():
    nonce = CLIENT_NONCE + "SRV+/="
    server_first = f"r={nonce},s={SALT_B64},i={ITERATIONS}"
    auth = f"n=,r={CLIENT_NONCE},{server_first},c=biws,r={nonce}"
    signature = hmac.new(SERVER_KEY, auth.encode(), "sha256").digest()
    write("scram_client", "valid", f"{server_first}\nv={b64(signature)}")
    write("scram_client", "server_error", f"{server_first}\ne=invalid-proof")
    write("scram_client", "extension", f"{server_first},x=ext\nv={b64(bytes(32))},y=ext")
    write("scram_client", "bad_salt", f"r={nonce},s=!!,i=4096")


def server_name(query, types=()):
    h = hashlib.sha256(query.encode() + b"\0" + b"".join(struct.pack(">I", t) for t in types))
    return "pgcorral_" + h.digest()[:16].hex()


def op(direction, tag, body, new_lease=False):
    """One message for the prepared harness: op byte, tag, length byte, body."""
    assert len(body) < 256
    return bytes([(1 if direction == "server" else 0) | (2 if new_lease else 0)]) + tag.encode() + bytes([len(body)]) + body


def c(tag, body=b"", **kw):
    return op("client", tag, body, **kw)


def s(tag, body=b"", **kw):
    return op("server", tag, body, **kw)


def prepared():
    # First byte: max_prepared_statements (mod 4).
    write("prepared", "parse_bind_execute", bytes([2])
          + c("P", parse_body("s1", "SELECT $1", [23])) + c("B", bind_body("", "s1")) + c("D", target_body("P", ""))
          + c("E", execute_body("")) + c("S")
          + s("1") + s("2") + s("T", b"\0\0") + s("D", b"\0\0") + s("C", cstr("SELECT 1")) + s("Z", b"I")
          # The next lease: Bind alone, then Close of the statement.
          + c("B", bind_body("", "s1"), new_lease=True) + c("C", target_body("S", "s1")) + c("S")
          + s("2") + s("3") + s("Z", b"I"))
    name = server_name("SELECT 1")
    write("prepared", "reused_name_error", bytes([0])
          + c("P", parse_body("s1", "SELECT 1")) + c("S") + s("1") + s("Z", b"I")
          + c("P", parse_body("s1", "SELECT 2")) + c("S")
          + s("E", fields(("S", "ERROR"), ("C", "42P05"), ("M", f'prepared statement "{name}" already exists')))
          + s("Z", b"I"))
    write("prepared", "eviction", bytes([1])
          + c("P", parse_body("a", "SELECT 1")) + c("S") + s("1") + s("Z", b"I")
          + c("P", parse_body("b", "SELECT 2")) + c("B", bind_body("", "a")) + c("S")
          + s("3") + s("1") + s("1") + s("2") + s("Z", b"I"))
    write("prepared", "deallocate_discard", bytes([2])
          + c("P", parse_body("s1", "SELECT 1")) + c("S") + s("1") + s("Z", b"I")
          + c("Q", cstr("DEALLOCATE s1")) + s("C", cstr("DEALLOCATE")) + s("Z", b"I")
          + c("P", parse_body("s2", "SELECT 2")) + c("S") + s("1") + s("Z", b"I")
          + c("Q", cstr("discard all;")) + s("C", cstr("DISCARD ALL")) + s("Z", b"I"))
    write("prepared", "same_text_two_names", bytes([2])
          + c("P", parse_body("x", "SELECT $1", [23])) + c("P", parse_body("y", "SELECT $1", [23]))
          + c("D", target_body("S", "y")) + c("S") + s("1") + s("1") + s("3") + s("t", b"\0\1\0\0\0\x17")
          + s("T", b"\0\0") + s("Z", b"I"))


def hba():
    write("hba", "rules", "# TYPE  DATABASE USER ADDRESS METHOD\n"
          "local   all      all                  peer map=m\n"
          "host    all      bob  10.0.0.0/8      reject\n"
          "hostssl app      alice,\"Bob\" 192.168.0.0 255.255.0.0 scram-sha-256\n"
          "hostnossl sameuser all ::ffff:10.0.0.0/104 md5\n"
          "host    replication all ::1/128       trust\n"
          "host    all      all  all             password\n")
    write("hba", "continuation", "host all \\\nall 0.0.0.0/0 \\\n  cert map=certs\n")
    write("hba", "at_file", "host @dbs.txt @users.txt 10.0.0.0/8 md5\n\0app, other\n\"quoted name\"\n")


def ident():
    write("ident", "maps", "# MAPNAME SYSTEM-USERNAME PG-USERNAME\n"
          "m alice alice\n"
          "m /^(.*)@example\\.com$ \\1\n"
          "m root all\n"
          "certs \"/^CN=(.*)$\" \"\\1\"\n")
    write("ident", "regex_all", "m /^adm-[a-z]+$ all\nm \"/^[^@]+@(corp|lab)$\" \"svc_\\1\"\n")
    write("ident", "continuation", "m \\\nalice \\\n  \"alice\"  # trailing comment\n")


def ini():
    with open(os.path.join(REPO, "conf", "pgcorral.ini"), "rb") as f:
        write("ini", "pgcorral_ini", f.read())
    write("ini", "sections", "[pgbouncer]\nlisten_port = 6432\nauth_type = hba\nauth_hba_file = hba.conf\n"
          "pool_mode = transaction\nquery_wait_timeout = 1.5\nmax_prepared_statements = 100\n"
          "[databases]\napp = host=127.0.0.1 port=5432 dbname=app pool_size=20 pool_mode=session\n"
          "\"my db\" = host=/tmp auth_user=admin connect_query='SELECT \\'a b\\''\n"
          "* = host=fallback\n"
          "[users]\nalice = pool_mode=statement max_user_connections=3\n"
          "[peers]\n1 = host=10.0.0.1 port=6432\n")
    write("ini", "include", "[pgbouncer]\n%include extra.ini\n; comment\n# comment\n"
          "\0[databases]\nfromincl = host=inc\n")


def connstr():
    write("connstr", "plain", "host=postgres port=5432 dbname=mydb")
    write("connstr", "quoted", "connect_query='SELECT \\'a b\\', 1' user=x  password='it''s' host='C:\\tmp'")
    write("connstr", "spacing", "  host = a\tPort= 1 ")


def userlist():
    write("userlist", "kinds", '"alice" "secret"\n'
          '"bob" "md5' + hashlib.md5(b"secretbob").hexdigest() + '"\n'
          ';"comment" "line"\n'
          '"carol" "SCRAM-SHA-256$4096:' + SALT_B64 + "$" + b64(STORED_KEY) + ":" + b64(SERVER_KEY) + '"\n'
          '"say ""hi""" "x" extra column\n')
    with open(os.path.join(REPO, "conf", "userlist.txt"), "rb") as f:
        write("userlist", "conf_example", f.read())
    write("userlist", "escapes_and_comments", '\ufeff# comment\n\n"a""b" "pass word"  \n"alice" "first"\n"alice" "last"\n')


def options():
    write("options", "switches", "-c search_path=app  -cstatement_timeout=5s --work-mem=8MB\t-c x.y=1")
    write("options", "escapes", "-c search_path=a,\\ b -c application_name=x\\\\y")
    write("options", "datestyle", "-c datestyle=ISO,\\ DMY -c timezone=UTC")
    write("options", "unsupported", "-B 100 -c")


def admin_command():
    for name, text in [("show", "SHOW POOLS;"), ("set", "set Admin_Users='a, b'"), ("set_to", "SET x TO 'it''s'"),
                       ("kill_client", "KILL_CLIENT 42"), ("shutdown", "shutdown wait_for_clients"),
                       ("resume", 'RESUME "My Db";'), ("empty", ";")]:
        write("admin_command", name, text)


def query():
    write("query", "asyncpg_release", "SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;")
    write("query", "deallocate", 'deallocate prepare "MiXed";')
    write("query", "discard_all", " discard all; ")
    write("query", "user_name_quotes", "o'brien\\'; DROP TABLE x; --")


def session():
    # First byte: pool mode (1 statement, 2 transaction); then (how, tag) pairs: how % 4 is
    # 0 client message, 1 server message, 2 CommandComplete tag, 3 ask for release.
    def client(tags):
        return bytes(x for t in tags for x in (0, ord(t)))

    def server(tags):
        return bytes(x for t in tags for x in (1, ord(t)))

    release = bytes([3, 0])
    write("session", "transaction", bytes([2]) + client("Q") + server("TDCZ") + release)
    write("session", "copy_pipeline", bytes([2]) + client("PBES") + server("12G") + client("ddcS") + server("CZ") + release)
    write("session", "statement_block", bytes([1]) + client("Q") + bytes([5, ord("Z")]) + release)


if __name__ == "__main__":
    for make in [startup, framing, frontend, extended, backend, scram_server, scram_client, prepared, hba, ident,
                 ini, connstr, userlist, options, admin_command, query, session]:
        make()
