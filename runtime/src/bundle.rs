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
    /// Where the main's program is, as the guest names it, if the host can tell.
    pub main_program: Option<PathBuf>,
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
        let mut bundle = Bundle {
            path,
            spec,
            rootfs,
            main_program: None,
        };
        bundle.main_program = bundle.find_main_program()?;
        Ok(bundle)
    }

    /// The main's program, where the host can tell (see [`find_program`]).
    fn find_main_program(&self) -> Result<Option<PathBuf>> {
        let process = self
            .spec
            .process()
            .as_ref()
            .ok_or_else(|| Error::InvalidInput("config.json has no process".into()))?;
        find_process_program(&self.rootfs, process, &Covered::of(&self.spec))
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

/// Paths where the container's view differs from its root filesystem on the
/// host: the destinations of its mounts, its masked and read-only paths, and
/// guest-init's own mounts. What lies at or below them only the guest can see.
#[derive(Debug, Default)]
pub struct Covered(Vec<PathBuf>);

impl Covered {
    pub fn of(spec: &Spec) -> Covered {
        let linux = spec.linux().as_ref();
        let mounts = spec
            .mounts()
            .iter()
            .flatten()
            .map(|m| m.destination().clone());
        let restricted = [
            linux.and_then(|l| l.masked_paths().as_ref()),
            linux.and_then(|l| l.readonly_paths().as_ref()),
        ]
        .into_iter()
        .flatten()
        .flatten()
        .map(PathBuf::from);
        let guest = krun_oci_protocol::contract::GUEST_MOUNTS.map(PathBuf::from);
        Covered(
            mounts
                .chain(restricted)
                .chain(guest)
                .map(|p| lexically_absolute(&p))
                .collect(),
        )
    }

    fn covers(&self, path: &Path) -> bool {
        self.0.iter().any(|c| path.starts_with(c))
    }

    /// Whether the guest may create `path` (missing in the rootfs) on its way
    /// to a mount point below it.
    fn may_create(&self, path: &Path) -> bool {
        self.0.iter().any(|c| c.starts_with(path))
    }
}

/// `path` from `/`, with `.` and `..` taken away as written (as the guest joins
/// mount destinations).
fn lexically_absolute(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

/// Why a path inside the container could not be resolved on the host.
#[derive(Debug)]
enum Unresolved {
    /// The walk reached a [`Covered`] path: only the guest can tell.
    Covered,
    /// Not there, or not to be looked up (a loop, an error).
    Missing,
}

/// Resolves `path` (absolute, as seen inside the container) to a host path
/// inside `rootfs`, following symlinks as the guest would: absolute targets
/// are relative to the rootfs and `..` never leaves it. Stops at the first
/// path (a symlink's own included) that `covered` covers, or that is missing
/// where the guest makes a mount point below it.
fn resolve_in_root(
    rootfs: &Path,
    path: &str,
    covered: &Covered,
) -> std::result::Result<PathBuf, Unresolved> {
    let mut pending: Vec<String> = path
        .split('/')
        .filter(|c| !c.is_empty())
        .map(String::from)
        .rev()
        .collect();
    let mut resolved = PathBuf::from("/");
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
        let next = resolved.join(&comp);
        if covered.covers(&next) {
            return Err(Unresolved::Covered);
        }
        let on_host = rootfs.join(next.strip_prefix("/").unwrap_or(&next));
        match fs::symlink_metadata(&on_host) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return Err(Unresolved::Missing);
                }
                let target = fs::read_link(&on_host).map_err(|_| Unresolved::Missing)?;
                if target.is_absolute() {
                    resolved = PathBuf::from("/");
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
            Ok(_) => resolved = next,
            Err(_) if covered.may_create(&next) => return Err(Unresolved::Covered),
            Err(_) => return Err(Unresolved::Missing),
        }
    }
    Ok(rootfs.join(resolved.strip_prefix("/").unwrap_or(&resolved)))
}

/// The program of `process` as guest-init's own lookup will find it (see
/// [`find_program`]).
pub fn find_process_program(
    rootfs: &Path,
    process: &oci_spec::runtime::Process,
    covered: &Covered,
) -> Result<Option<PathBuf>> {
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
    find_program(rootfs, arg0, path_var, process.cwd(), covered)
}

