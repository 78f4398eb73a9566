//! Turning an OCI `process` into a running child, for the main process and exec
//! sessions alike.
//!
//! Everything that needs allocation, parsing or the filesystem (PATH lookup,
//! capability masks, rlimits, the oom_score_adj value) is computed *before* the
//! fork; the child only issues raw, async-signal-safe syscalls (see `run_child`).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;

use krun_oci_protocol::{Process, RefusalKind};

use crate::reaper::Reaper;

/// PATH used when the process environment has none (the same default as runc).
use krun_oci_protocol::contract::DEFAULT_PATH;

/// How the child's stdio is wired.
#[derive(Debug, Clone, Copy)]
pub enum StdioMode {
    /// Three pipes: stdin, stdout, stderr (never sockets).
    Pipes,
    /// A fresh guest pty of this size; the child gets the slave as its controlling tty.
    /// `console`: the container's own terminal (the main's), which runc also binds
    /// onto `/dev/console`.
    Pty { rows: u16, cols: u16, console: bool },
}

/// A started child. Its exit code arrives on `exit` from the reaper.
pub struct Spawned {
    /// The process guest-init knows: the workload, or its relay (see [`relay`]).
    pub pid: i32,
    /// Whether `pid` is a relay, the workload its only child.
    pub relayed: bool,
    pub exit: Receiver<i32>,
    /// Write end of the stdin pipe, or a dup of the pty master.
    pub stdin: Option<File>,
    /// Read end of the stdout pipe, or the pty master.
    pub stdout: Option<File>,
    pub stderr: Option<File>,
    /// The pty master (for resizing), when `StdioMode::Pty`.
    pub pty: Option<File>,
}

/// Finds the program `arg0` names, as runc/Go's `exec.LookPath` would, inside
/// `root` (the container root; "/" once init has switched into it). Returns the
/// path as seen from inside the container.
pub fn resolve_executable(
    root: &Path,
    cwd: &Path,
    arg0: &str,
    path_env: Option<&str>,
) -> Result<PathBuf, SpawnError> {
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    if arg0.is_empty() {
        return Err(SpawnError::not_found(
            "exec: \"\": executable file not found in $PATH".into(),
        ));
    }
    if arg0.contains('/') {
        let candidate = cwd.join(arg0);
        return match std::fs::metadata(inside(&candidate)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(SpawnError::not_found(format!(
                "exec: \"{arg0}\": stat {arg0}: no such file or directory"
            ))),
            Err(e) => Err(format!("exec: \"{arg0}\": {}", errno_text(&e)).into()),
            Ok(m) if m.is_dir() || m.permissions().mode() & 0o111 == 0 => Err(SpawnError {
                reason: format!("exec: \"{arg0}\": permission denied"),
                kind: Some(RefusalKind::PermissionDenied),
            }),
            Ok(_) => Ok(candidate),
        };
    }
    for dir in path_env.unwrap_or(DEFAULT_PATH).split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = cwd.join(dir).join(arg0);
        if let Ok(m) = std::fs::metadata(inside(&candidate)) {
            if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                return Ok(candidate);
            }
        }
    }
    Err(SpawnError::not_found(format!(
        "exec: \"{arg0}\": executable file not found in $PATH"
    )))
}

/// Why a process could not be spawned: the text shown to the user and, where the
/// program itself is the problem, the kind the host turns into exec's 127/126.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpawnError {
    pub reason: String,
    pub kind: Option<RefusalKind>,
}

impl SpawnError {
    fn not_found(reason: String) -> Self {
        SpawnError {
            reason,
            kind: Some(RefusalKind::ExecutableNotFound),
        }
    }

    /// The `Nack` that answers the request.
    pub fn into_nack(self) -> krun_oci_protocol::Message {
        krun_oci_protocol::Message::Nack {
            reason: self.reason,
            kind: self.kind,
        }
    }
}

impl From<String> for SpawnError {
    fn from(reason: String) -> Self {
        SpawnError { reason, kind: None }
    }
}

impl From<&str> for SpawnError {
    fn from(reason: &str) -> Self {
        reason.to_string().into()
    }
}

impl std::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// strerror-like text in lower case ("no such file or directory").
pub fn errno_text(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => nix::errno::Errno::from_raw(n).desc().to_lowercase(),
        None => e.to_string(),
    }
}

/// Splits `K=V` entries; the last PATH wins.
fn split_env(env: &[String]) -> (Vec<(String, String)>, Option<String>) {
    let mut out = Vec::new();
    let mut path = None;
    for e in env {
        if let Some((k, v)) = e.split_once('=') {
            if k == "PATH" {
                path = Some(v.to_string());
            }
            out.push((k.to_string(), v.to_string()));
        }
    }
    (out, path)
}

fn rlimit_resource(name: &str) -> Option<libc::c_int> {
    Some(match name {
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        _ => return None,
    } as libc::c_int)
}

/// Capability sets as bit masks (bit n = capability n).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CapMasks {
    pub bounding: u64,
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
    pub ambient: u64,
}

fn mask_of(set: Option<&oci_spec::runtime::Capabilities>) -> Result<u64, String> {
    let mut mask = 0u64;
    for cap in set.into_iter().flatten() {
        let name = serde_json::to_value(cap)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let parsed: caps::Capability = name
            .parse()
            .map_err(|_| format!("unknown capability {name:?}"))?;
        mask |= 1u64 << parsed.index();
    }
    Ok(mask)
}

pub fn cap_masks(c: &oci_spec::runtime::LinuxCapabilities) -> Result<CapMasks, String> {
    Ok(CapMasks {
        bounding: mask_of(c.bounding().as_ref())?,
        effective: mask_of(c.effective().as_ref())?,
        permitted: mask_of(c.permitted().as_ref())?,
        inheritable: mask_of(c.inheritable().as_ref())?,
        ambient: mask_of(c.ambient().as_ref())?,
    })
}

/// A seccomp filter as the kernel takes it, decoded before the fork.
pub struct Seccomp {
    flags: libc::c_uint,
    filter: Vec<libc::sock_filter>,
}

impl Seccomp {
    /// Decodes the host-compiled program (`struct sock_filter[]`, native order).
    pub fn decode(p: &krun_oci_protocol::SeccompProgram) -> Result<Seccomp, String> {
        p.insns()?;
        let filter = p
            .filter
            .chunks_exact(krun_oci_protocol::SeccompProgram::INSN_LEN)
            .map(|c| libc::sock_filter {
                code: u16::from_ne_bytes([c[0], c[1]]),
                jt: c[2],
                jf: c[3],
                k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
            })
            .collect();
        Ok(Seccomp {
            flags: p.flags,
            filter,
        })
    }

    /// Installs the filter (one syscall; safe between fork and exec).
    fn install(&self) -> io::Result<()> {
        const SECCOMP_SET_MODE_FILTER: libc::c_ulong = 1;
        let prog = libc::sock_fprog {
            len: self.filter.len() as libc::c_ushort,
            filter: self.filter.as_ptr().cast_mut(),
        };
        // SAFETY: `prog` points at `filter`, which outlives the call.
        check(unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                SECCOMP_SET_MODE_FILTER,
                self.flags as libc::c_ulong,
                &prog as *const libc::sock_fprog,
            )
        })
    }
}

