//! Boot steps: early mounts, kernel modules, the container root and the switch
//! into it. Each step is timed (micros since init started) for the Ready beacon.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Instant;

use krun_oci_protocol::{contract, BootTiming};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

pub struct Timings {
    start: Instant,
    pub steps: Vec<BootTiming>,
}

impl Timings {
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            steps: Vec::new(),
        }
    }

    /// Records a finished step (also on the console: where a stuck boot stopped).
    pub fn mark(&mut self, step: &str) {
        let micros = self.start.elapsed().as_micros() as u64;
        log::info!("boot: {step} at {} ms", micros / 1000);
        self.steps.push(BootTiming {
            step: step.to_string(),
            micros,
        });
    }
}

fn err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

/// Mounts `fstype` at `target` (created if missing). `EBUSY` (already mounted by
/// the kernel, e.g. devtmpfs automount) counts as success.
pub fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> io::Result<()> {
    let _ = fs::create_dir_all(target);
    match mount(Some(source), target, Some(fstype), flags, data) {
        Ok(()) | Err(nix::errno::Errno::EBUSY) => Ok(()),
        Err(e) => Err(err(format!("mount {fstype} on {target}"), e.desc())),
    }
}

/// Best-effort variant for mounts a container can live without.
fn mount_optional(source: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) {
    if let Err(e) = mount_fs(source, target, fstype, flags, data) {
        log::warn!("{e}");
    }
}

/// VM: /dev, /proc, /sys of the initramfs.
pub fn early_mounts() -> io::Result<()> {
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    mount_fs(
        "proc",
        "/proc",
        "proc",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None,
    )?;
    mount_fs(
        "sysfs",
        "/sys",
        "sysfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None,
    )?;
    // Here, so that the grace period its first mount waits for (see
    // resources::cgroup2_data) is the boot's, not a pooled VM's `Setup`.
    if let Err(e) = crate::resources::mount_cgroup2_at_boot(
        "/sys/fs/cgroup",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
    ) {
        log::warn!("{e}");
    }
    Ok(())
}

/// The kernel may start PID 1 with fds 0-2 closed (no /dev/console in the
/// initramfs). Fill them with /dev/null so no socket or pipe ever lands there.
pub fn ensure_std_fds() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries the descriptor.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            if let Ok(f) = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                // SAFETY: duplicating our own descriptor onto a closed slot.
                unsafe { libc::dup2(f.as_raw_fd(), fd) };
            }
        }
    }
}

/// Parses the module list: `path [params...]` per line, blank lines and `#` comments skipped.
pub fn parse_module_list(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| match l.split_once(char::is_whitespace) {
            Some((p, params)) => (p.to_string(), params.trim().to_string()),
            None => (l.to_string(), String::new()),
        })
        .collect()
}

/// Loads the modules `/krun-oci/modules` lists (paths relative to `/krun-oci/`).
pub fn load_modules() -> io::Result<usize> {
    let Ok(text) = fs::read_to_string("/krun-oci/modules") else {
        return Ok(0);
    };
    let list = parse_module_list(&text);
    for (path, params) in &list {
        let full = Path::new("/krun-oci").join(path);
        let f = fs::File::open(&full).map_err(|e| err(full.display(), e))?;
        let params = std::ffi::CString::new(params.as_str()).map_err(|e| err(path, e))?;
        // SAFETY: finit_module with an open module file and a NUL-terminated string.
        let r = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), params.as_ptr(), 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(err(format!("loading module {path}"), e));
            }
        }
    }
    Ok(list.len())
}

/// Command-line words with surrounding double quotes removed: libkrun's `krun_set_env`
/// (the only way to add words to libkrunfw's command line) quotes each word.
fn cmdline_words(cmdline: &str) -> impl Iterator<Item = &str> {
    cmdline.split_whitespace().map(|w| {
        w.strip_prefix('"')
            .and_then(|w| w.strip_suffix('"'))
            .unwrap_or(w)
    })
}

/// The virtio-fs tag of the root: `krun_oci.root_tag=` on the command line, else `rootfs`.
pub fn root_tag(cmdline: &str) -> String {
    cmdline_words(cmdline)
        .find_map(|w| w.strip_prefix(contract::CMDLINE_ROOT_TAG))
        .unwrap_or(contract::ROOT_TAG)
        .to_string()
}

/// Whether the root comes later (`krun_oci.root=deferred`: a pooled VM, booted
/// before its container exists).
pub fn root_is_deferred(cmdline: &str) -> bool {
    cmdline_words(cmdline).any(|w| w == contract::CMDLINE_ROOT_DEFERRED)
}

/// Whether power-off must be a reboot (`krun_oci.halt=reboot`: the acpi=off
/// microvm model, where QEMU runs with -no-reboot).
pub fn halt_is_reboot(cmdline: &str) -> bool {
    cmdline_words(cmdline).any(|w| w == contract::CMDLINE_HALT_REBOOT)
}

