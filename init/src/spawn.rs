//! Turning an OCI `process` into a running child, for the main process and exec
//! sessions alike.
//!
//! Everything that needs allocation, parsing or the filesystem (PATH lookup,
//! capability masks, rlimits, the oom_score_adj value) is computed *before* the
//! fork; the `pre_exec` hook only issues raw, async-signal-safe syscalls.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;

use krun_oci_protocol::Process;

use crate::reaper::Reaper;

/// PATH used when the process environment has none (the same default as runc).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

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
    pub pid: i32,
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
) -> Result<PathBuf, String> {
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    if arg0.is_empty() {
        return Err("exec: \"\": executable file not found in $PATH".into());
    }
    if arg0.contains('/') {
        let candidate = cwd.join(arg0);
        return match std::fs::metadata(inside(&candidate)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(format!(
                "exec: \"{arg0}\": stat {arg0}: no such file or directory"
            )),
            Err(e) => Err(format!("exec: \"{arg0}\": {}", errno_text(&e))),
            Ok(m) if m.is_dir() || m.permissions().mode() & 0o111 == 0 => {
                Err(format!("exec: \"{arg0}\": permission denied"))
            }
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
    Err(format!(
        "exec: \"{arg0}\": executable file not found in $PATH"
    ))
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
/// (its `cgroup.procs`, opened at Setup; writing "0" moves the writer in).
#[derive(Clone, Default)]
pub struct Confinement {
    pub seccomp: Option<std::sync::Arc<Seccomp>>,
    pub cgroup_procs: Option<std::sync::Arc<std::os::fd::OwnedFd>>,
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
    /// The main's pid is its relay's (see [`relay`]): `pid_for_children` is the
    /// namespace the main is PID 1 of.
    fn open_main(&self, main: i32) -> Result<Vec<(OwnedFd, libc::c_int)>, String> {
        // With a pid namespace `main` is the relay: the namespaces made after its
        // fork (cgroup) are the workload's, its only child.
        let main = if self.pid {
            crate::procfs::list()
                .into_iter()
                .find(|p| p.ppid == main)
                .map(|p| p.pid)
                .ok_or("the container's main process is gone")?
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

    /// Moves the caller into the container cgroup (async-signal-safe).
    fn join_cgroup(&self) -> io::Result<()> {
        if let Some(procs) = &self.confinement.cgroup_procs {
            // SAFETY: a write of one byte from a static buffer to an fd we hold.
            check(
                unsafe { libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) } as libc::c_long,
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
            if !forks {
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
                    if let Some(p) = self
                        .confinement
                        .namespaces
                        .as_ref()
                        .and_then(|n| n.proc_mount.as_ref())
                    {
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
        // No fd of ours may keep a pipe open: stdio is the grandchild's, and std's
        // exec-status pipe must close when the grandchild execs.
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

/// Spawns `process`. `main`: `None` for the container's main (it makes the
/// container's namespaces), the main's pid for an exec (it joins them).
pub fn spawn(
    process: &Process,
    mode: StdioMode,
    reaper: &Reaper,
    confinement: Confinement,
    main: Option<i32>,
) -> Result<Spawned, String> {
    let args = process.args().clone().unwrap_or_default();
    let Some(arg0) = args.first() else {
        return Err("process.args must not be empty".into());
    };
    let (env, path_env) = split_env(process.env().as_deref().unwrap_or(&[]));
    let cwd = process.cwd().clone();
    if !cwd.is_absolute() {
        return Err(format!("cwd {cwd:?} must be an absolute path"));
    }
    match std::fs::metadata(&cwd) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(format!("chdir to cwd ({cwd:?}) failed: not a directory")),
        Err(e) => return Err(format!("chdir to cwd ({cwd:?}) failed: {}", errno_text(&e))),
    }
    let program = resolve_executable(Path::new("/"), &cwd, arg0, path_env.as_deref())?;

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
        Some(pid) => (0, namespaces.open_main(pid)?),
    };
    let user_sync = match (&namespaces.user_maps, main) {
        (Some(maps), None) => Some((UserNsSync::new()?, maps.clone())),
        _ => None,
    };
    let setup = ChildSetup {
        pid_ns: main.is_none() && namespaces.pid,
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

    let mut cmd = Command::new(&program);
    cmd.arg0(arg0)
        .args(&args[1..])
        .env_clear()
        .envs(env)
        .current_dir(&cwd);
    // SAFETY: `apply` only issues async-signal-safe syscalls (see ChildSetup::apply).
    unsafe {
        cmd.pre_exec(move || setup.apply());
    }

    // From here until the pid is registered no child may be reaped: hold the lock.
    let mut registry = reaper.lock();
    let mut master = None;
    match mode {
        StdioMode::Pipes => {
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
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
            let slave = File::from(pty.slave);
            let dup = |f: &File| {
                f.try_clone()
                    .map_err(|e| format!("pty: {}", errno_text(&e)))
            };
            cmd.stdin(Stdio::from(dup(&slave)?))
                .stdout(Stdio::from(dup(&slave)?))
                .stderr(Stdio::from(slave));
            master = Some(File::from(pty.master));
        }
    }
    // The pipes' child ends stay open until the spawn is over; ours go to the thread.
    let (user_thread, _child_ends) = match user_sync {
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
    let spawned_child = cmd.spawn();
    drop(_child_ends);
    if let Some(t) = user_thread {
        let mapped = t
            .join()
            .unwrap_or_else(|_| Err("the user namespace thread panicked".into()));
        if let (Err(e), Ok(_)) = (&mapped, &spawned_child) {
            // The child cannot have gone on unmapped; report why it would have failed.
            log::warn!("{e}");
        }
        if spawned_child.is_err() {
            mapped?;
        }
    }
    let mut child = spawned_child.map_err(|e| {
        let what = match e.raw_os_error() {
            Some(libc::ENOENT) => "no such file or directory".to_string(),
            Some(libc::EACCES) => "permission denied".to_string(),
            _ => errno_text(&e),
        };
        format!("exec: {:?}: {what}", program.display().to_string())
    })?;
    let pid = child.id() as i32;
    let exit = registry.register(pid);
    drop(registry);
    drop(cmd); // closes our copies of the pty slave

    let file = |fd: Option<OwnedFd>| fd.map(File::from);
    let mut spawned = Spawned {
        pid,
        exit,
        stdin: file(child.stdin.take().map(OwnedFd::from)),
        stdout: file(child.stdout.take().map(OwnedFd::from)),
        stderr: file(child.stderr.take().map(OwnedFd::from)),
        pty: None,
    };
    if let Some(m) = master {
        spawned.stdin = m.try_clone().ok();
        spawned.stdout = m.try_clone().ok();
        spawned.pty = Some(m);
    }
    // `child` is dropped without waiting: the reaper owns its status.
    Ok(spawned)
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
        assert!(e.contains("executable file not found in $PATH"), "{e}");
        // Not executable: skipped on PATH, like Go's LookPath.
        let e = resolve_executable(r, cwd, "plain", p).unwrap_err();
        assert!(e.contains("executable file not found in $PATH"), "{e}");
        // The default PATH applies when the env has none.
        assert_eq!(
            resolve_executable(r, cwd, "tool", None).unwrap(),
            Path::new("/bin/tool")
        );
        let e = resolve_executable(r, cwd, "", p).unwrap_err();
        assert!(e.contains("executable file not found in $PATH"), "{e}");
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
        assert!(e.contains("no such file or directory"), "{e}");
        let e = resolve_executable(r, cwd, "/usr/bin/plain", None).unwrap_err();
        assert!(e.contains("permission denied"), "{e}");
        let e = resolve_executable(r, cwd, "/bin", None).unwrap_err();
        assert!(e.contains("permission denied"), "{e}");
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
