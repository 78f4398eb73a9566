//! The state store: one directory per container under `--root`.
//!
//! Layout of `<root>/<id>/`:
//! - `state.json`  — [`ContainerRecord`], replaced atomically (temp + fsync + rename)
//! - `config.json` — snapshot of the bundle's config taken at create
//! - `lock`        — flock'd by every operation that changes the container
//! - `exit-code`   — written by the VM monitor when the workload's code is known
//! - `run/`        — sockets, console log and helper pid files of the VM
//!
//! Creating the directory is the create race's arbiter: `mkdir` succeeds for
//! exactly one of several concurrent `create`s of one ID.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::guest::GuestLink;

/// Longest accepted container ID: a file name's limit (runc has none of its own).
pub const MAX_ID_LEN: usize = 255;

/// Validates a container ID like runc: `^[\w+\-\.]+$`, not `.` or `..`.
pub fn validate_id(id: &str) -> Result<()> {
    let ok_chars = id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '-' | '.'));
    if id.is_empty() || !ok_chars || id == "." || id == ".." {
        return Err(Error::InvalidId(format!(
            "invalid container ID format: {id:?}"
        )));
    }
    if id.len() > MAX_ID_LEN {
        return Err(Error::InvalidId(format!(
            "container ID is {} bytes long, the limit is {MAX_ID_LEN}",
            id.len()
        )));
    }
    Ok(())
}

/// Writes `data` to `path` atomically: a temp file in the same dir, renamed over it,
/// so a reader sees the old or the new content whole. No fsync, as runc: the state
/// is for live containers (its root is on tmpfs by default), and a flush to disk
/// would cost every create, start and exit milliseconds on a disk-backed root.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(data)?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Lifecycle state as runc names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        };
        f.write_str(s)
    }
}

/// What the runtime remembers about a container (`state.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    pub created: DateTime<Utc>,
    #[serde(default)]
    pub owner: String,
    #[serde(default)]
    pub annotations: HashMap<String, String>,
    /// The VM monitor's pid (the container pid clients wait on); 0 while creating.
    #[serde(default)]
    pub pid: i32,
    /// Start time of `pid` (field 22 of /proc/PID/stat), guarding against pid reuse.
    #[serde(default)]
    pub pid_start_time: u64,
    /// Set once `start` spawned the main process.
    #[serde(default)]
    pub started: bool,
    #[serde(default)]
    pub paused: bool,
    /// Which VMM runs the VM.
    #[serde(default)]
    pub vmm: String,
    /// How to reach the guest.
    pub link: Option<GuestLink>,
    /// Host pids of the VMM and its helpers, for cleanup after a monitor crash.
    #[serde(default)]
    pub helper_pids: Vec<i32>,
    /// A pooled VM's member directories (pool::member).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pool_dirs: Vec<PathBuf>,
    /// Where the json-file log lives.
    #[serde(default)]
    pub log_path: Option<PathBuf>,
    /// The host cgroup the VM lives in (removed at delete).
    #[serde(default)]
    pub cgroup: Option<crate::cgroup::HostCgroup>,
}

/// A container's directory in the store.
#[derive(Debug, Clone)]
pub struct ContainerDir {
    pub id: String,
    pub path: PathBuf,
}

impl ContainerDir {
    pub fn state_file(&self) -> PathBuf {
        self.path.join("state.json")
    }
    pub fn config_file(&self) -> PathBuf {
        self.path.join("config.json")
    }
    pub fn exit_code_file(&self) -> PathBuf {
        self.path.join("exit-code")
    }
    /// Present once the guest reported that its OOM killer ran (monitor.rs).
    pub fn oom_file(&self) -> PathBuf {
        self.path.join("oom-killed")
    }
    /// Whether the guest's OOM killer ran while the main ran.
    pub fn oom_killed(&self) -> bool {
        self.oom_file().exists()
    }
    /// The VM's sockets, helper logs and console. Not under the state dir: a unix
    /// socket path must fit in 108 bytes, and `<root>/<64-hex id>/run/vsock_1030`
    /// does not under containerd's `/run/containerd/.../k8s.io` roots. The state
    /// dir's `run` is a symlink to it, for people looking.
    pub fn run_dir(&self) -> PathBuf {
        use sha2::Digest;
        // One name however the root was spelled (relative, `//`, `.`).
        let path = std::path::absolute(&self.path).unwrap_or_else(|_| self.path.clone());
        let path: PathBuf = path.components().collect();
        let digest = sha2::Sha256::digest(path.as_os_str().as_encoded_bytes());
        let name: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        run_base().join(name)
    }

