//! The per-container VM monitor: the container's pid.
//!
//! `create` starts it (re-executing this binary as `krun-oci monitor ID` in a new
//! session, with the container's stdio as fds 0/1/2). It boots the VM, waits for
//! guest-init's ready beacon, applies the guest setup, reports to `create` over a
//! sync pipe, and then lives exactly as long as the workload: it relays the
//! main's stdio (to fds 0/1/2 or the console pty, and to the json-file log),
//! forwards signals it receives into the guest, and exits with the workload's
//! exit code, so conmon and the shims can simply `waitpid` it.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use krun_oci_protocol::{self as proto, Frame, Message, SignalTarget};
use oci_spec::runtime::Spec;
use serde::{Deserialize, Serialize};

use crate::container::{read_guest_exit_code, LOST_EXIT_CODE};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::guest::{GuestClient, GuestLink};
use crate::logs::{JsonLogWriter, Stream};
use crate::relay::Forward;
use crate::state::{write_atomic, ContainerDir};
use crate::vmm::{Vm, VmSpec, VmmChoice};

/// When the workload's end comes without its report (the events stream closed,
/// the VM stopped), how long the guest gets to power off by itself.
const POWEROFF_GRACE: Duration = Duration::from_secs(10);

/// What `create` hands the monitor (`monitor.json` in the container dir).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MonitorConfig {
    pub rootfs: PathBuf,
    pub vmm: VmmChoice,
    pub vcpus: u32,
    pub ram_mib: u32,
    pub terminal: bool,
    pub console_socket: Option<PathBuf>,
    pub log_path: PathBuf,
    /// The host cgroup to enter before the VMM starts (so the whole VM is in it).
    #[serde(default)]
    pub cgroup: Option<crate::cgroup::HostCgroup>,
    /// Which links of the network namespace become the VM's NICs.
    #[serde(default)]
    pub network: crate::network::Plan,
    #[serde(default)]
    pub rootfs_cache: crate::vmm::RootfsCache,
    /// The main's program as the container names it, where `create` could tell
    /// (`crate::bundle::find_program`): the guest then skips its own lookup.
    #[serde(default)]
    pub main_program: Option<PathBuf>,
}

/// The monitor's report to `create`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncReport {
    Ready {
        link: GuestLink,
        helper_pids: Vec<i32>,
        vmm: String,
        timings: Vec<proto::BootTiming>,
        #[serde(default)]
        pool_dirs: Vec<PathBuf>,
    },
    Failed {
        error: crate::error::ErrorReport,
    },
}

impl ContainerDir {
    pub fn monitor_config_file(&self) -> PathBuf {
        self.path.join("monitor.json")
    }
    pub fn monitor_log_file(&self) -> PathBuf {
        self.path.join("monitor.log")
    }
    /// The monitor's configuration as create wrote it.
    pub fn monitor_config(&self) -> Result<MonitorConfig> {
        Ok(serde_json::from_slice(
            &std::fs::read(self.monitor_config_file()).ctx(|| "reading monitor.json".into())?,
        )?)
    }
    /// What the monitor attached of the network namespace (network.rs).
    pub fn network_record(&self) -> PathBuf {
        self.path.join(crate::network::NETWORK_RECORD)
    }
}

/// Entry point of `krun-oci monitor ID`. Returns the process exit status.
pub fn run(dir: &ContainerDir) -> Result<i32> {
    let t0 = Instant::now();
    let sync = crate::supervise::take_sync_pipe();
    let cfg = dir.monitor_config()?;
    let spec: Spec = serde_json::from_slice(
        &std::fs::read(dir.config_file()).ctx(|| "reading config snapshot".into())?,
    )?;
    // Entering the host cgroup waits on RCU grace periods (cgroup v1 moves take
    // a global rwsem that syncs RCU): it runs beside the image check and the pool
    // claim. A cold boot waits for it before it starts anything; a claimed VM is
    // moved in beside its setup.
    let booted = join_network_namespace(&spec).and_then(|()| {
        std::thread::scope(|s| {
            let entering = Mutex::new(Some(s.spawn(|| match &cfg.cgroup {
                Some(cg) => cg.enter(std::process::id() as i32, &spec),
                None => Ok(()),
            })));
            // Joined once: by boot, or here if boot failed before it needed to.
            let entered = || match entering.lock().map(|mut e| e.take()) {
                Ok(Some(h)) => h
                    .join()
                    .unwrap_or_else(|_| Err(Error::Vm("cgroup: entering it panicked".into()))),
                _ => Ok(()),
            };
            let booted = boot(dir, &cfg, &spec, t0, entered);
            let _ = entered();
            booted
        })
    });
    let booted = match booted {
        Ok(b) => b,
        Err(e) => {
            log::error!("boot failed: {e}");
            release_network(dir);
            report(sync, &SyncReport::Failed { error: e.report() });
            return Ok(1);
        }
    };
    report(
        sync,
        &SyncReport::Ready {
            link: booted.vm.link(),
            helper_pids: booted.vm.pids(),
            vmm: booted.vmm_name.to_string(),
            timings: booted.timings.clone(),
            pool_dirs: booted.pool_dirs.clone(),
        },
    );
    let code = supervise(dir, &cfg, booted);
    release_network(dir);
    Ok(code)
}

