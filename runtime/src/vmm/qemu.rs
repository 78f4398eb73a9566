//! The QEMU backend: `qemu-system-x86_64 -M microvm` booting the vmlinux directly
//! (PVH), root filesystem over virtio-fs served by `virtiofsd`, vsock over
//! vhost-user served by `vhost-device-vsock`. Works with KVM and, where hardware
//! virtualization is unusable, with TCG. Why each flag: docs/vmm.md.
//!
//! Every child is spawned by one supervisor thread per VM that lives exactly as
//! long as the VM: children carry `PR_SET_PDEATHSIG(SIGKILL)`, which fires when
//! the *thread* that forked them ends, so nothing outlives a killed monitor, and
//! the thread stops all of them as soon as any one exits.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout};

use crate::error::IoContext;
use crate::guest::GuestLink;
use crate::image::GuestImage;
use crate::mounts::{BindOps, MOUNTS_TAG};
use crate::supervise::tail;
use crate::vmm::{RootfsCache, Vm, VmExit, VmSpec, Vmm};
use crate::{Error, Result};

/// How QEMU executes guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// A helper program: its name, the env var that overrides its path, how to install it.
#[derive(Debug, Clone, Copy)]
pub struct Program {
    pub name: &'static str,
    pub env: &'static str,
    pub install: &'static str,
}

pub const QEMU: Program = Program {
    name: "qemu-system-x86_64",
    env: "KRUN_OCI_QEMU",
    install: "apt-get install qemu-system-x86",
};
pub const VIRTIOFSD: Program = Program {
    name: "virtiofsd",
    env: "KRUN_OCI_VIRTIOFSD",
    install: "apt-get install libcap-ng-dev libseccomp-dev && cargo install --locked virtiofsd",
};
pub const VHOST_VSOCK: Program = Program {
    name: "vhost-device-vsock",
    env: "KRUN_OCI_VHOST_VSOCK",
    install: "cargo install --locked vhost-device-vsock",
};

/// Finds a program: its env override, then `$PATH`, `~/.cargo/bin`, `/usr/local/bin`
/// (cargo-installed helpers are often not on the PATH of containerd or podman).
pub fn find_program(p: &Program) -> Option<PathBuf> {
    if let Some(v) = std::env::var_os(p.env).filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(v));
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.extend(["/root/.cargo/bin", "/usr/local/bin", "/usr/bin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join(p.name))
        .find(|c| c.is_file())
}

/// First line of `<path> --version`.
pub fn program_version(path: &Path) -> Option<String> {
    let out = Command::new(path)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .next()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
}

/// Paths of the three programs the backend runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Programs {
    pub qemu: PathBuf,
    pub virtiofsd: PathBuf,
    pub vhost_vsock: PathBuf,
}

impl Programs {
    pub fn locate() -> Result<Programs> {
        let get = |p: &Program| {
            find_program(p).ok_or_else(|| {
                Error::Vm(format!(
                    "{} not found; install it with: {}",
                    p.name, p.install
                ))
            })
        };
        Ok(Programs {
            qemu: get(&QEMU)?,
            virtiofsd: get(&VIRTIOFSD)?,
            vhost_vsock: get(&VHOST_VSOCK)?,
        })
    }
}

/// The per-VM files in `run_dir`.
#[derive(Debug, Clone)]
pub struct RunPaths {
    pub run_dir: PathBuf,
    /// vhost-user control socket of vhost-device-vsock (QEMU connects).
    pub vsock_ctl: PathBuf,
    /// Hybrid vsock socket (host processes connect; `<uds>_<port>` for guest connect-outs).
    pub vsock_uds: PathBuf,
    /// vhost-user socket of virtiofsd.
    pub fs_sock: PathBuf,
    /// vhost-user socket of the second virtiofsd (bind mounts), if any.
    pub fs_mounts_sock: PathBuf,
    pub console: PathBuf,
}

