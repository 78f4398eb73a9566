//! The OCI lifecycle over the VM monitor and the guest's control service:
//! create (the VM boots), start (deferred main spawn), kill, delete.
//! One implementation, used by the CLI and the shim.

use std::fs;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use krun_oci_protocol::SignalTarget;
use oci_spec::runtime::{LinuxResources, Spec};

use crate::bundle::Bundle;
use crate::container::{Container, EXIT_CODE_FILE};
use crate::error::{Error, IoContext, Result};
use crate::guest::GuestClient;
use crate::hooks::run_hooks;
use crate::monitor::{self, MonitorConfig, SyncReport};
use crate::state::{write_atomic, ContainerRecord, StateStore, Status};
use crate::vmm::VmmChoice;

/// Default VM size when neither resources nor annotations say otherwise.
pub const DEFAULT_VCPUS: u32 = 2;
/// How long a guest has to take a SIGKILL before `kill` ends the VM instead.
const KILL_ANSWER_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);
pub const DEFAULT_RAM_MIB: u32 = 512;
/// Least RAM a guest gets, whatever the memory limit says (kernel + init overhead).
pub const MIN_RAM_MIB: u32 = 128;

/// Options of `create` beyond the bundle.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    pub bundle: PathBuf,
    pub pid_file: Option<PathBuf>,
    pub console_socket: Option<PathBuf>,
    pub vmm: VmmChoice,
    /// Path of this binary, re-executed as the monitor.
    pub exe: PathBuf,
    /// The container's stdio (stdin, stdout, stderr) as the monitor's fds 0/1/2
    /// when there is no terminal. `None`: the caller's own fds 0/1/2 (runc
    /// semantics for the CLI). A shim passes containerd's fifos here.
    pub stdio: Option<[Arc<OwnedFd>; 3]>,
    /// `--systemd-cgroup`: `linux.cgroupsPath` is `slice:prefix:name`.
    pub systemd_cgroup: bool,
}

