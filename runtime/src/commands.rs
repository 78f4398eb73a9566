//! One short function per verb.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use krun_oci::cli::{
    CreateArgs, DeleteArgs, EventsArgs, ExecArgs, ExecRelayArgs, KillArgs, ListArgs, LogsArgs,
    OutputFormat, PoolCommand, PsArgs, RunArgs, SpecArgs, UpdateArgs,
};
use krun_oci::container::Container;
use krun_oci::error::ErrorKind;
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
    let source = match &args.process {
        Some(f) => {
            let data = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
            exec::ProcessSource::Given(Box::new(
                serde_json::from_slice(&data)
                    .with_context(|| format!("parsing {}", f.display()))?,
            ))
        }
        None => exec::ProcessSource::Overrides(exec::ExecOverrides {
            args: args.command.clone(),
            cwd: args.cwd.clone(),
            env: args.env.clone(),
            user: args.user.as_deref().map(exec::parse_user).transpose()?,
            additional_gids: args.additional_gids.clone(),
            tty: args.tty,
            no_new_privs: args.no_new_privs,
        }),
    };
    let process = exec::process_for(&Container::load(&store, &args.id)?, source)?;
    let console = args.console_socket.as_deref();
    exec::check_terminal(
        process.terminal().unwrap_or(false),
        console.is_some(),
        args.detach,
    )?;
    let result = if args.detach {
        let how = exec::DetachedExec {
            exe: &std::env::current_exe().context("locating the krun-oci binary")?,
            stdio: None,
            console_socket: console,
        };
        exec::spawn_detached(&store, &args.id, &process, how).and_then(|pid| {
            if let Some(p) = &args.pid_file {
                lifecycle::write_pid_file(p, pid)?;
            }
            Ok(0)
        })
    } else {
        // Without --detach the process to wait on is this one: it relays the
        // session and exits with the guest process's status.
        if let Some(p) = &args.pid_file {
            lifecycle::write_pid_file(p, std::process::id() as i32)?;
        }
        exec::run_attached(&store, &args.id, process, console)
    };
    result.or_else(exec_failure)
}

/// A failed exec's status: podman maps 127 and 126; the rest exit 1.
fn exec_failure(e: Error) -> Result<i32> {
    let code = match e.kind() {
        ErrorKind::ExecutableNotFound => 127,
        ErrorKind::PermissionDenied => 126,
        _ => return Err(e.into()),
    };
    log::error!("{e}");
    eprintln!("krun-oci: {e}");
    Ok(code)
}

/// The detached exec's relay process.
pub fn exec_relay(ctx: &Context, args: ExecRelayArgs) -> Result<i32> {
    Ok(exec::relay_main(
        &ctx.store()?,
        &args.id,
        &args.process_json,
        args.console_socket.as_deref(),
    ))
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
    let report = krun_oci::check::report(ctx.vmm, &krun_oci::boot::image_options(ctx.vmm)?);
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
            &ctx.root,
            &a.name,
            a.vcpus,
            a.ram_mib,
            a.rootfs_cache,
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
