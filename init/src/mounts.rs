//! config.json `mounts`, `linux.readonlyPaths` and `linux.maskedPaths`, applied
//! inside the guest (already switched into the container root) at Setup, in
//! runc's order: mounts as listed, (hostname, sysctls,) read-only paths, masked paths.
//!
//! Guest-init mounts `/proc`, `/dev` (devtmpfs), `/dev/pts`, `/dev/shm`, `/run`,
//! `/sys` and `/sys/fs/cgroup` at boot (boot.rs). A config mount at one of those
//! destinations replaces the boot one (detached first), so the workload's mount
//! table is the config's, in the config's order; a config `/dev` tmpfs gets
//! runc's default device nodes and links ([`populate_dev`]), and `linux.devices`
//! are made either way.
//!
//! Differences a VM makes (docs/guest-init.md): `cgroup` mounts become cgroup2
//! (the guest is unified); bind sources come from the host through the
//! `krun-mounts` virtio-fs share; a `/dev/shm` bind (podman's) is a tmpfs of the
//! guest's own.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use krun_oci_protocol::mounts::{is_bind, is_shared_bind, shared_binds, MOUNTS_TAG};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use oci_spec::runtime::{Mount, Spec};

use crate::spawn::errno_text;

/// Where the bind share is mounted while binds are made (then detached).
const SHARE_DIR: &str = "/dev/.krun-oci-mounts";

/// Mount options split the way mount(2) wants them.
#[derive(Debug, PartialEq, Eq)]
pub struct Options {
    pub flags: MsFlags,
    /// Propagation changes, applied after the mount.
    pub propagation: Vec<MsFlags>,
    /// Filesystem-specific data (`size=1m,mode=755`).
    pub data: Vec<String>,
}

/// Splits OCI mount options into flags, propagation and data, as runc does.
pub fn parse_options(options: &[String]) -> Options {
    let mut o = Options {
        flags: MsFlags::empty(),
        propagation: Vec::new(),
        data: Vec::new(),
    };
    for opt in options {
        let (set, clear) = match opt.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "remount" => (MsFlags::MS_REMOUNT, MsFlags::empty()),
            "mand" => (MsFlags::MS_MANDLOCK, MsFlags::empty()),
            "nomand" => (MsFlags::empty(), MsFlags::MS_MANDLOCK),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "nostrictatime" => (MsFlags::empty(), MsFlags::MS_STRICTATIME),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            other => {
                let propagation = match other {
                    "private" => Some(MsFlags::MS_PRIVATE),
                    "rprivate" => Some(MsFlags::MS_PRIVATE | MsFlags::MS_REC),
                    "shared" => Some(MsFlags::MS_SHARED),
                    "rshared" => Some(MsFlags::MS_SHARED | MsFlags::MS_REC),
                    "slave" => Some(MsFlags::MS_SLAVE),
                    "rslave" => Some(MsFlags::MS_SLAVE | MsFlags::MS_REC),
                    "unbindable" => Some(MsFlags::MS_UNBINDABLE),
                    "runbindable" => Some(MsFlags::MS_UNBINDABLE | MsFlags::MS_REC),
                    _ => None,
                };
                match propagation {
                    Some(p) => o.propagation.push(p),
                    // SELinux relabels and crun's extensions mean nothing to the kernel.
                    None if matches!(other, "z" | "Z" | "U" | "tmpcopyup" | "notmpcopyup") => {}
                    None => o.data.push(other.to_string()),
                }
                continue;
            }
        };
        o.flags.insert(set);
        o.flags.remove(clear);
    }
    o
}

/// Absolute destination; relative ones are taken from `/` (runc warns and does the same).
fn destination(m: &Mount) -> PathBuf {
    Path::new("/").join(m.destination())
}

fn mount_error(m: &Mount, e: impl std::fmt::Display) -> String {
    format!(
        "error mounting {:?} to rootfs at {:?}: {e}",
        m.source()
            .as_deref()
            .map(|s| s.display().to_string())
            .unwrap_or_default(),
        m.destination().display().to_string()
    )
}

fn errno(e: nix::Error) -> String {
    e.desc().to_lowercase()
}

/// A bind the host does not share (the protocol's rule: `/dev/shm`): the
/// guest serves it with a tmpfs of its own.
fn guest_provided(m: &Mount) -> bool {
    is_bind(m) && !is_shared_bind(m)
}

