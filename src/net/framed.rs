//! One framed connection: a socket with the bytes read from it and not yet consumed (`inbox`)
//! and the bytes queued for it (`outbox`). Every conversation pgcorral holds goes through it:
//! a client's login, its relay and its admin console, and a server's login and the queries
//! pgcorral runs on it itself.
//!
//! Two ways of using it, one set of buffers:
//! - step by step (logins, the console, pgcorral's own queries): `read_until` a parser has a
//!   whole message, `send` what is queued, `say_goodbye` with a deadline;
//! - as a poll loop (the relay): `poll_fill` and `poll_send`, which the relay interleaves for
//!   both of its connections so that neither peer can block the other.
//!
//! Buffers are allocated when there is something to hold and let go when emptied, so that an
//! idle client or server holds none.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::Socket;
use crate::protocol::{header_at, Frame, ProtocolError};

/// How long pgcorral tries to deliver its last words (an error, a goodbye) to a peer it is
/// disconnecting: a client that reads nothing must not keep its task and buffers alive.
pub const GOODBYE_DEADLINE: Duration = Duration::from_secs(2);

/// Reads are made in chunks of this size into growable buffers.
const READ_CHUNK: usize = 8 * 1024;

/// A byte stream a [`Framed`] can sit on: pgcorral's [`Socket`], and in-memory pipes in tests.
pub trait Stream: AsyncRead + AsyncWrite + Unpin {
    /// Ready once a read would find data (or the end): lets an idle connection wait without a
    /// read buffer.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl Stream for Socket {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Socket::poll_read_ready(self, cx)
    }
}

