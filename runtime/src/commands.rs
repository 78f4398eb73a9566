//! One short function per verb.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use krun_oci::cli::{
    CreateArgs, DeleteArgs, EventsArgs, ExecArgs, ExecRelayArgs, KillArgs, ListArgs, LogsArgs,
    OutputFormat, PoolCommand, PsArgs, RunArgs, SpecArgs, UpdateArgs,
};
use krun_oci::container::Container;
use krun_oci::exec;
use krun_oci::lifecycle::{self, CreateOptions};
use krun_oci::state::StateStore;
use krun_oci::vmm::VmmChoice;
use krun_oci::Error;

/// What every verb needs from the global flags.
pub struct Context {
    pub root: PathBuf,
    pub vmm: VmmChoice,
    pub systemd_cgroup: bool,
}

impl Context {
    fn store(&self) -> Result<StateStore> {
        Ok(StateStore::open(&self.root)?)
    }
}

/// `--preserve-fds` is accepted like runc's and ignored: fds cannot cross into the VM.
fn warn_preserve_fds(n: u32) {
    if n > 0 {
        log::warn!("--preserve-fds {n}: fds cannot cross the VM boundary; ignored");
    }
}

fn create_options(ctx: &Context, args: &CreateArgs) -> Result<CreateOptions> {
    warn_preserve_fds(args.preserve_fds);
    Ok(CreateOptions {
        bundle: args.bundle.clone(),
        pid_file: args.pid_file.clone(),
        console_socket: args.console_socket.clone(),
        vmm: ctx.vmm,
        exe: std::env::current_exe().context("locating the krun-oci binary")?,
        stdio: None,
        systemd_cgroup: ctx.systemd_cgroup,
    })
}

pub fn create(ctx: &Context, args: CreateArgs) -> Result<()> {
    lifecycle::create(&ctx.store()?, &args.id, &create_options(ctx, &args)?)?;
    Ok(())
}

pub fn start(ctx: &Context, id: &str) -> Result<()> {
    Ok(lifecycle::start(&ctx.store()?, id)?)
}

pub fn state(ctx: &Context, id: &str) -> Result<()> {
    let c = Container::load(&ctx.store()?, id)?;
    println!("{}", serde_json::to_string_pretty(&c.state_json())?);
    Ok(())
}

pub fn kill(ctx: &Context, args: KillArgs) -> Result<()> {
    let signal = krun_oci::signal::parse_signal(&args.signal)?;
    Ok(lifecycle::kill(&ctx.store()?, &args.id, signal, args.all)?)
}

pub fn pause(ctx: &Context, id: &str) -> Result<()> {
    Ok(lifecycle::pause(&ctx.store()?, id)?)
}

pub fn resume(ctx: &Context, id: &str) -> Result<()> {
    Ok(lifecycle::resume(&ctx.store()?, id)?)
}

pub fn delete(ctx: &Context, args: DeleteArgs) -> Result<()> {
    Ok(lifecycle::delete(&ctx.store()?, &args.id, args.force)?)
}

/// create + start, then (unless detached) wait and exit with the container's code.
pub fn run(ctx: &Context, args: RunArgs) -> Result<i32> {
    let store = ctx.store()?;
    let id = args.create.id.clone();
    let container = lifecycle::create(&store, &id, &create_options(ctx, &args.create)?)?;
    if let Err(e) = lifecycle::start(&store, &id) {
        let _ = lifecycle::delete(&store, &id, true);
        return Err(e.into());
    }
    if args.detach {
        return Ok(0);
    }
    // The monitor is our child: its exit status is the container's code.
    let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(container.record.pid), None)?;
    let code = match status {
        nix::sys::wait::WaitStatus::Exited(_, c) => c,
        nix::sys::wait::WaitStatus::Signaled(_, sig, _) => 128 + sig as i32,
        _ => krun_oci::container::LOST_EXIT_CODE,
    };
    if !args.keep {
        lifecycle::delete(&store, &id, true)?;
    }
    Ok(code)
}

