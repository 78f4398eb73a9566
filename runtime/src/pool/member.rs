//! A pool member: `krun-oci pool member NAME`, started by the daemon, one per
//! pooled VM. It boots the VM with a deferred root and a spare NIC, in a
//! network namespace and a mount namespace of its own (where the helpers run,
//! so what a claim attaches is seen by them and by nobody on the host, and
//! vanishes with them), tells the daemon it is ready, then waits:
//! - idle: health checks from the daemon; the daemon's lifeline closing, or
//!   SIGTERM, ends it and its VM;
//! - claimed (once, by one container's monitor): it attaches the root, binds and
//!   NIC it is handed, gives the monitor the guest link and events stream, and
//!   from then on ignores the daemon and ends the VM when the monitor's lifeline
//!   closes (the monitor exited, or was killed) or the VM stops by itself.

use std::fs::{self, File};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use krun_oci_protocol as proto;
use serde::{Deserialize, Serialize};

use super::{wire, PoolPaths, Shape};
use crate::error::{Error, IoContext, Result};
use crate::guest::GuestLink;
use crate::mounts::{DetachedTree, MountsShare};
use crate::state::{write_atomic, ContainerDir};
use crate::vmm::{RootfsCache, Vm, VmSpec, VmmChoice};

/// Env var naming the fd of the read end of the daemon's lifeline pipe.
pub const LIFELINE_FD_ENV: &str = "KRUN_OCI_POOL_LIFELINE_FD";
/// The entry of the rootfs share the container's root is attached at.
pub const ROOT_ENTRY: &str = "root";
/// How long one request to the member may take.
pub const MEMBER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a health check waits for the guest.
const HEALTH_LIMIT: Duration = Duration::from_secs(3);
/// How long an idle or claimed member waits on its sockets between checks.
const POLL_EVERY: Duration = Duration::from_millis(200);

/// A member's report to the daemon on its sync pipe.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberReport {
    Ready { shape: Shape, boot_ms: u64 },
    Failed { error: String },
}

/// Requests on the member's socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberRequest {
    Health,
    /// Fds, in order: the monitor's lifeline (read end), the root's detached
    /// tree, one detached tree per bind, then the network namespace if `netns`.
    Claim {
        binds: Vec<BindEntry>,
        netns: bool,
    },
}

/// A bind's entry in the mounts share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindEntry {
    pub entry: String,
    pub is_dir: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberReply {
    Health {
        healthy: bool,
        claimed: bool,
        why: String,
    },
    /// Fds: the events stream. With a network namespace, `TapMoved` (or
    /// `Refused`) follows once the spare tap is there.
    Claimed(Box<Claimed>),
    TapMoved,
    Refused {
        reason: String,
    },
}

/// What the monitor needs to run the claimed VM as its own.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claimed {
    pub member_pid: i32,
    pub helper_pids: Vec<i32>,
    pub link: GuestLink,
    pub console: PathBuf,
    pub timings: Vec<proto::BootTiming>,
    /// The spare NIC's tap, moving into the monitor's network namespace.
    pub spare: Option<crate::network::Claim>,
    /// What to remove if the member is killed before it cleans up itself.
    pub dirs: Vec<PathBuf>,
}

struct Member {
    root: PathBuf,
    dir: ContainerDir,
    run_dir: PathBuf,
    share: PathBuf,
    mounts: PathBuf,
    network_record: PathBuf,
}

impl Member {
    fn new(root: &Path, name: &str) -> Result<Member> {
        let dir = PoolPaths::for_root(root).member(name);
        fs::create_dir_all(&dir.path).ctx(|| format!("creating {}", dir.path.display()))?;
        let run_dir = dir.create_run_dir()?;
        let share = run_dir.join("rootfs-share");
        let mounts = run_dir.join("mounts");
        fs::create_dir_all(share.join(ROOT_ENTRY))
            .ctx(|| format!("creating {}", share.display()))?;
        fs::create_dir_all(&mounts).ctx(|| format!("creating {}", mounts.display()))?;
        Ok(Member {
            root: root.to_owned(),
            network_record: dir.path.join(crate::network::NETWORK_RECORD),
            dir,
            run_dir,
            share,
            mounts,
        })
    }