/// Finds `arg0` the way guest-init will before its exec (runc's rules: a name
/// with a slash from `cwd`, else the first executable file on `path_var`, an
/// empty entry meaning `cwd`). `Ok(Some(p))`: `p` as the guest names it;
/// `Ok(None)`: a [`Covered`] path decides, which only the guest sees; an error
/// (with the wording podman maps to exit codes 127 and 126) when the container
/// cannot have it.
pub fn find_program(
    rootfs: &Path,
    arg0: &str,
    path_var: &str,
    cwd: &Path,
    covered: &Covered,
) -> Result<Option<PathBuf>> {
    let not_found = |detail: String| Error::ExecutableNotFound {
        arg0: arg0.to_string(),
        detail,
    };
    let cwd = lexically_absolute(cwd);
    if arg0.contains('/') {
        let candidate = cwd.join(arg0);
        let shown = candidate.display().to_string();
        let host = match resolve_in_root(rootfs, &shown, covered) {
            Ok(host) => host,
            Err(Unresolved::Covered) => return Ok(None),
            Err(Unresolved::Missing) => {
                return Err(not_found(format!(
                    "stat {shown}: no such file or directory"
                )))
            }
        };
        // Resolved: a symlink here now appeared since, and is not followed.
        let m = fs::symlink_metadata(&host).map_err(|e| match e.kind() {
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
        return Ok(Some(candidate));
    }
    for dir in path_var.split(':') {
        let candidate = cwd.join(if dir.is_empty() { "." } else { dir }).join(arg0);
        match resolve_in_root(rootfs, &candidate.to_string_lossy(), covered) {
            Ok(host) => {
                if let Ok(m) = fs::symlink_metadata(&host) {
                    if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                        return Ok(Some(candidate));
                    }
                }
            }
            Err(Unresolved::Covered) => return Ok(None),
            Err(Unresolved::Missing) => {}
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

    fn none() -> Covered {
        Covered::default()
    }

    fn find(r: &Path, arg0: &str, path: &str) -> Result<Option<PathBuf>> {
        find_program(r, arg0, path, Path::new("/"), &none())
    }

    #[test]
    fn finds_on_path_inside_root() {
        let d = rootfs();
        let r = d.path();
        // Named as the guest will exec it, the symlink kept.
        let found = |arg0: &str, path: &str| find(r, arg0, path).unwrap().unwrap();
        assert_eq!(found("sh", "/usr/bin:/bin"), Path::new("/bin/sh"));
        assert_eq!(found("env", "/usr/bin"), Path::new("/usr/bin/env"));
        assert_eq!(found("/bin/sh", ""), Path::new("/bin/sh"));
        // An empty PATH entry and a relative one are taken from the cwd, as in the guest.
        let in_bin = |arg0: &str, path: &str| {
            find_program(r, arg0, path, Path::new("/bin"), &none())
                .unwrap()
                .unwrap()
        };
        assert_eq!(in_bin("sh", ":/usr/bin"), Path::new("/bin/./sh"));
        assert_eq!(
            in_bin("env", "../usr/bin"),
            Path::new("/bin/../usr/bin/env")
        );
        assert_eq!(in_bin("./sh", ""), Path::new("/bin/./sh"));
    }

    #[test]
    fn errors_use_runc_wording_and_kinds() {
        use crate::error::ErrorKind;
        let d = rootfs();
        let r = d.path();
        let fails = |arg0: &str| find(r, arg0, "/bin").unwrap_err();
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

    /// Where a mount of the container's decides, the guest looks itself.
    #[test]
    fn covered_paths_leave_the_lookup_to_the_guest() {
        let d = rootfs();
        let r = d.path();
        let mut spec = Spec::default();
        let bind = |dest: &str| {
            oci_spec::runtime::MountBuilder::default()
                .destination(dest)
                .typ("bind")
                .source("/opt/tools")
                .options(vec!["rbind".to_string()])
                .build()
                .unwrap()
        };
        spec.set_mounts(Some(vec![bind("/usr/local/bin"), bind("/tools/../opt")]));
        let covered = Covered::of(&spec);
        let find = |arg0: &str, path: &str| find_program(r, arg0, path, Path::new("/"), &covered);
        // A mount earlier on PATH may hold it: unknown; one later does not matter.
        assert!(find("sh", "/usr/local/bin:/bin").unwrap().is_none());
        assert_eq!(
            find("sh", "/bin:/usr/local/bin").unwrap().unwrap(),
            Path::new("/bin/sh")
        );
        // Not in the rootfs, but a mount may provide it: no error on the host.
        assert!(find("tool", "/usr/local/bin").unwrap().is_none());
        assert!(find("/opt/tool", "").unwrap().is_none());
        assert!(find("tool", "/bin").is_err());
        // A symlink into a covered path, and guest-init's own mounts.
        symlink("/proc/self/exe", r.join("bin/self")).unwrap();
        assert!(find("self", "/bin").unwrap().is_none());
        assert!(find("/dev/x", "").unwrap().is_none());
    }

    #[test]
    fn dotdot_cannot_escape() {
        let d = rootfs();
        let r = d.path();
        assert_eq!(
            resolve_in_root(r, "/../../../bin/busybox", &none()).unwrap(),
            r.join("bin/busybox")
        );
    }

    #[test]
    fn symlink_loops_end() {
        let d = rootfs();
        let r = d.path();
        symlink("/loop", r.join("loop")).unwrap();
        assert!(resolve_in_root(r, "/loop", &none()).is_err());
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