/// Where guest-init mounted a filesystem at boot (boot.rs `container_mounts`).
const BOOT_MOUNTS: [&str; 7] = krun_oci_protocol::contract::GUEST_MOUNTS;

/// The boot mounts still in place; a config mount at one of them detaches it
/// (with what is mounted below it) first.
struct BootMounts(Vec<&'static str>);

impl BootMounts {
    fn current() -> BootMounts {
        let table = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mounted: Vec<&str> = table.lines().filter_map(|l| l.split(' ').nth(4)).collect();
        BootMounts(
            BOOT_MOUNTS
                .into_iter()
                .filter(|d| mounted.contains(d))
                .collect(),
        )
    }

    /// Detaches the boot mount at `dest`, if it is still there. Returns whether it was.
    fn replace(&mut self, dest: &Path) -> bool {
        let Some(d) = self.0.iter().copied().find(|d| Path::new(d) == dest) else {
            return false;
        };
        if let Err(e) = umount2(d, MntFlags::MNT_DETACH) {
            log::warn!("detaching the guest's {d}: {}", errno(e));
        }
        // Lazy unmount takes the mounts below it along.
        self.0
            .retain(|other| !Path::new(other).starts_with(Path::new(d)));
        true
    }

    fn has(&self, dest: &str) -> bool {
        self.0.contains(&dest)
    }
}

/// Flags a bind remount sets on one mount (the others belong to its superblock).
const PER_MOUNT: MsFlags = MsFlags::MS_RDONLY
    .union(MsFlags::MS_NOSUID)
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC)
    .union(MsFlags::MS_NOATIME)
    .union(MsFlags::MS_NODIRATIME)
    .union(MsFlags::MS_RELATIME)
    .union(MsFlags::MS_STRICTATIME);

/// Sets the per-mount part of `flags` on the mount at `dest` (a bind remount).
fn remount_bind(dest: &Path, flags: MsFlags) -> nix::Result<()> {
    mount(
        None::<&str>,
        dest,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | (flags & PER_MOUNT),
        None::<&str>,
    )
}

/// A filesystem mounted at a scratch directory for one setup step, then
/// detached (what was bound or opened from it stays; the mount leaves the view).
pub struct TempMount {
    pub dir: PathBuf,
}

impl TempMount {
    pub fn new(
        dir: &str,
        source: &str,
        fstype: &str,
        flags: MsFlags,
        data: Option<&str>,
    ) -> nix::Result<TempMount> {
        let dir = PathBuf::from(dir);
        let _ = fs::create_dir(&dir);
        if let Err(e) = mount(Some(source), &dir, Some(fstype), flags, data) {
            let _ = fs::remove_dir(&dir);
            return Err(e);
        }
        Ok(TempMount { dir })
    }
}

impl Drop for TempMount {
    fn drop(&mut self) {
        if let Err(e) = umount2(&self.dir, MntFlags::MNT_DETACH) {
            log::warn!("detaching {}: {}", self.dir.display(), errno(e));
        }
        let _ = fs::remove_dir(&self.dir);
    }
}

/// Applies `mounts` of `spec`, in order, then `linux.devices`.
pub fn apply_mounts(spec: &Spec) -> Result<(), String> {
    let mounts = spec.mounts().as_deref().unwrap_or_default();
    let entries = shared_binds(mounts);
    let mut share: Option<TempMount> = None;
    let mut boot = BootMounts::current();
    let mut dev_replaced = false;
    let result = (|| -> Result<(), String> {
        for (pos, m) in mounts.iter().enumerate() {
            let dest = destination(m);
            if guest_provided(m) {
                if !boot.has("/dev/shm") {
                    guest_shm(&dest).map_err(|e| mount_error(m, e))?;
                }
                continue;
            }
            // The share lives under /dev: a new /dev (or /) would hide it; it is
            // mounted again, in the new one, when the next bind needs it.
            if Path::new(SHARE_DIR).starts_with(&dest) {
                share = None;
            }
            if boot.replace(&dest) && dest == Path::new("/dev") {
                dev_replaced = true;
            }
            match entries.iter().find(|(p, _)| *p == pos) {
                Some((_, entry)) => {
                    if share.is_none() {
                        let mounted = TempMount::new(
                            SHARE_DIR,
                            MOUNTS_TAG,
                            "virtiofs",
                            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                            None,
                        )
                        .map_err(|e| {
                            mount_error(m, format!("mounting the {MOUNTS_TAG} share: {}", errno(e)))
                        })?;
                        share = Some(mounted);
                    }
                    let dir = share.as_ref().map(|s| s.dir.join(entry));
                    bind_from_share(m, dir.as_deref().unwrap_or(Path::new("/")), &dest)?;
                }
                None => mount_typed(m, &dest)?,
            }
        }
        Ok(())
    })();
    drop(share);
    result?;
    if dev_replaced {
        populate_dev()?;
    }
    let devices = spec
        .linux()
        .as_ref()
        .and_then(|l| l.devices().as_deref())
        .unwrap_or_default();
    for d in devices {
        make_device(d)?;
    }
    Ok(())
}