impl RunPaths {
    pub fn new(run_dir: &Path) -> RunPaths {
        RunPaths {
            run_dir: run_dir.to_owned(),
            vsock_ctl: run_dir.join("vhost-vsock.sock"),
            vsock_uds: run_dir.join("vsock"),
            fs_sock: run_dir.join("virtiofs.sock"),
            fs_mounts_sock: run_dir.join("virtiofs-mounts.sock"),
            console: run_dir.join("console.log"),
        }
    }

    /// Removes every socket of the VM, including guest connect-out sockets `vsock_<port>`.
    fn remove_sockets(&self) {
        self.remove_helper_sockets();
        let prefix = format!(
            "{}_",
            self.vsock_uds
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
        );
        if let Ok(rd) = fs::read_dir(&self.run_dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name
                    .strip_prefix(&prefix)
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }

    /// Removes the sockets (and lock file) the helpers create.
    fn remove_helper_sockets(&self) {
        for p in [
            &self.vsock_ctl,
            &self.vsock_uds,
            &self.fs_sock,
            &self.fs_mounts_sock,
        ] {
            let _ = fs::remove_file(p);
        }
        // virtiofsd's lock files next to its sockets (left behind when it is killed).
        for sock in [&self.fs_sock, &self.fs_mounts_sock] {
            let mut pid = sock.clone().into_os_string();
            pid.push(".pid");
            let _ = fs::remove_file(pid);
        }
    }
}

/// The QEMU backend for one guest image and accelerator.
#[derive(Debug, Clone)]
pub struct QemuVmm {
    pub image: GuestImage,
    pub accel: Accel,
    pub programs: Programs,
    /// Host TSC kHz for `tsc_early_khz=`.
    pub tsc_khz: Option<u64>,
    /// `/dev/vhost-net` opens: the NICs' data path runs in the host kernel.
    pub vhost_net: bool,
}

impl QemuVmm {
    pub fn new(image: GuestImage, accel: Accel) -> Result<QemuVmm> {
        Ok(QemuVmm {
            image,
            accel,
            programs: Programs::locate()?,
            tsc_khz: host_cpu_khz(),
            vhost_net: fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/vhost-net")
                .is_ok(),
        })
    }

    /// The guest kernel command line.
    pub fn kernel_cmdline(&self, spec: &VmSpec) -> String {
        // console on the serial port; panic=-1 + -no-reboot: a dead PID 1 ends QEMU at
        // once; the rest shortens a TCG boot measurably (docs/vmm.md).
        let mut c = String::from(
            "console=ttyS0 panic=-1 quiet cryptomgr.notests mitigations=off lsm=lockdown audit=0 \
             tsc=reliable no_timer_check",
        );
        if let Some(khz) = self.tsc_khz {
            c.push_str(&format!(" tsc_early_khz={khz}"));
        }
        if !self.image.cmdline_extra.is_empty() {
            c.push(' ');
            c.push_str(&self.image.cmdline_extra);
        }
        if spec.deferred_root {
            c.push(' ');
            c.push_str(krun_oci_protocol::contract::CMDLINE_ROOT_DEFERRED);
        }
        // A debugging aid (docs/vmm.md): e.g. `loglevel=7` for the whole boot log.
        if let Ok(extra) = std::env::var("KRUN_OCI_KERNEL_CMDLINE") {
            if !extra.trim().is_empty() {
                c.push(' ');
                c.push_str(extra.trim());
            }
        }
        c
    }

