//! The runtime library's error type. Messages reuse runc's wording where
//! clients (podman, containerd, runtime-tools) match on substrings.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("container does not exist")]
    NotExist,
    #[error("container with given ID already exists")]
    Exists,
    #[error("{0}")]
    InvalidId(String),
    #[error("container not running")]
    NotRunning,
    #[error("cannot exec in a paused container")]
    Paused,
    #[error("container not paused")]
    NotPaused,
    #[error("container still running")]
    StillRunning,
    #[error("cannot delete container {id} that is not stopped: {status}")]
    NotStopped { id: String, status: String },
    #[error("cannot start a container that has stopped")]
    StartStopped,
    #[error("cannot start an already running container")]
    AlreadyRunning,
    #[error("{0}")]
    InvalidInput(String),
    #[error("{0} is not implemented yet")]
    NotImplemented(&'static str),
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error("guest: {0}")]
    Guest(String),
    #[error("vm: {0}")]
    Vm(String),
    #[error("network: {0}")]
    Network(String),
    #[error("pool: {0}")]
    Pool(String),
    #[error(transparent)]
    Protocol(#[from] krun_oci_protocol::ProtocolError),
    #[error(transparent)]
    Spec(#[from] oci_spec::OciSpecError),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Sys(#[from] nix::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Attaches what was being done to an io::Error.
pub trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: context(),
            source,
        })
    }
}

/// strerror-like text in lower case, as Go prints it ("no such file or directory").
pub fn errno_text(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => nix::errno::Errno::from_raw(n).desc().to_lowercase(),
        None => e.to_string(),
    }
}
