//! Loading and validating an OCI bundle before anything is created.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::Spec;

use crate::error::{Error, Result};

/// A validated bundle: the parsed config and the absolute rootfs path.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub path: PathBuf,
    pub spec: Spec,
    pub rootfs: PathBuf,
}

/// Symlink hops allowed while resolving a path inside the rootfs (as the kernel's ELOOP).
const MAX_SYMLINK_HOPS: usize = 40;

impl Bundle {
    /// Reads `<bundle>/config.json` and checks everything create relies on.
    pub fn load(path: &Path) -> Result<Self> {
        let path = fs::canonicalize(path)
            .map_err(|e| Error::InvalidInput(format!("bundle {}: {e}", path.display())))?;
        let config = path.join("config.json");
        let data = fs::read(&config)
            .map_err(|e| Error::InvalidInput(format!("reading {}: {e}", config.display())))?;
        let mut spec: Spec = serde_json::from_slice(&data)
            .map_err(|e| Error::InvalidInput(format!("parsing {}: {e}", config.display())))?;
        validate_version(spec.version())?;
        let root = spec
            .root()
            .as_ref()
            .ok_or_else(|| Error::InvalidInput("config.json has no root".into()))?;
        let rootfs = path.join(root.path());
        let rootfs = fs::canonicalize(&rootfs)
            .map_err(|e| Error::InvalidInput(format!("rootfs {}: {e}", rootfs.display())))?;
        if !rootfs.is_dir() {
            return Err(Error::InvalidInput(format!(
                "rootfs {} is not a directory",
                rootfs.display()
            )));
        }
        crate::mounts::resolve_bind_sources(&mut spec, &path)?;
        for w in crate::fidelity::unapplied(&spec) {
            log::warn!("{w}");
        }
        let bundle = Bundle { path, spec, rootfs };
        bundle.validate_process()?;
        Ok(bundle)
    }

    fn validate_process(&self) -> Result<()> {
        let process = self
            .spec
            .process()
            .as_ref()
            .ok_or_else(|| Error::InvalidInput("config.json has no process".into()))?;
        resolve_process_executable(&self.rootfs, process).map(|_| ())
    }
}

/// Accepts `1.x.y` versions (with optional pre-release suffix), like runc.
pub fn validate_version(v: &str) -> Result<()> {
    let core = v.split(['-', '+']).next().unwrap_or("");
    let parts: Vec<_> = core.split('.').collect();
    let numeric = parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if !numeric {
        return Err(Error::InvalidInput(format!("invalid ociVersion {v:?}")));
    }
    if parts[0] != "1" {
        return Err(Error::InvalidInput(format!(
            "unsupported ociVersion {v:?}: krun-oci implements 1.x"
        )));
    }
    Ok(())
}

/// Resolves `path` (absolute, as seen inside the container) to a host path
/// inside `rootfs`, following symlinks as the guest would: absolute targets
/// are relative to the rootfs and `..` never leaves it.
pub fn resolve_in_root(rootfs: &Path, path: &str) -> std::io::Result<PathBuf> {
    let mut pending: Vec<String> = path
        .split('/')
        .filter(|c| !c.is_empty())
        .map(String::from)
        .rev()
        .collect();
    let mut resolved: Vec<String> = Vec::new();
    let mut hops = 0;
    while let Some(comp) = pending.pop() {
        match comp.as_str() {
            "." => continue,
            ".." => {
                resolved.pop();
                continue;
            }
            _ => {}
        }
        let candidate = rootfs
            .join(resolved.iter().collect::<PathBuf>())
            .join(&comp);
        match fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return Err(std::io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = fs::read_link(&candidate)?;
                if target.is_absolute() {
                    resolved.clear();
                }
                let parts: Vec<String> = target
                    .components()
                    .filter_map(|c| match c {
                        Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
                        Component::ParentDir => Some("..".into()),
                        _ => None,
                    })
                    .collect();
                pending.extend(parts.into_iter().rev());
            }
            Ok(_) => resolved.push(comp),
            Err(e) => return Err(e),
        }
    }
    Ok(rootfs.join(resolved.iter().collect::<PathBuf>()))
}

/// The host path of `process`'s program in `rootfs`, looked up in the
/// process's PATH (runc's default without one), as guest-init will.
pub fn resolve_process_executable(
    rootfs: &Path,
    process: &oci_spec::runtime::Process,
) -> Result<PathBuf> {
    let arg0 = process
        .args()
        .as_deref()
        .unwrap_or_default()
        .first()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| Error::InvalidInput("process.args must not be empty".into()))?;
    let path_var = process
        .env()
        .as_deref()
        .unwrap_or_default()
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(krun_oci_protocol::contract::DEFAULT_PATH);
    resolve_executable(rootfs, arg0, path_var, process.cwd())
}