    /// QEMU's argument vector (without the program).
    pub fn qemu_args(&self, spec: &VmSpec, paths: &RunPaths) -> Vec<OsString> {
        let mem = spec.ram_mib.max(64);
        let (accel, cpu) = match self.accel {
            // Single-threaded TCG: with one host thread per vCPU (QEMU 7.2's default)
            // about 1 boot in 100-200 livelocks in the guest kernel's late init, both
            // vCPU threads spinning, right after static-key patching ("IPI shorthand
            // broadcast", "sched_clock: Marking stable"); 0 in 259 boots with
            // thread=single, at ~12 % boot time (docs/vmm.md).
            Accel::Tcg => ("tcg,thread=single", "qemu64"),
            Accel::Kvm => ("kvm", "host"),
        };
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |args: &[&str]| a.extend(args.iter().map(OsString::from));
        push(&["-M", "microvm,x-option-roms=off,memory-backend=mem"]);
        push(&["-accel", accel, "-cpu", cpu]);
        push(&[
            "-smp",
            &spec.vcpus.max(1).to_string(),
            "-m",
            &format!("{mem}M"),
        ]);
        push(&[
            "-object",
            &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
        ]);
        push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
        let path = |p: &Path| p.to_string_lossy().replace(',', ",,");
        push(&[
            "-kernel",
            &path(&self.image.kernel),
            "-initrd",
            &path(&self.image.initrd),
        ]);
        push(&["-append", &self.kernel_cmdline(spec)]);
        push(&[
            "-chardev",
            &format!("socket,id=fs0,path={}", path(&paths.fs_sock)),
        ]);
        push(&[
            "-device",
            &format!(
                "vhost-user-fs-device,chardev=fs0,tag={}",
                krun_oci_protocol::contract::ROOT_TAG
            ),
        ]);
        if spec.mounts.is_some() {
            push(&[
                "-chardev",
                &format!("socket,id=fs1,path={}", path(&paths.fs_mounts_sock)),
            ]);
            push(&[
                "-device",
                &format!("vhost-user-fs-device,chardev=fs1,tag={MOUNTS_TAG}"),
            ]);
        }
        push(&[
            "-chardev",
            &format!("socket,id=vs0,path={}", path(&paths.vsock_ctl)),
        ]);
        push(&["-device", "vhost-user-vsock-device,chardev=vs0"]);
        // The taps are open in the monitor; QEMU inherits the fds (ChildSpec::keep_fds).
        let vhost = if self.vhost_net { "on" } else { "off" };
        for (i, nic) in spec.nics.iter().enumerate() {
            push(&[
                "-netdev",
                &format!("tap,id=net{i},fd={},vhost={vhost}", nic.tap.as_raw_fd()),
            ]);
            // host_mtu caps the guest's MTU: only where the link's is known.
            let mtu = nic
                .mtu
                .map(|m| format!(",host_mtu={m}"))
                .unwrap_or_default();
            push(&[
                "-device",
                &format!(
                    "virtio-net-device,netdev=net{i},mac={}{mtu}",
                    krun_oci_protocol::net::format_mac(&nic.mac)
                ),
            ]);
        }
        push(&[
            "-chardev",
            &format!("file,id=con0,path={}", path(&paths.console)),
        ]);
        push(&["-serial", "chardev:con0"]);
        a
    }

    fn virtiofsd_args(
        &self,
        socket: &Path,
        shared_dir: &Path,
        cache: RootfsCache,
    ) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["--socket-path".into(), socket.into()];
        a.extend(["--shared-dir".into(), shared_dir.into()]);
        // The VM is the sandbox; virtiofsd's own namespace sandbox needs privileges
        // we may not have (rootless) and costs start time.
        a.extend(
            [
                cache.virtiofsd_arg(),
                "--sandbox=none",
                "--announce-submounts",
                "--log-level=error",
            ]
            .map(OsString::from),
        );
        a
    }

    fn vhost_vsock_args(&self, paths: &RunPaths) -> Vec<OsString> {
        vec![
            "--guest-cid".into(),
            "3".into(),
            "--socket".into(),
            paths.vsock_ctl.clone().into(),
            "--uds-path".into(),
            paths.vsock_uds.clone().into(),
        ]
    }
}

impl Vmm for QemuVmm {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn link(&self, spec: &VmSpec) -> GuestLink {
        GuestLink::HybridVsock {
            uds: RunPaths::new(&spec.run_dir).vsock_uds,
        }
    }