/// A tmpfs of the guest's own at `dest` (`/dev/shm`), with runc's default options.
fn guest_shm(dest: &Path) -> Result<(), String> {
    fs::create_dir_all(dest).map_err(|e| errno_text(&e))?;
    mount(
        Some("shm"),
        dest,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=1777,size=65536k"),
    )
    .map_err(errno)
}

/// runc's default devices in a config `/dev` tmpfs (mode 0666, owned by root).
const DEFAULT_DEVICES: [(&str, u64, u64); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// The nodes and links runc puts in a new `/dev`: [`DEFAULT_DEVICES`], `fd`,
/// `stdin`/`stdout`/`stderr`, `ptmx` -> `pts/ptmx`, and `core` where there is a
/// `/proc/kcore`.
fn populate_dev() -> Result<(), String> {
    use nix::sys::stat::SFlag;
    for (name, major, minor) in DEFAULT_DEVICES {
        let path = format!("/dev/{name}");
        mknod_as(Path::new(&path), SFlag::S_IFCHR, major, minor, 0o666, 0, 0)
            .map_err(|e| format!("creating {path}: {e}"))?;
    }
    let mut links = vec![
        ("/proc/self/fd", "/dev/fd"),
        ("/proc/self/fd/0", "/dev/stdin"),
        ("/proc/self/fd/1", "/dev/stdout"),
        ("/proc/self/fd/2", "/dev/stderr"),
        ("pts/ptmx", "/dev/ptmx"),
    ];
    if Path::new("/proc/kcore").exists() {
        links.push(("/proc/kcore", "/dev/core"));
    }
    for (target, link) in links {
        match std::os::unix::fs::symlink(target, link) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("linking {link}: {}", errno_text(&e))),
        }
    }
    Ok(())
}

/// One `linux.devices` entry: its type, numbers, mode and owner (an existing
/// node is kept, as runc does).
fn make_device(d: &oci_spec::runtime::LinuxDevice) -> Result<(), String> {
    use nix::sys::stat::SFlag;
    use oci_spec::runtime::LinuxDeviceType;
    let path = destination_of(d.path());
    let kind = match d.typ() {
        LinuxDeviceType::C | LinuxDeviceType::U => SFlag::S_IFCHR,
        LinuxDeviceType::B => SFlag::S_IFBLK,
        LinuxDeviceType::P => SFlag::S_IFIFO,
        other => {
            return Err(format!(
                "device {}: type {other:?} cannot be created",
                path.display()
            ))
        }
    };
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)
            .map_err(|e| format!("device {}: {}", path.display(), errno_text(&e)))?;
    }
    mknod_as(
        &path,
        kind,
        d.major() as u64,
        d.minor() as u64,
        d.file_mode().unwrap_or(0o666),
        d.uid().unwrap_or(0),
        d.gid().unwrap_or(0),
    )
    .map_err(|e| format!("device {}: {e}", path.display()))
}

fn destination_of(p: &Path) -> PathBuf {
    Path::new("/").join(p)
}

/// mknod with exactly `mode` (not masked by the umask) and the owner.
fn mknod_as(
    path: &Path,
    kind: nix::sys::stat::SFlag,
    major: u64,
    minor: u64,
    mode: u32,
    uid: u32,
    gid: u32,
) -> Result<(), String> {
    use nix::sys::stat::{makedev, mknod, Mode};
    match mknod(
        path,
        kind,
        Mode::from_bits_truncate(mode),
        makedev(major, minor),
    ) {
        Ok(()) => {}
        Err(nix::errno::Errno::EEXIST) => return Ok(()),
        Err(e) => return Err(errno(e)),
    }
    fs::set_permissions(
        path,
        std::os::unix::fs::PermissionsExt::from_mode(mode & 0o7777),
    )
    .map_err(|e| errno_text(&e))?;
    nix::unistd::chown(
        path,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
    )
    .map_err(errno)
}

