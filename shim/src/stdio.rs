//! The container's stdio: containerd's fifos (or a terminal) turned into the
//! three fds the VM monitor (or an exec relay) runs with.
//!
//! - stdout/stderr: the fifo itself is handed over (opened write-only while
//!   containerd already reads it, read-write otherwise so the open never blocks).
//! - stdin: a pipe whose write end the shim feeds from the fifo, so the process
//!   sees EOF when the client closes its side or containerd asks CloseIO.
//! - terminal: the shim listens on a console socket, receives the pty master
//!   (SCM_RIGHTS) and relays master <-> fifos.

use std::fs::{File, OpenOptions};
use std::io::{IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

use crate::error::{Error, Result};

/// The paths containerd gave for one process.
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// Live stdio of one process: what CloseIO and ResizePty act on.
#[derive(Default)]
pub struct StdioHandle {
    /// Set by CloseIO: the stdin relay stops and closes the process's stdin.
    stdin_closed: Arc<AtomicBool>,
    /// The pty master, once the console socket delivered it.
    master: Arc<Mutex<Option<Arc<OwnedFd>>>>,
}

impl StdioHandle {
    pub fn close_stdin(&self) {
        self.stdin_closed.store(true, Ordering::SeqCst);
    }

    /// Sets the terminal size (a no-op without a terminal).
    pub fn resize(&self, width: u32, height: u32) -> Result<bool> {
        let Some(master) = self.master.lock().unwrap().clone() else {
            return Ok(false);
        };
        let ws = libc::winsize {
            ws_row: height.min(u16::MAX as u32) as u16,
            ws_col: width.min(u16::MAX as u32) as u16,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize from the pointer we pass.
        if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(true)
    }
}

/// What a process is started with: its three fds, and the console socket to
/// pass to krun-oci when it has a terminal.
pub struct PreparedStdio {
    pub fds: [Arc<OwnedFd>; 3],
    pub console_socket: Option<ConsoleSocket>,
    pub handle: StdioHandle,
}

fn dev_null() -> Result<OwnedFd> {
    Ok(OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?
        .into())
}

/// Opens an output path containerd gave: a fifo, `file://PATH`, or nothing.
fn open_output(path: &str) -> Result<OwnedFd> {
    if path.is_empty() {
        return dev_null();
    }
    if let Some(file) = path.strip_prefix("file://") {
        return Ok(OpenOptions::new()
            .append(true)
            .create(true)
            .open(file)?
            .into());
    }
    if path.contains("://") {
        return Err(Error::Unimplemented(format!(
            "stdio URI {path}: only fifos and file:// are supported"
        )));
    }
    // Write-only while a reader exists (containerd opens its side first), so a
    // vanished reader means EPIPE, not a writer blocked forever.
    match OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => {
            let fd: OwnedFd = f.into();
            set_blocking(&fd)?;
            Ok(fd)
        }
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
            Ok(OpenOptions::new().read(true).write(true).open(path)?.into())
        }
        Err(e) => Err(Error::Internal(format!("opening {path}: {e}"))),
    }
}

fn set_blocking(fd: &impl AsFd) -> Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags & !OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Opens the stdin fifo without blocking (containerd may open its end later).
fn open_stdin_fifo(path: &str) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::Internal(format!("opening {path}: {e}")))
}

/// Copies the stdin fifo into `sink` until the client closes it or CloseIO.
/// The fifo is polled, never read blindly: with no writer yet, read() says EOF.
fn relay_stdin(mut fifo: File, mut sink: File, closed: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 32 * 1024];
        while !closed.load(Ordering::SeqCst) {
            let mut fds = [PollFd::new(fifo.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(200u16)) {
                Ok(0) => continue,
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => break,
            }
            match fifo.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if sink.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        // Dropping the sink is the process's EOF.
    });
}

/// Prepares stdio for a process. `socket_dir` holds the console socket when a
/// terminal is asked for (its path must stay short: sun_path has 108 bytes).
pub fn prepare(paths: &StdioPaths, socket_dir: &Path, name: &str) -> Result<PreparedStdio> {
    let handle = StdioHandle::default();
    if paths.terminal {
        let console = ConsoleSocket::bind(socket_dir, name)?;
        let null = Arc::new(dev_null()?);
        return Ok(PreparedStdio {
            fds: [null.clone(), null.clone(), null],
            console_socket: Some(console),
            handle,
        });
    }
    let stdin: OwnedFd = if paths.stdin.is_empty() {
        dev_null()?
    } else {
        let fifo = open_stdin_fifo(&paths.stdin)?;
        let (r, w) = nix::unistd::pipe()?;
        relay_stdin(fifo, File::from(w), handle.stdin_closed.clone());
        r
    };
    let stdout = open_output(&paths.stdout)?;
    let stderr = open_output(&paths.stderr)?;
    Ok(PreparedStdio {
        fds: [Arc::new(stdin), Arc::new(stdout), Arc::new(stderr)],
        console_socket: None,
        handle,
    })
}

/// A unix socket krun-oci sends the pty master to (runc's console-socket protocol).
pub struct ConsoleSocket {
    pub path: PathBuf,
    listener: Option<UnixListener>,
}

