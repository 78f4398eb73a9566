//! `linux.resources` inside the guest. The VM's size already carries the memory
//! limit and the CPU count (chosen on the host); what a VM size cannot express is
//! applied to a guest cgroup, `/container` of the guest's cgroup2, which every container
//! process joins before exec: today the pids limit.

use std::fs;
use std::os::fd::OwnedFd;

use nix::mount::MsFlags;
use oci_spec::runtime::Spec;

use crate::spawn::errno_text;

/// The container's cgroup, below the guest's cgroup2 root.
const CONTAINER_CGROUP: &str = "container";
/// Where the hierarchy is mounted while the cgroup is set up (then detached).
const PRIVATE_MOUNT: &str = "/dev/.krun-oci-cgroup";

/// The value for `pids.max`: runc's rule (0 = unset, negative = no limit).
pub fn pids_max(limit: i64) -> Option<String> {
    match limit {
        0 => None,
        l if l < 0 => Some("max".into()),
        l => Some(l.to_string()),
    }
}

/// Sets up the container cgroup when a limit needs it; returns its
/// `cgroup.procs`, opened for writing, for the processes to join.
pub fn apply(spec: &Spec) -> Result<Option<OwnedFd>, String> {
    let Some(max) = spec
        .linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref())
        .and_then(|r| r.pids().as_ref())
        .and_then(|p| pids_max(p.limit()))
    else {
        return Ok(None);
    };
    let fail = |what: &str, e: std::io::Error| format!("pids limit: {what}: {}", errno_text(&e));
    // A private mount of the hierarchy, detached once the file is open: the open
    // file must not count as a writer on the container's /sys/fs/cgroup, or the
    // config's read-only remount of it would fail with EBUSY.
    let private = crate::mounts::TempMount::new(
        PRIVATE_MOUNT,
        "cgroup2",
        "cgroup2",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
    )
    .map_err(|e| fail("mounting cgroup2", std::io::Error::from(e)))?;
    let mnt = private.dir.as_path();
    let result = (|| {
        fs::write(mnt.join("cgroup.subtree_control"), "+pids")
            .map_err(|e| fail("enabling the pids controller", e))?;
        let dir = mnt.join(CONTAINER_CGROUP);
        if let Err(e) = fs::create_dir(&dir) {
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                return Err(fail("creating the container cgroup", e));
            }
        }
        fs::write(dir.join("pids.max"), &max).map_err(|e| fail("writing pids.max", e))?;
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))
            .map_err(|e| fail("opening cgroup.procs", e))?;
        Ok(Some(procs.into()))
    })();
    drop(private);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pids_max_follows_runc() {
        assert_eq!(pids_max(0), None);
        assert_eq!(pids_max(-1).as_deref(), Some("max"));
        assert_eq!(pids_max(64).as_deref(), Some("64"));
    }
}