/// Undoes the taps and redirects of the VM's NICs (the monitor is still in the
/// container's network namespace).
fn release_network(dir: &ContainerDir) {
    if let Err(e) = crate::network::release(&dir.network_record()) {
        log::warn!("{e}");
    }
}

/// Joins `linux.namespaces`' network `path` (podman's or CNI's namespace), so the
/// VMM and its helpers, spawned after this, live there. Runs before the monitor
/// starts threads: setns changes the calling thread, later threads inherit it.
fn join_network_namespace(spec: &Spec) -> Result<()> {
    use oci_spec::runtime::LinuxNamespaceType;
    let netns = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|ns| ns.iter().find(|n| n.typ() == LinuxNamespaceType::Network));
    let listed = netns.is_some();
    let Some(path) = netns.and_then(|n| n.path().clone()) else {
        // Listed without a path: a new namespace, as runc makes for the container's
        // init (clients such as `ctr run --cni` configure /proc/<pid>/ns/net).
        if listed {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                Error::InvalidInput(format!(
                    "creating a network namespace: {}",
                    e.desc().to_lowercase()
                ))
            })?;
        }
        return Ok(());
    };
    let f = File::open(&path).ctx(|| format!("opening network namespace {}", path.display()))?;
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
        Error::InvalidInput(format!(
            "joining network namespace {}: {}",
            path.display(),
            e.desc().to_lowercase()
        ))
    })
}

fn report(sync: Option<File>, r: &SyncReport) {
    if let Some(mut f) = sync {
        let mut line = serde_json::to_vec(r).unwrap_or_default();
        line.push(b'\n');
        let _ = f.write_all(&line);
    }
}

struct Booted {
    vm: Box<dyn Vm>,
    vmm_name: &'static str,
    events: UnixStream,
    /// The control connection `Setup` went over: the first spare.
    control: GuestClient,
    timings: Vec<proto::BootTiming>,
    pty: Option<crate::console::HostPty>,
    /// A pooled VM's member directories (removed by delete if the member was killed).
    pool_dirs: Vec<PathBuf>,
}

