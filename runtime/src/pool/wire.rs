//! The pool's sockets: `SOCK_SEQPACKET` unix sockets carrying one JSON message
//! per packet, with fds alongside (`SCM_RIGHTS`). Packets are bounded; a peer
//! that sends more, or garbage, gets an error, never a panic.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{
    self, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};

/// Largest message body accepted.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Most fds one message carries (a root, a lifeline, a netns and the binds).
pub const MAX_FDS: usize = 64;

fn wire(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Pool(format!("{what}: {e}"))
}

fn seqpacket() -> Result<OwnedFd> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| wire("creating a socket", e))
}

/// Binds and listens at `path` (a stale socket file there is replaced).
pub fn listen(path: &Path) -> Result<OwnedFd> {
    let _ = std::fs::remove_file(path);
    let fd = seqpacket()?;
    let addr = UnixAddr::new(path).map_err(|e| wire(&format!("{}", path.display()), e))?;
    socket::bind(fd.as_raw_fd(), &addr)
        .map_err(|e| wire(&format!("binding {}", path.display()), e))?;
    socket::listen(
        &fd,
        socket::Backlog::new(64).unwrap_or(socket::Backlog::MAXCONN),
    )
    .map_err(|e| wire(&format!("listening on {}", path.display()), e))?;
    Ok(fd)
}

/// Connects to `path`; every later receive waits at most `timeout`.
pub fn connect(path: &Path, timeout: Duration) -> Result<OwnedFd> {
    let fd = seqpacket()?;
    let addr = UnixAddr::new(path).map_err(|e| wire(&format!("{}", path.display()), e))?;
    socket::connect(fd.as_raw_fd(), &addr)
        .map_err(|e| wire(&format!("connecting to {}", path.display()), e))?;
    set_timeout(&fd, timeout)?;
    Ok(fd)
}

/// Waits until `fd` is readable (`true`: a connection waits on a listener, a
/// peer wrote or hung up) or `timeout` passes (`false`; `None`: no limit).
pub fn readable(fd: &impl AsFd, timeout: Option<Duration>) -> Result<bool> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let timeout = match timeout {
        Some(t) => PollTimeout::try_from(t).unwrap_or(PollTimeout::MAX),
        None => PollTimeout::NONE,
    };
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, timeout) {
        Ok(n) => Ok(n > 0),
        Err(nix::errno::Errno::EINTR) => Ok(false),
        Err(e) => Err(wire("waiting for input", e)),
    }
}

/// Accepts one connection (the listener may be non-blocking: `None` when none waits).
pub fn accept(listener: &OwnedFd, timeout: Duration) -> Result<Option<OwnedFd>> {
    match socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
        Ok(fd) => {
            // SAFETY: accept4 returned a fresh fd that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            set_timeout(&fd, timeout)?;
            Ok(Some(fd))
        }
        Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => Ok(None),
        Err(e) => Err(wire("accepting a connection", e)),
    }
}

fn set_timeout(fd: &OwnedFd, timeout: Duration) -> Result<()> {
    let tv = nix::sys::time::TimeVal::new(
        timeout.as_secs() as libc::time_t,
        timeout.subsec_micros() as libc::suseconds_t,
    );
    socket::setsockopt(fd, socket::sockopt::ReceiveTimeout, &tv)
        .and_then(|()| socket::setsockopt(fd, socket::sockopt::SendTimeout, &tv))
        .map_err(|e| wire("setting a socket timeout", e))
}

/// Sends `msg` with `fds` in one packet.
pub fn send<T: Serialize>(sock: &impl AsFd, msg: &T, fds: &[BorrowedFd<'_>]) -> Result<()> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_MESSAGE || fds.len() > MAX_FDS {
        return Err(Error::Pool(format!(
            "message of {} bytes and {} fds is too large",
            body.len(),
            fds.len()
        )));
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs = if raw.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&raw)]
    };
    socket::sendmsg::<()>(
        sock.as_fd().as_raw_fd(),
        &[IoSlice::new(&body)],
        &cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(|e| wire("sending", e))?;
    Ok(())
}

/// Receives one packet: the message and the fds that came with it. A closed
/// peer, a truncated or malformed packet is an error.
pub fn recv<T: DeserializeOwned>(sock: &impl AsFd) -> Result<(T, Vec<OwnedFd>)> {
    let mut body = vec![0u8; MAX_MESSAGE + 1];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (len, truncated, fds) = {
        let mut iov = [IoSliceMut::new(&mut body)];
        let msg = socket::recvmsg::<()>(
            sock.as_fd().as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| wire("receiving", e))?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(|e| wire("receiving", e))? {
            if let ControlMessageOwned::ScmRights(received) = c {
                // SAFETY: the kernel installed these fds for us; nothing else owns them.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        let truncated = msg
            .flags
            .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
        (msg.bytes, truncated, fds)
    };
    if len == 0 {
        return Err(Error::Pool("the peer closed the connection".into()));
    }
    if truncated || len > MAX_MESSAGE {
        return Err(Error::Pool("a message over the size limit".into()));
    }
    let msg = serde_json::from_slice(&body[..len])
        .map_err(|e| Error::Pool(format!("a malformed message: {e}")))?;
    Ok((msg, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_fds_cross_and_garbage_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("s");
        let listener = listen(&path).unwrap();
        let client = connect(&path, Duration::from_secs(5)).unwrap();
        let server = loop {
            if let Some(s) = accept(&listener, Duration::from_secs(5)).unwrap() {
                break s;
            }
        };
        let (r, w) = nix::unistd::pipe().unwrap();
        send(&client, &vec!["hello".to_string()], &[w.as_fd()]).unwrap();
        drop(w);
        let (msg, fds): (Vec<String>, _) = recv(&server).unwrap();
        assert_eq!(msg, ["hello"]);
        assert_eq!(fds.len(), 1);
        nix::unistd::write(&fds[0], b"x").unwrap();
        let mut b = [0u8; 1];
        nix::unistd::read(&r, &mut b).unwrap();
        assert_eq!(&b, b"x");
        // Not JSON: an error, not a panic.
        socket::send(client.as_raw_fd(), b"\xff{", MsgFlags::empty()).unwrap();
        assert!(recv::<Vec<String>>(&server).is_err());
        drop(client);
        assert!(recv::<Vec<String>>(&server).is_err());
    }
}
