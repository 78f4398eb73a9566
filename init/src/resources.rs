//! `linux.resources` inside the guest. The VM's size already carries the memory
//! limit and the CPU count (chosen on the host); what a VM size cannot express is
//! applied to a guest cgroup, `/container` of the guest's cgroup2, which every container
//! process joins before exec: today the pids limit, also changed later by `update`.

use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use nix::fcntl::OFlag;
use nix::mount::MsFlags;
use oci_spec::runtime::Spec;

use crate::spawn::errno_text;

/// The container's cgroup, below the guest's cgroup2 root.
const CONTAINER_CGROUP: &str = "container";
/// Where the hierarchy is mounted while the cgroup is set up (then detached).
const PRIVATE_MOUNT: &str = "/dev/.krun-oci-cgroup";

/// The mount data of every cgroup2 mount guest-init makes once the boot mount
/// took it. `favordynmods` (Linux 6.0+) keeps the hierarchy's threadgroup lock
/// in its slow mode, so that moving a process into a cgroup no longer waits for
/// an RCU grace period: the main and every exec join the container cgroup, and
/// under TCG that wait was ~10 ms of each (a pool hit's main prepared in 25-39
/// -> 14-19 ms). The price, forks and exits taking that lock the slow way, is
/// small in a VM of one container. Each cgroup2 mount in the guest's cgroup
/// namespace sets the hierarchy's flags anew, so each carries it; the first,
/// in the initramfs at boot (`boot::early_mounts`), pays the grace period.
pub fn cgroup2_data() -> Option<&'static str> {
    FAVOR_DYNMODS
        .load(std::sync::atomic::Ordering::Relaxed)
        .then_some("favordynmods")
}

static FAVOR_DYNMODS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Mounts cgroup2 at boot with `favordynmods`, or without it where the kernel
/// does not know it; the mounts after follow ([`cgroup2_data`]).
pub fn mount_cgroup2_at_boot(target: &str, flags: MsFlags) -> std::io::Result<()> {
    match crate::boot::mount_fs("cgroup2", target, "cgroup2", flags, Some("favordynmods")) {
        Ok(()) => {
            FAVOR_DYNMODS.store(true, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        }
        Err(e) => {
            log::warn!("{e} (with favordynmods); mounting without it");
            crate::boot::mount_fs("cgroup2", target, "cgroup2", flags, None)
        }
    }
}

/// The value for `pids.max`: runc's rule (0 = unset, negative = no limit).
pub fn pids_max(limit: i64) -> Option<String> {
    match limit {
        0 => None,
        l if l < 0 => Some("max".into()),
        l => Some(l.to_string()),
    }
}

/// Runs `f` on the container cgroup's directory (created when missing) through a
/// private mount of the hierarchy, detached afterwards: an open file must not count
/// as a writer on the container's /sys/fs/cgroup, or the config's read-only remount
/// of it would fail with EBUSY.
fn in_container_cgroup<T>(f: impl FnOnce(&Path) -> Result<T, String>) -> Result<T, String> {
    let fail = |what: &str, e: std::io::Error| format!("{what}: {}", errno_text(&e));
    let private = crate::mounts::TempMount::new(
        PRIVATE_MOUNT,
        "cgroup2",
        "cgroup2",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        cgroup2_data(),
    )
    .map_err(|e| fail("mounting cgroup2", std::io::Error::from(e)))?;
    let mnt = private.dir.as_path();
    let result = (|| {
        // memory: for the container cgroup's memory.events (its OOM kills).
        fs::write(mnt.join("cgroup.subtree_control"), "+pids +memory")
            .map_err(|e| fail("enabling the pids and memory controllers", e))?;
        let dir = mnt.join(CONTAINER_CGROUP);
        if let Err(e) = fs::create_dir(&dir) {
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                return Err(fail("creating the container cgroup", e));
            }
        }
        f(&dir)
    })();
    drop(private);
    result
}

/// The container cgroup, opened at Setup on the private mount of the hierarchy
/// (detached after, kept by these fds; never the container's `/sys/fs/cgroup`).
pub struct ContainerCgroup {
    /// `cgroup.procs`, opened for writing: the processes join through it.
    pub procs: OwnedFd,
    /// The directory, read-only: its counters are read through it, with no
    /// mount and unmount each time (an unmount waits for RCU, ~4 ms under TCG,
    /// and the main's OOM-kill count is read on `start`'s path).
    pub dir: OwnedFd,
}

/// Sets up the container cgroup with the config's pids limit (none: `max`, so
/// `update` can set one later). Without a limit, a guest that cannot make the
/// cgroup still runs the container, only `update` of the pids limit will fail.
pub fn apply(spec: &Spec) -> Result<Option<ContainerCgroup>, String> {
    let max = spec
        .linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref())
        .and_then(|r| r.pids().as_ref())
        .and_then(|p| pids_max(p.limit()));
    let limited = max.is_some();
    let made = in_container_cgroup(|dir| {
        let max = max.unwrap_or_else(|| "max".into());
        fs::write(dir.join("pids.max"), &max)
            .map_err(|e| format!("writing pids.max: {}", errno_text(&e)))?;
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))
            .map_err(|e| format!("opening cgroup.procs: {}", errno_text(&e)))?;
        let dir = fs::File::open(dir)
            .map_err(|e| format!("opening the container cgroup: {}", errno_text(&e)))?;
        Ok(ContainerCgroup {
            procs: OwnedFd::from(procs),
            dir: OwnedFd::from(dir),
        })
    });
    match made {
        Ok(cgroup) => Ok(Some(cgroup)),
        Err(e) if !limited => {
            log::warn!("no container cgroup ({e}); a pids limit cannot be set later");
            Ok(None)
        }
        Err(e) => Err(format!("pids limit: {e}")),
    }
}

/// `update`: a new pids limit for the running container (runc's rule), written
/// through `dir` of [`ContainerCgroup`].
pub fn update_pids(dir: Option<&OwnedFd>, limit: i64) -> Result<(), String> {
    let Some(max) = pids_max(limit) else {
        return Ok(());
    };
    let dir = dir.ok_or("pids limit: the container has no cgroup")?;
    open_in(dir, "pids.max", OFlag::O_WRONLY)
        .and_then(|mut f| f.write_all(max.as_bytes()))
        .map_err(|e| format!("pids limit: writing pids.max: {}", errno_text(&e)))
}

/// How many of the container's processes the kernel's OOM killer has killed
/// (`oom_kill` of the container cgroup's memory.events, read through `dir` of
/// [`ContainerCgroup`]: every OOM kill, the guest-wide ones too, counts in the
/// victim's cgroup). 0 without a container cgroup.
pub fn oom_kills(dir: Option<&OwnedFd>) -> u64 {
    let mut events = String::new();
    if let Some(mut f) = dir.and_then(|d| open_in(d, "memory.events", OFlag::O_RDONLY).ok()) {
        let _ = f.read_to_string(&mut events);
    }
    events
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A file of the container cgroup, opened through its directory (no path
/// lookup from a mount, none needed).
fn open_in(dir: &OwnedFd, name: &str, flags: OFlag) -> std::io::Result<fs::File> {
    let fd = nix::fcntl::openat(
        dir.as_fd(),
        name,
        flags | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    Ok(fs::File::from(fd))
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
