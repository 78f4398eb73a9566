//! Warming a pooled VM while it waits for its container. Under TCG the first
//! run of any guest kernel path is slow (QEMU translates it first), and a pooled
//! VM's first paths would otherwise be its container's setup and spawn. So,
//! idle, it walks them once: `lo` up (which Setup would do), the filesystems a
//! setup mounts (the rootfs share included, mounted and dropped before its root
//! entry is ever looked up), a bind made read-only, and a spawn through fresh
//! namespaces. Nothing else of it stays. It runs before the VM reports Ready, so
//! the pool counts a VM idle only once it is warm, and a claim never waits for it.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::reaper::Reaper;

/// Set in the environment of the spawned warm-up child: it exits at once.
pub const WARM_ENV: &str = "KRUN_OCI_INIT_WARM";
const DIR: &str = "/warm";

pub fn warm_up(reaper: &Reaper, root_tag: &str) {
    let t0 = Instant::now();
    // `lo` comes up at Setup in any case (the VM's network is the container's):
    // now, the first inet socket and interface ioctls are off the claim's path.
    if let Err(e) = crate::network::apply(&[]) {
        log::warn!("warm-up: {e}");
    }
    if let Err(e) = filesystems(root_tag) {
        log::warn!("warm-up: {e}");
    }
    let _ = umount2(DIR, MntFlags::MNT_DETACH);
    let _ = std::fs::remove_dir(DIR);
    if let Err(e) = spawn(reaper) {
        log::warn!("warm-up: spawn: {e}");
    }
    log::info!("warm-up: {} ms", t0.elapsed().as_millis());
}

fn filesystems(root_tag: &str) -> Result<(), String> {
    let m = |src: &str, target: &str, fstype: Option<&str>, flags: MsFlags, data: Option<&str>| {
        let _ = std::fs::create_dir_all(target);
        mount(Some(src), target, fstype, flags, data).map_err(|e| format!("{target}: {}", e.desc()))
    };
    m(
        "tmpfs",
        DIR,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )?;
    let none = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let mounts = [
        ("proc", "proc", "proc", None),
        ("sysfs", "sys", "sysfs", None),
        (
            "devpts",
            "pts",
            "devpts",
            Some("newinstance,ptmxmode=0666,mode=0620"),
        ),
        ("shm", "shm", "tmpfs", Some("mode=1777")),
        ("mqueue", "mq", "mqueue", None),
        ("cgroup2", "cg", "cgroup2", None),
        (root_tag, "share", "virtiofs", None),
    ];
    for (src, dir, fstype, data) in mounts {
        // Best effort: a kernel without one of them only warms less.
        if let Err(e) = m(src, &format!("{DIR}/{dir}"), Some(fstype), none, data) {
            log::debug!("warm-up: {e}");
        }
    }
    let bind = format!("{DIR}/bind");
    m(
        &format!("{DIR}/shm"),
        &bind,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    m(
        "none",
        &bind,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None,
    )?;
    Ok(())
}

/// Fork and exec of guest-init itself through new namespaces, as a spawn does.
fn spawn(reaper: &Reaper) -> Result<(), String> {
    let mut cmd = Command::new("/init");
    cmd.env_clear()
        .env(WARM_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: unshare is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let flags = libc::CLONE_NEWNS
                | libc::CLONE_NEWUTS
                | libc::CLONE_NEWIPC
                | libc::CLONE_NEWCGROUP
                | libc::CLONE_NEWPID;
            if libc::unshare(flags) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let exit = {
        let mut registry = reaper.lock();
        let child = cmd.spawn().map_err(|e| e.to_string())?;
        registry.register(child.id() as i32)
    };
    exit.recv_timeout(Duration::from_secs(5))
        .map(drop)
        .map_err(|e| e.to_string())
}