/// Mounts what a container expects inside `root` (not yet switched into).
/// `sandbox`: no devtmpfs; a tmpfs /dev with the host's basic device nodes bound in.
pub fn container_mounts(root: &str, sandbox: bool) -> io::Result<()> {
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let at = |p: &str| format!("{root}{p}");
    mount_fs("proc", &at("/proc"), "proc", nosuid_nodev_noexec, None)?;
    if sandbox {
        mount_fs(
            "tmpfs",
            &at("/dev"),
            "tmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        )?;
        for node in ["null", "zero", "full", "random", "urandom", "tty"] {
            let target = at(&format!("/dev/{node}"));
            let _ = fs::File::create(&target);
            let src = format!("/dev/{node}");
            if let Err(e) = mount(
                Some(src.as_str()),
                target.as_str(),
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            ) {
                log::warn!("bind {src}: {}", e.desc());
            }
        }
    } else {
        mount_fs(
            "devtmpfs",
            &at("/dev"),
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        )?;
    }
    mount_fs(
        "devpts",
        &at("/dev/pts"),
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    // /dev/ptmx must reach this devpts instance.
    let ptmx = at("/dev/ptmx");
    let _ = fs::remove_file(&ptmx);
    std::os::unix::fs::symlink("pts/ptmx", &ptmx).map_err(|e| err("linking /dev/ptmx", e))?;
    mount_optional(
        "shm",
        &at("/dev/shm"),
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    );
    mount_optional(
        "tmpfs",
        &at("/run"),
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    );
    mount_optional("sysfs", &at("/sys"), "sysfs", nosuid_nodev_noexec, None);
    if !sandbox {
        mount_optional(
            "cgroup2",
            &at("/sys/fs/cgroup"),
            "cgroup2",
            nosuid_nodev_noexec,
            crate::resources::cgroup2_data(),
        );
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, at(link));
    }
    Ok(())
}

/// VM: mounts the virtio-fs root at /newroot and switches into it.
pub fn switch_to_virtiofs_root(tag: &str) -> io::Result<()> {
    const NEWROOT: &str = "/newroot";
    mount_fs(tag, NEWROOT, "virtiofs", MsFlags::empty(), None)?;
    enter_new_root(NEWROOT)
}

/// Fills `newroot` and moves it over `/` (initramfs cannot be pivoted away
/// from), then chroots into it.
fn enter_new_root(newroot: &str) -> io::Result<()> {
    container_mounts(newroot, false)?;
    std::env::set_current_dir(newroot)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| err("moving the root", e.desc()))?;
    nix::unistd::chroot(".").map_err(|e| err("chroot", e.desc()))?;
    std::env::set_current_dir("/")?;
    Ok(())
}

/// A deferred root: mounts the share `tag` at /share, binds its `entry` (where
/// the host attached the container's root) at /newroot, and switches into it
/// as [`switch_to_virtiofs_root`] does. The share itself stays behind, hidden
/// under the new root.
pub fn switch_to_share_entry(tag: &str, entry: &str) -> io::Result<()> {
    const SHARE: &str = "/share";
    const NEWROOT: &str = "/newroot";
    if entry.is_empty() || entry.contains('/') || entry == "." || entry == ".." {
        return Err(err(
            "deferred root entry",
            format!("{entry:?} is not a name"),
        ));
    }
    fs::create_dir_all(NEWROOT).map_err(|e| err(NEWROOT, e))?;
    mount_fs(tag, SHARE, "virtiofs", MsFlags::empty(), None)?;
    mount(
        Some(format!("{SHARE}/{entry}").as_str()),
        NEWROOT,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| err("binding the deferred root", e.desc()))?;
    enter_new_root(NEWROOT)
}

/// Host-sandbox harness: in our private mount namespace, bind `rootfs` onto
/// itself, fill it, and pivot_root into it (the host's tree is detached).
pub fn switch_to_sandbox_root(rootfs: &Path) -> io::Result<()> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| err("making / private", e.desc()))?;
    let root = rootfs
        .canonicalize()
        .map_err(|e| err(rootfs.display(), e))?;
    let root_s = root
        .to_str()
        .ok_or_else(|| err("rootfs", "not UTF-8"))?
        .to_string();
    mount(
        Some(root_s.as_str()),
        root_s.as_str(),
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| err("binding the rootfs", e.desc()))?;
    container_mounts(&root_s, true)?;
    std::env::set_current_dir(&root)?;
    nix::unistd::pivot_root(".", ".").map_err(|e| err("pivot_root", e.desc()))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| err("detaching the old root", e.desc()))?;
    std::env::set_current_dir("/")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_list() {
        let l = parse_module_list("virtio.ko\n\n# c\n vsock.ko  a=1 b=2 \n");
        assert_eq!(
            l,
            vec![
                ("virtio.ko".into(), String::new()),
                ("vsock.ko".into(), "a=1 b=2".into())
            ]
        );
    }

    #[test]
    fn cmdline_options() {
        assert_eq!(root_tag("console=ttyS0 quiet"), "rootfs");
        assert_eq!(root_tag("a krun_oci.root_tag=myfs b"), "myfs");
        assert!(halt_is_reboot("reboot=t krun_oci.halt=reboot"));
        assert!(!halt_is_reboot("krun_oci.halt=poweroff"));
        // libkrunfw: words added through krun_set_env arrive quoted.
        assert!(halt_is_reboot(
            "reboot=k KRUN_INIT=/x \"krun_oci.halt=reboot\" -- "
        ));
    }
}