/// Creates the container: validates, snapshots, starts the monitor (which boots
/// the VM), runs the create-time hooks. On failure nothing is left behind.
pub fn create(store: &StateStore, id: &str, opts: &CreateOptions) -> Result<Container> {
    let bundle = Bundle::load(&opts.bundle)?;
    let terminal = bundle
        .spec
        .process()
        .as_ref()
        .and_then(|p| p.terminal())
        .unwrap_or(false);
    match (terminal, &opts.console_socket) {
        (true, None) => {
            return Err(Error::InvalidInput(
                "cannot allocate tty if runc will detach without setting console socket".into(),
            ))
        }
        (false, Some(_)) => {
            return Err(Error::InvalidInput(
                "cannot use console socket if runc will not detach or allocate tty".into(),
            ))
        }
        _ => {}
    }
    // Before anything exists: a bad network annotation fails create cleanly.
    let (network, network_warning) = crate::network::plan(&bundle.spec)?;
    if let Some(w) = network_warning {
        log::warn!("{w}");
    }
    let dir = store.claim(id)?;
    let result = (|| {
        let _lock = dir.lock()?;
        let spec_json = serde_json::to_vec_pretty(&bundle.spec)?;
        write_atomic(&dir.config_file(), &spec_json).ctx(|| "writing config snapshot".into())?;
        // A stale code from an earlier run must not be mistaken for this one's.
        remove_guest_exit_code(&bundle.rootfs);
        let mut record = ContainerRecord {
            id: id.to_string(),
            bundle: bundle.path.clone(),
            rootfs: bundle.rootfs.clone(),
            created: chrono::Utc::now(),
            owner: String::new(),
            annotations: bundle.spec.annotations().clone().unwrap_or_default(),
            pid: 0,
            pid_start_time: 0,
            started: false,
            paused: false,
            vmm: String::new(),
            link: None,
            helper_pids: Vec::new(),
            pool_dirs: Vec::new(),
            log_path: None,
            cgroup: Some(crate::cgroup::HostCgroup::for_spec(
                &bundle.spec,
                id,
                opts.systemd_cgroup,
            )),
        };
        dir.save(&record)?;
        let (vcpus, ram_mib) = vm_size(&bundle.spec);
        let log_path = monitor::log_path(&dir, &bundle.spec);
        let cfg = MonitorConfig {
            rootfs: bundle.rootfs.clone(),
            vmm: vmm_choice(&bundle.spec, opts.vmm)?,
            vcpus,
            ram_mib,
            terminal,
            console_socket: opts.console_socket.clone(),
            log_path: log_path.clone(),
            cgroup: record.cgroup.clone(),
            network,
            rootfs_cache: crate::host_config::rootfs_cache()?,
            main_program: bundle.main_program.clone(),
        };
        write_atomic(
            &dir.monitor_config_file(),
            &serde_json::to_vec_pretty(&cfg)?,
        )
        .ctx(|| "writing monitor.json".into())?;
        // The monitor's pid is recorded as soon as it exists, so a create that is
        // killed while the VM boots still leaves something `delete --force` can stop.
        let (pid, report) = spawn_monitor(
            store.root(),
            &dir,
            &opts.exe,
            terminal,
            opts.stdio.as_ref(),
            |pid| {
                record.pid = pid;
                record.pid_start_time = crate::supervise::start_time(pid).unwrap_or(0);
                dir.save(&record)
            },
        )?;
        record.log_path = Some(log_path);
        match report {
            SyncReport::Ready {
                link,
                helper_pids,
                vmm,
                pool_dirs,
                ..
            } => {
                record.link = Some(link);
                record.helper_pids = helper_pids;
                record.vmm = vmm;
                record.pool_dirs = pool_dirs;
            }
            SyncReport::Failed { error } => {
                reap_quietly(pid);
                // Already a whole message from the monitor, with its kind.
                return Err(error.into());
            }
        }
        dir.save(&record)?;
        let container = Container {
            dir: dir.clone(),
            record,
        };
        if let Some(p) = &opts.pid_file {
            write_pid_file(p, pid)?;
        }
        let state = state_bytes(&container, Status::Created);
        let hooks = bundle.spec.hooks().clone().unwrap_or_default();
        #[allow(deprecated)]
        run_hooks("prestart", hooks.prestart().as_ref(), &state)?;
        run_hooks("createRuntime", hooks.create_runtime().as_ref(), &state)?;
        // createContainer's path resolves in the runtime namespace (the spec), so
        // it runs on the host: the binary is not in the guest. startContainer's
        // path resolves in the container, so that one runs in the guest.
        run_hooks("createContainer", hooks.create_container().as_ref(), &state)?;
        Ok(container)
    })();
    match result {
        Ok(c) => Ok(c),
        Err(e) => {
            if let Ok(c) = Container::load(store, id) {
                destroy(&c);
            }
            if let Some(p) = &opts.pid_file {
                let _ = fs::remove_file(p);
            }
            let _ = dir.remove();
            Err(e)
        }
    }
}