/// What confines every container process beyond its own process spec: the
/// seccomp filter, and the guest cgroup that carries `linux.resources` limits
/// (opened at Setup: writing "0" to its `cgroup.procs` moves the writer in, and
/// `clone3` can start a child in its directory).
#[derive(Clone, Default)]
pub struct Confinement {
    pub seccomp: Option<std::sync::Arc<Seccomp>>,
    pub cgroup: Option<std::sync::Arc<crate::resources::ContainerCgroup>>,
    pub namespaces: Option<std::sync::Arc<Namespaces>>,
}

/// The container's own namespaces inside the guest: the `linux.namespaces` types
/// listed without a path that a VM can give the workload (uts, ipc, mount,
/// cgroup, user). The main unshares them; every exec joins the main's. pid and
/// network stay the VM's: the guest's network *is* the container's network
/// namespace (its NICs), and the main is guest-init's child (docs/guest-init.md).
#[derive(Debug, Default)]
pub struct Namespaces {
    /// `CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWNS | CLONE_NEWCGROUP`, as listed.
    pub flags: libc::c_int,
    /// `uid_map` and `gid_map` of a new user namespace (`None`: no user namespace).
    pub user_maps: Option<(String, String)>,
    /// IPC-namespaced sysctls (`kernel.shm*`, `kernel.msg*`, `kernel.sem`,
    /// `fs.mqueue.*`): written by the main in its new IPC namespace.
    pub ipc_sysctls: Vec<(CString, Vec<u8>)>,
    /// A pid namespace: the main is its PID 1 (see [`ChildSetup::apply`]).
    pub pid: bool,
    /// With pid and mount namespaces: `/proc` mounted again inside them.
    pub proc_mount: Option<ProcMount>,
}

/// The config's `/proc` as the main mounts it again in its own pid and mount
/// namespaces, with the masked and read-only paths below it re-applied.
#[derive(Debug)]
pub struct ProcMount {
    pub flags: libc::c_ulong,
    pub masked: Vec<CString>,
    pub readonly: Vec<CString>,
}

/// `/proc/<pid>/ns/` names and `setns` types, user first (joining it grants the
/// rights to join the others).
const NS_FILES: [(&str, libc::c_int); 5] = [
    ("user", libc::CLONE_NEWUSER),
    ("uts", libc::CLONE_NEWUTS),
    ("ipc", libc::CLONE_NEWIPC),
    ("mnt", libc::CLONE_NEWNS),
    ("cgroup", libc::CLONE_NEWCGROUP),
];

/// Whether a sysctl belongs to the IPC namespace.
pub fn is_ipc_sysctl(key: &str) -> bool {
    let k = key.replace('/', ".");
    k.starts_with("kernel.shm")
        || k.starts_with("kernel.msg")
        || k == "kernel.sem"
        || k.starts_with("fs.mqueue.")
}

impl Namespaces {
    pub fn from_spec(spec: &oci_spec::runtime::Spec) -> Result<Namespaces, String> {
        use oci_spec::runtime::LinuxNamespaceType as T;
        let Some(linux) = spec.linux().as_ref() else {
            return Ok(Namespaces::default());
        };
        let mut ns = Namespaces::default();
        for n in linux.namespaces().iter().flatten() {
            if n.path().is_some() {
                continue;
            }
            ns.flags |= match n.typ() {
                T::Uts => libc::CLONE_NEWUTS,
                T::Ipc => libc::CLONE_NEWIPC,
                T::Mount => libc::CLONE_NEWNS,
                T::Cgroup => libc::CLONE_NEWCGROUP,
                T::Pid => {
                    ns.pid = true;
                    0
                }
                T::User => {
                    let map = |m: Option<&Vec<oci_spec::runtime::LinuxIdMapping>>| {
                        m.filter(|m| !m.is_empty()).map(|m| {
                            m.iter()
                                .map(|e| {
                                    format!("{} {} {}\n", e.container_id(), e.host_id(), e.size())
                                })
                                .collect::<String>()
                        })
                    };
                    match (
                        map(linux.uid_mappings().as_ref()),
                        map(linux.gid_mappings().as_ref()),
                    ) {
                        (Some(u), Some(g)) => ns.user_maps = Some((u, g)),
                        _ => {
                            return Err(
                                "user namespaces enabled, but no uid or gid mappings found".into()
                            )
                        }
                    }
                    0
                }
                _ => 0,
            };
        }
        if ns.pid && ns.flags & libc::CLONE_NEWNS != 0 {
            let proc = spec.mounts().iter().flatten().rfind(|m| {
                m.destination() == Path::new("/proc") && m.typ().as_deref() == Some("proc")
            });
            if let Some(m) = proc {
                let o = crate::mounts::parse_options(m.options().as_deref().unwrap_or_default());
                let under_proc = |paths: Option<&Vec<String>>| -> Vec<CString> {
                    paths
                        .into_iter()
                        .flatten()
                        .filter(|p| p.starts_with("/proc/"))
                        .filter_map(|p| CString::new(p.as_str()).ok())
                        .collect()
                };
                ns.proc_mount = Some(ProcMount {
                    flags: o.flags.bits() as libc::c_ulong,
                    masked: under_proc(linux.masked_paths().as_ref()),
                    readonly: under_proc(linux.readonly_paths().as_ref()),
                });
            }
        }
        if ns.flags & libc::CLONE_NEWIPC != 0 {
            for (key, value) in linux.sysctl().iter().flatten() {
                if is_ipc_sysctl(key) {
                    let path = crate::guest::sysctl_path(key)?;
                    ns.ipc_sysctls.push((
                        CString::new(path).map_err(|_| format!("sysctl {key:?}"))?,
                        value.clone().into_bytes(),
                    ));
                }
            }
        }
        Ok(ns)
    }

    /// Opens the main's namespaces (those this plan made) for an exec to join.
    /// `relayed`: `main` is the main's relay (see [`relay`]), not the workload;
    /// either way `pid_for_children` is the namespace the workload is PID 1 of.
    pub fn open_main(&self, main: i32, relayed: bool) -> Result<MainNamespaces, String> {
        // The namespaces made after the relay's fork (cgroup) are the
        // workload's, its only child.
        let main = if relayed {
            crate::procfs::only_child_of(main).ok_or("the container's main process is gone")?
        } else {
            main
        };
        let pid = self.pid.then_some(("pid", libc::CLONE_NEWPID));
        NS_FILES
            .iter()
            .copied()
            .chain(pid)
            .filter(|(_, t)| match *t {
                libc::CLONE_NEWUSER => self.user_maps.is_some(),
                libc::CLONE_NEWPID => self.pid,
                t => self.flags & t != 0,
            })
            .map(|(name, t)| {
                let path = format!("/proc/{main}/ns/{name}");
                File::open(&path)
                    .map(|f| (OwnedFd::from(f), t))
                    .map_err(|e| {
                        format!(
                            "joining the container's namespaces: {path}: {}",
                            errno_text(&e)
                        )
                    })
            })
            .collect::<Result<_, _>>()
            .map(MainNamespaces)
    }
}