impl Stream for tokio::io::DuplexStream {
    fn poll_read_ready(&self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Why a step-by-step read stopped.
#[derive(Debug, Error)]
pub enum ReadError<E> {
    /// The peer closed the connection before the message was whole.
    #[error("connection closed")]
    Closed,
    #[error(transparent)]
    Io(#[from] io::Error),
    /// What arrived cannot be read (the parser's own error).
    #[error("{0}")]
    Malformed(E),
}

#[derive(Debug)]
pub struct Framed<S = Socket> {
    pub socket: S,
    /// Read and not yet consumed.
    pub inbox: BytesMut,
    /// Queued to be sent.
    pub outbox: BytesMut,
}

impl<S: Stream> Framed<S> {
    pub fn new(socket: S) -> Self {
        Framed { socket, inbox: BytesMut::new(), outbox: BytesMut::new() }
    }

    /// Carries on a conversation another owner started: what it read ahead comes along.
    pub fn resume(socket: S, inbox: BytesMut) -> Self {
        Framed { socket, inbox, outbox: BytesMut::new() }
    }

    /// Writes as much of the outbox as the socket takes now; Ready(Ok) once it is empty. An
    /// emptied outbox lets go of its memory (usually a slice of some read buffer).
    pub fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.outbox.is_empty() {
            return Poll::Ready(Ok(()));
        }
        while !self.outbox.is_empty() {
            match ready!(Pin::new(&mut self.socket).poll_write(cx, &self.outbox)) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.outbox.advance(n),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        self.outbox = BytesMut::new();
        Poll::Ready(Ok(()))
    }

    /// Reads what is available into the inbox; Ready(Ok(0)) at the end of the stream. An
    /// empty inbox is only allocated once the socket is readable.
    pub fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.inbox.capacity() == 0 {
            ready!(self.socket.poll_read_ready(cx))?;
        }
        if self.inbox.capacity() - self.inbox.len() < READ_CHUNK / 2 {
            self.inbox.reserve(READ_CHUNK);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.socket), cx, &mut self.inbox)
    }

    /// Reads more; `Closed` at the end of the stream.
    pub async fn fill<E>(&mut self) -> Result<usize, ReadError<E>> {
        match poll_fn(|cx| self.poll_fill(cx)).await? {
            0 => Err(ReadError::Closed),
            n => Ok(n),
        }
    }

    /// Sends everything queued and flushes the socket (a TLS layer may hold bytes back).
    pub async fn send(&mut self) -> io::Result<()> {
        poll_fn(|cx| self.poll_send(cx)).await?;
        self.socket.flush().await
    }

    /// Sends what is queued if the peer takes it within [`GOODBYE_DEADLINE`]; whether it did.
    pub async fn say_goodbye(&mut self) -> bool {
        matches!(tokio::time::timeout(GOODBYE_DEADLINE, self.send()).await, Ok(Ok(())))
    }

    /// Reads until `parse` finds a whole unit at the front of the inbox, which it consumes.
    pub async fn read_until<T, E>(
        &mut self,
        mut parse: impl FnMut(&mut BytesMut) -> Result<Option<T>, E>,
    ) -> Result<T, ReadError<E>> {
        loop {
            if let Some(found) = parse(&mut self.inbox).map_err(ReadError::Malformed)? {
                return Ok(found);
            }
            self.fill().await?;
        }
    }

    /// Waits for the next message's tag and length (its body may still be on its way).
    pub async fn next_header(&mut self, max_len: usize) -> Result<Frame, ReadError<ProtocolError>> {
        loop {
            if let Some(frame) = header_at(&self.inbox, max_len).map_err(ReadError::Malformed)? {
                return Ok(frame);
            }
            self.fill().await?;
        }
    }

    /// Reads the whole next message and returns its tag and body (without tag and length).
    pub async fn read_message(&mut self, max_len: usize) -> Result<(u8, BytesMut), ReadError<ProtocolError>> {
        let frame = self.next_header(max_len).await?;
        self.inbox.reserve(frame.len.saturating_sub(self.inbox.len()));
        while self.inbox.len() < frame.len {
            self.fill().await?;
        }
        let mut message = self.inbox.split_to(frame.len);
        message.advance(5);
        Ok((frame.tag, message))
    }

    /// Drops the next `len` bytes, reading them as they come and holding none of them.
    pub async fn discard<E>(&mut self, mut len: usize) -> Result<(), ReadError<E>> {
        loop {
            let here = len.min(self.inbox.len());
            self.inbox.advance(here);
            len -= here;
            if len == 0 {
                return Ok(());
            }
            self.fill().await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt};

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[tokio::test]
    async fn messages_are_read_whole_whatever_the_chunks() {
        let (near, mut far) = duplex(7);
        let mut framed = Framed::new(near);
        let big = vec![b'x'; 100_000];
        let sender = tokio::spawn(async move {
            far.write_all(&message(b'Q', b"select 1\0")).await.unwrap();
            far.write_all(&message(b'd', &big)).await.unwrap();
            far.write_all(&message(b'X', b"")).await.unwrap();
        });
        assert_eq!(framed.read_message(1 << 20).await.unwrap(), (b'Q', BytesMut::from(&b"select 1\0"[..])));
        let (tag, body) = framed.read_message(1 << 20).await.unwrap();
        assert_eq!((tag, body.len()), (b'd', 100_000));
        assert_eq!(framed.read_message(1 << 20).await.unwrap().0, b'X');
        sender.await.unwrap();
        assert!(matches!(framed.read_message(1 << 20).await, Err(ReadError::Closed)));
    }

    #[tokio::test]
    async fn a_message_over_the_limit_is_refused_from_its_header() {
        let (near, mut far) = duplex(64);
        let mut framed = Framed::new(near);
        // Only the header is sent: the limit is applied before any body is awaited.
        far.write_all(&[b'Q', 0x7f, 0xff, 0xff, 0xff]).await.unwrap();
        match framed.read_message(1 << 20).await {
            Err(ReadError::Malformed(ProtocolError::TooLarge { .. })) => {}
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn discard_skips_a_body_larger_than_any_buffer() {
        let (near, mut far) = duplex(1024);
        let mut framed = Framed::new(near);
        let sender = tokio::spawn(async move {
            far.write_all(&vec![0u8; 1 << 20]).await.unwrap();
            far.write_all(&message(b'Z', b"I")).await.unwrap();
        });
        framed.discard::<()>(1 << 20).await.unwrap();
        assert!(framed.inbox.capacity() < 64 * 1024, "discarded bytes are not held");
        assert_eq!(framed.read_message(16).await.unwrap(), (b'Z', BytesMut::from(&b"I"[..])));
        sender.await.unwrap();
    }

    #[tokio::test]
    async fn an_emptied_outbox_holds_no_memory() {
        let (near, mut far) = duplex(1 << 16);
        let mut framed = Framed::new(near);
        framed.outbox.extend_from_slice(&[1u8; 4096]);
        framed.send().await.unwrap();
        assert_eq!(framed.outbox.capacity(), 0);
        let mut got = vec![0u8; 4096];
        far.read_exact(&mut got).await.unwrap();
    }

    #[tokio::test]
    async fn goodbye_gives_up_on_a_peer_that_reads_nothing() {
        let (near, _far) = duplex(16);
        let mut framed = Framed::new(near);
        framed.outbox.extend_from_slice(&[0u8; 1024]);
        assert!(!framed.say_goodbye().await);
    }
}