/// Starts the monitor detached (own session) and waits for its report.
fn spawn_monitor(
    root: &Path,
    dir: &crate::state::ContainerDir,
    exe: &Path,
    terminal: bool,
    stdio: Option<&[Arc<OwnedFd>; 3]>,
    on_spawned: impl FnOnce(i32) -> Result<()>,
) -> Result<(i32, SyncReport)> {
    let mut cmd = Command::new(exe);
    cmd.arg("--root")
        .arg(root)
        .arg("--log")
        .arg(dir.monitor_log_file())
        .arg("monitor")
        .arg(&dir.id);
    let (read_end, write_end) = crate::supervise::detached_with_sync_pipe(&mut cmd)?;
    // Without a terminal, create's stdio is the container's (runc semantics); with
    // one, the console pty is, and holding create's fds would keep the caller's
    // pipes open for the container's lifetime.
    match (terminal, stdio) {
        (true, _) => {
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
        }
        (false, Some([i, o, e])) => {
            let dup = |fd: &Arc<OwnedFd>| {
                fd.try_clone()
                    .map(Stdio::from)
                    .ctx(|| "duplicating a stdio fd".into())
            };
            cmd.stdin(dup(i)?).stdout(dup(o)?).stderr(dup(e)?);
        }
        (false, None) => {
            cmd.stdin(Stdio::inherit())
                .stdout(Stdio::inherit())
                .stderr(Stdio::inherit());
        }
    }
    let child = cmd
        .spawn()
        .ctx(|| format!("starting the VM monitor {}", exe.display()))?;
    drop(write_end);
    let pid = child.id() as i32;
    if let Err(e) = on_spawned(pid) {
        reap_quietly(pid);
        return Err(e);
    }
    let mut pipe = fs::File::from(read_end);
    let report = monitor::read_report(&mut pipe, &dir.monitor_log_file());
    // The monitor outlives us; it is never waited for here (the caller or a
    // subreaper reaps it). Forget the handle without killing it.
    std::mem::forget(child);
    match report {
        Ok(r) => Ok((pid, r)),
        Err(e) => {
            reap_quietly(pid);
            Err(e)
        }
    }
}

/// Kills and reaps a monitor that failed during create.
fn reap_quietly(pid: i32) {
    let pid = nix::unistd::Pid::from_raw(pid);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    let _ = nix::sys::wait::waitpid(pid, None);
}

/// A link a client added to the container's new network namespace between
/// create and start (`ctr run --cni`) goes to the VM's spare NIC now.
fn attach_late_network(c: &Container, link: &crate::guest::GuestLink) -> Result<()> {
    let monitor = c.dir.monitor_config()?;
    if monitor.network != crate::network::Plan::Fresh {
        return Ok(());
    }
    let network = crate::network::attach_late(&c.dir.network_record(), c.record.pid)?;
    if network.is_empty() {
        return Ok(());
    }
    GuestClient::connect(link)?.configure_network(network)
}

/// Runs the container's main process.
pub fn start(store: &StateStore, id: &str) -> Result<()> {
    let mut c = Container::load(store, id)?;
    let _lock = c.dir.lock()?;
    c.record = c.dir.load()?;
    match c.status() {
        Status::Created => {}
        Status::Stopped => return Err(Error::StartStopped),
        Status::Running => return Err(Error::AlreadyRunning),
        other => {
            return Err(Error::WrongState {
                op: "start",
                status: other.to_string(),
            })
        }
    }
    let spec = c.config_snapshot()?;
    if spec.process().is_none() {
        return Err(Error::InvalidInput("config has no process".into()));
    }
    let link = c.record.link.clone().ok_or(Error::NotRunning)?;
    attach_late_network(&c, &link)?;
    // startContainer hooks run in the container (the guest), before the main; a
    // failing one aborts start.
    let hooks = spec.hooks().clone().unwrap_or_default();
    run_guest_hooks(
        "startContainer",
        hooks.start_container().as_ref(),
        &state_bytes(&c, Status::Created),
        &link,
    )?;
    // Marked first, so a main that exits at once is never seen as "created".
    c.record.started = true;
    c.dir.save(&c.record)?;
    if let Err(e) = GuestClient::connect(&link).and_then(|mut g| g.spawn_main()) {
        c.record.started = false;
        c.dir.save(&c.record)?;
        return Err(e);
    }
    let state = state_bytes(&c, Status::Running);
    if let Err(e) = run_hooks("poststart", hooks.poststart().as_ref(), &state) {
        log::warn!("{e}");
    }
    Ok(())
}

