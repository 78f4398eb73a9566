//! One short function per verb.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use krun_oci::cli::{CreateArgs, DeleteArgs, ExecArgs, KillArgs, ListArgs, LogsArgs, OutputFormat, PsArgs, RunArgs, SpecArgs};
use krun_oci::container::Container;
use krun_oci::lifecycle::{self, CreateOptions};
use krun_oci::state::StateStore;
use krun_oci::vmm::VmmChoice;
use krun_oci::Error;

/// What every verb needs from the global flags.
pub struct Context {
    pub root: PathBuf,
    pub vmm: VmmChoice,
    #[allow(dead_code)]
    pub systemd_cgroup: bool,
}

impl Context {
    fn store(&self) -> Result<StateStore> {
        Ok(StateStore::open(&self.root)?)
    }
}

fn create_options(ctx: &Context, args: &CreateArgs) -> Result<CreateOptions> {
    if args.preserve_fds > 0 {
        log::warn!("--preserve-fds {}: fds cannot cross the VM boundary; ignored", args.preserve_fds);
    }
    Ok(CreateOptions {
        bundle: args.bundle.clone(),
        pid_file: args.pid_file.clone(),
        console_socket: args.console_socket.clone(),
        vmm: ctx.vmm,
        exe: std::env::current_exe().context("locating the krun-oci binary")?,
        stdio: None,
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

pub fn exec(_ctx: &Context, _args: ExecArgs) -> Result<i32> {
    Err(Error::NotImplemented("exec").into())
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
            writeln!(out, "{:<12} {:<8} {:<10} {:<40} {:<30} OWNER", "ID", "PID", "STATUS", "BUNDLE", "CREATED")?;
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
    println!("{}", serde_json::to_string_pretty(&krun_oci::spec::features()?)?);
    Ok(())
}

pub fn spec(args: SpecArgs) -> Result<()> {
    krun_oci::spec::write_default_spec(&args.bundle, args.rootless)
        .with_context(|| format!("bundle {}", args.bundle.display()))
}

pub fn logs(ctx: &Context, args: LogsArgs) -> Result<()> {
    let c = Container::load(&ctx.store()?, &args.id)?;
    let path = c.record.log_path.clone().unwrap_or_else(|| c.dir.path.join("container.log"));
    let since = match &args.since {
        Some(s) => Some(krun_oci::logs::parse_since(s).with_context(|| format!("invalid --since {s:?}"))?),
        None => None,
    };
    let opts = krun_oci::logs::PrintOptions { tail: args.tail, since, timestamps: args.timestamps };
    let mut running = || c.status() != krun_oci::state::Status::Stopped;
    let follow: Option<&mut dyn FnMut() -> bool> = if args.follow { Some(&mut running) } else { None };
    krun_oci::logs::print(&path, &opts, follow)?;
    Ok(())
}

pub fn check(ctx: &Context) -> Result<i32> {
    let report = krun_oci::check::report(ctx.vmm, &krun_oci::image::ImageOptions::from_env());
    print!("{report}");
    Ok(if report.can_run() { 0 } else { 1 })
}

pub fn monitor(ctx: &Context, id: &str) -> Result<i32> {
    let store = ctx.store()?;
    let dir = krun_oci::state::ContainerDir { id: id.to_string(), path: store.root().join(id) };
    Ok(krun_oci::monitor::run(&dir)?)
}