/// Boots the VM (or claims a pooled one) and brings the guest to "created":
/// beacon received, setup applied.
/// `entered` waits until the monitor is in the container's cgroup.
fn boot(
    dir: &ContainerDir,
    cfg: &MonitorConfig,
    spec: &Spec,
    t0: Instant,
    entered: impl FnOnce() -> Result<()> + Send,
) -> Result<Booted> {
    let run_dir = dir.create_run_dir()?;
    // The sandbox boots no kernel: no image to build.
    let image = match cfg.vmm {
        VmmChoice::Sandbox => None,
        vmm => Some(crate::image::ensure(&crate::boot::image_options(vmm)?)?),
    };
    let selection = crate::vmm::detect::select(cfg.vmm, image.as_ref())?;
    let image_ms = t0.elapsed().as_millis();
    // Compiled before the VM starts: a bad profile fails create at once.
    let seccomp = spec
        .linux()
        .as_ref()
        .and_then(|l| l.seccomp().as_ref())
        .map(crate::seccomp::compile)
        .transpose()?;
    let mounts = crate::mounts::MountsShare::plan(spec, run_dir.join("mounts"))?;
    let pooled = match (selection.vmm.name(), &image) {
        ("qemu", Some(image)) => claim_pooled(dir, cfg, spec, image, mounts.as_ref()),
        _ => None,
    };
    let claimed_ms = t0.elapsed().as_millis();
    // A cold VM's processes are the monitor's children: they start in its cgroup.
    // A claimed VM's are moved there beside its setup (below).
    let (launched, entered) = match pooled {
        Some(p) => {
            log::info!("vmm: qemu, pooled VM {} (pool hit)", p.member);
            (Ok(adopt(p)), Some(entered))
        }
        None => {
            entered()?;
            log::info!("vmm: {} ({})", selection.engine, selection.explanation);
            let launched = launch_cold(
                dir,
                cfg,
                &run_dir,
                selection.vmm.as_ref(),
                mounts,
                image.as_ref(),
            );
            (launched, None)
        }
    };
    let launched = launched?;
    let Launched {
        mut vm,
        events,
        timings,
        interfaces,
        spare_tap,
        deferred_root,
        pool_dirs,
        adopted_pids,
    } = launched;
    let launched_ms = t0.elapsed().as_millis();
    let link = vm.link();
    // A claimed VM joins the container's cgroup, and its spare tap moves into the
    // namespace (the kernel takes its time for both), while the guest is set up;
    // its NIC is configured once the tap is wired. Every thread is joined on every
    // path; their errors are the host's (runc's words), not the guest's.
    let prepared = main_can_be_prepared(spec);
    let (guest, host) = std::thread::scope(|s| {
        let joining = entered.map(|entered| {
            s.spawn(move || {
                entered()?;
                match &cfg.cgroup {
                    Some(cg) => cg.add(&adopted_pids),
                    None => Ok(()),
                }
            })
        });
        let mut wiring = spare_tap.map(|spare| {
            s.spawn(move || {
                spare.arrived()?;
                crate::network::attach_pooled(&cfg.network, &dir.network_record(), &spare.claim)
            })
        });
        let wired = |w: std::thread::ScopedJoinHandle<'_, Result<Vec<_>>>| {
            w.join()
                .unwrap_or_else(|_| Err(Error::Network("wiring the pooled NIC panicked".into())))
        };
        // `net.*` sysctls may name the NICs or act on their addresses: as on a
        // cold boot, the NICs then come in `Setup`, before the sysctls.
        let early = match wiring.take() {
            Some(w) if sets_net_sysctls(spec) => Some(wired(w)),
            later => {
                wiring = later;
                None
            }
        };
        let (early, early_error) = match early {
            Some(Ok(interfaces)) => (Some(interfaces), None),
            Some(Err(e)) => (None, Some(e)),
            None => (None, None),
        };
        let guest = match early_error {
            // Not reached: the host's error below is returned first.
            Some(_) => Err(Error::Network("the pooled NIC was not wired".into())),
            None => (|| {
                let mut control = GuestClient::dial(&link, crate::guest::CONTROL_TIMEOUT)?;
                control.setup(
                    spec.clone(),
                    seccomp,
                    early.unwrap_or(interfaces),
                    deferred_root,
                    crate::guest::MainPlan {
                        prepare: prepared,
                        program: cfg.main_program.clone(),
                    },
                )?;
                Ok(control)
            })(),
        };
        let host = (|| {
            if let Some(joining) = joining {
                joining.join().unwrap_or_else(|_| {
                    Err(Error::Vm("cgroup: moving the VM into it panicked".into()))
                })?;
            }
            if let Some(e) = early_error {
                return Err(e);
            }
            wiring.map_or(Ok(Vec::new()), wired)
        })();
        (guest, host)
    });
    let late_interfaces = match host {
        Ok(i) => i,
        Err(e) => {
            vm.kill();
            return Err(e);
        }
    };
    let ready = guest.and_then(|mut control| {
        if !late_interfaces.is_empty() {
            control.configure_network(late_interfaces)?;
        }
        let pty = match (&cfg.console_socket, cfg.terminal) {
            (Some(sock), true) => Some(crate::console::send_pty_to_console_socket(sock)?),
            _ => None,
        };
        // Created means the main is set up and waits for `start` (runc's create
        // returns once `runc init` waits on its exec fifo): the guest prepared it
        // while the steps above ran.
        if prepared {
            control.await_main()?;
        }
        Ok((control, pty))
    });
    // One parseable line for `make bench`: where the monitor's time went (ms
    // since it started; `claim` is the pool's answer, `vm` the cold boot or the
    // claimed VM taken over; a claimed VM's cgroup and NIC are done in `setup`).
    log::info!(
        "create-timing: image_ms={image_ms} claim_ms={claimed_ms} vm_ms={launched_ms} setup_ms={} pooled={}",
        t0.elapsed().as_millis(),
        !pool_dirs.is_empty()
    );
    match ready {
        Ok((control, pty)) => Ok(Booted {
            vm,
            vmm_name: selection.vmm.name(),
            events,
            control,
            timings,
            pty,
            pool_dirs,
        }),
        Err(e) => Err(with_console(e, vm.as_mut())),
    }
}