/// Runs hooks inside the guest, in the container's root, over the exec channel:
/// the state JSON on stdin, `timeout` honoured (the hook is killed when it runs out).
fn run_guest_hooks(
    kind: &str,
    hooks: Option<&Vec<oci_spec::runtime::Hook>>,
    state: &[u8],
    link: &crate::guest::GuestLink,
) -> Result<()> {
    for hook in hooks.map(|h| h.as_slice()).unwrap_or_default() {
        let fail = |reason: String| Error::HookFailed {
            hook: kind.to_string(),
            path: hook.path().display().to_string(),
            reason,
        };
        let mut args = vec![hook.path().display().to_string()];
        args.extend(
            hook.args()
                .as_deref()
                .unwrap_or_default()
                .iter()
                .skip(1)
                .cloned(),
        );
        let mut process = krun_oci_protocol::Process::default();
        process.set_args(Some(args));
        process.set_env(Some(hook.env().clone().unwrap_or_else(|| {
            vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()]
        })));
        process.set_terminal(Some(false));
        process.set_capabilities(None);
        process.set_rlimits(None);
        let session = crate::exec::ExecSession::start(link, process, false, None)
            .map_err(|e| fail(e.to_string()))?;
        let (stdin_r, stdin_w) = nix::unistd::pipe()?;
        // The state is small (far below a pipe's buffer): write it all, then close.
        let _ = nix::unistd::write(&stdin_w, state);
        drop(stdin_w);
        let null = || {
            fs::OpenOptions::new()
                .write(true)
                .open("/dev/null")
                .map(std::os::fd::OwnedFd::from)
        };
        let (out, err) = (
            null().ctx(|| "/dev/null".into())?,
            null().ctx(|| "/dev/null".into())?,
        );
        let id = session.id.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(session.relay(stdin_r, out, err, None));
        });
        let code = match hook.timeout().filter(|t| *t > 0) {
            Some(t) => match rx.recv_timeout(Duration::from_secs(t as u64)) {
                Ok(code) => code,
                Err(_) => {
                    let _ = GuestClient::connect(link)
                        .and_then(|mut g| g.signal(SignalTarget::Exec(id), libc::SIGKILL));
                    return Err(fail(format!("timed out after {t}s")));
                }
            },
            None => rx.recv().unwrap_or(crate::container::LOST_EXIT_CODE),
        };
        if code != 0 {
            return Err(fail(format!("exit status {code}")));
        }
    }
    Ok(())
}

/// Sends `signal` to the main process (or every guest process with `all`).
pub fn kill(store: &StateStore, id: &str, signal: i32, all: bool) -> Result<()> {
    let mut c = Container::load(store, id)?;
    // `start` marks the container running before the guest has spawned the main
    // and holds the lock until it has: a kill right after `state` said running
    // must wait for that, not find no main in the guest.
    let _lock = c.dir.lock()?;
    c.record = c.dir.load()?;
    let status = c.status();
    if !matches!(status, Status::Created | Status::Running | Status::Paused) {
        return Err(Error::NotRunning);
    }
    let link = c.record.link.clone().ok_or(Error::NotRunning)?;
    if status == Status::Paused {
        // A frozen VM cannot take the signal: thaw it, deliver, and freeze it
        // again, except for SIGKILL, which ends the VM (as runc's frozen init
        // dies on SIGKILL).
        set_frozen(&mut c, false)?;
        let was = if c.record.started {
            Status::Running
        } else {
            Status::Created
        };
        let r = kill_unlocked(&c, &link, was, signal, all);
        if signal != libc::SIGKILL {
            set_frozen(&mut c, true)?;
        }
        return r;
    }
    kill_unlocked(&c, &link, status, signal, all)
}