    fn launch(&self, spec: &VmSpec) -> Result<Box<dyn Vm>> {
        let paths = RunPaths::new(&spec.run_dir);
        fs::create_dir_all(&paths.run_dir).ctx(|| format!("create {}", paths.run_dir.display()))?;
        // Stale sockets of our helpers only: `vsock_<port>` listeners are already bound
        // by the monitor (the guest's beacon lands there).
        paths.remove_helper_sockets();
        let _ = fs::remove_file(&paths.console);
        let mut children = vec![
            ChildSpec::new(
                "vhost-device-vsock",
                &self.programs.vhost_vsock,
                self.vhost_vsock_args(&paths),
                &paths,
            )
            .ready_when_listening(&paths.vsock_ctl),
            ChildSpec::new(
                "virtiofsd",
                &self.programs.virtiofsd,
                self.virtiofsd_args(&paths.fs_sock, &spec.rootfs, spec.rootfs_cache),
                &paths,
            )
            .ready_when_listening(&paths.fs_sock),
        ];
        if let Some(mounts) = &spec.mounts {
            let mut child = ChildSpec::new(
                "virtiofsd-mounts",
                &self.programs.virtiofsd,
                self.virtiofsd_args(&paths.fs_mounts_sock, &mounts.staging, RootfsCache::Auto),
                &paths,
            )
            .ready_when_listening(&paths.fs_mounts_sock);
            // A pooled VM's share starts empty: its binds are moved into the
            // pool member's mount namespace at claim (pool::member), where this
            // virtiofsd must run too.
            if !mounts.binds.is_empty() {
                child = child.with_binds(mounts.ops()?);
            }
            children.push(child);
        }
        children.push(
            ChildSpec::new(
                "qemu",
                &self.programs.qemu,
                self.qemu_args(spec, &paths),
                &paths,
            )
            .keep_fds(spec.nics.iter().map(|n| n.tap.clone()).collect()),
        );
        let vm = QemuVm::start(&spec.id, children, paths)?;
        Ok(Box::new(vm))
    }
}

/// How to start one child process.
struct ChildSpec {
    component: &'static str,
    program: PathBuf,
    args: Vec<OsString>,
    log: PathBuf,
    /// Socket the child must be listening on before the next one starts.
    ready_socket: Option<PathBuf>,
    /// Bind mounts the child makes in its own mount namespace before exec.
    binds: Option<Arc<BindOps>>,
    /// Open fds the child inherits under the same numbers (QEMU's taps).
    keep_fds: Vec<Arc<OwnedFd>>,
}

impl ChildSpec {
    fn new(
        component: &'static str,
        program: &Path,
        args: Vec<OsString>,
        paths: &RunPaths,
    ) -> ChildSpec {
        ChildSpec {
            component,
            program: program.to_owned(),
            args,
            log: paths.run_dir.join(format!("{component}.log")),
            ready_socket: None,
            binds: None,
            keep_fds: Vec::new(),
        }
    }

    fn keep_fds(mut self, fds: Vec<Arc<OwnedFd>>) -> ChildSpec {
        self.keep_fds = fds;
        self
    }

    fn with_binds(mut self, ops: BindOps) -> ChildSpec {
        self.binds = Some(Arc::new(ops));
        self
    }

    fn ready_when_listening(mut self, socket: &Path) -> ChildSpec {
        self.ready_socket = Some(socket.to_owned());
        self
    }

    fn spawn(&self) -> Result<Child> {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args);
        crate::supervise::supervised(&mut cmd, &self.log)?;
        if !self.keep_fds.is_empty() {
            let fds: Vec<i32> = self.keep_fds.iter().map(|f| f.as_raw_fd()).collect();
            // SAFETY: only fcntl (async-signal-safe) between fork and exec; the fds
            // stay open in the parent, which holds the Arcs across the spawn.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    for &fd in &fds {
                        if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                            return Err(io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        if let Some(ops) = self.binds.clone() {
            // SAFETY: BindOps::apply only makes system calls (prepared before fork).
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || ops.apply());
            }
        }
        cmd.spawn()
            .ctx(|| format!("start {} ({})", self.component, self.program.display()))
    }
}

