//! Passing open sockets between processes over a Unix socket (SCM_RIGHTS), for the online
//! restart: the old process's listening sockets and idle clients go to the new one.
//!
//! A blocking channel of [`crate::takeover::Message`]s, each sent with the descriptors it
//! carries. Descriptors travel attached to the first byte of their message; the receiver
//! collects them as they arrive and hands each message the ones that came with it, in order.
//! The standard library has no stable API for ancillary data, hence the two `libc` calls.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use crate::takeover::{Message, TakeoverError};

/// The most descriptors one message may carry (a process with many workers and addresses
/// hands over one listening socket per worker and address).
const MAX_FDS: usize = 512;

/// One end of the takeover conversation.
pub struct FdChannel {
    stream: UnixStream,
    inbox: Vec<u8>,
    fds: std::collections::VecDeque<OwnedFd>,
}

impl FdChannel {
    pub fn new(stream: UnixStream) -> FdChannel {
        FdChannel { stream, inbox: Vec::new(), fds: Default::default() }
    }

    pub fn try_clone(&self) -> io::Result<FdChannel> {
        Ok(FdChannel::new(self.stream.try_clone()?))
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Sends `message` with `fds` (as many as the message says it carries).
    pub fn send(&mut self, message: &Message, fds: &[RawFd]) -> io::Result<()> {
        assert_eq!(fds.len(), message.descriptors(), "a message carries the descriptors its kind says");
        let bytes = message.encode();
        let sent = send_with_fds(self.stream.as_raw_fd(), &bytes, fds)?;
        // The rest, if the socket took only part: the descriptors went with the first byte.
        use std::io::Write;
        self.stream.write_all(&bytes[sent..])
    }

    /// The next message and the descriptors it carries; Ok(None) at the end of the stream.
    pub fn receive(&mut self) -> io::Result<Option<(Message, Vec<OwnedFd>)>> {
        loop {
            match Message::decode(&self.inbox).map_err(invalid)? {
                Some((message, len)) => {
                    self.inbox.drain(..len);
                    let wanted = message.descriptors();
                    if self.fds.len() < wanted {
                        return Err(invalid(TakeoverError::Malformed {
                            kind: '?',
                            what: "a message without the descriptors it carries",
                        }));
                    }
                    let fds = self.fds.drain(..wanted).collect();
                    return Ok(Some((message, fds)));
                }
                None => {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut received = Vec::new();
                    let n = recv_with_fds(self.stream.as_raw_fd(), &mut buf, &mut received)?;
                    self.fds.extend(received);
                    if n == 0 {
                        return if self.inbox.is_empty() {
                            Ok(None)
                        } else {
                            Err(io::Error::new(io::ErrorKind::UnexpectedEof, "takeover message cut short"))
                        };
                    }
                    self.inbox.extend_from_slice(&buf[..n]);
                }
            }
        }
    }
}

fn invalid(e: TakeoverError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// `sendmsg` with the descriptors as SCM_RIGHTS; returns how many bytes went.
fn send_with_fds(socket: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    let fd_bytes = std::mem::size_of_val(fds) as u32;
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    let mut control = vec![0u8; if fds.is_empty() { 0 } else { space }];
    // SAFETY: msghdr is plain data; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = control.len() as _;
        // SAFETY: the control buffer is CMSG_SPACE(fd_bytes) long, room for one header and
        // the descriptors.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg) as *mut RawFd, fds.len());
        }
    }
    loop {
        // SAFETY: msg points at live buffers for the duration of the call.
        let n = unsafe { libc::sendmsg(socket, &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// `recvmsg` into `buf`; descriptors that came with the bytes are appended to `fds`, owned.
fn recv_with_fds(socket: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr() as *mut libc::c_void, iov_len: buf.len() };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: msghdr is plain data; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = control.len() as _;
    let n = loop {
        // SAFETY: msg points at live buffers; MSG_CMSG_CLOEXEC keeps received descriptors out
        // of any child process.
        let n = unsafe { libc::recvmsg(socket, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };
    // SAFETY: walks the control messages the kernel wrote, within msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg) as *const RawFd;
                let count =
                    ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "more descriptors than a takeover message carries",
        ));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::takeover::{ListenerKind, MovedClient};
    use std::io::{Read, Write};

    #[test]
    fn sockets_cross_with_their_messages_in_order() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut send, mut receive) = (FdChannel::new(a), FdChannel::new(b));
        let (left1, mut right1) = UnixStream::pair().unwrap();
        let (left2, mut right2) = UnixStream::pair().unwrap();
        let big = MovedClient { database: "x".repeat(200_000), ..MovedClient::default() };
        let sender = std::thread::spawn(move || {
            send.send(&Message::Listeners(vec![ListenerKind::Tcp]), &[left1.as_raw_fd()]).unwrap();
            send.send(&Message::Client(Box::new(big)), &[left2.as_raw_fd()]).unwrap();
            send.send(&Message::Done, &[]).unwrap();
        });
        let (first, fds1) = receive.receive().unwrap().unwrap();
        assert_eq!(first, Message::Listeners(vec![ListenerKind::Tcp]));
        let (second, fds2) = receive.receive().unwrap().unwrap();
        assert!(matches!(&second, Message::Client(c) if c.database.len() == 200_000));
        assert_eq!(receive.receive().unwrap().unwrap().0, Message::Done);
        sender.join().unwrap();
        assert!(receive.receive().unwrap().is_none(), "then the end of the stream");
        // Each received descriptor is the socket that was sent: what is written on one end
        // comes out of the other.
        for (fd, peer) in [(fds1, &mut right1), (fds2, &mut right2)] {
            let mut moved = UnixStream::from(fd.into_iter().next().unwrap());
            moved.write_all(b"hi").unwrap();
            let mut got = [0u8; 2];
            peer.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"hi");
        }
    }
}