/// Finds `arg0` the way the guest will exec it, with the error wording
/// podman maps to exit codes 127 (not found) and 126 (permission denied).
pub fn resolve_executable(
    rootfs: &Path,
    arg0: &str,
    path_var: &str,
    cwd: &Path,
) -> Result<PathBuf> {
    let not_found = |detail: String| Error::ExecutableNotFound {
        arg0: arg0.to_string(),
        detail,
    };
    let check = |p: &Path, shown: &str| -> Result<PathBuf> {
        let m = fs::metadata(p).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                not_found(format!("stat {shown}: no such file or directory"))
            }
            _ => Error::InvalidInput(format!("exec: {arg0:?}: stat {shown}: {e}")),
        })?;
        if m.is_dir() || m.permissions().mode() & 0o111 == 0 {
            return Err(Error::PermissionDenied {
                arg0: arg0.to_string(),
            });
        }
        Ok(p.to_path_buf())
    };
    if arg0.contains('/') {
        let in_container = if arg0.starts_with('/') {
            arg0.to_string()
        } else {
            format!("{}/{arg0}", cwd.display())
        };
        let host = resolve_in_root(rootfs, &in_container)
            .map_err(|_| not_found(format!("stat {in_container}: no such file or directory")))?;
        return check(&host, &in_container);
    }
    for dir in path_var.split(':').filter(|d| !d.is_empty()) {
        let candidate = format!("{}/{arg0}", dir.trim_end_matches('/'));
        if let Ok(host) = resolve_in_root(rootfs, &candidate) {
            if let Ok(m) = fs::metadata(&host) {
                if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                    return Ok(host);
                }
            }
        }
    }
    Err(not_found("executable file not found in $PATH".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn rootfs() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("bin")).unwrap();
        fs::create_dir_all(r.join("usr/bin")).unwrap();
        fs::write(r.join("bin/busybox"), b"#!").unwrap();
        fs::set_permissions(r.join("bin/busybox"), fs::Permissions::from_mode(0o755)).unwrap();
        symlink("/bin/busybox", r.join("bin/sh")).unwrap();
        symlink("../../bin/busybox", r.join("usr/bin/env")).unwrap();
        // An escape attempt: absolute target must stay inside the rootfs.
        symlink("/etc/passwd", r.join("bin/evil")).unwrap();
        fs::write(r.join("bin/noexec"), b"x").unwrap();
        d
    }

    #[test]
    fn resolves_on_path_inside_root() {
        let d = rootfs();
        let r = d.path();
        let p = resolve_executable(r, "sh", "/usr/bin:/bin", Path::new("/")).unwrap();
        assert_eq!(p, r.join("bin/busybox"));
        assert_eq!(
            resolve_executable(r, "env", "/usr/bin", Path::new("/")).unwrap(),
            r.join("bin/busybox")
        );
        assert_eq!(
            resolve_executable(r, "/bin/sh", "", Path::new("/")).unwrap(),
            r.join("bin/busybox")
        );
    }

    #[test]
    fn errors_use_runc_wording_and_kinds() {
        use crate::error::ErrorKind;
        let d = rootfs();
        let r = d.path();
        let fails = |arg0: &str| resolve_executable(r, arg0, "/bin", Path::new("/")).unwrap_err();
        let e = fails("nope");
        assert_eq!(
            e.to_string(),
            "exec: \"nope\": executable file not found in $PATH"
        );
        assert_eq!(e.kind(), ErrorKind::ExecutableNotFound);
        let e = fails("/bin/nope");
        assert_eq!(
            e.to_string(),
            "exec: \"/bin/nope\": stat /bin/nope: no such file or directory"
        );
        assert_eq!(e.kind(), ErrorKind::ExecutableNotFound);
        let e = fails("/bin/noexec");
        assert_eq!(e.to_string(), "exec: \"/bin/noexec\": permission denied");
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        // /bin/evil -> /etc/passwd resolves inside the rootfs, where it does not exist.
        let e = fails("/bin/evil");
        assert!(e.to_string().contains("no such file or directory"), "{e}");
        assert_eq!(e.kind(), ErrorKind::ExecutableNotFound);
    }

    #[test]
    fn dotdot_cannot_escape() {
        let d = rootfs();
        let r = d.path();
        assert_eq!(
            resolve_in_root(r, "/../../../bin/busybox").unwrap(),
            r.join("bin/busybox")
        );
    }

    #[test]
    fn symlink_loops_end() {
        let d = rootfs();
        let r = d.path();
        symlink("/loop", r.join("loop")).unwrap();
        assert!(resolve_in_root(r, "/loop").is_err());
    }

    #[test]
    fn versions() {
        for ok in ["1.0.0", "1.2.0", "1.0.2-dev", "1.1.0-rc.1"] {
            validate_version(ok).unwrap();
        }
        for bad in ["", "1", "1.0", "a.b.c", "2.0.0", "1.0.0.0", "v1.0.0"] {
            assert!(validate_version(bad).is_err(), "{bad}");
        }
    }
}
