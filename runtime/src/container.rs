//! One container: load, status derived from live facts, state JSON.

use std::collections::HashMap;
use std::path::PathBuf;

use serde::Serialize;

use crate::error::{IoContext, Result};
use crate::state::{ContainerDir, ContainerRecord, StateStore, Status};
use crate::supervise;

/// Name of the exit-code file guest-init writes at the root of the container's rootfs.
pub use krun_oci_protocol::contract::EXIT_CODE_FILE;
/// Code recorded when the VM or guest died without reporting one (never 0).
pub const LOST_EXIT_CODE: i32 = 255;

/// An exit code the guest reported, if a process can have it (0..=255:
/// `WEXITSTATUS` or 128+signal). Any other is a lie, worth nothing.
pub fn reported_exit_code(code: i32) -> Option<i32> {
    (0..=255).contains(&code).then_some(code)
}

/// runc's `state` JSON, plus `exitCode` once stopped.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StateJson {
    pub oci_version: String,
    pub id: String,
    pub pid: i32,
    pub status: Status,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    pub created: String,
    pub owner: String,
    #[serde(skip_serializing_if = "HashMap::is_empty")]
    pub annotations: HashMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

/// A container loaded from the store.
#[derive(Debug)]
pub struct Container {
    pub dir: ContainerDir,
    pub record: ContainerRecord,
}

impl Container {
    /// The config.json that create copied into the state dir.
    pub fn config_snapshot(&self) -> Result<oci_spec::runtime::Spec> {
        let data =
            std::fs::read(self.dir.config_file()).ctx(|| "reading config snapshot".into())?;
        Ok(serde_json::from_slice(&data)?)
    }

    pub fn load(store: &StateStore, id: &str) -> Result<Self> {
        let dir = store.get(id)?;
        let record = dir.load()?;
        Ok(Self { dir, record })
    }

    pub fn id(&self) -> &str {
        &self.dir.id
    }

    /// Is the VM monitor (the container pid) still alive?
    pub fn monitor_alive(&self) -> bool {
        self.record.pid > 0 && supervise::is_alive(self.record.pid, self.record.pid_start_time)
    }

    /// The status, derived from live facts rather than a cached field: a recorded
    /// exit code or a dead monitor means stopped.
    pub fn status(&self) -> Status {
        if self.record.pid == 0 {
            return Status::Creating;
        }
        // No guest link yet: the VM is still booting, or its monitor died trying.
        if self.record.link.is_none() {
            return if self.monitor_alive() {
                Status::Creating
            } else {
                Status::Stopped
            };
        }
        if self.dir.recorded_exit_code().is_some() || !self.monitor_alive() {
            return Status::Stopped;
        }
        match (self.record.started, self.record.paused) {
            (_, true) => Status::Paused,
            (true, false) => Status::Running,
            (false, false) => Status::Created,
        }
    }

    /// The workload's exit code once stopped: what the monitor recorded, else
    /// the exit-code file guest-init wrote (read without following symlinks),
    /// else 255 — a VM that died without a code never reads as success.
    pub fn exit_code(&self) -> Option<i32> {
        if self.status() != Status::Stopped {
            return None;
        }
        Some(
            self.dir
                .recorded_exit_code()
                .or_else(|| read_guest_exit_code(&self.record.rootfs))
                .unwrap_or(LOST_EXIT_CODE),
        )
    }

    pub fn state_json(&self) -> StateJson {
        let status = self.status();
        StateJson {
            oci_version: crate::spec::OCI_VERSION.to_string(),
            id: self.id().to_string(),
            pid: if status == Status::Stopped {
                0
            } else {
                self.record.pid
            },
            status,
            bundle: self.record.bundle.clone(),
            rootfs: self.record.rootfs.clone(),
            created: self
                .record
                .created
                .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
            owner: self.record.owner.clone(),
            annotations: {
                let mut a = self.record.annotations.clone();
                if self.dir.oom_killed() {
                    a.insert(ANNOTATION_OOM_KILLED.into(), "true".into());
                }
                a
            },
            exit_code: self.exit_code(),
        }
    }
}

/// Added to `state`'s annotations once the guest's OOM killer ran while the main
/// ran (runc's state has no field for it; containerd gets TaskOOM from the shim,
/// `events` prints an `oom` event).
pub const ANNOTATION_OOM_KILLED: &str = "krun-oci.oom-killed";

/// Reads `/.a3s_exit_code` of a rootfs. The guest is hostile: the file is opened
/// with O_NOFOLLOW, must be a regular file, and only a few bytes are read.
pub fn read_guest_exit_code(rootfs: &std::path::Path) -> Option<i32> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(rootfs.join(EXIT_CODE_FILE))
        .ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut buf = String::new();
    f.take(16).read_to_string(&mut buf).ok()?;
    buf.trim().parse::<i32>().ok().and_then(reported_exit_code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_exit_code_is_read_defensively() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        assert_eq!(read_guest_exit_code(root), None);
        std::fs::write(root.join(EXIT_CODE_FILE), b"7").unwrap();
        assert_eq!(read_guest_exit_code(root), Some(7));
        std::fs::write(root.join(EXIT_CODE_FILE), b"137\n").unwrap();
        assert_eq!(read_guest_exit_code(root), Some(137));
        std::fs::write(root.join(EXIT_CODE_FILE), b"99999").unwrap();
        assert_eq!(read_guest_exit_code(root), None);
        std::fs::write(root.join(EXIT_CODE_FILE), b"garbage").unwrap();
        assert_eq!(read_guest_exit_code(root), None);
        // A symlink planted by the guest is not followed.
        std::fs::remove_file(root.join(EXIT_CODE_FILE)).unwrap();
        std::fs::write(root.join("target"), b"3").unwrap();
        std::os::unix::fs::symlink(root.join("target"), root.join(EXIT_CODE_FILE)).unwrap();
        assert_eq!(read_guest_exit_code(root), None);
        // A FIFO does not block the reader.
        std::fs::remove_file(root.join(EXIT_CODE_FILE)).unwrap();
        nix::unistd::mkfifo(&root.join(EXIT_CODE_FILE), nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert_eq!(read_guest_exit_code(root), None);
    }
}