/// runs a process in the container's VM; exits with its status (127/126 when the
/// command is missing / not executable, as podman expects).
pub fn exec(ctx: &Context, args: ExecArgs) -> Result<i32> {
    warn_preserve_fds(args.preserve_fds);
    let store = ctx.store()?;
    let c = Container::load(&store, &args.id)?;
    let base = lifecycle::load_snapshot(&c)?
        .process()
        .clone()
        .unwrap_or_default();
    let process = match &args.process {
        Some(f) => {
            let data = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
            exec::process_from_file(
                &base,
                serde_json::from_slice(&data)
                    .with_context(|| format!("parsing {}", f.display()))?,
            )
        }
        None => exec::process_from_overrides(
            &base,
            &exec::ExecOverrides {
                args: args.command.clone(),
                cwd: args.cwd.clone(),
                env: args.env.clone(),
                user: args.user.as_deref().map(exec::parse_user).transpose()?,
                additional_gids: args.additional_gids.clone(),
                tty: args.tty,
                no_new_privs: args.no_new_privs,
            },
        )?,
    };
    let tty = process.terminal().unwrap_or(false);
    match (tty, &args.console_socket, args.detach) {
        (false, Some(_), _) => {
            anyhow::bail!("cannot use console socket if runc will not detach or allocate tty")
        }
        (true, None, true) => {
            anyhow::bail!("cannot allocate tty if runc will detach without setting console socket")
        }
        _ => {}
    }
    let link = match exec::prepare(&c, &process) {
        Ok(l) => l,
        Err(e) => return exec_failure(e),
    };
    if args.detach {
        let pid = spawn_exec_relay(ctx, &c, &process, args.console_socket.as_deref())?;
        if let Some(p) = &args.pid_file {
            lifecycle::write_pid_file(p, pid)?;
        }
        return Ok(0);
    }
    // Without --detach the process to wait on is this one: it relays the session
    // and exits with the guest process's status.
    if let Some(p) = &args.pid_file {
        lifecycle::write_pid_file(p, std::process::id() as i32)?;
    }
    match run_session(&link, process, tty, args.console_socket.as_deref(), None) {
        Ok(code) => Ok(code),
        Err(e) => exec_failure(e),
    }
}

/// Prints a failed exec's error and picks the status podman maps it by.
fn exec_failure(e: Error) -> Result<i32> {
    let msg = e.to_string();
    let code =
        if msg.contains("executable file not found") || msg.contains("no such file or directory") {
            127
        } else if msg.contains("permission denied") {
            126
        } else {
            return Err(e.into());
        };
    log::error!("{msg}");
    eprintln!("krun-oci: {msg}");
    Ok(code)
}

/// Starts an exec session and relays it with our stdio (or a console-socket pty).
/// `started` is told the guest pid once the process runs.
fn run_session(
    link: &krun_oci::guest::GuestLink,
    process: krun_oci_protocol::Process,
    tty: bool,
    console_socket: Option<&std::path::Path>,
    started: Option<&mut dyn FnMut(std::result::Result<i32, String>)>,
) -> std::result::Result<i32, Error> {
    use std::os::fd::AsFd;
    let dup = |fd: i32| {
        // SAFETY: fds 0/1/2 stay open for the life of the process; we duplicate them.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
            .try_clone_to_owned()
            .map_err(|e| Error::Io {
                context: "dup".into(),
                source: e,
            })
    };
    if console_socket.is_some() {
        // A session of our own, so the pty becomes our controlling terminal and the
        // client's resizes arrive as SIGWINCH. Fails harmlessly where we already
        // lead a session (the detached relay) or a process group.
        let _ = nix::unistd::setsid();
    }
    let pty = console_socket
        .map(krun_oci::console::send_pty_to_console_socket)
        .transpose();
    let pty = match pty {
        Ok(p) => p,
        Err(e) => {
            if let Some(cb) = started {
                cb(Err(e.to_string()));
            }
            return Err(e);
        }
    };
    let stdin_is_tty = nix::unistd::isatty(std::io::stdin().as_fd()).unwrap_or(false);
    let (input, out, err, tty_fd) = match &pty {
        Some(p) => {
            let f = || {
                p.slave.try_clone().map_err(|e| Error::Io {
                    context: "dup pty".into(),
                    source: e,
                })
            };
            (f()?, f()?, f()?, Some(f()?))
        }
        None => (
            dup(0)?,
            dup(1)?,
            dup(2)?,
            if tty && stdin_is_tty {
                Some(dup(0)?)
            } else {
                None
            },
        ),
    };
    let size = tty_fd.as_ref().and_then(krun_oci::console::window_size);
    let session = match exec::ExecSession::start(link, process, tty, size) {
        Ok(s) => s,
        Err(e) => {
            if let Some(cb) = started {
                cb(Err(e.to_string()));
            }
            return Err(e);
        }
    };
    if let Some(cb) = started {
        cb(Ok(session.guest_pid));
    }
    let _raw = match (&pty, &tty_fd) {
        (None, Some(fd)) => exec::RawMode::enable(fd),
        _ => None,
    };
    Ok(session.relay(input, out, err, tty_fd))
}