/// The main's namespaces, open (see [`Namespaces::open_main`]): an exec joins
/// them. Kept by guest-init for the main's life, so that an exec neither scans
/// /proc for the main's workload nor opens its `/proc/PID/ns/` files again.
#[derive(Debug)]
pub struct MainNamespaces(Vec<(OwnedFd, libc::c_int)>);

impl MainNamespaces {
    fn duplicate(&self) -> Result<Vec<(OwnedFd, libc::c_int)>, String> {
        self.0
            .iter()
            .map(|(fd, t)| {
                fd.try_clone()
                    .map(|fd| (fd, *t))
                    .map_err(|e| format!("joining the container's namespaces: {}", errno_text(&e)))
            })
            .collect()
    }
}

/// The parent's half of a new user namespace: it reads the child's pid, writes
/// its `uid_map` and `gid_map` (the child, in the new namespace, cannot map
/// arbitrary ids itself), then lets it go on.
struct UserNsSync {
    /// The child's ends: it writes its pid on `ready`, then waits for a byte on `go`.
    child_ready: OwnedFd,
    child_go: OwnedFd,
    /// Ours, which the child closes first.
    parent_ready: OwnedFd,
    parent_go: OwnedFd,
}

impl UserNsSync {
    fn new() -> Result<UserNsSync, String> {
        let pipe = || {
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| format!("pipe: {}", e.desc().to_lowercase()))
        };
        let (parent_ready, child_ready) = pipe()?;
        let (child_go, parent_go) = pipe()?;
        Ok(UserNsSync {
            child_ready,
            child_go,
            parent_ready,
            parent_go,
        })
    }

    /// Starts the thread that writes the maps once the child asks.
    fn serve(
        parent_ready: OwnedFd,
        parent_go: OwnedFd,
        maps: (String, String),
    ) -> std::thread::JoinHandle<Result<(), String>> {
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            let mut pid = [0u8; 4];
            File::from(parent_ready)
                .read_exact(&mut pid)
                .map_err(|_| "the child ended before its user namespace was mapped".to_string())?;
            let pid = i32::from_ne_bytes(pid);
            for (file, map) in [("uid_map", &maps.0), ("gid_map", &maps.1)] {
                std::fs::write(format!("/proc/{pid}/{file}"), map)
                    .map_err(|e| format!("writing {file} {map:?}: {}", errno_text(&e)))?;
            }
            File::from(parent_go)
                .write_all(b"1")
                .map_err(|e| format!("releasing the child: {}", errno_text(&e)))
        })
    }
}