impl ConsoleSocket {
    fn bind(dir: &Path, name: &str) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .map_err(|e| Error::Internal(format!("binding {}: {e}", path.display())))?;
        Ok(Self {
            path,
            listener: Some(listener),
        })
    }

    /// Accepts the master on a thread and relays it to/from the fifos.
    pub fn serve(&mut self, paths: &StdioPaths, handle: &StdioHandle) {
        let Some(listener) = self.listener.take() else {
            return;
        };
        let paths = paths.clone();
        let master_slot = handle.master.clone();
        let closed = handle.stdin_closed.clone();
        let path = self.path.clone();
        std::thread::spawn(move || {
            let master = accept_master(&listener);
            drop(listener);
            let _ = std::fs::remove_file(&path);
            let master = match master {
                Ok(Some(m)) => Arc::new(m),
                Ok(None) => return,
                Err(e) => {
                    log::warn!("console socket {}: {e}", path.display());
                    return;
                }
            };
            *master_slot.lock().unwrap() = Some(master.clone());
            if !paths.stdin.is_empty() {
                match (open_stdin_fifo(&paths.stdin), master.try_clone()) {
                    (Ok(fifo), Ok(m)) => relay_stdin(fifo, File::from(m), closed),
                    (Err(e), _) => log::warn!("{e}"),
                    (_, Err(e)) => log::warn!("dup pty master: {e}"),
                }
            }
            let out = match open_output(&paths.stdout) {
                Ok(o) => o,
                Err(e) => {
                    log::warn!("{e}");
                    return;
                }
            };
            let mut out = File::from(out);
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                // EIO once the last slave fd closed: the process is gone.
                match nix::unistd::read(master.as_fd(), &mut buf) {
                    Ok(0) | Err(nix::errno::Errno::EIO) => break,
                    Ok(n) => {
                        if out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    Err(nix::errno::Errno::EINTR) | Err(nix::errno::Errno::EAGAIN) => {}
                    Err(_) => break,
                }
            }
        });
    }

    /// Unblocks a `serve` thread whose sender never came (create failed).
    pub fn cancel(&self) {
        let _ = std::os::unix::net::UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Receives one fd over the first connection: `Ok(None)` if it carried none.
fn accept_master(listener: &UnixListener) -> Result<Option<OwnedFd>> {
    let (stream, _) = listener.accept()?;
    let mut buf = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(f) = c {
            fds.extend(f);
        }
    }
    // SAFETY: SCM_RIGHTS installed these fds in our table; we own them now.
    let mut owned: Vec<OwnedFd> = fds
        .into_iter()
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    Ok(if owned.is_empty() {
        None
    } else {
        Some(owned.swap_remove(0))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdin_relay_ends_with_the_clients_close() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("stdin");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let paths = StdioPaths {
            stdin: fifo.to_string_lossy().into(),
            ..Default::default()
        };
        let prepared = prepare(&paths, dir.path(), "t").unwrap();
        // No writer yet: the process must not see EOF.
        let mut input = File::from(prepared.fds[0].try_clone().unwrap());
        let mut w = OpenOptions::new().write(true).open(&fifo).unwrap();
        w.write_all(b"hello").unwrap();
        drop(w);
        let mut got = String::new();
        input.read_to_string(&mut got).unwrap();
        assert_eq!(got, "hello");
    }

    #[test]
    fn outputs_open_without_a_reader_and_empty_paths_are_dev_null() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("stdout");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let paths = StdioPaths {
            stdout: fifo.to_string_lossy().into(),
            ..Default::default()
        };
        let prepared = prepare(&paths, dir.path(), "t").unwrap();
        let mut out = File::from(prepared.fds[1].try_clone().unwrap());
        out.write_all(b"x").unwrap();
        let file = dir.path().join("log");
        let fd = open_output(&format!("file://{}", file.display())).unwrap();
        File::from(fd).write_all(b"y").unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"y");
        assert!(matches!(
            open_output("binary:///x"),
            Err(Error::Unimplemented(_))
        ));
    }

    #[test]
    fn console_socket_receives_the_master() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        nix::unistd::mkfifo(&out, nix::sys::stat::Mode::S_IRWXU).unwrap();
        // Read-write: a read waits for data instead of seeing EOF before the relay opens its end.
        let mut reader = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&out)
            .unwrap();
        let paths = StdioPaths {
            stdout: out.to_string_lossy().into(),
            terminal: true,
            ..Default::default()
        };
        let mut prepared = prepare(&paths, dir.path(), "c").unwrap();
        let mut console = prepared.console_socket.take().unwrap();
        console.serve(&paths, &prepared.handle);
        // What krun-oci does: send the master, keep the slave.
        let pty = krun_oci::console::send_pty_to_console_socket(&console.path).unwrap();
        nix::unistd::write(&pty.slave, b"tty says hi").unwrap();
        let mut buf = [0u8; 11];
        reader.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"tty says hi");
        while prepared.handle.master.lock().unwrap().is_none() {
            std::thread::yield_now();
        }
        assert!(prepared.handle.resize(100, 40).unwrap());
        assert_eq!(krun_oci::console::window_size(&pty.slave), Some((40, 100)));
    }
}
