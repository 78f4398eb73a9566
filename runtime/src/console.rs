//! Terminals: the host side of `process.terminal` and `exec -t`.
//!
//! krun-oci opens a host pty pair, hands the master to the client's console
//! socket (one `sendmsg`: data = the pty's name, SCM_RIGHTS = exactly one fd),
//! and relays between the slave and the guest's pty. The slave is put in raw
//! mode so the only line discipline is the guest's.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use nix::pty::{openpty, OpenptyResult, Winsize};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use nix::sys::termios;

use crate::error::{Error, IoContext, Result};

/// A host pty whose master was sent to a console socket.
pub struct HostPty {
    /// Our end: the guest's output is written here, the user's input read here.
    pub slave: OwnedFd,
}

/// Opens a pty pair, sends the master to `socket`, and returns the slave (raw mode).
pub fn send_pty_to_console_socket(socket: &Path) -> Result<HostPty> {
    let OpenptyResult { master, slave } = openpty(None, None)?;
    let name = nix::unistd::ttyname(&slave)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "/dev/pts/?".into());
    let mut attrs = termios::tcgetattr(&slave)?;
    termios::cfmakeraw(&mut attrs);
    termios::tcsetattr(&slave, termios::SetArg::TCSANOW, &attrs)?;
    let stream = UnixStream::connect(socket)
        .ctx(|| format!("connecting to console socket {}", socket.display()))?;
    let fds = [master.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [IoSlice::new(name.as_bytes())];
    sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
        .map_err(|e| Error::InvalidInput(format!("sending pty master to console socket: {e}")))?;
    // The client owns the master now; our copy closes here.
    drop(master);
    // When we lead a session without a terminal (the monitor, the exec relay), the
    // slave becomes our controlling terminal, so the client's window-size changes
    // arrive as SIGWINCH and its hang-up as SIGHUP — both forwarded to the guest.
    // SAFETY: TIOCSCTTY takes an integer argument; failure just means we keep none.
    unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSCTTY, 0) };
    Ok(HostPty { slave })
}

/// Current window size of a terminal fd.
pub fn window_size(fd: &impl AsRawFd) -> Option<(u16, u16)> {
    let mut ws = Winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a Winsize into the pointer we pass.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0).then_some((ws.ws_row, ws.ws_col))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{recvmsg, ControlMessageOwned};
    use std::io::IoSliceMut;
    use std::os::unix::net::UnixListener;

    #[test]
    fn master_arrives_with_one_fd_and_the_name() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("console.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let receiver = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 256];
            let mut iov = [IoSliceMut::new(&mut buf)];
            let mut space = nix::cmsg_space!([std::os::fd::RawFd; 4]);
            let msg = recvmsg::<()>(s.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::empty())
                .unwrap();
            let mut fds = Vec::new();
            for c in msg.cmsgs().unwrap() {
                if let ControlMessageOwned::ScmRights(f) = c {
                    fds.extend(f);
                }
            }
            let n = msg.bytes;
            (String::from_utf8_lossy(&buf[..n]).into_owned(), fds)
        });
        let pty = send_pty_to_console_socket(&sock).unwrap();
        let (name, fds) = receiver.join().unwrap();
        assert!(name.starts_with("/dev/pts/"), "{name}");
        assert_eq!(fds.len(), 1);
        // Bytes written to the master come out of the slave.
        nix::unistd::write(
            // SAFETY: fds[0] was just received and stays open for this call.
            unsafe { std::os::fd::BorrowedFd::borrow_raw(fds[0]) },
            b"hi",
        )
        .unwrap();
        let mut b = [0u8; 2];
        nix::unistd::read(&pty.slave, &mut b).unwrap();
        assert_eq!(&b, b"hi");
        nix::unistd::close(fds[0]).unwrap();
    }
}