/// Whether the config sets sysctls of the network (`net.*`).
fn sets_net_sysctls(spec: &Spec) -> bool {
    spec.linux()
        .as_ref()
        .and_then(|l| l.sysctl().as_ref())
        .is_some_and(|s| s.keys().any(|k| k.starts_with("net.")))
}

/// Whether the guest may fork the main right after setup (it then waits for
/// `start` before its exec): not while create-time hooks, which run after setup
/// and may still change what the main finds, are configured.
fn main_can_be_prepared(spec: &Spec) -> bool {
    #[allow(deprecated)]
    let none = |h: &oci_spec::runtime::Hooks| {
        [h.prestart(), h.create_runtime(), h.create_container()]
            .iter()
            .all(|hooks| hooks.as_ref().is_none_or(|v| v.is_empty()))
    };
    spec.process().is_some() && spec.hooks().as_ref().is_none_or(none)
}

/// Ends a VM whose guest failed. A failure of the VM or the link becomes
/// [`Error::BootFailed`] with the console's tail; one with a meaning of its own
/// (a refused setup, a bad seccomp profile) keeps it, the console goes to the log.
fn with_console(e: Error, vm: &mut dyn Vm) -> Error {
    let console_tail = vm.console_tail(2048).trim().to_string();
    vm.kill();
    match e.kind() {
        ErrorKind::Internal => Error::BootFailed {
            // Not "vm: ...": the reason reads as the sentence it is.
            reason: match e {
                Error::Vm(m) => m,
                other => other.to_string(),
            },
            console_tail,
        },
        _ => {
            log::warn!("console: {console_tail}");
            e
        }
    }
}

/// A VM whose guest is ready for `Setup`.
struct Launched {
    vm: Box<dyn Vm>,
    events: UnixStream,
    timings: Vec<proto::BootTiming>,
    interfaces: Vec<proto::net::NetInterface>,
    /// A pooled VM's NIC, wired while the guest is set up.
    spare_tap: Option<crate::pool::adopt::SpareTap>,
    /// A pooled VM's processes, moved into the container's cgroup meanwhile.
    adopted_pids: Vec<i32>,
    deferred_root: Option<String>,
    pool_dirs: Vec<PathBuf>,
}