/// `exec --detach`: a relay child (own session) runs the exec; its pid is returned.
fn spawn_exec_relay(
    ctx: &Context,
    c: &Container,
    process: &krun_oci_protocol::Process,
    console_socket: Option<&std::path::Path>,
) -> Result<i32> {
    use std::io::Read;
    let json = c.dir.path.join(format!("exec-{}.json", std::process::id()));
    krun_oci::state::write_atomic(&json, &serde_json::to_vec(process)?)?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("--root")
        .arg(&ctx.root)
        .arg("exec-relay")
        .arg("--process-json")
        .arg(&json);
    if let Some(s) = console_socket {
        cmd.arg("--console-socket").arg(s);
    }
    cmd.arg(c.id());
    if console_socket.is_some() {
        // The pty is the exec's stdio; keep none of the caller's pipes open.
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
    }
    let (read_end, write_end) = krun_oci::monitor::detached_with_sync_pipe(&mut cmd)?;
    let child = cmd.spawn().context("starting the exec relay")?;
    drop(write_end);
    let mut report = String::new();
    std::fs::File::from(read_end)
        .take(64 * 1024)
        .read_to_string(&mut report)?;
    let pid = child.id() as i32;
    // The relay outlives us (its parent becomes the caller's subreaper).
    std::mem::forget(child);
    let _ = std::fs::remove_file(&json);
    match report.trim().strip_prefix("started ") {
        Some(_) => Ok(pid),
        None => {
            let msg = report
                .trim()
                .strip_prefix("error ")
                .unwrap_or("the exec relay exited")
                .to_string();
            Err(anyhow::anyhow!(msg))
        }
    }
}

/// The detached exec's relay process.
pub fn exec_relay(ctx: &Context, args: ExecRelayArgs) -> Result<i32> {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    let mut sync: Option<std::fs::File> = std::env::var(krun_oci::monitor::SYNC_FD_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
        // SAFETY: the parent passed this fd for exactly this report.
        .map(|fd| unsafe { std::fs::File::from_raw_fd(fd) });
    std::env::remove_var(krun_oci::monitor::SYNC_FD_ENV);
    let result = (|| -> Result<(krun_oci::guest::GuestLink, krun_oci_protocol::Process)> {
        let c = Container::load(&ctx.store()?, &args.id)?;
        let process: krun_oci_protocol::Process =
            serde_json::from_slice(&std::fs::read(&args.process_json)?)?;
        let _ = std::fs::remove_file(&args.process_json);
        Ok((exec::prepare(&c, &process)?, process))
    })();
    let (link, process) = match result {
        Ok(v) => v,
        Err(e) => {
            if let Some(mut f) = sync.take() {
                let _ = writeln!(f, "error {e:#}");
            }
            return Ok(1);
        }
    };
    let tty = process.terminal().unwrap_or(false);
    let mut report = |r: std::result::Result<i32, String>| {
        if let Some(mut f) = sync.take() {
            let _ = match r {
                Ok(pid) => writeln!(f, "started {pid}"),
                Err(e) => writeln!(f, "error {e}"),
            };
        }
    };
    Ok(run_session(
        &link,
        process,
        tty,
        args.console_socket.as_deref(),
        Some(&mut report),
    )
    .unwrap_or(krun_oci::container::LOST_EXIT_CODE))
}

pub fn list(ctx: &Context, args: ListArgs) -> Result<()> {
    let store = ctx.store()?;
    let states: Vec<_> = store
        .list()?
        .iter()
        .filter_map(|id| Container::load(&store, id).ok())
        .map(|c| c.state_json())
        .collect();
    let mut out = std::io::stdout().lock();
    if args.quiet {
        for s in &states {
            writeln!(out, "{}", s.id)?;
        }
        return Ok(());
    }
    match args.format {
        // runc prints `null` for no containers.
        OutputFormat::Json if states.is_empty() => writeln!(out, "null")?,
        OutputFormat::Json => writeln!(out, "{}", serde_json::to_string(&states)?)?,
        OutputFormat::Table => {
            writeln!(
                out,
                "{:<12} {:<8} {:<10} {:<40} {:<30} OWNER",
                "ID", "PID", "STATUS", "BUNDLE", "CREATED"
            )?;
            for s in &states {
                writeln!(
                    out,
                    "{:<12} {:<8} {:<10} {:<40} {:<30} {}",
                    s.id,
                    s.pid,
                    s.status,
                    s.bundle.display(),
                    s.created,
                    if s.owner.is_empty() { "root" } else { &s.owner }
                )?;
            }
        }
    }
    Ok(())
}

pub fn ps(ctx: &Context, args: PsArgs) -> Result<()> {
    let processes = lifecycle::ps(&ctx.store()?, &args.id)?;
    match args.format {
        OutputFormat::Json => {
            let pids: Vec<i32> = processes.iter().map(|p| p.pid).collect();
            println!("{}", serde_json::to_string(&pids)?);
        }
        OutputFormat::Table => {
            println!("{:>8} {:>8} {:>6} CMD", "PID", "PPID", "UID");
            for p in processes {
                println!("{:>8} {:>8} {:>6} {}", p.pid, p.ppid, p.uid, p.cmd);
            }
        }
    }
    Ok(())
}

pub fn features() -> Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(&krun_oci::spec::features()?)?
    );
    Ok(())
}

