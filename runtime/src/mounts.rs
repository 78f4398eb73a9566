//! Bind mounts of host paths, made visible to the guest.
//!
//! virtiofsd shares directories, not single files, and sharing a file's parent
//! would hand the guest its siblings too. So the process that serves the share
//! (a second virtiofsd, or the libkrun VMM itself) enters a private mount
//! namespace and bind-mounts each source onto an empty entry of a staging
//! directory (`<run dir>/mounts/0`, `1`, ...), then shares that directory under
//! the tag [`MOUNTS_TAG`]. The binds exist only in that namespace: they vanish
//! with the process, nothing is left mounted on the host, and removing the
//! staging directory in the host's namespace never reaches a source. The guest
//! mounts the share and binds entry `i` at the i-th bind's destination
//! ([`krun_oci_protocol::mounts::shared_binds`] numbers them on both sides).

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

pub use krun_oci_protocol::mounts::MOUNTS_TAG;
use krun_oci_protocol::mounts::{is_bind, shared_binds};
use oci_spec::runtime::Spec;
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

/// Makes relative bind sources absolute (relative to the bundle, as runc does)
/// and checks that each source exists, in runc's words when it does not.
pub fn resolve_bind_sources(spec: &mut Spec, bundle: &Path) -> Result<()> {
    let Some(mounts) = spec.mounts().clone() else {
        return Ok(());
    };
    let mut resolved = Vec::with_capacity(mounts.len());
    for mut m in mounts {
        if is_bind(&m) {
            let source = m.source().clone().unwrap_or_default();
            let absolute = if source.is_absolute() {
                source.clone()
            } else {
                bundle.join(&source)
            };
            if let Err(e) = fs::metadata(&absolute) {
                return Err(Error::InvalidInput(format!(
                    "error mounting {:?} to rootfs at {:?}: stat {}: {}",
                    source.display().to_string(),
                    m.destination().display().to_string(),
                    absolute.display(),
                    crate::error::errno_text(&e)
                )));
            }
            m.set_source(Some(absolute));
        }
        resolved.push(m);
    }
    spec.set_mounts(Some(resolved));
    Ok(())
}

/// One source and the staging entry it is bound onto.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedBind {
    pub source: PathBuf,
    /// Entry name in the staging directory (also the name the guest opens).
    pub entry: String,
    pub is_dir: bool,
    pub readonly: bool,
    pub recursive: bool,
}

/// The staging directory and the binds the serving process makes in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountsShare {
    pub staging: PathBuf,
    pub binds: Vec<SharedBind>,
}

impl MountsShare {
    /// The share for `spec` (sources already resolved), or `None` without binds.
    pub fn plan(spec: &Spec, staging: PathBuf) -> Result<Option<MountsShare>> {
        let mounts = spec.mounts().as_deref().unwrap_or_default();
        let mut binds = Vec::new();
        for (pos, entry) in shared_binds(mounts) {
            let m = &mounts[pos];
            let source = m.source().clone().unwrap_or_default();
            let meta = fs::metadata(&source).ctx(|| format!("stat {}", source.display()))?;
            let options = m.options().as_deref().unwrap_or_default();
            binds.push(SharedBind {
                source,
                entry,
                is_dir: meta.is_dir(),
                readonly: options.iter().any(|o| o == "ro"),
                recursive: options.iter().any(|o| o == "rbind"),
            });
        }
        Ok((!binds.is_empty()).then_some(MountsShare { staging, binds }))
    }

    /// Creates the staging directory with one empty mount point per bind.
    pub fn prepare(&self) -> Result<()> {
        let _ = fs::remove_dir_all(&self.staging);
        fs::create_dir_all(&self.staging).ctx(|| format!("create {}", self.staging.display()))?;
        for b in &self.binds {
            let target = self.staging.join(&b.entry);
            let made = if b.is_dir {
                fs::create_dir(&target)
            } else {
                fs::File::create(&target).map(drop)
            };
            made.ctx(|| format!("create {}", target.display()))?;
        }
        Ok(())
    }

