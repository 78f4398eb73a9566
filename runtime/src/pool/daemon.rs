//! `krun-oci pool serve`: keeps `min_idle` (up to `max_idle` while creates
//! miss) idle VMs of one shape for one `--root`. One thread, one loop: answer
//! requests, collect members' reports, retire old or sick VMs, refill one boot
//! at a time, back off after failed boots. Each VM is its own member process
//! holding the read end of a lifeline pipe: when the daemon dies, however it
//! dies, idle members see the pipe close and end their VMs; a claimed member no
//! longer looks at it.

use std::fs::{self, File};
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::member::{socket_of, MemberReply, MemberReport, MemberRequest, LIFELINE_FD_ENV};
use super::{wire, MemberStatus, PoolPaths, PoolSettings, PoolStatus, Reply, Request, Shape};
use crate::error::{Error, IoContext, Result};

/// Longest wait between boots after repeated failures.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A VM handed out but never claimed (its monitor died first) is retired after this.
const UNCLAIMED_LIMIT: Duration = Duration::from_secs(30);
/// A boot that has not reported by then is abandoned.
const BOOT_LIMIT: Duration = Duration::from_secs(150);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Booting,
    Idle,
    /// Handed to a monitor at this instant.
    HandedOut(Instant),
    Retiring,
}

struct Member {
    name: String,
    child: Child,
    started: Instant,
    ready_at: Option<Instant>,
    phase: Phase,
    /// The report pipe while booting.
    sync: Option<File>,
    report: Vec<u8>,
    /// Held for the member's life; its closing is the daemon's death.
    _lifeline: OwnedFd,
    last_health: Instant,
}

impl Member {
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn retire(&mut self) {
        if self.phase != Phase::Retiring {
            self.phase = Phase::Retiring;
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid()),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
}

struct Daemon {
    root: PathBuf,
    paths: PoolPaths,
    settings: PoolSettings,
    shape: Shape,
    exe: PathBuf,
    members: Vec<Member>,
    next_name: u64,
    hits: u64,
    misses: u64,
    boot_failures: u64,
    failures_in_a_row: u32,
    next_boot: Instant,
    /// Until then, creates missed: keep `max_idle`.
    demand_until: Instant,
}

/// Serves `root`'s pool until SIGTERM or SIGINT.
pub fn serve(root: &Path, settings: PoolSettings, exe: &Path) -> Result<()> {
    settings.validate()?;
    let paths = PoolPaths::for_root(root);
    fs::create_dir_all(&paths.dir).ctx(|| format!("creating {}", paths.dir.display()))?;
    if let Some(run) = paths.socket.parent() {
        fs::create_dir_all(run).ctx(|| format!("creating {}", run.display()))?;
    }
    let lock = File::create(&paths.lock).ctx(|| format!("creating {}", paths.lock.display()))?;
    nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| Error::PoolAlreadyServing {
            root: root.to_owned(),
        })
        .map(|lock| {
            // Held until we exit.
            std::mem::forget(lock);
        })?;
    remove_stale_members(&paths);
    let shape = super::shape_for(settings.vcpus, settings.ram_mib)?;
    let listener = wire::listen(&paths.socket)?;
    nix::fcntl::fcntl(
        &listener,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [libc::SIGTERM, libc::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).ctx(|| "signal handler".into())?;
    }
    log::info!(
        "pool: serving {} at {} ({} vCPU, {} MiB, {}..{} idle)",
        root.display(),
        paths.socket.display(),
        shape.vcpus,
        shape.ram_mib,
        settings.min_idle,
        settings.max_idle
    );
    let now = Instant::now();
    let mut d = Daemon {
        root: root.to_owned(),
        paths,
        settings,
        shape,
        exe: exe.to_owned(),
        members: Vec::new(),
        next_name: 0,
        hits: 0,
        misses: 0,
        boot_failures: 0,
        failures_in_a_row: 0,
        next_boot: now,
        demand_until: now,
    };
    while !stop.load(Ordering::Relaxed) {
        let _ = wire::readable(&listener, Some(Duration::from_millis(100)));
        while let Ok(Some(conn)) = wire::accept(&listener, Duration::from_secs(2)) {
            d.answer(&conn);
        }
        d.collect();
        d.check_health();
        d.refill();
    }
    d.shutdown();
    let _ = fs::remove_file(&d.paths.socket);
    if let Some(dir) = d.paths.socket.parent() {
        let _ = fs::remove_dir(dir);
    }
    Ok(())
}