pub fn spec(args: SpecArgs) -> Result<()> {
    krun_oci::spec::write_default_spec(&args.bundle, args.rootless)
        .with_context(|| format!("bundle {}", args.bundle.display()))
}

pub fn logs(ctx: &Context, args: LogsArgs) -> Result<()> {
    let c = Container::load(&ctx.store()?, &args.id)?;
    let path = c
        .record
        .log_path
        .clone()
        .unwrap_or_else(|| c.dir.path.join("container.log"));
    let since = match &args.since {
        Some(s) => {
            Some(krun_oci::logs::parse_since(s).with_context(|| format!("invalid --since {s:?}"))?)
        }
        None => None,
    };
    let opts = krun_oci::logs::PrintOptions {
        tail: args.tail,
        since,
        timestamps: args.timestamps,
    };
    let mut running = || c.status() != krun_oci::state::Status::Stopped;
    let follow: Option<&mut dyn FnMut() -> bool> = if args.follow {
        Some(&mut running)
    } else {
        None
    };
    krun_oci::logs::print(&path, &opts, follow)?;
    Ok(())
}

pub fn check(ctx: &Context) -> Result<i32> {
    let report = krun_oci::check::report(ctx.vmm, &krun_oci::monitor::image_options(ctx.vmm)?);
    print!("{report}");
    Ok(if report.can_run() { 0 } else { 1 })
}

pub fn pool(ctx: &Context, command: PoolCommand) -> Result<i32> {
    match command {
        PoolCommand::Serve(a) => {
            let mut s = krun_oci::host_config::load()?.pool.unwrap_or_default();
            let set = |v: Option<u32>, into: &mut u32| {
                if let Some(v) = v {
                    *into = v
                }
            };
            set(a.min_idle, &mut s.min_idle);
            set(a.max_idle, &mut s.max_idle);
            set(a.vcpus, &mut s.vcpus);
            set(a.ram_mib, &mut s.ram_mib);
            s.ttl_secs = a.ttl.unwrap_or(s.ttl_secs);
            s.memory_budget_mib = a.memory_budget_mib.unwrap_or(s.memory_budget_mib);
            s.health_secs = a.health_interval.unwrap_or(s.health_secs);
            krun_oci::pool::daemon::serve(&ctx.root, s, &std::env::current_exe()?)?;
            Ok(0)
        }
        PoolCommand::Status(a) => {
            let st = krun_oci::pool::status(&ctx.root)?;
            let mut out = std::io::stdout().lock();
            match a.format {
                OutputFormat::Json => writeln!(out, "{}", serde_json::to_string_pretty(&st)?)?,
                OutputFormat::Table => {
                    writeln!(
                        out,
                        "pid {}  idle {}  booting {}  claimed {}  hits {}  misses {}  boot failures {}",
                        st.pid, st.idle, st.booting, st.claimed, st.hits, st.misses, st.boot_failures
                    )?;
                    if let Some(shape) = &st.shape {
                        writeln!(out, "shape: {} vCPU, {} MiB", shape.vcpus, shape.ram_mib)?;
                    }
                    writeln!(out, "{:<24} {:<8} {:<10} AGE(s)", "NAME", "PID", "STATE")?;
                    for m in &st.members {
                        writeln!(
                            out,
                            "{:<24} {:<8} {:<10} {}",
                            m.name, m.pid, m.state, m.age_secs
                        )?;
                    }
                }
            }
            Ok(0)
        }
        PoolCommand::Member(a) => Ok(krun_oci::pool::member::run(
            &ctx.root, &a.name, a.vcpus, a.ram_mib,
        )?),
    }
}