/// Boots the container's own VM.
fn launch_cold(
    dir: &ContainerDir,
    cfg: &MonitorConfig,
    run_dir: &Path,
    vmm: &dyn crate::vmm::Vmm,
    mounts: Option<crate::mounts::MountsShare>,
    image: Option<&crate::image::GuestImage>,
) -> Result<Launched> {
    if let Some(m) = &mounts {
        m.prepare()?;
    }
    let network = if vmm.has_network() {
        crate::network::attach(
            &cfg.network,
            &dir.network_record(),
            vmm.opens_taps_by_name(),
        )?
    } else {
        log::warn!("the {} backend has no network: loopback only", vmm.name());
        crate::network::Attached::default()
    };
    let vm_spec = VmSpec {
        id: dir.id.clone(),
        run_dir: run_dir.to_owned(),
        rootfs: cfg.rootfs.clone(),
        vcpus: cfg.vcpus,
        ram_mib: cfg.ram_mib,
        mounts,
        nics: network.nics,
        deferred_root: false,
        rootfs_cache: cfg.rootfs_cache,
    };
    let link = vmm.link(&vm_spec);
    let listener = crate::boot::bind_events(&link)?;
    let launch_start = Instant::now();
    let mut vm = vmm.launch(&vm_spec)?;
    let launched = launch_start.elapsed();
    let ready = crate::boot::await_ready(&listener, vm.as_mut());
    let _ = std::fs::remove_file(link.host_port_path(proto::HOST_EVENTS_PORT));
    let (events, timings) = ready.map_err(|e| with_console(e, vm.as_mut()))?;
    // One parseable line for `make bench` (scripts/bench.sh): boot-to-ready as
    // the host sees it, from launching the VMM (helpers included) to the guest's
    // Ready, and guest-init's own steps (micros since init started).
    let steps: Vec<String> = timings
        .iter()
        .map(|t| format!("{}={}", t.step, t.micros))
        .collect();
    log::info!(
        "boot-timing: ready_ms={} launch_ms={} kernel={:?} init_us=[{}]",
        launch_start.elapsed().as_millis(),
        launched.as_millis(),
        image.map(|i| i.kernel_origin),
        steps.join(",")
    );
    Ok(Launched {
        vm,
        events,
        timings,
        interfaces: network.interfaces,
        spare_tap: None,
        adopted_pids: Vec::new(),
        deferred_root: None,
        pool_dirs: Vec::new(),
    })
}

/// A pooled VM of the container's shape, claimed with its root, binds and
/// network namespace; `None` (the cold path) on a miss, another shape, a
/// container that opted out, or any error before the claim took effect.
fn claim_pooled(
    dir: &ContainerDir,
    cfg: &MonitorConfig,
    spec: &Spec,
    image: &crate::image::GuestImage,
    mounts: Option<&crate::mounts::MountsShare>,
) -> Option<crate::pool::adopt::Adopted> {
    let opted_out = spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(crate::spec::ANNOTATION_POOL))
        .is_some_and(|v| v == "false");
    let root = dir.path.parent()?;
    if opted_out || !crate::pool::PoolPaths::for_root(root).socket.exists() {
        return None;
    }
    // A pooled VM has one NIC: a namespace with more links boots cold.
    if let crate::network::Plan::Attach { .. } = cfg.network {
        match crate::network::candidate_count() {
            Ok(n) if n <= 1 => {}
            Ok(n) => {
                log::info!("pool: not used, the network namespace has {n} links to attach");
                return None;
            }
            Err(e) => {
                log::warn!("pool: not used: {e}");
                return None;
            }
        }
    }
    let shape = crate::pool::Shape {
        vcpus: cfg.vcpus,
        ram_mib: cfg.ram_mib,
        kernel: image.kernel.clone(),
        initrd: image.initrd.clone(),
        rootfs_cache: cfg.rootfs_cache,
    };
    let netns = cfg.network != crate::network::Plan::LoopbackOnly;
    match crate::pool::adopt::claim(root, &shape, &cfg.rootfs, mounts, netns) {
        Ok(p) => p,
        Err(e) => {
            log::warn!("pool: {e}; booting cold");
            None
        }
    }
}

/// Runs a claimed pooled VM as the container's. Its processes join the
/// container's cgroup and its NIC is wired in `boot`, beside the guest's setup.
fn adopt(p: crate::pool::adopt::Adopted) -> Launched {
    Launched {
        vm: p.vm,
        events: p.events,
        timings: p.timings,
        interfaces: Vec::new(),
        spare_tap: p.spare,
        adopted_pids: p.pids,
        deferred_root: Some(crate::pool::member::ROOT_ENTRY.to_string()),
        pool_dirs: p.dirs,
    }
}

/// Unexpected frames on the events stream logged one by one; the rest are counted.
const MAX_LOGGED_UNEXPECTED: u64 = 5;

/// Why the supervision loop woke up.
enum Event {
    MainExited { code: i32, oom_killed: bool },
    StreamClosed,
}

