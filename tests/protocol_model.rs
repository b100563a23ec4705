//! The protocol model that decides when a server is free (`TxnTracker`) checked against a
//! simulated PostgreSQL on generated client streams: simple and extended queries that succeed
//! or fail, Flush, pipelines, COPY in and out by Query and by Execute, good and bad copy rows,
//! CopyFail, stray copy messages, with client sends, server work and answers interleaved at
//! random. The simulator follows PostgreSQL's rules (postgres.c and copyfromparse.c): messages
//! are read in order, an extended-protocol error skips to the next Sync, a COPY's reader takes
//! CopyData, CopyDone, CopyFail, Flush and Sync and stops with an error at anything else.
//!
//! Properties: the model never calls a server quiet while PostgreSQL still owes an answer or
//! the client has an extended batch open (releasing it then would hand that answer to the next
//! client); and once everything is answered it calls the server quiet, unless copy data was
//! followed by a Sync or a non-copy message (where PostgreSQL's answer count depends on which
//! row failed, and the model pins the server to its client instead).

use std::collections::VecDeque;

use pgcorral::protocol::TxnTracker;
use proptest::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Copy {
    None,
    In,
    Out,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Msg {
    Query { copy: Copy, fails: bool },
    Parse { fails: bool },
    Bind { fails: bool },
    Describe,
    Close,
    Execute { copy: Copy, fails: bool },
    Sync,
    Flush,
    CopyData { bad: bool },
    CopyDone,
    CopyFail,
}

impl Msg {
    fn tag(self) -> u8 {
        match self {
            Msg::Query { .. } => b'Q',
            Msg::Parse { .. } => b'P',
            Msg::Bind { .. } => b'B',
            Msg::Describe => b'D',
            Msg::Close => b'C',
            Msg::Execute { .. } => b'E',
            Msg::Sync => b'S',
            Msg::Flush => b'H',
            Msg::CopyData { .. } => b'd',
            Msg::CopyDone => b'c',
            Msg::CopyFail => b'f',
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Normal,
    SkipToSync,
    CopyIn { extended: bool },
}

/// PostgreSQL, reduced to the order of its answers.
#[derive(Debug, Clone)]
struct Server {
    input: VecDeque<Msg>,
    output: VecDeque<u8>,
    mode: Mode,
}

impl Server {
    fn new() -> Server {
        Server { input: VecDeque::new(), output: VecDeque::new(), mode: Mode::Normal }
    }

    fn emit(&mut self, tags: &[u8]) {
        self.output.extend(tags);
    }

    /// The copy (or the query around it) failed.
    fn fail_copy(&mut self, extended: bool) {
        self.emit(b"E");
        if extended {
            self.mode = Mode::SkipToSync;
        } else {
            self.emit(b"Z");
            self.mode = Mode::Normal;
        }
    }

    /// Reads and handles the next client message.
    fn step(&mut self) {
        let Some(msg) = self.input.pop_front() else { return };
        match self.mode {
            Mode::SkipToSync => {
                if msg == Msg::Sync {
                    self.emit(b"Z");
                    self.mode = Mode::Normal;
                }
            }
            Mode::CopyIn { extended } => match msg {
                Msg::CopyData { bad: false } | Msg::Sync | Msg::Flush => {}
                Msg::CopyData { bad: true } | Msg::CopyFail => self.fail_copy(extended),
                Msg::CopyDone => {
                    self.emit(b"C");
                    if !extended {
                        self.emit(b"Z");
                    }
                    self.mode = Mode::Normal;
                }
                // "unexpected message type during COPY from stdin"
                _ => self.fail_copy(extended),
            },
            Mode::Normal => match msg {
                Msg::Query { copy: Copy::In, .. } => {
                    self.emit(b"G");
                    self.mode = Mode::CopyIn { extended: false };
                }
                Msg::Query { copy: Copy::Out, .. } => self.emit(b"HddcCZ"),
                Msg::Query { fails: true, .. } => self.emit(b"EZ"),
                Msg::Query { .. } => self.emit(b"TDCZ"),
                Msg::Parse { fails: true } | Msg::Bind { fails: true } | Msg::Execute { fails: true, .. } => {
                    self.emit(b"E");
                    self.mode = Mode::SkipToSync;
                }
                Msg::Parse { .. } => self.emit(b"1"),
                Msg::Bind { .. } => self.emit(b"2"),
                Msg::Describe => self.emit(b"tT"),
                Msg::Close => self.emit(b"3"),
                Msg::Execute { copy: Copy::In, .. } => {
                    self.emit(b"G");
                    self.mode = Mode::CopyIn { extended: true };
                }
                Msg::Execute { copy: Copy::Out, .. } => self.emit(b"HdcC"),
                Msg::Execute { .. } => self.emit(b"DC"),
                Msg::Sync => self.emit(b"Z"),
                Msg::Flush | Msg::CopyData { .. } | Msg::CopyDone | Msg::CopyFail => {}
            },
        }
    }

    /// Whether anything the client sent so far will still be answered.
    fn owes(&self) -> bool {
        let mut rest = self.clone();
        while !rest.input.is_empty() {
            rest.step();
        }
        !rest.output.is_empty() || matches!(rest.mode, Mode::CopyIn { .. })
    }
}

fn message() -> impl Strategy<Value = Msg> {
    let copy = prop_oneof![6 => Just(Copy::None), 1 => Just(Copy::In), 1 => Just(Copy::Out)];
    let fails = prop_oneof![5 => Just(false), 1 => Just(true)];
    prop_oneof![
        3 => (copy.clone(), fails.clone()).prop_map(|(copy, fails)| Msg::Query { copy, fails }),
        3 => fails.clone().prop_map(|fails| Msg::Parse { fails }),
        3 => fails.clone().prop_map(|fails| Msg::Bind { fails }),
        1 => Just(Msg::Describe),
        1 => Just(Msg::Close),
        3 => (copy, fails).prop_map(|(copy, fails)| Msg::Execute { copy, fails }),
        4 => Just(Msg::Sync),
        1 => Just(Msg::Flush),
        3 => prop_oneof![6 => Just(false), 1 => Just(true)].prop_map(|bad| Msg::CopyData { bad }),
        2 => Just(Msg::CopyDone),
        1 => Just(Msg::CopyFail),
    ]
}

/// What happens next: the client sends, PostgreSQL reads, or an answer reaches pgcorral.
#[derive(Debug, Clone, Copy)]
enum Turn {
    Send,
    Read,
    Answer,
}

fn turn() -> impl Strategy<Value = Turn> {
    prop_oneof![Just(Turn::Send), Just(Turn::Read), Just(Turn::Answer)]
}

/// The cases with no exact answer count, where the model pins the server instead: after copy
/// data, a Sync, or a message that is not copy data, which a COPY reader takes (and fails on)
/// or not, depending on whether a row failed first.
fn ambiguous_after_copy_rows(stream: &[Msg]) -> bool {
    stream.iter().enumerate().any(|(at, msg)| {
        matches!(msg, Msg::CopyData { .. })
            && stream[at + 1..]
                .iter()
                .find(|m| !matches!(m, Msg::CopyData { .. } | Msg::Flush))
                .is_some_and(|next| !matches!(next, Msg::CopyDone | Msg::CopyFail))
    })
}

fn run(stream: &[Msg], turns: &[Turn]) -> Result<(), TestCaseError> {
    let mut tracker = TxnTracker::default();
    let mut server = Server::new();
    let mut to_send = stream.iter().copied().collect::<VecDeque<_>>();
    let mut open_batch = false;
    let mut turns = turns.iter().copied().cycle().take(turns.len().max(1) * 4);
    loop {
        let turn = match turns.next() {
            Some(turn) => turn,
            // Afterwards everything happens, in a fixed order.
            None if !to_send.is_empty() => Turn::Send,
            None if !server.input.is_empty() => Turn::Read,
            None if !server.output.is_empty() => Turn::Answer,
            None => break,
        };
        match turn {
            Turn::Send => {
                if let Some(msg) = to_send.pop_front() {
                    tracker.client_sent(msg.tag());
                    server.input.push_back(msg);
                    match msg {
                        Msg::Parse { .. }
                        | Msg::Bind { .. }
                        | Msg::Describe
                        | Msg::Close
                        | Msg::Execute { .. } => open_batch = true,
                        Msg::Sync => open_batch = false,
                        _ => {}
                    }
                }
            }
            Turn::Read => server.step(),
            Turn::Answer => {
                if let Some(tag) = server.output.pop_front() {
                    tracker.server_sent(tag, (tag == b'Z').then_some(b'I'));
                }
            }
        }
        if tracker.quiet() {
            prop_assert!(
                server.output.is_empty() && !server.owes(),
                "called quiet while PostgreSQL owes an answer: {server:?}"
            );
            prop_assert!(!open_batch, "called quiet with an extended batch open");
        }
    }
    let settled = !open_batch && !matches!(server.mode, Mode::CopyIn { .. });
    if settled && !ambiguous_after_copy_rows(stream) {
        prop_assert!(tracker.quiet(), "everything answered, yet not quiet (pinned: {})", tracker.pinned());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn the_model_never_frees_a_server_that_owes_an_answer(
        stream in proptest::collection::vec(message(), 0..24),
        turns in proptest::collection::vec(turn(), 0..64),
    ) {
        run(&stream, &turns)?;
    }
}

/// Shrunk failures found while writing the model, kept as plain cases.
#[test]
fn kept_cases() {
    use Msg::*;
    let cases: Vec<Vec<Msg>> = vec![
        vec![
            Parse { fails: false },
            Bind { fails: false },
            Execute { copy: Copy::In, fails: false },
            Sync,
            CopyData { bad: false },
            CopyDone,
            Sync,
        ],
        vec![Execute { copy: Copy::In, fails: false }, Sync, Query { copy: Copy::None, fails: false }, Sync],
        vec![
            Bind { fails: true },
            Execute { copy: Copy::None, fails: false },
            Query { copy: Copy::None, fails: false },
            Sync,
        ],
        vec![
            Query { copy: Copy::In, fails: false },
            CopyData { bad: true },
            CopyData { bad: false },
            CopyDone,
        ],
        // A row fails before the reader reaches the Query: that Query is then answered.
        vec![
            Query { copy: Copy::In, fails: false },
            CopyData { bad: true },
            Query { copy: Copy::None, fails: false },
        ],
    ];
    for stream in cases {
        run(&stream, &[]).unwrap();
        run(&stream, &[Turn::Send, Turn::Send, Turn::Read, Turn::Answer, Turn::Read]).unwrap();
    }
}