/// Everything the child needs after the fork, precomputed.
struct ChildSetup {
    tty: bool,
    uid: u32,
    gid: u32,
    groups: Vec<libc::gid_t>,
    umask: Option<u32>,
    rlimits: Vec<(libc::c_int, libc::rlimit)>,
    caps: Option<CapMasks>,
    last_cap: u32,
    no_new_privs: bool,
    oom_path: CString,
    oom_value: Option<Vec<u8>>,
    confinement: Confinement,
    /// Namespaces the main unshares (`CLONE_NEW*`, user excluded).
    unshare: libc::c_int,
    /// A new user namespace: the child's ends of the sync pipes and the parent's,
    /// which the child closes first.
    user_ns: Option<[libc::c_int; 4]>,
    /// An exec: the main's namespaces to join, user first.
    join: Vec<(OwnedFd, libc::c_int)>,
    /// cwd again after joining a mount namespace (setns moves to its root).
    cwd: CString,
    /// The main makes a pid namespace (an exec joins the main's through `join`):
    /// the child forks once more and relays for the grandchild, PID 1 there.
    pid_ns: bool,
    /// The child was cloned into its new pid namespace (PID 1 there), so it
    /// neither forks nor relays: it mounts `/proc` again itself.
    pid_ns_entered: bool,
    /// The child was cloned into the container cgroup: it does not join it.
    in_cgroup: bool,
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

fn check(ret: libc::c_long) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl ChildSetup {
    /// Whether the workload runs in a pid namespace of the container's (made, or
    /// joined by an exec): the child then forks once more and relays.
    fn in_pid_ns(&self) -> bool {
        self.pid_ns || self.join.iter().any(|(_, t)| *t == libc::CLONE_NEWPID)
    }

    /// `/proc` of the main's new pid namespace, to mount in its mount namespace.
    fn proc_mount(&self) -> Option<&ProcMount> {
        self.confinement
            .namespaces
            .as_ref()
            .and_then(|n| n.proc_mount.as_ref())
    }

    /// The fds `apply` uses.
    fn fds_in_use(&self) -> Vec<libc::c_int> {
        let mut fds: Vec<libc::c_int> = self.join.iter().map(|(fd, _)| fd.as_raw_fd()).collect();
        fds.extend(self.user_ns.iter().flatten());
        fds.extend(
            self.confinement
                .cgroup
                .as_ref()
                .map(|c| c.procs.as_raw_fd()),
        );
        fds
    }

    /// Moves the caller into the container cgroup (async-signal-safe).
    fn join_cgroup(&self) -> io::Result<()> {
        if let Some(cgroup) = &self.confinement.cgroup {
            check(
                // SAFETY: a write of one byte from a static buffer to an fd we hold.
                unsafe { libc::write(cgroup.procs.as_raw_fd(), b"0".as_ptr().cast(), 1) }
                    as libc::c_long,
            )?;
        }
        Ok(())
    }

    /// Runs in the child between fork and exec: raw syscalls only, no allocation.
    fn apply(&self) -> io::Result<()> {
        // SAFETY: plain syscalls on values prepared before the fork.
        unsafe {
            // With a pid namespace this process stays behind as a relay (below): it
            // must not count in the container's cgroup (pids.max), so the grandchild
            // joins it, and makes the cgroup namespace after that.
            let forks = self.in_pid_ns();
            if !forks && !self.in_cgroup {
                self.join_cgroup()?;
            }
            // The user namespace first: the others then belong to it (as runc).
            if let Some([ready, go, parent_ready, parent_go]) = self.user_ns {
                libc::close(parent_ready);
                libc::close(parent_go);
                check(libc::unshare(libc::CLONE_NEWUSER) as libc::c_long)?;
                let pid = libc::getpid().to_ne_bytes();
                check(libc::write(ready, pid.as_ptr().cast(), 4) as libc::c_long)?;
                let mut byte = 0u8;
                if libc::read(go, (&mut byte as *mut u8).cast(), 1) != 1 {
                    return Err(io::Error::other("the user namespace was not mapped"));
                }
            }
            // Joined after the cgroup (a process inside a cgroup namespace cannot
            // move in from outside its root).
            let mut cgroup_ns = None;
            for (fd, nstype) in &self.join {
                if forks && *nstype == libc::CLONE_NEWCGROUP {
                    cgroup_ns = Some(fd.as_raw_fd());
                    continue;
                }
                check(libc::setns(fd.as_raw_fd(), *nstype) as libc::c_long)?;
            }
            if !self.join.is_empty() {
                check(libc::chdir(self.cwd.as_ptr()) as libc::c_long)?;
            }
            let unshare = if forks {
                self.unshare & !libc::CLONE_NEWCGROUP
            } else {
                self.unshare
            };
            if unshare != 0 {
                check(libc::unshare(unshare) as libc::c_long)?;
                if let Some(ns) = &self.confinement.namespaces {
                    for (path, value) in &ns.ipc_sysctls {
                        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                        check(fd as libc::c_long)?;
                        let n = libc::write(fd, value.as_ptr().cast(), value.len());
                        libc::close(fd);
                        check(n as libc::c_long)?;
                    }
                }
            }
            if self.pid_ns_entered {
                if let Some(p) = self.proc_mount() {
                    remount_proc(p)?;
                }
            }
            // A pid namespace applies to children: fork once more. This process
            // stays behind as the relay (it is the pid guest-init knows); the
            // grandchild, PID 1 of the new namespace (or a member of the main's),
            // goes on to exec.
            if forks {
                if self.pid_ns {
                    check(libc::unshare(libc::CLONE_NEWPID) as libc::c_long)?;
                }
                // Blocked before the fork: the grandchild's exit must wait for the relay.
                libc::signal(libc::SIGCHLD, libc::SIG_DFL);
                let mut all: libc::sigset_t = std::mem::zeroed();
                let mut before: libc::sigset_t = std::mem::zeroed();
                libc::sigfillset(&mut all);
                libc::sigprocmask(libc::SIG_SETMASK, &all, &mut before);
                let child = libc::fork();
                if child > 0 {
                    relay(child, &all);
                }
                libc::sigprocmask(libc::SIG_SETMASK, &before, std::ptr::null_mut());
                check(child as libc::c_long)?;
                self.join_cgroup()?;
                if self.unshare & libc::CLONE_NEWCGROUP != 0 {
                    check(libc::unshare(libc::CLONE_NEWCGROUP) as libc::c_long)?;
                }
                if let Some(fd) = cgroup_ns {
                    check(libc::setns(fd, libc::CLONE_NEWCGROUP) as libc::c_long)?;
                }
                if self.pid_ns {
                    if let Some(p) = self.proc_mount() {
                        remount_proc(p)?;
                    }
                }
            }
            check(libc::setsid() as libc::c_long)?;
            if self.tty {
                check(libc::ioctl(0, libc::TIOCSCTTY, 0) as libc::c_long)?;
            }
            if let Some(v) = &self.oom_value {
                let fd = libc::open(self.oom_path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd >= 0 {
                    libc::write(fd, v.as_ptr().cast(), v.len());
                    libc::close(fd);
                }
            }
            for (res, lim) in &self.rlimits {
                check(libc::setrlimit(*res as _, lim) as libc::c_long)?;
            }
            if let Some(m) = self.umask {
                libc::umask(m as libc::mode_t);
            }
            if let Some(c) = &self.caps {
                // Dropping from the bounding set needs CAP_SETPCAP: do it while still root.
                for cap in 0..=self.last_cap {
                    if c.bounding & (1u64 << cap) == 0 {
                        let r = libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0);
                        if r < 0 && *libc::__errno_location() != libc::EINVAL {
                            return Err(io::Error::last_os_error());
                        }
                    }
                }
                check(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) as libc::c_long)?;
            }
            // As runc: without no_new_privs installing a filter needs CAP_SYS_ADMIN,
            // so it goes in before privileges are dropped; with it, as late as possible.
            if !self.no_new_privs {
                if let Some(s) = &self.confinement.seccomp {
                    s.install()?;
                }
            }
            check(libc::syscall(
                libc::SYS_setgroups,
                self.groups.len(),
                self.groups.as_ptr(),
            ))?;
            check(libc::syscall(
                libc::SYS_setresgid,
                self.gid,
                self.gid,
                self.gid,
            ))?;
            check(libc::syscall(
                libc::SYS_setresuid,
                self.uid,
                self.uid,
                self.uid,
            ))?;
            if let Some(c) = &self.caps {
                let header = CapHeader {
                    version: LINUX_CAPABILITY_VERSION_3,
                    pid: 0,
                };
                let data = [
                    CapData {
                        effective: c.effective as u32,
                        permitted: c.permitted as u32,
                        inheritable: c.inheritable as u32,
                    },
                    CapData {
                        effective: (c.effective >> 32) as u32,
                        permitted: (c.permitted >> 32) as u32,
                        inheritable: (c.inheritable >> 32) as u32,
                    },
                ];
                check(libc::syscall(libc::SYS_capset, &header, data.as_ptr()))?;
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                    0,
                    0,
                    0,
                );
                for cap in 0..=self.last_cap {
                    if c.ambient & (1u64 << cap) != 0 {
                        // Fails (EPERM) unless also permitted+inheritable: like runc, ignore.
                        libc::prctl(
                            libc::PR_CAP_AMBIENT,
                            libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                            cap as libc::c_ulong,
                            0,
                            0,
                        );
                    }
                }
            }
            if self.in_pid_ns() {
                // The relay gone (SIGKILL), the workload goes too. Set after the
                // uid change, which clears it.
                libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                );
            }
            if self.no_new_privs {
                check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) as libc::c_long)?;
                if let Some(s) = &self.confinement.seccomp {
                    s.install()?;
                }
            }
        }
        Ok(())
    }
}

/// The relay between guest-init and a process in a pid namespace (the
/// grandchild): every signal it gets goes to `child`, and it ends as `child`
/// ended (the same code, or killed by the same signal). Runs in the forked
/// child before exec: async-signal-safe calls only, never returns.
/// Called with every signal blocked (`all`).
fn relay(child: libc::pid_t, all: &libc::sigset_t) -> ! {
    // SAFETY: plain syscalls on local values; this process never returns to Rust code.
    unsafe {
        // No fd of ours may keep a pipe open: stdio is the grandchild's, and the
        // status pipe must close when the grandchild execs.
        libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
        loop {
            let sig = libc::sigwaitinfo(all, std::ptr::null_mut());
            if sig == libc::SIGCHLD {
                let mut status = 0;
                if libc::waitpid(child, &mut status, libc::WNOHANG) == child {
                    if libc::WIFSIGNALED(status) {
                        let s = libc::WTERMSIG(status);
                        libc::signal(s, libc::SIG_DFL);
                        let mut one: libc::sigset_t = std::mem::zeroed();
                        libc::sigaddset(&mut one, s);
                        libc::sigprocmask(libc::SIG_UNBLOCK, &one, std::ptr::null_mut());
                        libc::kill(libc::getpid(), s);
                        libc::_exit(128 + s);
                    }
                    libc::_exit(libc::WEXITSTATUS(status));
                }
            } else if sig > 0 {
                libc::kill(child, sig);
            }
        }
    }
}