/// `linux.rootfsPropagation` on `/`, after the mounts (runc applies it once the
/// root is in place).
pub fn apply_rootfs_propagation(spec: &Spec) -> Result<(), String> {
    let Some(p) = spec
        .linux()
        .as_ref()
        .and_then(|l| l.rootfs_propagation().as_deref())
        .filter(|p| !p.is_empty())
    else {
        return Ok(());
    };
    let o = parse_options(&[p.to_string()]);
    let [flag] = o.propagation[..] else {
        return Err(format!("rootfsPropagation {p:?}: not a propagation type"));
    };
    mount(None::<&str>, "/", None::<&str>, flag, None::<&str>)
        .map_err(|e| format!("rootfsPropagation {p}: {}", errno(e)))
}

/// Applies `linux.readonlyPaths`, then `linux.maskedPaths` (after sysctls, as runc).
pub fn apply_path_restrictions(spec: &Spec) -> Result<(), String> {
    let linux = spec.linux().as_ref();
    for p in linux
        .and_then(|l| l.readonly_paths().as_deref())
        .unwrap_or_default()
    {
        readonly_path(Path::new(p)).map_err(|e| format!("readonly path {p}: {e}"))?;
    }
    for p in linux
        .and_then(|l| l.masked_paths().as_deref())
        .unwrap_or_default()
    {
        mask_path(Path::new(p)).map_err(|e| format!("masked path {p}: {e}"))?;
    }
    Ok(())
}

/// Creates the mount point: a directory, or an empty file for a file bind.
fn make_mount_point(dest: &Path, is_dir: bool) -> io::Result<()> {
    if is_dir {
        return fs::create_dir_all(dest);
    }
    if fs::metadata(dest).is_ok() {
        return Ok(());
    }
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(dest)
        .map(drop)
}

fn bind_from_share(m: &Mount, entry: &Path, dest: &Path) -> Result<(), String> {
    let is_dir = fs::metadata(entry)
        .map_err(|e| mount_error(m, errno_text(&e)))?
        .is_dir();
    make_mount_point(dest, is_dir).map_err(|e| mount_error(m, errno_text(&e)))?;
    let o = parse_options(m.options().as_deref().unwrap_or_default());
    let rec = o.flags & MsFlags::MS_REC;
    mount(
        Some(entry),
        dest,
        None::<&str>,
        MsFlags::MS_BIND | rec,
        None::<&str>,
    )
    .map_err(|e| mount_error(m, errno(e)))?;
    if o.flags.intersects(PER_MOUNT) {
        remount_bind(dest, o.flags).map_err(|e| mount_error(m, errno(e)))?;
    }
    set_propagation(m, dest, &o)
}

fn mount_typed(m: &Mount, dest: &Path) -> Result<(), String> {
    let typ = m.typ().as_deref().unwrap_or("none");
    let o = parse_options(m.options().as_deref().unwrap_or_default());
    // The guest kernel mounts cgroup2 only; v1 controller names are not options there.
    let (typ, mut data) = if typ == "cgroup" {
        ("cgroup2", Vec::new())
    } else {
        (typ, o.data.clone())
    };
    if typ == "cgroup2" {
        data.extend(crate::resources::cgroup2_data().map(String::from));
    }
    let data = data.join(",");
    fs::create_dir_all(dest).map_err(|e| mount_error(m, errno_text(&e)))?;
    let source = m
        .source()
        .as_deref()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| typ.to_string());
    let data = (!data.is_empty()).then_some(data.as_str());
    let result = match mount(Some(source.as_str()), dest, Some(typ), o.flags, data) {
        // sysfs and cgroup2 have one superblock per guest (runc's new network and
        // cgroup namespaces give it fresh ones). EBUSY: that superblock is
        // read-write while this mount asks read-only, or it is already mounted
        // right here (the guest mounted it at boot). Either way, mount it without
        // changing the superblock and set this mount's own flags.
        Err(nix::errno::Errno::EBUSY) => {
            match mount(
                Some(source.as_str()),
                dest,
                Some(typ),
                o.flags - MsFlags::MS_RDONLY,
                data,
            ) {
                Ok(()) | Err(nix::errno::Errno::EBUSY) => remount_bind(dest, o.flags),
                Err(e) => Err(e),
            }
        }
        r => r,
    };
    result.map_err(|e| mount_error(m, errno(e)))?;
    set_propagation(m, dest, &o)
}