    /// Creates [`Self::run_dir`] and the `run` symlink to it in the state dir.
    pub fn create_run_dir(&self) -> Result<PathBuf> {
        let dir = self.run_dir();
        fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        let link = self.path.join("run");
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&dir, &link).ctx(|| format!("linking {}", link.display()))?;
        Ok(dir)
    }

    pub fn load(&self) -> Result<ContainerRecord> {
        let data = match fs::read(self.state_file()) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Error::NotExist),
            Err(e) => return Err(e).ctx(|| format!("reading state of {}", self.id)),
        };
        Ok(serde_json::from_slice(&data)?)
    }

    pub fn save(&self, record: &ContainerRecord) -> Result<()> {
        let data = serde_json::to_vec_pretty(record)?;
        write_atomic(&self.state_file(), &data).ctx(|| format!("writing state of {}", self.id))
    }

    /// The exit code the monitor recorded, if any.
    pub fn recorded_exit_code(&self) -> Option<i32> {
        fs::read_to_string(self.exit_code_file())
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Takes the container's exclusive lock (blocks until free). Released on drop.
    pub fn lock(&self) -> Result<ContainerLock> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(self.path.join("lock"))
            .ctx(|| format!("opening lock of {}", self.id))?;
        loop {
            // SAFETY: flock on a valid, owned fd.
            let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(ContainerLock { _file: f });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e).ctx(|| format!("locking {}", self.id));
            }
        }
    }

    /// Removes the whole directory, and the run dir.
    pub fn remove(&self) -> Result<()> {
        match fs::remove_dir_all(self.run_dir()) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).ctx(|| format!("removing {}", self.run_dir().display())),
        }
        match fs::remove_dir_all(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).ctx(|| format!("removing {}", self.path.display())),
        }
    }
}

/// Held flock on a container; dropping it unlocks.
#[derive(Debug)]
pub struct ContainerLock {
    _file: File,
}

/// The `--root` directory.
#[derive(Debug, Clone)]
pub struct StateStore {
    root: PathBuf,
}