    fn socket(&self) -> PathBuf {
        self.run_dir.join("member.sock")
    }

    /// Everything on disk. The container's root and binds are detached first
    /// (they are mounts of this namespace only), and the removal never enters
    /// a mount, whatever is still attached.
    fn remove(&self) {
        let mut attached = vec![self.share.join(ROOT_ENTRY)];
        if let Ok(rd) = fs::read_dir(&self.mounts) {
            attached.extend(rd.flatten().map(|e| e.path()));
        }
        for m in &attached {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
        crate::mounts::remove_dir_on_one_mount(&self.run_dir);
        crate::mounts::remove_dir_on_one_mount(&self.dir.path);
    }
}

/// A daemon that was killed could not remove its socket: the first idle
/// member to see it gone does (only if nobody answers there: a new daemon's
/// socket stays).
fn remove_dead_daemon_socket(root: &Path) {
    let paths = PoolPaths::for_root(root);
    if wire::connect(&paths.socket, Duration::from_secs(1)).is_err() {
        let _ = fs::remove_file(&paths.socket);
        if let Some(dir) = paths.socket.parent() {
            let _ = fs::remove_dir(dir);
        }
    }
}

/// The member's socket for `name` under `root` (what the daemon hands out).
pub fn socket_of(root: &Path, name: &str) -> PathBuf {
    PoolPaths::for_root(root)
        .member(name)
        .run_dir()
        .join("member.sock")
}

/// Entry point of `krun-oci pool member NAME`. Returns the exit status.
pub fn run(
    root: &Path,
    name: &str,
    vcpus: u32,
    ram_mib: u32,
    rootfs_cache: RootfsCache,
) -> Result<i32> {
    let sync = crate::supervise::take_sync_pipe();
    let lifeline = crate::supervise::take_inherited_fd(LIFELINE_FD_ENV);
    let term = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(libc::SIGTERM, term.clone()).ctx(|| "SIGTERM handler".into())?;
    let member = Member::new(root, name)?;
    let booted = isolate().and_then(|()| boot(&member, vcpus, ram_mib, rootfs_cache));
    let (mut vm, events, shape, boot_ms, timings) = match booted {
        Ok(b) => b,
        Err(e) => {
            log::error!("pool member {name}: boot failed: {e}");
            let _ = crate::network::release(&member.network_record);
            member.remove();
            report(
                sync,
                &MemberReport::Failed {
                    error: e.to_string(),
                },
            );
            return Ok(1);
        }
    };
    let code = match serve(
        &member,
        vm.as_mut(),
        events,
        timings,
        lifeline,
        &term,
        sync,
        shape,
        boot_ms,
    ) {
        Ok(()) => 0,
        Err(e) => {
            log::warn!("pool member {name}: {e}");
            1
        }
    };
    vm.kill();
    let _ = crate::network::release(&member.network_record);
    member.remove();
    Ok(code)
}

fn report(sync: Option<File>, r: &MemberReport) {
    if let Some(mut f) = sync {
        let mut line = serde_json::to_vec(r).unwrap_or_default();
        line.push(b'\n');
        let _ = std::io::Write::write_all(&mut f, &line);
    }
}

/// Own network namespace (the spare tap waits there) and own mount namespace
/// (a slave of the host's: host mounts still arrive, ours never leave). Before
/// any thread starts: unshare applies to the calling thread only.
fn isolate() -> Result<()> {
    use nix::sched::CloneFlags;
    nix::sched::unshare(CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWNS)
        .map_err(|e| Error::Pool(format!("unsharing namespaces: {e}")))?;
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(|e| Error::Pool(format!("making / a slave mount: {e}")))?;
    // A booting or idle pooled VM runs only when nothing else wants the CPU
    // (SCHED_IDLE): a refill never slows the containers that run. Threads,
    // and so every helper, inherit it; a claim lifts it.
    set_policy(0, libc::SCHED_IDLE);
    Ok(())
}

type Booted = (Box<dyn Vm>, UnixStream, Shape, u64, Vec<proto::BootTiming>);

fn boot(member: &Member, vcpus: u32, ram_mib: u32, rootfs_cache: RootfsCache) -> Result<Booted> {
    let image = crate::image::ensure(&crate::boot::image_options(VmmChoice::Qemu)?)?;
    let selection = crate::vmm::detect::select(VmmChoice::Qemu, Some(&image))?;
    let network = crate::network::spare_nic(&member.network_record, false)?;
    let spec = VmSpec {
        id: member.dir.id.clone(),
        run_dir: member.run_dir.clone(),
        rootfs: member.share.clone(),
        vcpus,
        ram_mib,
        mounts: Some(MountsShare {
            staging: member.mounts.clone(),
            binds: Vec::new(),
        }),
        nics: network.nics,
        deferred_root: true,
        rootfs_cache,
    };
    let link = selection.vmm.link(&spec);
    let listener = crate::boot::bind_events(&link)?;
    let t0 = std::time::Instant::now();
    let mut vm = selection.vmm.launch(&spec)?;
    match crate::boot::await_ready(&listener, vm.as_mut()) {
        Ok((events, timings)) => {
            let _ = fs::remove_file(link.host_port_path(proto::HOST_EVENTS_PORT));
            // One control connection now, so the claim's is not the first
            // (under TCG every first path is slow); the guest warms the rest.
            let _ = crate::guest::GuestClient::dial(&link, Duration::from_secs(10));
            let shape = Shape {
                vcpus,
                ram_mib,
                kernel: image.kernel.clone(),
                initrd: image.initrd.clone(),
                rootfs_cache,
            };
            Ok((vm, events, shape, t0.elapsed().as_millis() as u64, timings))
        }
        Err(e) => {
            let tail = vm.console_tail(1024);
            vm.kill();
            Err(Error::Vm(format!("{e}; console: {}", tail.trim())))
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn serve(
    member: &Member,
    vm: &mut dyn Vm,
    events: UnixStream,
    timings: Vec<proto::BootTiming>,
    daemon: Option<OwnedFd>,
    term: &AtomicBool,
    sync: Option<File>,
    shape: Shape,
    boot_ms: u64,
) -> Result<()> {
    let listener = wire::listen(&member.socket())?;
    nix::fcntl::fcntl(
        &listener,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )?;
    report(sync, &MemberReport::Ready { shape, boot_ms });
    log::info!(
        "pool member {}: idle ({boot_ms} ms to ready)",
        member.dir.id
    );
    // Idle: until claimed, retired, orphaned, or the VM stops.
    let (lifeline, claimed) = loop {
        if term.load(Ordering::Relaxed) {
            return Ok(());
        }
        if daemon
            .as_ref()
            .is_some_and(|d| wire::readable(d, Some(Duration::ZERO)).unwrap_or(false))
        {
            remove_dead_daemon_socket(&member.root);
            return Err(Error::Pool("the pool daemon is gone".into()));
        }
        if vm.try_wait().ctx(|| "checking the VM".into())?.is_some() {
            return Err(Error::Pool("the idle VM stopped".into()));
        }
        if !wire::readable(&listener, Some(POLL_EVERY)).unwrap_or(false) {
            continue;
        }
        let Some(conn) = wire::accept(&listener, MEMBER_TIMEOUT)? else {
            continue;
        };
        let (request, fds) = match wire::recv::<MemberRequest>(&conn) {
            Ok(r) => r,
            Err(e) => {
                log::warn!("pool member: {e}");
                continue;
            }
        };
        match request {
            MemberRequest::Health => {
                let reply = match crate::guest::GuestClient::dial(&vm.link(), HEALTH_LIMIT) {
                    Ok(_) => MemberReply::Health {
                        healthy: true,
                        claimed: false,
                        why: String::new(),
                    },
                    Err(e) => MemberReply::Health {
                        healthy: false,
                        claimed: false,
                        why: e.to_string(),
                    },
                };
                let _ = wire::send(&conn, &reply, &[]);
            }
            MemberRequest::Claim { binds, netns } => {
                // Whatever happens now, this VM is never offered again.
                match claim(member, vm, &binds, netns, fds, &timings) {
                    Ok((lifeline, claimed, netns)) => {
                        wire::send(
                            &conn,
                            &MemberReply::Claimed(Box::new(claimed.clone())),
                            &[events.as_fd()],
                        )?;
                        if let (Some(ns), Some(spare)) = (netns, &claimed.spare) {
                            let moved =
                                crate::network::move_spare_tap(&member.network_record, spare, &ns);
                            let reply = match moved {
                                Ok(()) => MemberReply::TapMoved,
                                Err(e) => MemberReply::Refused {
                                    reason: e.to_string(),
                                },
                            };
                            // Unheard, the monitor ends the VM (its lifeline).
                            let _ = wire::send(&conn, &reply, &[]);
                        }
                        break (lifeline, claimed);
                    }
                    Err(e) => {
                        let _ = wire::send(
                            &conn,
                            &MemberReply::Refused {
                                reason: e.to_string(),
                            },
                            &[],
                        );
                        return Err(e);
                    }
                }
            }
        }
    };
    drop(events);
    drop(daemon);
    drop(listener);
    let _ = fs::remove_file(member.socket());
    log::info!(
        "pool member {}: claimed (pids {:?})",
        member.dir.id,
        claimed.helper_pids
    );
    // Claimed: the VM is the container's until its monitor lets go.
    loop {
        if wire::readable(&lifeline, Some(POLL_EVERY)).unwrap_or(false) {
            return Ok(());
        }
        if vm.try_wait().ctx(|| "checking the VM".into())?.is_some() {
            return Ok(());
        }
    }
}

/// Attaches what the monitor handed over; returns its lifeline, what it needs,
/// and the network namespace the spare tap goes to (moved once it has the rest).
fn claim(
    member: &Member,
    vm: &mut dyn Vm,
    binds: &[BindEntry],
    netns: bool,
    fds: Vec<OwnedFd>,
    timings: &[proto::BootTiming],
) -> Result<(OwnedFd, Claimed, Option<File>)> {
    // The container's VM runs at normal priority, and so does its claim.
    for pid in vm.pids().iter().copied().chain([std::process::id() as i32]) {
        for_each_thread(pid, |tid| set_policy(tid, libc::SCHED_OTHER));
    }
    let want = 2 + binds.len() + usize::from(netns);
    if fds.len() != want {
        return Err(Error::Pool(format!(
            "a claim with {} fds, {want} expected",
            fds.len()
        )));
    }
    let mut fds = fds.into_iter();
    let lifeline = fds.next().expect("counted");
    DetachedTree::from_fd(fds.next().expect("counted")).attach(&member.share.join(ROOT_ENTRY))?;
    for b in binds {
        if b.entry.is_empty() || b.entry.contains('/') || b.entry.starts_with('.') {
            return Err(Error::Pool(format!("bad bind entry {:?}", b.entry)));
        }
        let target = member.mounts.join(&b.entry);
        let made = if b.is_dir {
            fs::create_dir(&target)
        } else {
            File::create(&target).map(drop)
        };
        made.ctx(|| format!("creating {}", target.display()))?;
        DetachedTree::from_fd(fds.next().expect("counted")).attach(&target)?;
    }
    let (spare, netns) = if netns {
        let ns = File::from(fds.next().expect("counted"));
        (
            Some(crate::network::spare_tap(&member.network_record)?),
            Some(ns),
        )
    } else {
        (None, None)
    };
    let helper_pids = vm.pids();
    let dirs = vec![member.run_dir.clone(), member.dir.path.clone()];
    let _ = write_atomic(&member.dir.path.join("claimed"), b"1");
    Ok((
        lifeline,
        Claimed {
            member_pid: std::process::id() as i32,
            helper_pids,
            link: vm.link(),
            console: member.run_dir.join("console.log"),
            timings: timings.to_vec(),
            spare,
            dirs,
        },
        netns,
    ))
}

/// The scheduling policy of one thread (`tid` 0: the calling one).
fn set_policy(tid: i32, policy: libc::c_int) {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler with a valid sched_param.
    if unsafe { libc::sched_setscheduler(tid, policy, &param) } != 0 {
        log::debug!(
            "scheduling policy of {tid}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Calls `f` with each thread of `pid` (policies are per thread).
fn for_each_thread(pid: i32, f: impl Fn(i32)) {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for t in tasks.flatten() {
        if let Ok(tid) = t.file_name().to_string_lossy().parse::<i32>() {
            f(tid);
        }
    }
}
