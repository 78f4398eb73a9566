//! The busybox rootfs every test boots: busybox-static in /bin, its applets as
//! relative links beside it (they resolve inside the guest, not to the host's
//! path), a root user, and the mount points a container needs.
use anyhow::{Context, Result};
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The directories of the rootfs; /tmp is world-writable and sticky.
const DIRS: [&str; 11] = [
    "bin", "sbin", "usr/bin", "usr/sbin", "etc", "tmp", "proc", "sys", "dev", "run", "root",
];

/// The host's busybox: `/bin/busybox` (Debian's busybox-static), else on `PATH`.
pub fn host_busybox() -> Option<PathBuf> {
    let bin = Path::new("/bin/busybox");
    if bin.is_file() {
        Some(bin.to_path_buf())
    } else {
        crate::which("busybox")
    }
}

/// Fills `rootfs` (created if missing) with busybox-static and its applets.
pub fn busybox(rootfs: &Path) -> Result<()> {
    for d in DIRS {
        fs::create_dir_all(rootfs.join(d))?;
    }
    fs::set_permissions(rootfs.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    let busybox = host_busybox().context("busybox is not installed (busybox-static)")?;
    let bin = rootfs.join("bin");
    fs::copy(&busybox, bin.join("busybox"))
        .with_context(|| format!("copy {}", busybox.display()))?;
    // Ask the host's busybox, not the fresh copy: a concurrent fork in another
    // test thread may still hold the copy's write fd (ETXTBSY).
    let list = Command::new(&busybox)
        .arg("--list")
        .output()
        .context("busybox --list")?;
    anyhow::ensure!(list.status.success(), "busybox --list: {}", list.status);
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        // The list names busybox itself: linking it would replace the binary.
        if applet.is_empty() || applet == "busybox" {
            continue;
        }
        let link = bin.join(applet);
        if link.symlink_metadata().is_err() {
            symlink("busybox", &link).with_context(|| format!("link {}", link.display()))?;
        }
    }
    fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    fs::write(rootfs.join("etc/group"), "root:x:0:\n")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applets_link_to_the_copy_inside() {
        if host_busybox().is_none() {
            eprintln!("SKIPPED: no busybox here");
            return;
        }
        let dir = std::env::temp_dir().join(crate::ids::unique("testkit-rootfs"));
        busybox(&dir).unwrap();
        assert!(dir.join("bin/busybox").is_file());
        assert_eq!(
            fs::read_link(dir.join("bin/sh")).unwrap(),
            PathBuf::from("busybox")
        );
        let tmp = fs::metadata(dir.join("tmp")).unwrap().permissions().mode();
        assert_eq!(tmp & 0o7777, 0o1777);
        fs::remove_dir_all(&dir).unwrap();
    }
}