/// Relays stdio and signals until the workload ends; returns the exit status.
fn supervise(dir: &ContainerDir, cfg: &MonitorConfig, booted: Booted) -> i32 {
    let Booted {
        mut vm,
        events,
        control,
        pty,
        ..
    } = booted;
    let link = vm.link();
    // From here the CLI's verbs find connections ready (crate::spares).
    if let Err(e) = crate::spares::serve(link.clone(), Some(control.into_stream())) {
        log::warn!("{e}");
    }
    let log = JsonLogWriter::open(&cfg.log_path)
        .map_err(|e| log::warn!("json-file log {}: {e}", cfg.log_path.display()))
        .ok()
        .map(|w| Arc::new(Mutex::new(w)));
    let (tx, rx) = mpsc::channel();
    let window = Arc::new(crate::relay::StdinWindow::default());

    // Output: frames from the guest to our fds (or the pty) and the log.
    let (out_fd, err_fd): (OwnedFd, OwnedFd) = match &pty {
        Some(p) => (
            p.slave.try_clone().expect("dup pty"),
            p.slave.try_clone().expect("dup pty"),
        ),
        None => (dup_fd(1), dup_fd(2)),
    };
    {
        let mut events = events.try_clone().expect("dup events stream");
        let log = log.clone();
        let tx = tx.clone();
        let window = window.clone();
        std::thread::spawn(move || {
            let mut out = File::from(out_fd);
            let mut err = File::from(err_fd);
            let mut unexpected = 0u64;
            loop {
                match proto::read_frame(&mut events) {
                    Ok(Frame::Stdout(d)) | Ok(Frame::Stderr(d)) if d.is_empty() => {}
                    Ok(Frame::Stdout(d)) => {
                        let _ = out.write_all(&d);
                        if let Some(l) = &log {
                            let _ = l.lock().map(|mut l| l.write(Stream::Stdout, &d));
                        }
                    }
                    Ok(Frame::Stderr(d)) => {
                        let _ = err.write_all(&d);
                        if let Some(l) = &log {
                            let _ = l.lock().map(|mut l| l.write(Stream::Stderr, &d));
                        }
                    }
                    Ok(Frame::Message(Message::StdinAck { bytes })) => {
                        window.release(bytes as usize)
                    }
                    Ok(Frame::Message(Message::MainExited { code, oom_killed })) => {
                        let event = match crate::container::reported_exit_code(code) {
                            Some(code) => Event::MainExited { code, oom_killed },
                            None => {
                                log::warn!("the guest reported exit code {code}: ignored");
                                Event::StreamClosed
                            }
                        };
                        let _ = tx.send(event);
                        break;
                    }
                    Ok(other) => {
                        // Logged a few times, then counted: the log stays small
                        // whatever the guest sends.
                        unexpected += 1;
                        if unexpected <= MAX_LOGGED_UNEXPECTED {
                            log::warn!(
                                "unexpected frame on the events stream: {}",
                                crate::guest::brief(&other)
                            );
                        }
                    }
                    Err(e) => {
                        log::info!("events stream ended: {e}");
                        let _ = tx.send(Event::StreamClosed);
                        break;
                    }
                }
            }
            if unexpected > MAX_LOGGED_UNEXPECTED {
                log::warn!("{unexpected} unexpected frames on the events stream in all");
            }
        });
    }

    // Input: our stdin (or the pty) to the main's stdin.
    let input = match &pty {
        Some(p) => p.slave.try_clone().expect("dup pty"),
        None => dup_fd(0),
    };
    let writer = Arc::new(Mutex::new(events.try_clone().expect("dup events stream")));
    crate::relay::spawn_input_pump(input, writer, window);

    forward_signals(
        link.clone(),
        pty.as_ref().map(|p| p.slave.try_clone().expect("dup pty")),
    );

    // Wait for the workload's end or the VM's death.
    let mut reported = false;
    let code = loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Event::MainExited { code, oom_killed }) => {
                if oom_killed {
                    // Recorded before the exit code: `stopped` is seen with it.
                    let _ = write_atomic(&dir.oom_file(), b"1");
                }
                reported = true;
                break Some(code);
            }
            Ok(Event::StreamClosed) => break None,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break None,
        }
        match vm.try_wait() {
            Ok(Some(exit)) => {
                log::warn!("VM stopped without reporting an exit code: {exit:?}");
                // The events reader may still hold the last frames; give it a moment.
                break match rx.recv_timeout(Duration::from_millis(500)) {
                    Ok(Event::MainExited { code, .. }) => Some(code),
                    _ => None,
                };
            }
            Ok(None) => {}
            Err(e) => log::warn!("checking the VM: {e}"),
        }
    };
    let code = code
        .or_else(|| dir.recorded_exit_code())
        .or_else(|| read_guest_exit_code(&cfg.rootfs))
        .unwrap_or(LOST_EXIT_CODE);
    if dir.recorded_exit_code().is_none() {
        let _ = write_atomic(&dir.exit_code_file(), code.to_string().as_bytes());
    }
    // The code is recorded: clients see `stopped` now; tear the VM down. A guest
    // that reported has nothing left to write back (its processes have ended and
    // its shares are write-through: docs/guest-init.md), so it is stopped at
    // once; otherwise it gets time to power off.
    let grace = if reported {
        Duration::ZERO
    } else {
        POWEROFF_GRACE
    };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(vm.try_wait(), Ok(Some(_)) | Err(_)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    vm.kill();
    if let Some(l) = &log {
        let _ = l.lock().map(|mut l| l.flush_partial());
    }
    code & 0xff
}