    /// The mount calls, with every string allocated now: [`BindOps::apply`]
    /// runs between fork and exec, where allocating is not allowed.
    pub fn ops(&self) -> Result<BindOps> {
        let cpath = |p: &Path| {
            CString::new(p.as_os_str().as_bytes())
                .map_err(|_| Error::InvalidInput(format!("NUL byte in {}", p.display())))
        };
        let binds = self
            .binds
            .iter()
            .map(|b| {
                Ok(BindOp {
                    source: cpath(&b.source)?,
                    target: cpath(&self.staging.join(&b.entry))?,
                    readonly: b.readonly,
                    recursive: b.recursive,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(BindOps {
            root: c"/".to_owned(),
            binds,
        })
    }
}

struct BindOp {
    source: CString,
    target: CString,
    readonly: bool,
    recursive: bool,
}

/// Prepared mount calls for [`MountsShare`].
pub struct BindOps {
    root: CString,
    binds: Vec<BindOp>,
}

impl BindOps {
    /// Enters a new mount namespace (a slave of the host's, so mounts made there
    /// never propagate back) and makes the binds. Only system calls: safe
    /// between fork and exec, and in a process that has not started threads.
    pub fn apply(&self) -> io::Result<()> {
        let check = |rc: libc::c_int| {
            if rc < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        let null = std::ptr::null::<libc::c_char>();
        // SAFETY: plain system calls on NUL-terminated strings that outlive them.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                null,
                self.root.as_ptr(),
                null,
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            ))?;
            for b in &self.binds {
                let rec = if b.recursive { libc::MS_REC } else { 0 };
                check(libc::mount(
                    b.source.as_ptr(),
                    b.target.as_ptr(),
                    null,
                    libc::MS_BIND | rec,
                    std::ptr::null(),
                ))?;
                if b.readonly {
                    // Read-only on the host side too: a hostile guest cannot write
                    // through virtiofsd to a source the config shares read-only.
                    check(libc::mount(
                        null,
                        b.target.as_ptr(),
                        null,
                        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                        std::ptr::null(),
                    ))?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a thread of its own mount namespace (nothing reaches the host's).
    fn in_private_mount_ns(f: impl FnOnce() + Send + 'static) -> bool {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root for mount namespaces");
            return false;
        }
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).unwrap();
            nix::mount::mount(
                None::<&str>,
                "/",
                None::<&str>,
                nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .unwrap();
            f()
        })
        .join()
        .unwrap();
        true
    }

    #[test]
    fn detached_trees_attach_read_only_and_removal_never_enters_a_mount() {
        in_private_mount_ns(|| {
            let d = tempfile::tempdir().unwrap();
            let (src, share) = (d.path().join("src"), d.path().join("share"));
            fs::create_dir_all(src.join("sub")).unwrap();
            fs::write(src.join("sub/keep"), "x").unwrap();
            fs::create_dir_all(share.join("root")).unwrap();
            fs::create_dir_all(share.join("ro")).unwrap();
            fs::write(share.join("own"), "y").unwrap();
            DetachedTree::clone_of(&src, true, false)
                .unwrap()
                .attach(&share.join("root"))
                .unwrap();
            DetachedTree::clone_of(&src, false, true)
                .unwrap()
                .attach(&share.join("ro"))
                .unwrap();
            assert_eq!(
                fs::read_to_string(share.join("root/sub/keep")).unwrap(),
                "x"
            );
            let e = fs::write(share.join("ro/new"), "z").unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EROFS));
            // Both mounts still attached: the removal skips them, and the source keeps its files.
            assert!(!remove_dir_on_one_mount(&share));
            assert!(src.join("sub/keep").exists());
            assert!(!share.join("own").exists());
            for m in ["root", "ro"] {
                nix::mount::umount2(&share.join(m), nix::mount::MntFlags::MNT_DETACH).unwrap();
            }
            assert!(remove_dir_on_one_mount(&share));
            assert!(!share.exists() && src.join("sub/keep").exists());
        });
    }

    fn spec_with(mounts: serde_json::Value) -> Spec {
        crate::testutil::spec_with("mounts", mounts)
    }

    #[test]
    fn relative_sources_are_bundle_relative_and_must_exist() {
        let b = tempfile::tempdir().unwrap();
        fs::create_dir(b.path().join("data")).unwrap();
        let mut spec = spec_with(serde_json::json!([
            {"destination": "/data", "type": "bind", "source": "data", "options": ["rbind"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"}
        ]));
        resolve_bind_sources(&mut spec, b.path()).unwrap();
        let m = spec.mounts().as_ref().unwrap();
        assert_eq!(
            m[0].source().as_deref(),
            Some(b.path().join("data").as_path())
        );
        assert_eq!(m[1].source().as_deref(), Some(Path::new("tmpfs")));

        let mut spec = spec_with(serde_json::json!([
            {"destination": "/x", "type": "bind", "source": "/no/such/src"}
        ]));
        let e = resolve_bind_sources(&mut spec, b.path())
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "error mounting \"/no/such/src\" to rootfs at \"/x\": stat /no/such/src: no such file or directory"
        );
    }

    #[test]
    fn plan_and_prepare_the_staging_directory() {
        let b = tempfile::tempdir().unwrap();
        let file = b.path().join("hosts");
        fs::write(&file, "127.0.0.1 localhost\n").unwrap();
        let spec = spec_with(serde_json::json!([
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/hosts", "type": "bind", "source": file, "options": ["bind", "ro"]},
            {"destination": "/dev/shm", "type": "bind", "source": b.path(), "options": ["bind"]},
            {"destination": "/data", "type": "none", "source": b.path(), "options": ["rbind"]}
        ]));
        let staging = b.path().join("run/mounts");
        let share = MountsShare::plan(&spec, staging.clone()).unwrap().unwrap();
        assert_eq!(
            share.binds,
            vec![
                SharedBind {
                    source: file,
                    entry: "0".into(),
                    is_dir: false,
                    readonly: true,
                    recursive: false
                },
                SharedBind {
                    source: b.path().to_owned(),
                    entry: "1".into(),
                    is_dir: true,
                    readonly: false,
                    recursive: true
                },
            ]
        );
        share.prepare().unwrap();
        assert!(staging.join("0").is_file());
        assert!(staging.join("1").is_dir());
        assert_eq!(fs::read_dir(&staging).unwrap().count(), 2);
        assert!(share.ops().is_ok());

        let none = spec_with(serde_json::json!([
            {"destination": "/proc", "type": "proc", "source": "proc"}
        ]));
        assert!(MountsShare::plan(&none, staging).unwrap().is_none());
    }

    /// The binds exist in the serving process's namespace only.
    #[test]
    fn binds_stay_in_the_private_namespace() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: needs root (mount namespaces)");
            return;
        }
        let b = tempfile::tempdir().unwrap();
        let src = b.path().join("src");
        fs::create_dir(&src).unwrap();
        fs::write(src.join("hello"), "hi").unwrap();
        let spec = spec_with(serde_json::json!([
            {"destination": "/data", "type": "bind", "source": src, "options": ["bind", "ro"]}
        ]));
        let staging = b.path().join("staging");
        let share = MountsShare::plan(&spec, staging.clone()).unwrap().unwrap();
        share.prepare().unwrap();
        let ops = share.ops().unwrap();
        let entry = staging.join("0");
        // A child applies the binds before exec, as a serving process does.
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c")
            .arg(r#"[ "$(cat "$1/hello")" = hi ] && ! touch "$1/new" 2>/dev/null"#)
            .arg("sh")
            .arg(&entry);
        // SAFETY: BindOps::apply only makes system calls.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || ops.apply());
        }
        assert!(cmd.status().unwrap().success());
        // Here, in the host's namespace, the entry is still the empty mount point.
        assert_eq!(fs::read_dir(staging.join("0")).unwrap().count(), 0);
        assert!(!src.join("new").exists());
    }
}

/// A detached copy of a mount tree (`open_tree(OPEN_TREE_CLONE)`), made in the
/// caller's mount namespace and attached later in another one with
/// [`DetachedTree::attach`]: a pooled VM's root and binds reach its pool
/// member's namespace without relying on mount propagation (POOL.md). The fd
/// passes between processes over `SCM_RIGHTS`; a tree never attached vanishes
/// with its last fd.
#[derive(Debug)]
pub struct DetachedTree(std::os::fd::OwnedFd);

impl DetachedTree {
    /// Clones the mount at `source` (with what is mounted below it when
    /// `recursive`); `readonly` makes every mount of the clone read-only before
    /// anyone can see it, so a read-only bind is never writable, not even briefly.
    pub fn clone_of(source: &Path, recursive: bool, readonly: bool) -> Result<DetachedTree> {
        let path = CString::new(source.as_os_str().as_bytes())
            .map_err(|_| Error::InvalidInput(format!("NUL byte in {}", source.display())))?;
        let mut flags = libc::OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint;
        if recursive {
            flags |= libc::AT_RECURSIVE as libc::c_uint;
        }
        // SAFETY: open_tree with a NUL-terminated path; returns a new fd or -1.
        let fd =
            unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, path.as_ptr(), flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error())
                .ctx(|| format!("cloning the mount at {}", source.display()));
        }
        // SAFETY: a fresh fd that nothing else owns.
        let tree = DetachedTree(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd as i32) });
        if readonly {
            tree.set_readonly()
                .ctx(|| format!("making the clone of {} read-only", source.display()))?;
        }
        Ok(tree)
    }

    /// Takes a tree received from another process.
    pub fn from_fd(fd: std::os::fd::OwnedFd) -> DetachedTree {
        DetachedTree(fd)
    }

    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.0)
    }

    fn set_readonly(&self) -> io::Result<()> {
        let attr = libc::mount_attr {
            attr_set: libc::MOUNT_ATTR_RDONLY,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        // SAFETY: mount_setattr on our fd with a mount_attr of the size passed.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                std::os::fd::AsRawFd::as_raw_fd(&self.0),
                c"".as_ptr(),
                (libc::AT_EMPTY_PATH | libc::AT_RECURSIVE) as libc::c_uint,
                &attr as *const libc::mount_attr,
                std::mem::size_of::<libc::mount_attr>(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Attaches the tree at `target` in the caller's mount namespace.
    pub fn attach(self, target: &Path) -> Result<()> {
        let path = CString::new(target.as_os_str().as_bytes())
            .map_err(|_| Error::InvalidInput(format!("NUL byte in {}", target.display())))?;
        // SAFETY: move_mount from our fd (empty path) to a NUL-terminated target.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                std::os::fd::AsRawFd::as_raw_fd(&self.0),
                c"".as_ptr(),
                libc::AT_FDCWD,
                path.as_ptr(),
                libc::MOVE_MOUNT_F_EMPTY_PATH,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error())
                .ctx(|| format!("attaching a mount at {}", target.display()));
        }
        Ok(())
    }
}

