//! The shim's error type and its mapping onto ttrpc status codes: containerd
//! reacts to the code (NotFound on kill of a finished process, AlreadyExists on a
//! second create...), so every failure carries the right one.

use containerd_shim::protos::ttrpc::{self, Code};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}: not found")]
    NotFound(String),
    #[error("{0}: already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn code(&self) -> Code {
        match self {
            Error::NotFound(_) => Code::NOT_FOUND,
            Error::AlreadyExists(_) => Code::ALREADY_EXISTS,
            Error::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            Error::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            Error::Unimplemented(_) => Code::UNIMPLEMENTED,
            Error::Internal(_) => Code::INTERNAL,
        }
    }
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

impl From<krun_oci::Error> for Error {
    /// By the error's kind, never its text.
    fn from(e: krun_oci::Error) -> Self {
        use krun_oci::error::ErrorKind as K;
        let msg = e.to_string();
        match e.kind() {
            K::NotFound => Error::NotFound(msg),
            K::AlreadyExists => Error::AlreadyExists(msg),
            // What containerd shows for a bad spec, and for an exec of a missing
            // program (the process could not be started as asked).
            K::InvalidArgument | K::ExecutableNotFound | K::PermissionDenied => {
                Error::InvalidArgument(msg)
            }
            K::WrongState | K::GuestRefused => Error::FailedPrecondition(msg),
            K::Unimplemented => Error::Unimplemented(msg),
            K::BootFailed | K::HookFailed | K::Internal => Error::Internal(msg),
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Internal(e.to_string())
    }
}

impl From<nix::Error> for Error {
    fn from(e: nix::Error) -> Self {
        Error::Internal(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_errors_map_to_the_codes_containerd_expects() {
        let code = |e: krun_oci::Error| Error::from(e).code();
        assert_eq!(code(krun_oci::Error::NotExist), Code::NOT_FOUND);
        assert_eq!(code(krun_oci::Error::Exists), Code::ALREADY_EXISTS);
        assert_eq!(code(krun_oci::Error::NotRunning), Code::FAILED_PRECONDITION);
        assert_eq!(code(krun_oci::Error::Paused), Code::FAILED_PRECONDITION);
        assert_eq!(
            code(krun_oci::Error::NotStopped {
                id: "a".into(),
                status: "running".into()
            }),
            Code::FAILED_PRECONDITION
        );
        assert_eq!(
            code(krun_oci::Error::NotImplemented("exec")),
            Code::UNIMPLEMENTED
        );
        // start on a creating or paused container: the state, not the input, is wrong.
        assert_eq!(
            code(krun_oci::Error::WrongState {
                op: "start",
                status: "paused".into()
            }),
            Code::FAILED_PRECONDITION
        );
        assert_eq!(
            code(krun_oci::Error::ResumeFirst { op: "update" }),
            Code::FAILED_PRECONDITION
        );
        assert_eq!(
            code(krun_oci::Error::NoHostCgroup("c has no host cgroup".into())),
            Code::FAILED_PRECONDITION
        );
        // A startContainer hook that failed in the guest, like one on the host.
        assert_eq!(
            code(krun_oci::Error::HookFailed {
                hook: "startContainer".into(),
                path: "/bin/false".into(),
                reason: "exit status 1".into()
            }),
            Code::INTERNAL
        );
        assert_eq!(code(krun_oci::Error::Vm("boom".into())), Code::INTERNAL);
        // A boot that failed is the runtime's failure, not the caller's input.
        assert_eq!(
            code(krun_oci::Error::BootFailed {
                reason: "the VM stopped".into(),
                console_tail: String::new()
            }),
            Code::INTERNAL
        );
        assert_eq!(
            code(krun_oci::Error::ExecutableNotFound {
                arg0: "nope".into(),
                detail: "executable file not found in $PATH".into()
            }),
            Code::INVALID_ARGUMENT
        );
        // The kind crosses the relay's pipe; the text does not decide it.
        let reported = krun_oci::Error::from(krun_oci::error::ErrorReport {
            kind: krun_oci::error::ErrorKind::NotFound,
            message: "vm: boom".into(),
        });
        assert_eq!(code(reported), Code::NOT_FOUND);
        match ttrpc::Error::from(Error::NotFound("task x".into())) {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), Code::NOT_FOUND);
                assert_eq!(s.message(), "task x: not found");
            }
            other => panic!("{other:?}"),
        }
    }
}
