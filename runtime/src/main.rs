//! The `krun-oci` binary: parse, set up logging, dispatch each verb to a short
//! function over the library, and turn errors into runc's exit status 1.

mod commands;

use clap::Parser;
use krun_oci::cli::{Cli, Command};

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Help is not an error; a usage error exits 1 like runc, not clap's 2.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let _ = e.print();
            std::process::exit(1);
        }
    };
    if cli.version {
        print!("{}", krun_oci::cli::version_text());
        return;
    }
    if let Err(e) = krun_oci::logger::init(cli.log.as_deref(), cli.log_format, cli.debug) {
        eprintln!("krun-oci: opening log file: {e}");
        std::process::exit(1);
    }
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            let msg = format!("{e:#}");
            log::error!("{msg}");
            eprintln!("krun-oci: {msg}");
            1
        }
    };
    std::process::exit(code);
}

/// Runs the chosen verb; `Ok(code)` is the process exit status.
fn run(cli: Cli) -> anyhow::Result<i32> {
    let root = cli
        .root
        .clone()
        .unwrap_or_else(krun_oci::state::default_root);
    if cli.rootless.as_deref() == Some("true") {
        log::warn!("--rootless=true is not supported: the runtime runs as the calling user");
    }
    let Some(command) = cli.command else {
        anyhow::bail!("no command given; see --help");
    };
    // --vmm / KRUN_OCI_VMM, else the host config file, else auto.
    let vmm = match cli.vmm {
        Some(v) => v,
        None => krun_oci::host_config::default_vmm()?,
    };
    let ctx = commands::Context {
        root,
        vmm,
        systemd_cgroup: cli.systemd_cgroup,
    };
    match command {
        Command::Create(a) => commands::create(&ctx, a).map(|_| 0),
        Command::Start(a) => commands::start(&ctx, &a.id).map(|_| 0),
        Command::State(a) => commands::state(&ctx, &a.id).map(|_| 0),
        Command::Kill(a) => commands::kill(&ctx, a).map(|_| 0),
        Command::Delete(a) => commands::delete(&ctx, a).map(|_| 0),
        Command::Run(a) => commands::run(&ctx, a),
        Command::Exec(a) => commands::exec(&ctx, a),
        Command::List(a) => commands::list(&ctx, a).map(|_| 0),
        Command::Ps(a) => commands::ps(&ctx, a).map(|_| 0),
        Command::Pause(a) => commands::pause(&ctx, &a.id).map(|_| 0),
        Command::Resume(a) => commands::resume(&ctx, &a.id).map(|_| 0),
        Command::Events(a) => commands::events(&ctx, a),
        Command::Update(a) => commands::update(&ctx, a),
        Command::Features => commands::features().map(|_| 0),
        Command::Spec(a) => commands::spec(a).map(|_| 0),
        Command::Logs(a) => commands::logs(&ctx, a).map(|_| 0),
        Command::Check => commands::check(&ctx),
        Command::Pool(p) => commands::pool(&ctx, p),
        Command::Monitor(a) => commands::monitor(&ctx, &a.id),
        Command::ExecRelay(a) => commands::exec_relay(&ctx, a),
        Command::LibkrunVmm(a) => Ok(krun_oci::vmm::libkrun::vmm_main(&a.config)?),
    }
}
