//! Listening sockets and the dial to the host: AF_VSOCK in a VM, unix sockets in
//! the host-sandbox harness (`<dir>/guest-<port>.sock`, `<dir>/host-<port>.sock`,
//! the same naming as the runtime's `GuestLink::PortSockets`).
//!
//! Accepted and dialed connections of either family are handed out as
//! `UnixStream`s: std's UnixStream is used here only as an owned stream-socket
//! handle (read/write/shutdown/try_clone work on any stream socket; nothing
//! address-specific is called on it).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use krun_oci_protocol::contract;
use nix::sys::socket::{
    accept4, bind, connect, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};

/// Where ports live.
pub enum Transport {
    Vsock,
    /// Host-sandbox harness: unix sockets in `dir`. `dir_fd` (O_PATH) keeps the
    /// directory reachable after init has pivoted into the container root.
    Unix {
        dir: PathBuf,
        dir_fd: OwnedFd,
    },
}

pub struct Listener {
    fd: OwnedFd,
    pub port: u32,
}

const VMADDR_CID_ANY: u32 = u32::MAX;

impl Transport {
    pub fn unix(dir: PathBuf) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(&dir)?;
        Ok(Transport::Unix {
            dir,
            dir_fd: OwnedFd::from(f),
        })
    }

    /// Binds and listens on guest port `port` (a host connect queues from now on).
    pub fn listen(&self, port: u32) -> io::Result<Listener> {
        let fd = match self {
            Transport::Vsock => {
                let fd = socket(
                    AddressFamily::Vsock,
                    SockType::Stream,
                    SockFlag::SOCK_CLOEXEC,
                    None,
                )?;
                bind(fd.as_raw_fd(), &VsockAddr::new(VMADDR_CID_ANY, port))?;
                listen(&fd, Backlog::new(128).unwrap_or(Backlog::MAXCONN))?;
                fd
            }
            Transport::Unix { dir, .. } => {
                // Bound and listening under a temporary name, then renamed: once
                // the socket file exists, a connect queues (never ECONNREFUSED).
                let path = dir.join(contract::guest_port_socket(port));
                let tmp = dir.join(format!(".guest-{port}.sock.tmp"));
                let _ = std::fs::remove_file(&tmp);
                let l = UnixListener::bind(&tmp)?;
                std::fs::rename(&tmp, &path)?;
                OwnedFd::from(l)
            }
        };
        Ok(Listener { fd, port })
    }

    /// Connects to host port `port`.
    pub fn dial_host(&self, port: u32) -> io::Result<UnixStream> {
        match self {
            Transport::Vsock => {
                let fd = socket(
                    AddressFamily::Vsock,
                    SockType::Stream,
                    SockFlag::SOCK_CLOEXEC,
                    None,
                )?;
                connect(
                    fd.as_raw_fd(),
                    &VsockAddr::new(krun_oci_protocol::HOST_CID, port),
                )?;
                Ok(UnixStream::from(fd))
            }
            Transport::Unix { dir_fd, .. } => UnixStream::connect(format!(
                "/proc/self/fd/{}/{}",
                dir_fd.as_raw_fd(),
                contract::host_port_socket(port)
            )),
        }
    }
}

impl Listener {
    pub fn accept(&self) -> io::Result<UnixStream> {
        let fd = accept4(self.fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
        // SAFETY: accept4 returned a fresh descriptor that nothing else owns.
        Ok(UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
}
