//! The runtime library's error type. Messages reuse runc's wording where
//! clients (podman, containerd, runtime-tools) match on substrings; callers
//! decide what to do from [`Error::kind`], never from the text (the CLI's exit
//! status, the shim's ttrpc code).

use std::io;

use serde::{Deserialize, Serialize};

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
    /// `op` cannot be done in the container's `status` (`creating`, `paused`...).
    #[error("cannot {op} a container in the {status} state")]
    WrongState { op: &'static str, status: String },
    /// `op` needs the guest to answer, and a paused (frozen) guest cannot.
    #[error("cannot {op} a paused container: resume it first")]
    ResumeFirst { op: &'static str },
    /// The container's record names no host cgroup (an older krun-oci made it),
    /// and the operation needs one; the text says which.
    #[error("{0}")]
    NoHostCgroup(String),
    /// `spec` found a config.json in the bundle (runc's wording).
    #[error("File config.json exists. Remove it first")]
    ConfigExists,
    /// No pool daemon answers on the root's socket.
    #[error("pool: no pool is serving {} ({reason})", .root.display())]
    NoPool {
        root: std::path::PathBuf,
        reason: String,
    },
    /// Another pool daemon holds the root's pool lock.
    #[error("pool: a pool is already serving {}", .root.display())]
    PoolAlreadyServing { root: std::path::PathBuf },
    /// The process's program is not in the container (`detail`: runc's words,
    /// "executable file not found in $PATH" or "stat X: no such file or directory").
    #[error("exec: {arg0:?}: {detail}")]
    ExecutableNotFound { arg0: String, detail: String },
    /// The program exists but cannot be run (a directory, no exec bit).
    #[error("exec: {arg0:?}: permission denied")]
    PermissionDenied { arg0: String },
    /// The VM did not come up, or its guest failed before the container was created.
    #[error("{reason}{}", console_suffix(.console_tail))]
    BootFailed {
        reason: String,
        console_tail: String,
    },
    /// An OCI hook exited non-zero or timed out.
    #[error("error running {hook} hook {path}: {reason}")]
    HookFailed {
        hook: String,
        path: String,
        reason: String,
    },
    /// guest-init answered a request with a refusal.
    #[error("{context}: {reason}")]
    GuestRefused {
        context: &'static str,
        reason: String,
        kind: Option<krun_oci_protocol::RefusalKind>,
    },
    /// An error one of our helper processes (the VM monitor, the exec relay)
    /// reported across its sync pipe: the kind survives the crossing.
    #[error("{message}")]
    Reported { kind: ErrorKind, message: String },
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

fn console_suffix(tail: &str) -> String {
    match tail.trim() {
        "" => String::new(),
        t => format!("; console: {t}"),
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// What kind of failure an [`Error`] is: what the CLI's exit status and the
/// shim's ttrpc code are chosen by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The container (or process, or the pool serving the root) does not exist.
    NotFound,
    /// The container (or `spec`'s config.json, or a pool for the root) exists already.
    AlreadyExists,
    /// The container is not in a state that allows the operation.
    WrongState,
    /// The caller's input (flags, config, id) is wrong.
    InvalidArgument,
    ExecutableNotFound,
    PermissionDenied,
    Unimplemented,
    BootFailed,
    HookFailed,
    GuestRefused,
    /// Anything else: the host or the guest failed.
    Internal,
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        use krun_oci_protocol::RefusalKind;
        match self {
            Error::NotExist | Error::NoPool { .. } => ErrorKind::NotFound,
            Error::Exists | Error::ConfigExists | Error::PoolAlreadyServing { .. } => {
                ErrorKind::AlreadyExists
            }
            Error::NotRunning
            | Error::Paused
            | Error::NotPaused
            | Error::StillRunning
            | Error::NotStopped { .. }
            | Error::StartStopped
            | Error::AlreadyRunning
            | Error::WrongState { .. }
            | Error::ResumeFirst { .. }
            | Error::NoHostCgroup(_) => ErrorKind::WrongState,
            Error::InvalidId(_) | Error::InvalidInput(_) | Error::Spec(_) | Error::Json(_) => {
                ErrorKind::InvalidArgument
            }
            Error::ExecutableNotFound { .. } => ErrorKind::ExecutableNotFound,
            Error::PermissionDenied { .. } => ErrorKind::PermissionDenied,
            Error::NotImplemented(_) => ErrorKind::Unimplemented,
            Error::BootFailed { .. } => ErrorKind::BootFailed,
            Error::HookFailed { .. } => ErrorKind::HookFailed,
            Error::GuestRefused { kind, .. } => match kind {
                Some(RefusalKind::ExecutableNotFound) => ErrorKind::ExecutableNotFound,
                Some(RefusalKind::PermissionDenied) => ErrorKind::PermissionDenied,
                None => ErrorKind::GuestRefused,
            },
            Error::Reported { kind, .. } => *kind,
            Error::Io { .. }
            | Error::Guest(_)
            | Error::Vm(_)
            | Error::Network(_)
            | Error::Pool(_)
            | Error::Protocol(_)
            | Error::Sys(_) => ErrorKind::Internal,
        }
    }

    /// A guest-init `Nack` as an error (its reason already bounded by the reader).
    pub fn refused(
        context: &'static str,
        reason: String,
        kind: Option<krun_oci_protocol::RefusalKind>,
    ) -> Error {
        Error::GuestRefused {
            context,
            reason,
            kind,
        }
    }

    /// What a helper process sends its parent in place of this error.
    pub fn report(&self) -> ErrorReport {
        ErrorReport {
            kind: self.kind(),
            message: self.to_string(),
        }
    }
}

/// An error as it crosses a pipe between our processes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReport {
    pub kind: ErrorKind,
    pub message: String,
}

impl From<ErrorReport> for Error {
    fn from(r: ErrorReport) -> Self {
        Error::Reported {
            kind: r.kind,
            message: r.message,
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_come_from_variants_and_survive_a_report() {
        let missing = Error::ExecutableNotFound {
            arg0: "nope".into(),
            detail: "executable file not found in $PATH".into(),
        };
        assert_eq!(
            missing.to_string(),
            "exec: \"nope\": executable file not found in $PATH"
        );
        assert_eq!(missing.kind(), ErrorKind::ExecutableNotFound);
        let crossed = Error::from(missing.report());
        assert_eq!(crossed.kind(), ErrorKind::ExecutableNotFound);
        assert_eq!(crossed.to_string(), missing.to_string());
        let json = serde_json::to_string(&missing.report()).unwrap();
        assert!(json.contains("\"executable_not_found\""), "{json}");

        let refused = Error::refused(
            "exec",
            "exec: \"/x\": permission denied".into(),
            Some(krun_oci_protocol::RefusalKind::PermissionDenied),
        );
        assert_eq!(refused.kind(), ErrorKind::PermissionDenied);
        assert_eq!(
            Error::refused("ps", "no".into(), None).kind(),
            ErrorKind::GuestRefused
        );
        // A message that merely reads like a kind does not make one.
        assert_eq!(
            Error::Guest("executable file not found".into()).kind(),
            ErrorKind::Internal
        );
    }

    #[test]
    fn state_existence_and_hook_variants_keep_runcs_words_and_their_kinds() {
        let cases: Vec<(Error, &str, ErrorKind)> = vec![
            (
                Error::WrongState {
                    op: "start",
                    status: "paused".into(),
                },
                "cannot start a container in the paused state",
                ErrorKind::WrongState,
            ),
            (
                Error::ResumeFirst {
                    op: "list the processes of",
                },
                "cannot list the processes of a paused container: resume it first",
                ErrorKind::WrongState,
            ),
            (
                Error::NoHostCgroup("c has no host cgroup for cpu and block I/O limits".into()),
                "c has no host cgroup for cpu and block I/O limits",
                ErrorKind::WrongState,
            ),
            (
                Error::ConfigExists,
                "File config.json exists. Remove it first",
                ErrorKind::AlreadyExists,
            ),
            (
                Error::NoPool {
                    root: "/run/krun-oci".into(),
                    reason: "pool: connecting: no such file or directory".into(),
                },
                "pool: no pool is serving /run/krun-oci (pool: connecting: no such file or directory)",
                ErrorKind::NotFound,
            ),
            (
                Error::PoolAlreadyServing {
                    root: "/run/krun-oci".into(),
                },
                "pool: a pool is already serving /run/krun-oci",
                ErrorKind::AlreadyExists,
            ),
            // A startContainer hook that failed in the guest: the host hooks' variant.
            (
                Error::HookFailed {
                    hook: "startContainer".into(),
                    path: "/bin/false".into(),
                    reason: "exit status 1".into(),
                },
                "error running startContainer hook /bin/false: exit status 1",
                ErrorKind::HookFailed,
            ),
        ];
        for (e, text, kind) in cases {
            assert_eq!(e.to_string(), text);
            assert_eq!(e.kind(), kind, "{text}");
            // Across a helper's sync pipe both survive.
            let crossed = Error::from(e.report());
            assert_eq!((crossed.to_string().as_str(), crossed.kind()), (text, kind));
        }
    }

    #[test]
    fn a_boot_failure_shows_the_console_only_when_there_is_one() {
        let e = |tail: &str| Error::BootFailed {
            reason: "the guest was not ready within 30s".into(),
            console_tail: tail.into(),
        };
        assert_eq!(e("  \n").to_string(), "the guest was not ready within 30s");
        assert_eq!(
            e("Kernel panic\n").to_string(),
            "the guest was not ready within 30s; console: Kernel panic"
        );
        assert_eq!(e("").kind(), ErrorKind::BootFailed);
    }
}