impl StateStore {
    /// Opens the root directory; it is created (mode 0700) by the first `claim`.
    pub fn open(root: &Path) -> Result<Self> {
        if root.as_os_str().is_empty() {
            return Err(Error::InvalidInput("--root must not be empty".into()));
        }
        match fs::metadata(root) {
            Ok(m) if !m.is_dir() => Err(Error::InvalidInput(format!(
                "root {} is not a directory",
                root.display()
            ))),
            _ => Ok(Self {
                root: root.to_path_buf(),
            }),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of an existing container.
    pub fn get(&self, id: &str) -> Result<ContainerDir> {
        validate_id(id)?;
        let path = self.root.join(id);
        if !path.join("state.json").exists() {
            return Err(Error::NotExist);
        }
        Ok(ContainerDir {
            id: id.to_string(),
            path,
        })
    }

    /// Atomically claims `id`: exactly one concurrent caller succeeds, the others get `Exists`.
    pub fn claim(&self, id: &str) -> Result<ContainerDir> {
        validate_id(id)?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .ctx(|| format!("creating root directory {}", self.root.display()))?;
        let path = self.root.join(id);
        match fs::DirBuilder::new().mode(0o711).create(&path) {
            Ok(()) => Ok(ContainerDir {
                id: id.to_string(),
                path,
            }),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(Error::Exists),
            Err(e) => Err(e).ctx(|| format!("creating {}", path.display())),
        }
    }

    /// IDs of all containers with a state file, sorted.
    pub fn list(&self) -> Result<Vec<String>> {
        let mut ids = Vec::new();
        if !self.root.exists() {
            return Ok(ids);
        }
        for entry in fs::read_dir(&self.root).ctx(|| format!("reading {}", self.root.display()))? {
            let entry = entry.ctx(|| format!("reading {}", self.root.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if validate_id(&name).is_ok() && entry.path().join("state.json").exists() {
                ids.push(name);
            }
        }
        ids.sort();
        Ok(ids)
    }
}

/// Where run dirs live: short, so socket paths stay under 108 bytes.
/// `/run/krun-oci-vm`, or `$XDG_RUNTIME_DIR/krun-oci-vm` for non-root.
pub fn run_base() -> PathBuf {
    if !nix::unistd::geteuid().is_root() {
        if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
            return PathBuf::from(dir).join("krun-oci-vm");
        }
        return std::env::temp_dir().join(format!("krun-oci-vm-{}", nix::unistd::geteuid()));
    }
    PathBuf::from("/run/krun-oci-vm")
}

/// Default `--root`: `/run/krun-oci`, or `$XDG_RUNTIME_DIR/krun-oci` for non-root.
pub fn default_root() -> PathBuf {
    if !nix::unistd::geteuid().is_root() {
        if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
            return PathBuf::from(dir).join("krun-oci");
        }
    }
    PathBuf::from("/run/krun-oci")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};

    #[test]
    fn run_dir_is_short_and_the_same_however_the_root_is_spelled() {
        let dir = |p: &str| ContainerDir {
            id: "c".into(),
            path: PathBuf::from(p),
        };
        let a = dir("/run/containerd/runc/k8s.io/c").run_dir();
        assert_eq!(a, dir("/run//containerd/./runc/k8s.io/c").run_dir());
        assert_ne!(a, dir("/run/containerd/runc/default/c").run_dir());
        // Room for the longest socket name under it in a 108-byte sockaddr_un.
        assert!(
            a.join("virtiofs-mounts.sock").as_os_str().len() < 100,
            "{a:?}"
        );
    }

    #[test]
    fn ids_validated_like_runc() {
        for ok in ["a", "abc-1.2_3+x", "A", "0", "..a", "a..b"] {
            validate_id(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        let long = "a".repeat(1024);
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "/abs",
            "a b",
            "a:b",
            "é",
            long.as_str(),
        ] {
            assert!(validate_id(bad).is_err(), "{bad:?} accepted");
        }
        validate_id(&"a".repeat(MAX_ID_LEN)).unwrap();
    }

    #[test]
    fn atomic_write_replaces_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_atomic(&p, b"first version, long").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"second");
        // No temp files left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn atomic_write_is_never_torn_for_readers() {
        let dir = tempfile::tempdir().unwrap();
        let p = Arc::new(dir.path().join("s"));
        let a = vec![b'a'; 64 * 1024];
        let b = vec![b'b'; 64 * 1024];
        write_atomic(&p, &a).unwrap();
        let reader = {
            let p = p.clone();
            std::thread::spawn(move || {
                for _ in 0..2000 {
                    let d = fs::read(&*p).unwrap();
                    assert!(
                        d.iter().all(|&c| c == d[0]) && d.len() == 64 * 1024,
                        "torn read"
                    );
                }
            })
        };
        for i in 0..200 {
            write_atomic(&p, if i % 2 == 0 { &b } else { &a }).unwrap();
        }
        reader.join().unwrap();
    }

    #[test]
    fn concurrent_claims_have_one_winner() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let n = 32;
        let barrier = Arc::new(Barrier::new(n));
        let winners: usize = (0..n)
            .map(|_| {
                let store = store.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    match store.claim("race") {
                        Ok(_) => 1,
                        Err(Error::Exists) => 0,
                        Err(e) => panic!("{e}"),
                    }
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .sum();
        assert_eq!(winners, 1);
    }

    #[test]
    fn lock_serializes() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let c = store.claim("x").unwrap();
        let counter = Arc::new(std::sync::Mutex::new(Vec::new()));
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let c = c.clone();
                let counter = counter.clone();
                std::thread::spawn(move || {
                    let _l = c.lock().unwrap();
                    counter.lock().unwrap().push((i, "in"));
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    counter.lock().unwrap().push((i, "out"));
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let log = counter.lock().unwrap();
        for pair in log.chunks(2) {
            assert_eq!(pair[0].0, pair[1].0, "interleaved: {log:?}");
        }
    }

    #[test]
    fn root_must_be_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("file");
        fs::write(&f, b"").unwrap();
        assert!(StateStore::open(&f).is_err());
        assert!(StateStore::open(Path::new("")).is_err());
        let nested = dir.path().join("a/b");
        let store = StateStore::open(&nested).unwrap();
        assert!(!nested.exists(), "read-only use must not create the root");
        assert!(store.list().unwrap().is_empty());
        store.claim("c").unwrap();
        assert!(nested.join("c").is_dir());
    }
}