fn set_propagation(m: &Mount, dest: &Path, o: &Options) -> Result<(), String> {
    for &p in &o.propagation {
        mount(None::<&str>, dest, None::<&str>, p, None::<&str>)
            .map_err(|e| mount_error(m, errno(e)))?;
    }
    Ok(())
}

/// runc's readonlyPaths: a recursive bind onto itself, remounted read-only,
/// keeping nosuid/nodev/noexec of what was there. Missing paths are skipped.
fn readonly_path(p: &Path) -> Result<(), String> {
    if fs::symlink_metadata(p).is_err() {
        return Ok(());
    }
    mount(
        Some(p),
        p,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(errno)?;
    let mut keep = MsFlags::empty();
    if let Ok(st) = nix::sys::statvfs::statvfs(p) {
        use nix::sys::statvfs::FsFlags;
        for (have, flag) in [
            (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
            (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
            (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        ] {
            if st.flags().contains(have) {
                keep |= flag;
            }
        }
    }
    remount_bind(p, MsFlags::MS_RDONLY | keep).map_err(errno)
}

/// runc's maskedPaths: /dev/null over a file, an empty read-only tmpfs over a
/// directory. Missing paths are skipped.
fn mask_path(p: &Path) -> Result<(), String> {
    let Ok(meta) = fs::metadata(p) else {
        return Ok(());
    };
    if meta.is_dir() {
        mount(
            Some("tmpfs"),
            p,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None::<&str>,
        )
    } else {
        mount(
            Some("/dev/null"),
            p,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
    }
    .map_err(errno)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(o: &[&str]) -> Options {
        parse_options(&o.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn options_split_like_runc() {
        let o = opts(&["nosuid", "nodev", "size=1m", "mode=755", "rprivate", "Z"]);
        assert_eq!(o.flags, MsFlags::MS_NOSUID | MsFlags::MS_NODEV);
        assert_eq!(o.data, vec!["size=1m", "mode=755"]);
        assert_eq!(o.propagation, vec![MsFlags::MS_PRIVATE | MsFlags::MS_REC]);
        // Later options win.
        assert_eq!(opts(&["ro", "rw"]).flags, MsFlags::empty());
        assert_eq!(
            opts(&["rbind", "ro"]).flags,
            MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_RDONLY
        );
        assert_eq!(opts(&["newinstance", "ptmxmode=0666"]).data.len(), 2);
    }

    #[test]
    fn the_guest_serves_a_dev_shm_bind_only() {
        let m = |j: &str| -> Mount { serde_json::from_str(j).unwrap() };
        let dev = m(r#"{"destination":"/dev","type":"tmpfs","source":"tmpfs"}"#);
        assert!(!guest_provided(&dev));
        let pts = m(r#"{"destination":"/dev/pts","type":"devpts","source":"devpts"}"#);
        assert!(!guest_provided(&pts));
        let shm = m(r#"{"destination":"/dev/shm","type":"bind","source":"/x"}"#);
        assert!(guest_provided(&shm));
        let shm_tmpfs = m(r#"{"destination":"/dev/shm","type":"tmpfs","source":"shm"}"#);
        assert!(!guest_provided(&shm_tmpfs));
        let rel = m(r#"{"destination":"data","type":"tmpfs","source":"tmpfs"}"#);
        assert_eq!(destination(&rel), Path::new("/data"));
    }

    #[test]
    fn mount_points_for_files_and_dirs() {
        let d = tempfile::tempdir().unwrap();
        make_mount_point(&d.path().join("etc/hosts"), false).unwrap();
        assert!(d.path().join("etc/hosts").is_file());
        make_mount_point(&d.path().join("data/x"), true).unwrap();
        assert!(d.path().join("data/x").is_dir());
        // An existing file keeps its content.
        fs::write(d.path().join("etc/hosts"), "keep").unwrap();
        make_mount_point(&d.path().join("etc/hosts"), false).unwrap();
        assert_eq!(
            fs::read_to_string(d.path().join("etc/hosts")).unwrap(),
            "keep"
        );
    }
}