/// In the main's own pid and mount namespaces: `/proc` again (the one guest-init
/// mounted shows the VM's pids), and the config's masked and read-only paths
/// under it. Async-signal-safe calls only.
fn remount_proc(p: &ProcMount) -> io::Result<()> {
    // SAFETY: syscalls on NUL-terminated strings prepared before the fork.
    unsafe {
        // On top of the one mounted at Setup (kept: the mount table stays in the
        // config's order, this one last), which shows the VM's pids.
        let proc = c"/proc".as_ptr();
        check(libc::mount(
            c"proc".as_ptr(),
            proc,
            c"proc".as_ptr(),
            p.flags,
            std::ptr::null(),
        ) as libc::c_long)?;
        for path in &p.masked {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::stat(path.as_ptr(), &mut st) != 0 {
                continue;
            }
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                libc::mount(
                    c"tmpfs".as_ptr(),
                    path.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_RDONLY,
                    std::ptr::null(),
                );
            } else {
                libc::mount(
                    c"/dev/null".as_ptr(),
                    path.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                );
            }
        }
        for path in &p.readonly {
            if libc::mount(
                path.as_ptr(),
                path.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ) == 0
            {
                libc::mount(
                    std::ptr::null(),
                    path.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND
                        | libc::MS_REMOUNT
                        | libc::MS_RDONLY
                        | libc::MS_NOSUID
                        | libc::MS_NODEV
                        | libc::MS_NOEXEC,
                    std::ptr::null(),
                );
            }
        }
    }
    Ok(())
}

fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

fn set_cloexec(fd: &OwnedFd) {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC);
    }
}