/// Whether `/proc/net/unix` lists a listening socket bound to `path`.
pub fn parse_listening(proc_net_unix: &str, path: &Path) -> bool {
    const SO_ACCEPTCON: u32 = 0x10000;
    let want = path.to_string_lossy();
    proc_net_unix.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 8
            && f[7..].join(" ") == want
            && u32::from_str_radix(f[3], 16).is_ok_and(|flags| flags & SO_ACCEPTCON != 0)
    })
}

fn is_listening(path: &Path) -> bool {
    match fs::read_to_string("/proc/net/unix") {
        Ok(t) => parse_listening(&t, path),
        Err(_) => path.exists(),
    }
}

/// The host TSC frequency in kHz from the first `cpu MHz` line of /proc/cpuinfo.
/// Passed to the guest as `tsc_early_khz=`: without it ~1 boot in 4 hangs in TSC
/// calibration under TCG.
pub fn parse_cpu_khz(cpuinfo: &str) -> Option<u64> {
    let line = cpuinfo.lines().find(|l| l.starts_with("cpu MHz"))?;
    let (_, v) = line.split_once(':')?;
    let mhz: f64 = v.trim().parse().ok()?;
    (mhz > 0.0).then(|| (mhz * 1000.0).round() as u64)
}

/// Host TSC frequency in kHz, if /proc/cpuinfo tells it.
pub fn host_cpu_khz() -> Option<u64> {
    parse_cpu_khz(&fs::read_to_string("/proc/cpuinfo").ok()?)
}

struct Running {
    component: &'static str,
    child: Child,
    pidfd: Option<OwnedFd>,
}

fn stop_all(running: &mut [Running]) {
    for r in running.iter_mut() {
        let _ = r.child.kill();
    }
    for r in running.iter_mut() {
        let _ = r.child.wait();
    }
}