/// Member directories left by members that were killed (no live member holds
/// their run dir's socket): removed before serving.
fn remove_stale_members(paths: &PoolPaths) {
    let Ok(rd) = fs::read_dir(&paths.dir) else {
        return;
    };
    for e in rd.flatten() {
        if !e.path().is_dir() {
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        let dir = paths.member(&name);
        let pid: Option<i32> = fs::read_to_string(dir.path.join("member.pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok());
        if pid.is_some_and(|p| crate::supervise::start_time(p).is_some()) {
            continue;
        }
        crate::mounts::remove_dir_on_one_mount(&dir.run_dir());
        crate::mounts::remove_dir_on_one_mount(&dir.path);
    }
}

impl Daemon {
    fn answer(&mut self, conn: &OwnedFd) {
        let request = match wire::recv::<Request>(conn) {
            Ok((r, _)) => r,
            Err(e) => {
                log::warn!("pool: {e}");
                return;
            }
        };
        let reply = match request {
            Request::Acquire { shape } => self.acquire(&shape),
            Request::Status => Reply::Status(Box::new(self.status())),
        };
        if let Err(e) = wire::send(conn, &reply, &[]) {
            log::warn!("pool: answering: {e}");
        }
    }

    fn acquire(&mut self, shape: &Shape) -> Reply {
        if *shape != self.shape {
            self.misses += 1;
            return Reply::Miss {
                reason: "the pool serves another VM shape".into(),
            };
        }
        // The oldest idle VM first: it is the nearest to its TTL.
        let found = self
            .members
            .iter_mut()
            .filter(|m| m.phase == Phase::Idle)
            .min_by_key(|m| m.ready_at);
        match found {
            Some(m) => {
                m.phase = Phase::HandedOut(Instant::now());
                self.hits += 1;
                log::info!("pool: hit, {} handed out", m.name);
                Reply::Hit {
                    member: m.name.clone(),
                    socket: socket_of(&self.root, &m.name),
                }
            }
            None => {
                self.misses += 1;
                self.demand_until = Instant::now() + Duration::from_secs(self.settings.ttl_secs);
                Reply::Miss {
                    reason: "no idle VM".into(),
                }
            }
        }
    }

    fn status(&self) -> PoolStatus {
        let count =
            |f: &dyn Fn(&Phase) -> bool| self.members.iter().filter(|m| f(&m.phase)).count() as u32;
        PoolStatus {
            pid: std::process::id() as i32,
            shape: Some(self.shape.clone()),
            settings: Some(self.settings.clone()),
            idle: count(&|p| *p == Phase::Idle),
            booting: count(&|p| *p == Phase::Booting),
            claimed: count(&|p| matches!(p, Phase::HandedOut(_))),
            hits: self.hits,
            misses: self.misses,
            boot_failures: self.boot_failures,
            backoff_secs: self
                .next_boot
                .saturating_duration_since(Instant::now())
                .as_secs(),
            members: self
                .members
                .iter()
                .map(|m| MemberStatus {
                    name: m.name.clone(),
                    pid: m.pid(),
                    state: match m.phase {
                        Phase::Booting => "booting",
                        Phase::Idle => "idle",
                        Phase::HandedOut(_) => "claimed",
                        Phase::Retiring => "retiring",
                    }
                    .into(),
                    age_secs: m.started.elapsed().as_secs(),
                })
                .collect(),
        }
    }

    /// Reports of booting members, and members that exited.
    fn collect(&mut self) {
        let ttl = Duration::from_secs(self.settings.ttl_secs);
        let mut failed = 0;
        let mut booted = 0;
        for m in &mut self.members {
            if m.phase == Phase::Booting {
                match read_report(m) {
                    Some(MemberReport::Ready { boot_ms, .. }) => {
                        log::info!("pool: {} idle after {boot_ms} ms", m.name);
                        m.phase = Phase::Idle;
                        m.ready_at = Some(Instant::now());
                        m.last_health = Instant::now();
                        m.sync = None;
                        booted += 1;
                    }
                    Some(MemberReport::Failed { error }) => {
                        log::warn!("pool: {} failed to boot: {error}", m.name);
                        m.sync = None;
                        m.retire();
                        failed += 1;
                    }
                    None if m.started.elapsed() > BOOT_LIMIT => {
                        log::warn!("pool: {} did not boot within {BOOT_LIMIT:?}", m.name);
                        m.retire();
                        failed += 1;
                    }
                    None => {}
                }
            }
            if m.phase == Phase::Idle && m.ready_at.is_some_and(|t| t.elapsed() > ttl) {
                log::info!("pool: {} reached its TTL", m.name);
                m.retire();
            }
            if let Phase::HandedOut(at) = m.phase {
                if at.elapsed() > UNCLAIMED_LIMIT && !claimed_on_disk(&self.paths, &m.name) {
                    log::warn!("pool: {} was handed out but never claimed", m.name);
                    m.retire();
                }
            }
        }
        let mut exited_booting = 0;
        self.members.retain_mut(|m| match m.child.try_wait() {
            Ok(Some(st)) => {
                if m.phase == Phase::Booting {
                    log::warn!("pool: {} exited while booting: {st}", m.name);
                    exited_booting += 1;
                }
                false
            }
            _ => true,
        });
        failed += exited_booting;
        if booted > 0 {
            self.failures_in_a_row = 0;
        }
        if failed > 0 {
            self.boot_failures += failed;
            self.failures_in_a_row += failed as u32;
            let backoff = Duration::from_secs(1 << self.failures_in_a_row.min(6)).min(MAX_BACKOFF);
            self.next_boot = Instant::now() + backoff;
            log::warn!(
                "pool: {} boot failures in a row, next boot in {backoff:?}",
                self.failures_in_a_row
            );
        }
    }

    /// Asks each idle VM's guest whether it answers, every `health_secs`.
    fn check_health(&mut self) {
        let every = Duration::from_secs(self.settings.health_secs.max(1));
        for m in &mut self.members {
            if m.phase != Phase::Idle || m.last_health.elapsed() < every {
                continue;
            }
            m.last_health = Instant::now();
            let answer = wire::connect(&socket_of(&self.root, &m.name), Duration::from_secs(5))
                .and_then(|s| {
                    wire::send(&s, &MemberRequest::Health, &[])?;
                    Ok(wire::recv::<MemberReply>(&s)?.0)
                });
            match answer {
                Ok(MemberReply::Health { healthy: true, .. }) => {}
                Ok(MemberReply::Health { why, .. }) => {
                    log::warn!("pool: {} is unhealthy: {why}", m.name);
                    m.retire();
                }
                Ok(other) => {
                    log::warn!("pool: {}: unexpected health answer {other:?}", m.name);
                    m.retire();
                }
                Err(e) => {
                    log::warn!("pool: {}: health check failed: {e}", m.name);
                    m.retire();
                }
            }
        }
    }

    /// One boot at a time, up to the target, within the memory budget.
    fn refill(&mut self) {
        let now = Instant::now();
        if now < self.next_boot || self.members.iter().any(|m| m.phase == Phase::Booting) {
            return;
        }
        let target = if now < self.demand_until {
            self.settings.max_idle
        } else {
            self.settings.min_idle
        };
        let idle = self
            .members
            .iter()
            .filter(|m| m.phase == Phase::Idle)
            .count() as u32;
        if idle >= target {
            return;
        }
        let pooled = self
            .members
            .iter()
            .filter(|m| matches!(m.phase, Phase::Idle | Phase::Booting))
            .count() as u64;
        let budget = self.settings.memory_budget_mib;
        if budget > 0 && (pooled + 1) * u64::from(self.shape.ram_mib) > budget {
            return;
        }
        match self.spawn_member() {
            Ok(m) => self.members.push(m),
            Err(e) => {
                log::warn!("pool: starting a member: {e}");
                self.boot_failures += 1;
                self.failures_in_a_row += 1;
                self.next_boot =
                    now + MAX_BACKOFF.min(Duration::from_secs(1 << self.failures_in_a_row.min(6)));
            }
        }
    }

    fn spawn_member(&mut self) -> Result<Member> {
        self.next_name += 1;
        let name = format!("vm-{}-{}", std::process::id(), self.next_name);
        let dir = self.paths.member(&name);
        fs::create_dir_all(&dir.path).ctx(|| format!("creating {}", dir.path.display()))?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg("--root")
            .arg(&self.root)
            .arg("--log")
            .arg(dir.path.join("member.log"))
            .arg("pool")
            .arg("member")
            .arg("--vcpus")
            .arg(self.shape.vcpus.to_string())
            .arg("--ram-mib")
            .arg(self.shape.ram_mib.to_string())
            .arg("--rootfs-cache")
            .arg(self.shape.rootfs_cache.name())
            .arg(&name)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let (sync_r, sync_w) = crate::supervise::detached_with_sync_pipe(&mut cmd)?;
        let (life_r, life_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let life_fd = life_r.as_raw_fd();
        cmd.env(LIFELINE_FD_ENV, life_fd.to_string());
        // SAFETY: only fcntl (async-signal-safe) between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                let flags = libc::fcntl(life_fd, libc::F_GETFD);
                libc::fcntl(life_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                Ok(())
            });
        }
        let child = cmd.spawn().ctx(|| format!("starting pool member {name}"))?;
        drop(sync_w);
        drop(life_r);
        let _ = fs::write(dir.path.join("member.pid"), child.id().to_string());
        let sync = File::from(sync_r);
        nix::fcntl::fcntl(
            &sync,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
        log::info!("pool: booting {name} (pid {})", child.id());
        Ok(Member {
            name,
            child,
            started: Instant::now(),
            ready_at: None,
            phase: Phase::Booting,
            sync: Some(sync),
            report: Vec::new(),
            _lifeline: life_w,
            last_health: Instant::now(),
        })
    }

    /// Ends the idle and booting VMs (claimed ones are their containers').
    fn shutdown(&mut self) {
        for m in &mut self.members {
            if !matches!(m.phase, Phase::HandedOut(_)) {
                m.retire();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for m in &mut self.members {
            if matches!(m.phase, Phase::HandedOut(_)) {
                continue;
            }
            while matches!(m.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = m.child.kill();
            let _ = m.child.wait();
        }
        log::info!("pool: stopped");
    }
}

/// A booting member's report, once a whole line has arrived.
fn read_report(m: &mut Member) -> Option<MemberReport> {
    let sync = m.sync.as_mut()?;
    let mut buf = [0u8; 4096];
    loop {
        match sync.read(&mut buf) {
            Ok(0) => {
                // The member closed its report pipe without a report: it died.
                m.sync = None;
                return serde_json::from_slice(&m.report)
                    .ok()
                    .or(Some(MemberReport::Failed {
                        error: "the member exited before reporting".into(),
                    }));
            }
            Ok(n) if m.report.len() + n <= 64 * 1024 => m.report.extend_from_slice(&buf[..n]),
            Ok(_) => {
                return Some(MemberReport::Failed {
                    error: "an oversized report".into(),
                })
            }
            Err(_) => break,
        }
    }
    let line = m.report.split(|&b| b == b'\n').next()?;
    if !m.report.contains(&b'\n') {
        return None;
    }
    Some(
        serde_json::from_slice(line).unwrap_or(MemberReport::Failed {
            error: "an unreadable report".into(),
        }),
    )
}

fn claimed_on_disk(paths: &PoolPaths, name: &str) -> bool {
    paths.member(name).path.join("claimed").exists()
}