/// Sets a terminal's window size.
pub fn set_winsize(tty: &File, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ with a valid winsize on a descriptor we own.
    let r = unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Starts `process` inside the container root (init's "/"), registered with the
/// reaper before anything can reap it. Errors are user-facing reasons.
/// Binds the terminal onto `/dev/console` (an empty file made as the mount point
/// where the config's /dev has none), as runc does for the container's terminal.
fn bind_console(slave: &OwnedFd) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let console = Path::new("/dev/console");
    if std::fs::symlink_metadata(console).is_err() {
        File::create(console).map_err(|e| format!("creating /dev/console: {}", errno_text(&e)))?;
    }
    let source = format!("/proc/self/fd/{}", slave.as_raw_fd());
    nix::mount::mount(
        Some(source.as_str()),
        console,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| {
        format!(
            "binding the terminal to /dev/console: {}",
            e.desc().to_lowercase()
        )
    })
}

/// Spawns `process` and lets it run. `main`: `None` for the container's main
/// (it makes the container's namespaces), the main's for an exec (it joins them).
pub fn spawn(
    process: &Process,
    mode: StdioMode,
    reaper: &Reaper,
    confinement: Confinement,
    main: Option<&MainNamespaces>,
) -> Result<Spawned, SpawnError> {
    prepare(process, mode, reaper, confinement, main, None)?.release()
}

/// Forks `process` and sets it up (namespaces, cgroup, credentials, seccomp) up
/// to its exec, where it waits for [`Prepared::release`]. The main is prepared at
/// create, so that `start` has only the exec left (runc's `runc init` waits the
/// same way on its exec fifo). `program`: where the host found the program
/// (`Setup.main_program`), which spares the lookup here.
pub fn prepare(
    process: &Process,
    mode: StdioMode,
    reaper: &Reaper,
    confinement: Confinement,
    main: Option<&MainNamespaces>,
    program: Option<&Path>,
) -> Result<Prepared, SpawnError> {
    let args = process.args().clone().unwrap_or_default();
    let Some(arg0) = args.first() else {
        return Err("process.args must not be empty".into());
    };
    let (env, path_env) = split_env(process.env().as_deref().unwrap_or(&[]));
    let cwd = process.cwd().clone();
    if !cwd.is_absolute() {
        return Err(format!("cwd {cwd:?} must be an absolute path").into());
    }
    match std::fs::metadata(&cwd) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(format!("chdir to cwd ({cwd:?}) failed: not a directory").into()),
        Err(e) => return Err(format!("chdir to cwd ({cwd:?}) failed: {}", errno_text(&e)).into()),
    }
    let program = match program {
        Some(p) => p.to_path_buf(),
        None => resolve_executable(Path::new("/"), &cwd, arg0, path_env.as_deref())?,
    };

    let user = process.user();
    let mut rlimits = Vec::new();
    for rl in process.rlimits().iter().flatten() {
        let name = serde_json::to_value(rl.typ())
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let res = rlimit_resource(&name).ok_or_else(|| format!("unknown rlimit {name:?}"))?;
        rlimits.push((
            res,
            libc::rlimit {
                rlim_cur: rl.soft(),
                rlim_max: rl.hard(),
            },
        ));
    }
    let namespaces = confinement.namespaces.clone().unwrap_or_default();
    let (unshare, join) = match main {
        None => (namespaces.flags, Vec::new()),
        Some(main) => (0, main.duplicate()?),
    };
    let user_sync = match (&namespaces.user_maps, main) {
        (Some(maps), None) => Some((UserNsSync::new()?, maps.clone())),
        _ => None,
    };
    let mut setup = ChildSetup {
        pid_ns: main.is_none() && namespaces.pid,
        pid_ns_entered: false,
        in_cgroup: false,
        unshare,
        user_ns: user_sync.as_ref().map(|(s, _)| {
            [
                s.child_ready.as_raw_fd(),
                s.child_go.as_raw_fd(),
                s.parent_ready.as_raw_fd(),
                s.parent_go.as_raw_fd(),
            ]
        }),
        join,
        cwd: CString::new(cwd.as_os_str().as_encoded_bytes()).map_err(|_| "cwd has a NUL byte")?,
        tty: matches!(mode, StdioMode::Pty { .. }),
        uid: user.uid(),
        gid: user.gid(),
        groups: user.additional_gids().clone().unwrap_or_default(),
        umask: user.umask(),
        rlimits,
        caps: process.capabilities().as_ref().map(cap_masks).transpose()?,
        last_cap: last_cap(),
        no_new_privs: process.no_new_privileges().unwrap_or(false),
        oom_path: CString::new("/proc/self/oom_score_adj").expect("no NUL"),
        oom_value: process.oom_score_adj().map(|v| v.to_string().into_bytes()),
        confinement,
    };

    let shown = program.display().to_string();
    // `at_exec`: execve itself failed (not the setup before it), so ENOENT and
    // EACCES are about the program.
    let exec_failed = move |errno: i32, at_exec: bool| {
        let (what, kind) = match errno {
            libc::ENOENT => (
                "no such file or directory".to_string(),
                Some(RefusalKind::ExecutableNotFound),
            ),
            libc::EACCES => (
                "permission denied".to_string(),
                Some(RefusalKind::PermissionDenied),
            ),
            e => (errno_text(&io::Error::from_raw_os_error(e)), None),
        };
        SpawnError {
            reason: format!("exec: {shown:?}: {what}"),
            kind: kind.filter(|_| at_exec),
        }
    };
    let image = ExecImage::new(&program, arg0, &args[1..], env, &cwd)?;

    // The child's stdio, each parent-side end kept, each child-side end at fd 3 or
    // above (so that the child's dup2 onto 0, 1, 2 cannot clobber another).
    let (ours, master, theirs): ([Option<File>; 3], Option<File>, [OwnedFd; 3]) = match mode {
        StdioMode::Pipes => {
            let (stdin_r, stdin_w) = pipe()?;
            let (stdout_r, stdout_w) = pipe()?;
            let (stderr_r, stderr_w) = pipe()?;
            (
                [
                    Some(File::from(stdin_w)),
                    Some(File::from(stdout_r)),
                    Some(File::from(stderr_r)),
                ],
                None,
                [
                    above_stdio(stdin_r)?,
                    above_stdio(stdout_w)?,
                    above_stdio(stderr_w)?,
                ],
            )
        }
        StdioMode::Pty {
            rows,
            cols,
            console,
        } => {
            let ws = nix::pty::Winsize {
                ws_row: rows,
                ws_col: cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            let pty = nix::pty::openpty(Some(&ws), None)
                .map_err(|e| format!("allocating a pty: {}", e.desc().to_lowercase()))?;
            set_cloexec(&pty.master);
            set_cloexec(&pty.slave);
            if console {
                bind_console(&pty.slave)?;
            }
            let slave = above_stdio(pty.slave)?;
            let dup = |f: &OwnedFd| {
                f.try_clone()
                    .map_err(|e| format!("pty: {}", errno_text(&e)))
            };
            let m = File::from(pty.master);
            (
                [m.try_clone().ok(), m.try_clone().ok(), None],
                Some(m),
                [dup(&slave)?, dup(&slave)?, slave],
            )
        }
    };
    // `status`: the child's word on how far it got (see ChildReport); `go`: one
    // byte releases it into its exec.
    let (status_r, status_w) = pipe()?;
    let (go_r, go_w) = pipe()?;
    let (user_thread, user_child_ends) = match user_sync {
        Some((sync, maps)) => {
            let UserNsSync {
                child_ready,
                child_go,
                parent_ready,
                parent_go,
            } = sync;
            (
                Some(UserNsSync::serve(parent_ready, parent_go, maps)),
                Some((child_ready, child_go)),
            )
        }
        None => (None, None),
    };
    let mut keep = setup.fds_in_use();
    keep.extend([status_w.as_raw_fd(), go_r.as_raw_fd()]);
    keep.sort_unstable();
    let child = ChildFds {
        stdio: [
            theirs[0].as_raw_fd(),
            theirs[1].as_raw_fd(),
            theirs[2].as_raw_fd(),
        ],
        status: status_w.as_raw_fd(),
        go: go_r.as_raw_fd(),
        keep,
    };

    // The main (without a user namespace, which its pid namespace would have to
    // belong to) is cloned straight into its pid namespace and the container
    // cgroup: no relay forked, no move into the cgroup (under TCG each took
    // 3-12 ms of the main's preparation, on a `start` that follows `create` at once).
    let cgroup_dir = setup.confinement.cgroup.as_ref().map(|c| c.dir.as_raw_fd());
    if main.is_none() && setup.user_ns.is_none() {
        setup.pid_ns_entered = setup.pid_ns;
        setup.pid_ns = false;
        setup.in_cgroup = cgroup_dir.is_some();
    }
    // From the fork until the pid is registered no child may be reaped: hold the lock.
    let mut registry = reaper.lock();
    let cloned = setup.pid_ns_entered || setup.in_cgroup;
    let mut forked = match cloned {
        // SAFETY: the child only runs `run_child`, which issues async-signal-safe
        // syscalls on values prepared above and never returns.
        true => unsafe { clone_into(setup.pid_ns_entered, cgroup_dir.filter(|_| setup.in_cgroup)) },
        false => fork(),
    };
    if let (true, Err(e)) = (cloned, &forked) {
        // A kernel without clone3 or CLONE_INTO_CGROUP: the relay's way.
        log::debug!("clone3: {}; forking", errno_text(e));
        setup.pid_ns = setup.pid_ns_entered;
        setup.pid_ns_entered = false;
        setup.in_cgroup = false;
        forked = fork();
    }
    let pid = match forked {
        Err(e) => return Err(format!("fork: {}", errno_text(&e)).into()),
        // SAFETY: in the child; see the fork above.
        Ok(0) => unsafe { run_child(&setup, &image, &child) },
        Ok(pid) => pid,
    };
    let relayed = setup.in_pid_ns();
    let exit = registry.register(pid);
    drop(registry);
    drop((theirs, status_w, go_r, user_child_ends, image));

    let mut status = File::from(status_r);
    let report = ChildReport::read(&mut status);
    if let Some(t) = user_thread {
        let mapped = t
            .join()
            .unwrap_or_else(|_| Err("the user namespace thread panicked".into()));
        if let Err(e) = mapped {
            if report != ChildReport::Ready {
                return Err(e.into());
            }
            // The child cannot have gone on unmapped; report why it would have failed.
            log::warn!("{e}");
        }
    }
    match report {
        ChildReport::Ready => {}
        ChildReport::SetupFailed(errno) => return Err(exec_failed(errno, false)),
        ChildReport::ExecFailed(errno) => return Err(exec_failed(errno, true)),
        ChildReport::Ended => return Err(exec_failed(libc::ECHILD, false)),
    }
    let [stdin, stdout, stderr] = ours;
    Ok(Prepared {
        spawned: Spawned {
            pid,
            relayed,
            exit,
            stdin,
            stdout,
            stderr,
            pty: master,
        },
        go: File::from(go_w),
        status,
        exec_failed: Box::new(exec_failed),
    })
}

/// The byte that releases a prepared child: exec and report how it went, or
/// exec unwatched.
const GO_AFTER_EXEC: u8 = b'1';
const GO_BEFORE_EXEC: u8 = b'2';

/// A child waiting before its exec (see [`prepare`]). Dropped unreleased, it exits.
pub struct Prepared {
    spawned: Spawned,
    go: File,
    status: File,
    exec_failed: Box<dyn Fn(i32, bool) -> SpawnError + Send>,
}

impl Prepared {
    pub fn pid(&self) -> i32 {
        self.spawned.pid
    }

    /// Whether [`Prepared::pid`] is the workload's relay.
    pub fn relayed(&self) -> bool {
        self.spawned.relayed
    }

    /// The pty master, when the child has a terminal.
    pub fn pty(&self) -> Option<&File> {
        self.spawned.pty.as_ref()
    }

    /// Whether the child still waits (it may have been killed meanwhile).
    pub fn waiting(&self) -> bool {
        matches!(
            self.spawned.exit.try_recv(),
            Err(std::sync::mpsc::TryRecvError::Empty)
        )
    }

    /// Releases the child into its exec; returns once the exec has succeeded (or
    /// with the exec's error, as `exec: "PROGRAM": REASON`).
    pub fn release(mut self) -> Result<Spawned, SpawnError> {
        use std::io::Write;
        self.go
            .write_all(&[GO_AFTER_EXEC])
            .map_err(|_| (self.exec_failed)(libc::ECHILD, false))?;
        match ChildReport::read(&mut self.status) {
            // The status pipe closes on a successful exec.
            ChildReport::Ended => Ok(self.spawned),
            ChildReport::ExecFailed(errno) => Err((self.exec_failed)(errno, true)),
            ChildReport::SetupFailed(errno) => Err((self.exec_failed)(errno, false)),
            ChildReport::Ready => Err((self.exec_failed)(libc::EPROTO, false)),
        }
    }

    /// Releases the child: the word is in its pipe when this returns, its exec
    /// still to come, as `runc init` execs after runc's `start` has read its byte
    /// from the exec fifo. No answer is awaited: under TCG the child's wake-up and
    /// the reply's were ~1-2 ms of a pool hit's `start`. An exec that fails is the
    /// process's own failure (exit status 126, 127 when not found, the reason on
    /// its stderr, as runc's `exec PROGRAM: REASON`).
    pub fn release_before_exec(mut self) -> Spawned {
        use std::io::Write;
        // A child killed meanwhile refuses the word (no reader): its exit, in
        // the reaper's channel, is then the main's as after any release.
        if self.go.write_all(&[GO_BEFORE_EXEC]).is_err() {
            log::warn!("pid {} died before its release", self.spawned.pid);
        }
        self.spawned
    }
}

/// What the child reports on its status pipe: a tag byte, then the errno for the failures.
#[derive(Debug, PartialEq)]
enum ChildReport {
    /// Set up; waiting to be released.
    Ready,
    SetupFailed(i32),
    ExecFailed(i32),
    /// The pipe closed: exec'd (after release) or died (before).
    Ended,
}

impl ChildReport {
    const READY: u8 = b'R';
    const SETUP_FAILED: u8 = b'S';
    const EXEC_FAILED: u8 = b'E';

    fn read(status: &mut File) -> ChildReport {
        use std::io::Read;
        let mut tag = [0u8; 1];
        match status.read(&mut tag) {
            Ok(1) => {}
            _ => return ChildReport::Ended,
        }
        if tag[0] == Self::READY {
            return ChildReport::Ready;
        }
        let mut errno = [0u8; 4];
        let errno = match status.read_exact(&mut errno) {
            Ok(()) => i32::from_ne_bytes(errno),
            Err(_) => libc::EIO,
        };
        match tag[0] {
            Self::SETUP_FAILED => ChildReport::SetupFailed(errno),
            _ => ChildReport::ExecFailed(errno),
        }
    }
}

/// The raw fds the child works with.
struct ChildFds {
    stdio: [libc::c_int; 3],
    status: libc::c_int,
    go: libc::c_int,
    /// Every fd above stdio the child still needs (sorted): the others are closed.
    keep: Vec<libc::c_int>,
}

/// The exec's arguments as C strings, built before the fork.
struct ExecImage {
    program: CString,
    cwd: CString,
    /// Why an exec failed, per errno, for a child released before its exec (it
    /// may not allocate): made once per guest-init, not per spawn.
    exec_errors: &'static [(i32, String)],
    // Owners of the strings the pointer arrays point into.
    _strings: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
}

impl ExecImage {
    fn new(
        program: &Path,
        arg0: &str,
        args: &[String],
        env: Vec<(String, String)>,
        cwd: &Path,
    ) -> Result<ExecImage, String> {
        let c =
            |s: &[u8], what: &str| CString::new(s).map_err(|_| format!("{what} has a NUL byte"));
        let mut strings = Vec::new();
        for a in std::iter::once(arg0).chain(args.iter().map(String::as_str)) {
            strings.push(c(a.as_bytes(), "process.args")?);
        }
        let argc = strings.len();
        // One entry per name, the last one winning (as std's Command::envs).
        let env: std::collections::BTreeMap<String, String> = env.into_iter().collect();
        for (k, v) in env {
            strings.push(c(format!("{k}={v}").as_bytes(), "process.env")?);
        }
        let ptrs = |s: &[CString]| {
            s.iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect::<Vec<_>>()
        };
        Ok(ExecImage {
            program: c(program.as_os_str().as_encoded_bytes(), "the program path")?,
            exec_errors: exec_errors(),
            cwd: c(cwd.as_os_str().as_encoded_bytes(), "cwd")?,
            argv: ptrs(&strings[..argc]),
            envp: ptrs(&strings[argc..]),
            _strings: strings,
        })
    }
}

/// The texts of the errors execve(2) documents, made once.
fn exec_errors() -> &'static [(i32, String)] {
    static TEXTS: std::sync::OnceLock<Vec<(i32, String)>> = std::sync::OnceLock::new();
    TEXTS.get_or_init(|| {
        EXEC_ERRNOS
            .iter()
            .map(|&e| (e, errno_text(&io::Error::from_raw_os_error(e))))
            .collect()
    })
}