/// How long a helper may take to start listening.
const HELPER_START_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts the children in order; on failure stops those already started.
fn start_children(specs: &[ChildSpec]) -> Result<Vec<Running>> {
    let mut running: Vec<Running> = Vec::new();
    for s in specs {
        let child = match s.spawn() {
            Ok(c) => c,
            Err(e) => {
                stop_all(&mut running);
                return Err(e);
            }
        };
        let pidfd = crate::supervise::pidfd_open(child.id() as i32);
        running.push(Running {
            component: s.component,
            child,
            pidfd,
        });
        if let Some(sock) = &s.ready_socket {
            let deadline = Instant::now() + HELPER_START_TIMEOUT;
            loop {
                if is_listening(sock) {
                    break;
                }
                let me = running.last_mut().unwrap();
                let died = me.child.try_wait().ok().flatten();
                if died.is_some() || Instant::now() > deadline {
                    let why = match died {
                        Some(st) => format!("exited ({st}) before listening on {}", sock.display()),
                        None => format!(
                            "did not listen on {} within {HELPER_START_TIMEOUT:?}",
                            sock.display()
                        ),
                    };
                    stop_all(&mut running);
                    return Err(Error::Vm(format!(
                        "{} {why}: {}",
                        s.component,
                        tail(&s.log, 2000).trim()
                    )));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
    Ok(running)
}

/// How long QEMU may take to exit after a helper exited cleanly (power-off).
const POWER_OFF_GRACE: Duration = Duration::from_secs(2);

/// Waits until a child exits or `stop` becomes readable; returns the first exit seen.
fn supervise(running: &mut [Running], stop: &OwnedFd) -> VmExit {
    let use_pidfds = running.iter().all(|r| r.pidfd.is_some());
    loop {
        let mut fds: Vec<PollFd> = Vec::new();
        if use_pidfds {
            fds.extend(
                running
                    .iter()
                    .filter_map(|r| r.pidfd.as_ref())
                    .map(|fd| PollFd::new(fd.as_fd(), PollFlags::POLLIN)),
            );
        }
        fds.push(PollFd::new(stop.as_fd(), PollFlags::POLLIN));
        // Without pidfds (old kernels) fall back to polling every 100 ms.
        let timeout = if use_pidfds {
            PollTimeout::NONE
        } else {
            PollTimeout::from(100u16)
        };
        let _ = nix::poll::poll(&mut fds, timeout);
        let fired = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
        let stop_requested = fds.last().is_some_and(fired);
        // Children that exited in this wake-up (all of them without pidfds).
        let exited: Vec<usize> = if use_pidfds {
            (0..running.len()).filter(|&i| fired(&fds[i])).collect()
        } else {
            (0..running.len()).collect()
        };
        drop(fds);
        // qemu (last) first: on power-off virtiofsd exits right after it and must not be blamed.
        for &i in exited.iter().rev() {
            if let Ok(Some(st)) = running[i].child.try_wait() {
                // On power-off QEMU closes the vhost-user sockets before it exits, and
                // virtiofsd then exits cleanly: that is QEMU's exit, report it as such.
                let is_vmm = i + 1 == running.len();
                if !is_vmm && st.success() {
                    if let Some(vmm) = running.last_mut() {
                        if let Some(vst) =
                            crate::supervise::wait_timeout(&mut vmm.child, POWER_OFF_GRACE)
                        {
                            return super::exit_of(vmm.component, Some(vst));
                        }
                    }
                }
                return super::exit_of(running[i].component, Some(st));
            }
        }
        if stop_requested {
            let component = running.last().map_or("qemu", |r| r.component);
            return VmExit::Exited {
                component: component.to_owned(),
                status: None,
                signal: Some(libc::SIGKILL),
            };
        }
    }
}

/// A running QEMU VM with its helpers.
pub struct QemuVm {
    link: GuestLink,
    pids: Vec<i32>,
    paths: RunPaths,
    exit: Arc<Mutex<Option<VmExit>>>,
    stop: Option<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl QemuVm {
    fn start(id: &str, specs: Vec<ChildSpec>, paths: RunPaths) -> Result<QemuVm> {
        let (stop_r, stop_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let exit = Arc::new(Mutex::new(None));
        let (started_tx, started_rx) = mpsc::channel::<Result<Vec<i32>>>();
        let thread_paths = paths.clone();
        let thread_exit = exit.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vm-{}", id.chars().take(12).collect::<String>()))
            .spawn(move || {
                let mut running = match start_children(&specs) {
                    Ok(r) => r,
                    Err(e) => {
                        thread_paths.remove_helper_sockets();
                        let _ = started_tx.send(Err(e));
                        return;
                    }
                };
                let _ = started_tx.send(Ok(running.iter().map(|r| r.child.id() as i32).collect()));
                let first = supervise(&mut running, &stop_r);
                *thread_exit.lock().unwrap() = Some(first.clone());
                stop_all(&mut running);
                thread_paths.remove_sockets();
                log::debug!("vm stopped: {first:?}");
            })
            .ctx(|| "spawn the VM supervisor thread".into())?;
        match started_rx.recv() {
            Ok(Ok(pids)) => Ok(QemuVm {
                link: GuestLink::HybridVsock {
                    uds: paths.vsock_uds.clone(),
                },
                pids,
                paths,
                exit,
                stop: Some(stop_w),
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(Error::Vm("VM supervisor thread died during start".into()))
            }
        }
    }

    /// Blocks until the VM is gone (the supervisor thread finished its cleanup).
    fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Vm for QemuVm {
    fn link(&self) -> GuestLink {
        self.link.clone()
    }

    fn pids(&self) -> Vec<i32> {
        self.pids.clone()
    }

    fn try_wait(&mut self) -> io::Result<Option<VmExit>> {
        let exit = self.exit.lock().unwrap().clone();
        if exit.is_some() {
            // Everything is stopped and reaped once the thread is done; make that
            // true before reporting, so callers can rely on it.
            self.join();
        }
        Ok(exit)
    }

    fn kill(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = nix::unistd::write(&stop, b"k");
        }
        self.join();
        self.paths.remove_sockets();
    }

    fn console_tail(&self, max: usize) -> String {
        tail(&self.paths.console, max)
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_frequency_from_cpuinfo() {
        let ci = "processor\t: 0\ncpu MHz\t\t: 2199.998\nflags\t\t: fpu vme sse2 vmx ssse3\n";
        assert_eq!(parse_cpu_khz(ci), Some(2_199_998));
        assert_eq!(parse_cpu_khz("nothing"), None);
    }
    use crate::image::KernelOrigin;

    fn vmm(accel: Accel) -> QemuVmm {
        QemuVmm {
            image: GuestImage {
                kernel: "/c/vmlinux".into(),
                initrd: "/c/img,1/initrd.cpio".into(),
                kernel_origin: KernelOrigin::DistroStock,
                cmdline_extra: "foo=1".into(),
            },
            accel,
            programs: Programs {
                qemu: "q".into(),
                virtiofsd: "v".into(),
                vhost_vsock: "s".into(),
            },
            tsc_khz: Some(2_199_998),
            vhost_net: false,
        }
    }

    use crate::testutil::vm_spec as spec;

    fn joined(v: &[OsString]) -> String {
        v.iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn qemu_argv_tcg() {
        let v = vmm(Accel::Tcg);
        let s = spec();
        let a = v.qemu_args(&s, &RunPaths::new(&s.run_dir));
        let j = joined(&a);
        assert!(j.starts_with("-M microvm,x-option-roms=off,memory-backend=mem -accel tcg,thread=single -cpu qemu64 -smp 2 -m 256M"), "{j}");
        assert!(
            j.contains("-object memory-backend-memfd,id=mem,size=256M,share=on"),
            "{j}"
        );
        assert!(
            j.contains("-nodefaults -no-user-config -nographic -no-reboot"),
            "{j}"
        );
        // Commas in paths are doubled for QEMU's option parser.
        assert!(
            j.contains("-kernel /c/vmlinux -initrd /c/img,,1/initrd.cpio"),
            "{j}"
        );
        assert!(j.contains("-chardev socket,id=fs0,path=/run/k/c1/virtiofs.sock -device vhost-user-fs-device,chardev=fs0,tag=rootfs"));
        assert!(j.contains("-chardev socket,id=vs0,path=/run/k/c1/vhost-vsock.sock -device vhost-user-vsock-device,chardev=vs0"));
        assert!(j.contains("-chardev file,id=con0,path=/run/k/c1/console.log -serial chardev:con0"));
        let append = &a[a.iter().position(|x| x == "-append").unwrap() + 1];
        let cmdline = append.to_string_lossy();
        for want in [
            "console=ttyS0",
            "panic=-1",
            "tsc_early_khz=2199998",
            "cryptomgr.notests",
            "foo=1",
        ] {
            assert!(
                cmdline.split(' ').any(|w| w == want),
                "{want} missing in {cmdline}"
            );
        }
    }

    #[test]
    fn qemu_argv_kvm_and_helpers() {
        let v = vmm(Accel::Kvm);
        let s = spec();
        let p = RunPaths::new(&s.run_dir);
        assert!(joined(&v.qemu_args(&s, &p)).contains("-accel kvm -cpu host"));
        assert_eq!(
            joined(&v.vhost_vsock_args(&p)),
            "--guest-cid 3 --socket /run/k/c1/vhost-vsock.sock --uds-path /run/k/c1/vsock"
        );
        let f = joined(&v.virtiofsd_args(&p.fs_sock, &s.rootfs, s.rootfs_cache));
        assert!(
            f.starts_with(
                "--socket-path /run/k/c1/virtiofs.sock --shared-dir /b/rootfs --cache=always "
            ),
            "{f}"
        );
        let f = joined(&v.virtiofsd_args(&p.fs_sock, &s.rootfs, RootfsCache::Auto));
        assert!(f.contains(" --cache=auto "), "{f}");
        // No bind mounts: one virtio-fs device only.
        assert!(!joined(&v.qemu_args(&s, &p)).contains("krun-mounts"));
        assert_eq!(
            v.link(&s),
            GuestLink::HybridVsock {
                uds: "/run/k/c1/vsock".into()
            }
        );
    }

    #[test]
    fn bind_mounts_add_a_second_share() {
        let v = vmm(Accel::Tcg);
        let mut s = spec();
        s.mounts = Some(crate::mounts::MountsShare {
            staging: "/run/k/c1/mounts".into(),
            binds: vec![crate::mounts::SharedBind {
                source: "/etc/hosts".into(),
                entry: "0".into(),
                is_dir: false,
                readonly: true,
                recursive: false,
            }],
        });
        let p = RunPaths::new(&s.run_dir);
        let j = joined(&v.qemu_args(&s, &p));
        assert!(
            j.contains("-chardev socket,id=fs1,path=/run/k/c1/virtiofs-mounts.sock -device vhost-user-fs-device,chardev=fs1,tag=krun-mounts"),
            "{j}"
        );
        let f = joined(&v.virtiofsd_args(
            &p.fs_mounts_sock,
            &s.mounts.as_ref().unwrap().staging,
            RootfsCache::Auto,
        ));
        assert!(
            f.starts_with(
                "--socket-path /run/k/c1/virtiofs-mounts.sock --shared-dir /run/k/c1/mounts"
            ),
            "{f}"
        );
    }

    #[test]
    fn proc_net_unix_parsing() {
        let t = "Num       RefCount Protocol Flags    Type St Inode Path\n\
                 0000000000000000: 00000002 00000000 00010000 0001 01 123 /run/k/c1/virtiofs.sock\n\
                 0000000000000000: 00000002 00000000 00000000 0001 03 124 /run/k/c1/vsock\n";
        assert!(parse_listening(t, Path::new("/run/k/c1/virtiofs.sock")));
        assert!(!parse_listening(t, Path::new("/run/k/c1/vsock")));
        assert!(!parse_listening(t, Path::new("/run/k/c1/other")));
    }

    #[test]
    fn supervisor_stops_siblings_when_one_exits() {
        // Stand-ins for the helpers: `sleep` children, one of which exits early.
        let d = tempfile::tempdir().unwrap();
        let paths = RunPaths::new(d.path());
        let sleep = PathBuf::from("/bin/sleep");
        let specs = vec![
            ChildSpec::new("a", &sleep, vec!["30".into()], &paths),
            ChildSpec::new("b", &sleep, vec!["0.2".into()], &paths),
            ChildSpec::new("qemu", &sleep, vec!["30".into()], &paths),
        ];
        let mut vm = QemuVm::start("t", specs, paths).unwrap();
        let pids = vm.pids();
        let t0 = Instant::now();
        let exit = loop {
            if let Some(e) = vm.try_wait().unwrap() {
                break e;
            }
            assert!(t0.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(
            exit,
            VmExit::Exited {
                component: "b".into(),
                status: Some(0),
                signal: None
            }
        );
        for p in pids {
            assert!(
                !Path::new(&format!("/proc/{p}")).exists(),
                "pid {p} still there"
            );
        }
    }

    #[test]
    fn kill_stops_everything() {
        let d = tempfile::tempdir().unwrap();
        let paths = RunPaths::new(d.path());
        let sleep = PathBuf::from("/bin/sleep");
        let specs = vec![ChildSpec::new("qemu", &sleep, vec!["30".into()], &paths)];
        let mut vm = QemuVm::start("t", specs, paths).unwrap();
        let pid = vm.pids()[0];
        vm.kill();
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        let e = vm.try_wait().unwrap().unwrap();
        assert!(
            matches!(
                e,
                VmExit::Exited {
                    signal: Some(9),
                    ..
                }
            ),
            "{e:?}"
        );
    }
}