fn dup_fd(fd: i32) -> OwnedFd {
    // SAFETY: fds 0/1/2 are open for the life of the process; we duplicate, not take.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    borrowed.try_clone_to_owned().unwrap_or_else(|_| {
        File::options()
            .read(true)
            .write(true)
            .open("/dev/null")
            .expect("/dev/null")
            .into()
    })
}

/// Signals delivered to the container pid go to the workload, as with runc's
/// init (the exec relays' policy: [`crate::relay::forward_signals`]).
fn forward_signals(link: GuestLink, pty: Option<OwnedFd>) {
    // One control connection, reused; reconnected once if it broke.
    let mut control: Option<GuestClient> = None;
    crate::relay::forward_signals(pty, move |forward| {
        for _ in 0..2 {
            if control.is_none() {
                control = GuestClient::dial(&link, crate::guest::CONTROL_TIMEOUT).ok();
            }
            let Some(c) = control.as_mut() else { return };
            let sent = match forward {
                Forward::Resize { rows, cols } => c.resize(rows, cols),
                Forward::Signal(sig) => c.signal(SignalTarget::Main, sig),
            };
            match sent {
                // A refusal (no main yet) leaves the connection usable.
                Ok(()) | Err(Error::GuestRefused { .. }) => return,
                Err(_) => control = None,
            }
        }
    });
}

/// Path of the json-file log for a container (annotation override, else the state dir).
pub fn log_path(dir: &ContainerDir, spec: &Spec) -> PathBuf {
    spec.annotations()
        .as_ref()
        .and_then(|a| a.get(crate::spec::ANNOTATION_LOG_PATH))
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.path.join("container.log"))
}

/// Reads the monitor's report from the sync pipe (EOF = the monitor died).
pub fn read_report(pipe: &mut File, monitor_log: &Path) -> Result<SyncReport> {
    let mut buf = Vec::new();
    pipe.take(1024 * 1024)
        .read_to_end(&mut buf)
        .ctx(|| "reading the monitor's report".into())?;
    match serde_json::from_slice::<SyncReport>(
        buf.split(|&b| b == b'\n').next().unwrap_or_default(),
    ) {
        Ok(r) => Ok(r),
        Err(_) => {
            let log = std::fs::read_to_string(monitor_log).unwrap_or_default();
            let tail: String = log
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("; ");
            Err(Error::BootFailed {
                reason: format!("the VM monitor exited before the guest was ready: {tail}"),
                console_tail: String::new(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with_hooks(hooks: serde_json::Value) -> Spec {
        let mut v = serde_json::to_value(Spec::default()).unwrap();
        v["hooks"] = hooks;
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_main_is_prepared_unless_create_time_hooks_follow_setup() {
        assert!(main_can_be_prepared(&Spec::default()));
        let hook = serde_json::json!([{ "path": "/bin/true" }]);
        // Hooks that run after the main is released do not matter.
        for later in ["startContainer", "poststart", "poststop"] {
            assert!(main_can_be_prepared(&spec_with_hooks(
                serde_json::json!({ later: hook })
            )));
        }
        for earlier in ["prestart", "createRuntime", "createContainer"] {
            assert!(!main_can_be_prepared(&spec_with_hooks(
                serde_json::json!({ earlier: hook })
            )));
        }
        assert!(main_can_be_prepared(&spec_with_hooks(
            serde_json::json!({ "createRuntime": [] })
        )));
    }
}