const EXEC_ERRNOS: [i32; 18] = [
    libc::E2BIG,
    libc::EACCES,
    libc::EAGAIN,
    libc::EFAULT,
    libc::EINVAL,
    libc::EIO,
    libc::EISDIR,
    libc::ELIBBAD,
    libc::ELOOP,
    libc::EMFILE,
    libc::ENAMETOOLONG,
    libc::ENFILE,
    libc::ENOENT,
    libc::ENOEXEC,
    libc::ENOMEM,
    libc::ENOTDIR,
    libc::EPERM,
    libc::ETXTBSY,
];

/// fork(2), for `prepare`, whose child only runs `run_child`.
fn fork() -> io::Result<libc::pid_t> {
    // SAFETY: the child makes async-signal-safe calls only (`run_child`).
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        pid => Ok(pid),
    }
}

/// `struct clone_args` of clone3(2), up to `cgroup` (Linux 5.7).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// fork(2) by clone3(2): the child in a new pid namespace (`new_pid_ns`, PID 1
/// there) and in the cgroup of the directory `cgroup`. Returns as fork does.
///
/// # Safety
/// As fork in a multi-threaded process, and more so (libc's fork handlers do
/// not run): the child may only make async-signal-safe calls.
unsafe fn clone_into(new_pid_ns: bool, cgroup: Option<libc::c_int>) -> io::Result<libc::pid_t> {
    let mut args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    if new_pid_ns {
        args.flags |= libc::CLONE_NEWPID as u64;
    }
    if let Some(fd) = cgroup {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = fd as u64;
    }
    // SAFETY: clone3 with a valid, fully initialised argument block of its size.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as libc::pid_t)
    }
}