pub fn monitor(ctx: &Context, id: &str) -> Result<i32> {
    let store = ctx.store()?;
    let dir = krun_oci::state::ContainerDir {
        id: id.to_string(),
        path: store.root().join(id),
    };
    Ok(krun_oci::monitor::run(&dir)?)
}

/// `events [--stats] [--interval D] ID`: one stats event with `--stats`, else one
/// every interval until the container stops.
pub fn events(ctx: &Context, args: EventsArgs) -> Result<i32> {
    use std::io::Write;
    let store = ctx.store()?;
    let interval = humantime::parse_duration(&args.interval)
        .with_context(|| format!("--interval {:?}", args.interval))?;
    let print = |event: &serde_json::Value| -> Result<()> {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{event}")?;
        Ok(out.flush()?)
    };
    // runc's `{"type":"oom","id":ID}`, once, when the guest's OOM killer has run.
    let mut oom_reported = false;
    let mut report_oom = || -> Result<()> {
        if !oom_reported && lifecycle::oom_killed(&store, &args.id) {
            oom_reported = true;
            print(&serde_json::json!({"type": "oom", "id": args.id}))?;
        }
        Ok(())
    };
    loop {
        match lifecycle::stats_event(&store, &args.id) {
            Ok(event) => print(&event)?,
            // The stream ends with the container (and the OOM kill that ended it).
            Err(krun_oci::Error::NotRunning) if !args.stats => {
                report_oom()?;
                return Ok(0);
            }
            Err(e) => return Err(e.into()),
        }
        if !args.stats {
            report_oom()?;
        }
        if args.stats {
            return Ok(0);
        }
        std::thread::sleep(interval);
    }
}

/// `update [--resources FILE|-] [--memory M] [--cpu-quota Q] [--cpu-period P]
/// [--cpuset-cpus C] [--pids-limit N] ID`: the flags override the file, as in runc.
pub fn update(ctx: &Context, args: UpdateArgs) -> Result<i32> {
    use oci_spec::runtime::{LinuxPids, LinuxResources};
    let mut r: LinuxResources = match args.resources.as_deref() {
        None => LinuxResources::default(),
        Some("-") => serde_json::from_reader(std::io::stdin()).context("resources from stdin")?,
        Some(f) => {
            serde_json::from_slice(&std::fs::read(f).with_context(|| format!("reading {f}"))?)
                .with_context(|| format!("parsing {f}"))?
        }
    };
    if let Some(m) = &args.memory {
        let mut mem = r.memory().unwrap_or_default();
        mem.set_limit(Some(parse_bytes(m)?));
        r.set_memory(Some(mem));
    }
    if args.cpu_quota.is_some() || args.cpu_period.is_some() || args.cpuset_cpus.is_some() {
        let mut cpu = r.cpu().clone().unwrap_or_default();
        if let Some(q) = args.cpu_quota {
            cpu.set_quota(Some(q));
        }
        if let Some(p) = args.cpu_period {
            cpu.set_period(Some(p));
        }
        if let Some(c) = &args.cpuset_cpus {
            cpu.set_cpus(Some(c.clone()));
        }
        r.set_cpu(Some(cpu));
    }
    if let Some(n) = args.pids_limit {
        let mut pids = LinuxPids::default();
        pids.set_limit(n);
        r.set_pids(Some(pids));
    }
    lifecycle::update(&ctx.store()?, &args.id, &r)?;
    Ok(0)
}

/// A byte count as runc's `--memory` takes it: `512m`, `1g`, `1048576`.
fn parse_bytes(s: &str) -> Result<i64> {
    let t = s.trim().to_ascii_lowercase();
    let (num, mult) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (t.as_str(), 1),
        Some((i, _)) => (
            &t[..i],
            match t[i..].trim_end_matches('b') {
                "k" => 1 << 10,
                "m" => 1 << 20,
                "g" => 1 << 30,
                "" => 1,
                _ => anyhow::bail!("--memory {s:?}: expected a number with k, m or g"),
            },
        ),
    };
    let n: i64 = num.parse().with_context(|| format!("--memory {s:?}"))?;
    Ok(n * mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes_like_runc() {
        assert_eq!(parse_bytes("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_bytes("512m").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1G").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("64kb").unwrap(), 64 << 10);
        assert!(parse_bytes("12x").is_err());
    }
}