/// The mount id of `path` (statx `STATX_MNT_ID`), not following a final symlink.
fn mount_id(path: &Path) -> io::Result<u64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: statx fills the zeroed struct we own.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out pointer.
    let rc = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_MNT_ID,
            &mut stx,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stx.stx_mnt_id)
}

/// Removes the directory tree at `path` without ever descending into another
/// mount: a directory under it that is a mount point (a container's root or a
/// bind still attached) is left alone, so removing a pooled VM's directories
/// can never reach the container's files. Returns whether all of it went.
pub fn remove_dir_on_one_mount(path: &Path) -> bool {
    fn walk(dir: &Path, mnt: u64) -> bool {
        let Ok(entries) = fs::read_dir(dir) else {
            return false;
        };
        let mut all = true;
        for e in entries.flatten() {
            let p = e.path();
            let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
            if mount_id(&p).map_or(true, |m| m != mnt) {
                log::warn!("not removing {}: another mount", p.display());
                all = false;
                continue;
            }
            let removed = if is_dir {
                walk(&p, mnt) && fs::remove_dir(&p).is_ok()
            } else {
                fs::remove_file(&p).is_ok()
            };
            all &= removed;
        }
        all
    }
    let Ok(mnt) = mount_id(path) else {
        return true; // already gone
    };
    walk(path, mnt) && fs::remove_dir(path).is_ok()
}