/// The forked child: stdio, cwd, the setup, then waits for release and execs.
/// Async-signal-safe syscalls only; never returns.
///
/// # Safety
/// Only between fork and exec, in the child.
unsafe fn run_child(setup: &ChildSetup, image: &ExecImage, fds: &ChildFds) -> ! {
    let report = |tag: u8, errno: i32| {
        let mut msg = [0u8; 5];
        msg[0] = tag;
        msg[1..].copy_from_slice(&errno.to_ne_bytes());
        let len = if tag == ChildReport::READY { 1 } else { 5 };
        // SAFETY: a write from a local buffer to an fd we hold.
        unsafe { libc::write(fds.status, msg.as_ptr().cast(), len) };
    };
    let errno = || {
        io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    };
    // SAFETY: plain syscalls on prepared values, in the child after fork.
    unsafe {
        // guest-init blocks SIGCHLD in every thread and Rust ignores SIGPIPE: the
        // workload starts with neither, as std's Command does.
        let empty: libc::sigset_t = std::mem::zeroed();
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        for (target, &fd) in fds.stdio.iter().enumerate() {
            if libc::dup2(fd, target as libc::c_int) < 0 {
                report(ChildReport::SETUP_FAILED, errno());
                libc::_exit(127);
            }
        }
        if libc::chdir(image.cwd.as_ptr()) < 0 {
            report(ChildReport::SETUP_FAILED, errno());
            libc::_exit(127);
        }
        // Waiting may last (a prepared main waits until `start`): hold no fd of
        // guest-init's meanwhile but those the setup and the two pipes need. Before
        // the setup, which may install a seccomp filter that forbids close_range.
        let mut from: libc::c_int = 3;
        for &fd in &fds.keep {
            if fd > from {
                libc::syscall(libc::SYS_close_range, from as u32, (fd - 1) as u32, 0u32);
            }
            from = from.max(fd + 1);
        }
        libc::syscall(libc::SYS_close_range, from as u32, u32::MAX, 0u32);
        if let Err(e) = setup.apply() {
            report(
                ChildReport::SETUP_FAILED,
                e.raw_os_error().unwrap_or(libc::EIO),
            );
            libc::_exit(127);
        }
        report(ChildReport::READY, 0);
        let mut byte = 0u8;
        if libc::read(fds.go, (&mut byte as *mut u8).cast(), 1) != 1 {
            // Never released: the prepared process was given up.
            libc::_exit(127);
        }
        libc::close(fds.go);
        let before_exec = byte == GO_BEFORE_EXEC;
        libc::execve(
            image.program.as_ptr(),
            image.argv.as_ptr(),
            image.envp.as_ptr(),
        );
        let errno = errno();
        if before_exec {
            // Nobody waits on the status pipe now: the reason goes where runc's
            // goes, to the process's stderr, as `exec PROGRAM: REASON`.
            let why = image
                .exec_errors
                .iter()
                .find(|(e, _)| *e == errno)
                .map_or("exec failed", |(_, text)| text.as_str());
            let program = image.program.as_bytes();
            let parts: [&[u8]; 5] = [b"exec ", program, b": ", why.as_bytes(), b"\n"];
            let iov = parts.map(|p| libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            });
            libc::writev(2, iov.as_ptr(), iov.len() as libc::c_int);
            // As a shell's: not found 127, found but not executable 126.
            libc::_exit(if errno == libc::ENOENT { 127 } else { 126 });
        }
        report(ChildReport::EXEC_FAILED, errno);
        libc::_exit(127);
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| format!("pipe: {}", e.desc().to_lowercase()))
}

/// `fd` itself, or a duplicate of it at 3 or above (close-on-exec either way).
fn above_stdio(fd: OwnedFd) -> Result<OwnedFd, String> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3))
        .map(|n| {
            // SAFETY: F_DUPFD_CLOEXEC returned a fresh fd that nothing else owns.
            unsafe { std::os::fd::FromRawFd::from_raw_fd(n) }
        })
        .map_err(|e| format!("dup: {}", e.desc().to_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn rootfs() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("bin")).unwrap();
        std::fs::create_dir_all(d.path().join("usr/bin")).unwrap();
        std::fs::create_dir_all(d.path().join("work")).unwrap();
        let exe = d.path().join("bin/tool");
        std::fs::write(&exe, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let plain = d.path().join("usr/bin/plain");
        std::fs::write(&plain, b"data").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        symlink("tool", d.path().join("bin/link")).unwrap();
        let local = d.path().join("work/local");
        std::fs::write(&local, b"x").unwrap();
        std::fs::set_permissions(&local, std::fs::Permissions::from_mode(0o700)).unwrap();
        d
    }

    #[test]
    fn path_lookup() {
        let d = rootfs();
        let r = d.path();
        let cwd = Path::new("/");
        let p = Some("/usr/bin:/bin");
        assert_eq!(
            resolve_executable(r, cwd, "tool", p).unwrap(),
            Path::new("/bin/tool")
        );
        assert_eq!(
            resolve_executable(r, cwd, "link", p).unwrap(),
            Path::new("/bin/link")
        );
        let e = resolve_executable(r, cwd, "missing", p).unwrap_err();
        assert!(
            e.reason.contains("executable file not found in $PATH"),
            "{e}"
        );
        assert_eq!(e.kind, Some(RefusalKind::ExecutableNotFound));
        // Not executable: skipped on PATH, like Go's LookPath.
        let e = resolve_executable(r, cwd, "plain", p).unwrap_err();
        assert!(
            e.reason.contains("executable file not found in $PATH"),
            "{e}"
        );
        // The default PATH applies when the env has none.
        assert_eq!(
            resolve_executable(r, cwd, "tool", None).unwrap(),
            Path::new("/bin/tool")
        );
        let e = resolve_executable(r, cwd, "", p).unwrap_err();
        assert!(
            e.reason.contains("executable file not found in $PATH"),
            "{e}"
        );
    }

    #[test]
    fn explicit_paths() {
        let d = rootfs();
        let r = d.path();
        let cwd = Path::new("/work");
        assert_eq!(
            resolve_executable(r, cwd, "/bin/tool", None).unwrap(),
            Path::new("/bin/tool")
        );
        assert_eq!(
            resolve_executable(r, cwd, "./local", None).unwrap(),
            Path::new("/work/./local")
        );
        let e = resolve_executable(r, cwd, "/nope", None).unwrap_err();
        assert!(e.reason.contains("no such file or directory"), "{e}");
        assert_eq!(e.kind, Some(RefusalKind::ExecutableNotFound));
        let e = resolve_executable(r, cwd, "/usr/bin/plain", None).unwrap_err();
        assert!(e.reason.contains("permission denied"), "{e}");
        assert_eq!(e.kind, Some(RefusalKind::PermissionDenied));
        let e = resolve_executable(r, cwd, "/bin", None).unwrap_err();
        assert!(e.reason.contains("permission denied"), "{e}");
        // An empty PATH entry means the working directory.
        assert_eq!(
            resolve_executable(r, cwd, "local", Some(":/bin")).unwrap(),
            Path::new("/work/./local")
        );
    }

    #[test]
    fn env_split() {
        let (env, path) = split_env(&[
            "A=1".into(),
            "PATH=/x".into(),
            "bogus".into(),
            "B=x=y".into(),
        ]);
        assert_eq!(path.as_deref(), Some("/x"));
        assert_eq!(env.len(), 3);
        assert_eq!(env[2], ("B".into(), "x=y".into()));
    }

    #[test]
    fn capability_masks() {
        let caps = oci_spec::runtime::LinuxCapabilities::default();
        let m = cap_masks(&caps).unwrap();
        let kill = 1u64 << caps::Capability::CAP_KILL.index();
        assert_ne!(m.bounding & kill, 0);
        assert_eq!(m.ambient & !m.bounding, 0);
    }

    #[test]
    fn rlimit_names() {
        assert_eq!(
            rlimit_resource("RLIMIT_NOFILE"),
            Some(libc::RLIMIT_NOFILE as libc::c_int)
        );
        assert_eq!(rlimit_resource("RLIMIT_BOGUS"), None);
    }
}