fn kill_unlocked(
    c: &Container,
    link: &crate::guest::GuestLink,
    status: Status,
    signal: i32,
    all: bool,
) -> Result<()> {
    if status == Status::Created {
        // No main yet: the signal ends the container, as it would end runc's waiting init.
        let _ = write_atomic(
            &c.dir.exit_code_file(),
            (128 + signal).to_string().as_bytes(),
        );
        if let Ok(mut g) = GuestClient::connect(link) {
            let _ = g.shutdown();
        } else {
            kill_monitor(c);
        }
        return Ok(());
    }
    let target = if all {
        SignalTarget::All
    } else {
        SignalTarget::Main
    };
    // SIGKILL must work on a wedged guest: it gets a few seconds, not the usual 30.
    let limit = if signal == libc::SIGKILL {
        KILL_ANSWER_LIMIT
    } else {
        crate::guest::CONTROL_TIMEOUT
    };
    let reply = GuestClient::connect_within(link, limit).and_then(|mut g| g.signal(target, signal));
    match reply {
        Ok(()) => Ok(()),
        Err(e @ Error::GuestRefused { .. }) => Err(e),
        // A wedged guest still goes away on SIGKILL: end the VM.
        Err(_) if signal == libc::SIGKILL => {
            let _ = write_atomic(&c.dir.exit_code_file(), b"137");
            kill_monitor(c);
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Whether the guest's OOM killer ran while the container's main ran.
pub fn oom_killed(store: &StateStore, id: &str) -> bool {
    Container::load(store, id).is_ok_and(|c| c.dir.oom_killed())
}

/// One `stats` event as `events` prints it: `{"type":"stats","id":ID,"data":...}`,
/// the data being the host cgroup's statistics (youki's libcgroups field names), so
/// the VM's whole cost as the host sees it.
pub fn stats_event(store: &StateStore, id: &str) -> Result<serde_json::Value> {
    let c = Container::load(store, id)?;
    if c.status() == Status::Stopped {
        return Err(Error::NotRunning);
    }
    let cgroup = c.record.cgroup.as_ref().ok_or_else(|| {
        Error::NoHostCgroup(format!(
            "{id} has no host cgroup (created by an older krun-oci)"
        ))
    })?;
    let stats = cgroup.stats()?;
    Ok(serde_json::json!({"type": "stats", "id": id, "data": stats}))
}

/// Created or running: what the guest must answer. A frozen guest answers nothing.
fn require_unpaused(c: &Container, action: &'static str) -> Result<()> {
    match c.status() {
        Status::Created | Status::Running => Ok(()),
        Status::Paused => Err(Error::ResumeFirst { op: action }),
        _ => Err(Error::NotRunning),
    }
}

/// `update`: new resource limits for a created, running or paused container. CPU
/// and block I/O go to the VM's host cgroup, the pids limit to the guest's
/// container cgroup. A VM's RAM is fixed when it boots, so a different memory
/// limit is refused before anything changes.
pub fn update(store: &StateStore, id: &str, resources: &LinuxResources) -> Result<()> {
    let c = Container::load(store, id)?;
    let _lock = c.dir.lock()?;
    require_unpaused(&c, "update")?;
    let spec = c.config_snapshot()?;
    if let Some(want) = resources.memory().as_ref().and_then(|m| m.limit()) {
        let now = spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref())
            .and_then(|r| r.memory().as_ref())
            .and_then(|m| m.limit());
        if Some(want) != now {
            let (_, ram_mib) = vm_size(&spec);
            return Err(Error::InvalidInput(format!(
                "memory limit {want}: a VM's RAM is fixed when it boots ({ram_mib} MiB); \
                 update cannot change it"
            )));
        }
    }
    if let Some(host) = crate::cgroup::host_part(resources)? {
        let cgroup = c.record.cgroup.as_ref().ok_or_else(|| {
            Error::NoHostCgroup(format!(
                "{id} has no host cgroup for cpu and block I/O limits"
            ))
        })?;
        cgroup.apply(&host)?;
    }
    if let Some(pids) = resources.pids() {
        let link = c.record.link.clone().ok_or(Error::NotRunning)?;
        GuestClient::connect(&link)?.update_pids(pids.limit())?;
    }
    Ok(())
}

/// Lists the processes inside the container's VM (guest pids).
pub fn ps(store: &StateStore, id: &str) -> Result<Vec<krun_oci_protocol::GuestProcess>> {
    let c = Container::load(store, id)?;
    // The guest answers ps.
    require_unpaused(&c, "list the processes of")?;
    let link = c.record.link.clone().ok_or(Error::NotRunning)?;
    GuestClient::connect(&link)?.ps()
}

/// Deletes a stopped (or created) container; `force` stops a running one first.
pub fn delete(store: &StateStore, id: &str, force: bool) -> Result<()> {
    let c = match Container::load(store, id) {
        Ok(c) => c,
        Err(Error::NotExist) if force => {
            // A half-created directory (no state yet) is removed too.
            crate::state::validate_id(id)?;
            let dir = crate::state::ContainerDir {
                id: id.to_string(),
                path: store.root().join(id),
            };
            let _ = dir.remove();
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let _lock = c.dir.lock()?;
    match c.status() {
        Status::Stopped | Status::Created => {}
        status if force => log::debug!("force-deleting {id} ({status})"),
        status => {
            return Err(Error::NotStopped {
                id: id.to_string(),
                status: status.to_string(),
            })
        }
    }
    destroy(&c);
    let spec = c.config_snapshot().ok();
    let state = state_bytes(&c, Status::Stopped);
    remove_guest_exit_code(&c.record.rootfs);
    c.dir.remove()?;
    if let Some(hooks) = spec.and_then(|s| s.hooks().clone()) {
        if let Err(e) = run_hooks("poststop", hooks.poststop().as_ref(), &state) {
            log::warn!("{e}");
        }
    }
    Ok(())
}

/// `pause`: freezes the VM's host cgroup, vCPUs and helpers alike.
pub fn pause(store: &StateStore, id: &str) -> Result<()> {
    let mut c = Container::load(store, id)?;
    let _lock = c.dir.lock()?;
    c.record = c.dir.load()?;
    match c.status() {
        Status::Running | Status::Created => set_frozen(&mut c, true),
        Status::Paused => Ok(()),
        _ => Err(Error::NotRunning),
    }
}

/// `resume`: thaws a paused container.
pub fn resume(store: &StateStore, id: &str) -> Result<()> {
    let mut c = Container::load(store, id)?;
    let _lock = c.dir.lock()?;
    c.record = c.dir.load()?;
    match c.status() {
        Status::Paused => set_frozen(&mut c, false),
        _ => Err(Error::NotPaused),
    }
}

/// Freezes or thaws the VM and records it (the caller holds the lock).
fn set_frozen(c: &mut Container, frozen: bool) -> Result<()> {
    let cg = c.record.cgroup.clone().ok_or_else(|| {
        Error::NoHostCgroup(
            "the container has no cgroup to freeze (created by an older krun-oci)".into(),
        )
    })?;
    cg.freeze(frozen)?;
    c.record.paused = frozen;
    c.dir.save(&c.record)
}

/// Stops the monitor and every helper it started, and waits until they are gone.
fn destroy(c: &Container) {
    // Frozen tasks do not die until thawed.
    if c.record.paused {
        if let Some(cg) = &c.record.cgroup {
            let _ = cg.freeze(false);
        }
    }
    if c.monitor_alive() {
        kill_monitor(c);
    }
    for &pid in &c.record.helper_pids {
        if pid > 0 && crate::supervise::start_time(pid).is_some() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let any_alive = || {
        (c.record.pid > 0 && crate::supervise::is_alive(c.record.pid, c.record.pid_start_time))
            || c.record
                .helper_pids
                .iter()
                .any(|&p| crate::supervise::state_letter(p).is_some_and(|s| s != 'Z'))
    };
    while any_alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if let Some(cg) = &c.record.cgroup {
        if let Err(e) = cg.remove() {
            log::warn!("{e}");
        }
    }
    // A pooled VM's member removes its directories as it exits; a killed one cannot.
    for d in &c.record.pool_dirs {
        if d.starts_with(
            c.dir
                .path
                .parent()
                .unwrap_or(Path::new("/"))
                .join(crate::pool::POOL_DIR),
        ) || d.starts_with(crate::state::run_base())
        {
            crate::mounts::remove_dir_on_one_mount(d);
        }
    }
    // The monitor undoes its taps and redirects as it exits; one that was killed
    // left its record behind.
    if let Ok(monitor) = c.dir.monitor_config() {
        if let crate::network::Plan::Attach { netns, .. } = &monitor.network {
            if let Err(e) = crate::network::release_in(&c.dir.network_record(), netns) {
                log::warn!("{e}");
            }
        }
    }
}

fn kill_monitor(c: &Container) {
    if c.monitor_alive() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.record.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

fn state_bytes(c: &Container, status: Status) -> Vec<u8> {
    let mut s = c.state_json();
    s.status = status;
    serde_json::to_vec(&s).unwrap_or_default()
}

/// Writes the pid file atomically, with no trailing newline.
pub fn write_pid_file(path: &Path, pid: i32) -> Result<()> {
    write_atomic(path, pid.to_string().as_bytes())
        .ctx(|| format!("writing pid file {}", path.display()))
}

fn remove_guest_exit_code(rootfs: &Path) {
    // remove_file unlinks a symlink itself, never its target.
    let _ = fs::remove_file(rootfs.join(EXIT_CODE_FILE));
}

/// The VM's size: annotations first (ours, then crun-krun's), else derived from
/// the resources (memory limit -> RAM, CPU quota/cpuset -> vCPUs), else defaults.
pub fn vm_size(spec: &Spec) -> (u32, u32) {
    use crate::spec::*;
    let ann = spec.annotations().clone().unwrap_or_default();
    let get = |keys: [&str; 2]| {
        keys.iter()
            .find_map(|k| ann.get(*k))
            .and_then(|v| v.trim().parse::<u32>().ok())
    };
    let resources = spec.linux().as_ref().and_then(|l| l.resources().clone());
    let cpus_from_resources =
        resources
            .as_ref()
            .and_then(|r| r.cpu().clone())
            .and_then(|cpu| match (cpu.quota(), cpu.period()) {
                (Some(q), Some(p)) if q > 0 && p > 0 => Some(((q as u64).div_ceil(p)) as u32),
                _ => cpu
                    .cpus()
                    .as_ref()
                    .map(|s| count_cpuset(s))
                    .filter(|n| *n > 0),
            });
    let ram_from_resources = resources
        .as_ref()
        .and_then(|r| r.memory().as_ref().and_then(|m| m.limit()))
        .filter(|l| *l > 0)
        .map(|l| ((l as u64) / (1024 * 1024)) as u32);
    let vcpus = get([ANNOTATION_CPUS, ANNOTATION_CRUN_CPUS])
        .or(cpus_from_resources)
        .unwrap_or(DEFAULT_VCPUS)
        .clamp(1, 64);
    let ram = get([ANNOTATION_RAM_MIB, ANNOTATION_CRUN_RAM_MIB])
        .or(ram_from_resources)
        .unwrap_or(DEFAULT_RAM_MIB)
        .max(MIN_RAM_MIB);
    (vcpus, ram)
}

fn count_cpuset(s: &str) -> u32 {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('-') {
            Some((a, b)) => match (a.trim().parse::<u32>(), b.trim().parse::<u32>()) {
                (Ok(a), Ok(b)) if b >= a => b - a + 1,
                _ => 0,
            },
            None => u32::from(p.trim().parse::<u32>().is_ok()),
        })
        .sum()
}

/// The VMM for this container: the annotation wins over the global flag.
fn vmm_choice(spec: &Spec, flag: VmmChoice) -> Result<VmmChoice> {
    let ann = spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(crate::spec::ANNOTATION_VMM));
    match ann.map(|s| s.as_str()) {
        None => Ok(flag),
        Some("auto") => Ok(VmmChoice::Auto),
        Some("qemu") => Ok(VmmChoice::Qemu),
        Some("libkrun") => Ok(VmmChoice::Libkrun),
        Some(other) => Err(Error::InvalidInput(format!(
            "annotation {}: unknown VMM {other:?}",
            crate::spec::ANNOTATION_VMM
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Spec {
        let mut base = serde_json::to_value(Spec::default()).unwrap();
        for (k, v) in json.as_object().unwrap() {
            base[k] = v.clone();
        }
        serde_json::from_value(base).unwrap()
    }

    /// A container `c` in a store under `root` whose monitor is this (live)
    /// process: paused when `paused`, still creating without a guest link.
    fn stored(root: &Path, paused: bool, link: bool) -> StateStore {
        let store = StateStore::open(root).unwrap();
        let dir = store.claim("c").unwrap();
        let pid = std::process::id() as i32;
        let record = ContainerRecord {
            id: "c".into(),
            bundle: root.into(),
            rootfs: root.into(),
            created: chrono::Utc::now(),
            owner: String::new(),
            annotations: Default::default(),
            pid,
            pid_start_time: crate::supervise::start_time(pid).unwrap(),
            started: true,
            paused,
            vmm: String::new(),
            link: link.then(|| crate::guest::GuestLink::PortSockets { dir: root.into() }),
            helper_pids: Vec::new(),
            pool_dirs: Vec::new(),
            log_path: None,
            // As an older krun-oci recorded it.
            cgroup: None,
        };
        dir.save(&record).unwrap();
        store
    }

    #[test]
    fn wrong_states_are_typed_with_runcs_words() {
        use crate::error::ErrorKind;
        let d = tempfile::tempdir().unwrap();
        let paused = stored(d.path(), true, true);
        let e = start(&paused, "c").unwrap_err();
        assert!(matches!(e, Error::WrongState { op: "start", .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "cannot start a container in the paused state"
        );
        assert_eq!(e.kind(), ErrorKind::WrongState);
        let e = update(&paused, "c", &LinuxResources::default()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot update a paused container: resume it first"
        );
        assert_eq!(e.kind(), ErrorKind::WrongState);
        let e = resume(&paused, "c").unwrap_err();
        assert_eq!(
            e.to_string(),
            "the container has no cgroup to freeze (created by an older krun-oci)"
        );
        assert_eq!(e.kind(), ErrorKind::WrongState);
        let e = stats_event(&paused, "c").unwrap_err();
        assert_eq!(
            e.to_string(),
            "c has no host cgroup (created by an older krun-oci)"
        );
        assert_eq!(e.kind(), ErrorKind::WrongState);

        let d = tempfile::tempdir().unwrap();
        let creating = stored(d.path(), false, false);
        let e = start(&creating, "c").unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot start a container in the creating state"
        );
        assert_eq!(e.kind(), ErrorKind::WrongState);
    }

    #[test]
    fn vm_size_from_resources_and_annotations() {
        assert_eq!(vm_size(&Spec::default()), (DEFAULT_VCPUS, DEFAULT_RAM_MIB));
        let s = spec(
            serde_json::json!({"linux": {"resources": {"memory": {"limit": 1073741824i64}, "cpu": {"quota": 150000, "period": 100000}}}}),
        );
        assert_eq!(vm_size(&s), (2, 1024));
        let s = spec(
            serde_json::json!({"linux": {"resources": {"cpu": {"cpus": "0-3,6"}, "memory": {"limit": 1048576}}}}),
        );
        assert_eq!(vm_size(&s), (5, MIN_RAM_MIB));
        let s =
            spec(serde_json::json!({"annotations": {"krun.cpus": "3", "krun-oci.ram_mib": "768"}}));
        assert_eq!(vm_size(&s), (3, 768));
    }

    #[test]
    fn vmm_annotation() {
        let s = spec(serde_json::json!({"annotations": {"krun-oci.vmm": "qemu"}}));
        assert_eq!(vmm_choice(&s, VmmChoice::Auto).unwrap(), VmmChoice::Qemu);
        let s = spec(serde_json::json!({"annotations": {"krun-oci.vmm": "bogus"}}));
        assert!(vmm_choice(&s, VmmChoice::Auto).is_err());
    }

    #[test]
    fn pid_file_has_no_newline() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pid");
        write_pid_file(&p, 4242).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"4242");
    }
}
