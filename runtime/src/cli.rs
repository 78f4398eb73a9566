//! The runc-compatible command line (clap structs only; `main.rs` dispatches).
//!
//! Global flags go before the subcommand; subcommand flags may come before or
//! after the container ID, in `--flag value` or `--flag=value` form.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::logger::LogFormat;
use crate::vmm::{RootfsCache, VmmChoice};

#[derive(Parser, Debug)]
#[command(
    name = "krun-oci",
    about = "OCI runtime that runs every container in its own microVM",
    disable_version_flag = true,
    subcommand_required = false,
    arg_required_else_help = true
)]
pub struct Cli {
    /// Root directory for container state.
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Append log lines (and errors) to FILE.
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// Format of --log lines.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log debug messages.
    #[arg(long)]
    pub debug: bool,
    /// Use systemd for cgroup placement (cgroupsPath is slice:prefix:name).
    #[arg(long)]
    pub systemd_cgroup: bool,
    /// Rootless mode: true, false or auto (only the `--rootless=VALUE` form, like runc).
    #[arg(long, value_name = "true|false|auto", require_equals = true, num_args = 0..=1, default_missing_value = "true")]
    pub rootless: Option<String>,
    /// VMM backend.
    #[arg(long, value_enum, env = "KRUN_OCI_VMM")]
    pub vmm: Option<VmmChoice>,
    /// Print the version.
    #[arg(short = 'v', long)]
    pub version: bool,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a container: boot its VM; the main process waits for `start`.
    Create(CreateArgs),
    /// Run the created container's main process.
    Start(IdArgs),
    /// Print the container's state as JSON.
    State(IdArgs),
    /// Send a signal to the container's main process (or all with --all).
    Kill(KillArgs),
    /// Delete a stopped container (or any with --force).
    Delete(DeleteArgs),
    /// Create and start a container, wait for it, exit with its code.
    Run(RunArgs),
    /// Run a process inside the container's VM.
    Exec(ExecArgs),
    /// List containers.
    List(ListArgs),
    /// List the processes inside the container's VM.
    Ps(PsArgs),
    /// Freeze the container's VM.
    Pause(IdArgs),
    /// Thaw the container's VM.
    Resume(IdArgs),
    /// Show container events and statistics.
    Events(EventsArgs),
    /// Update the container's resource limits.
    Update(UpdateArgs),
    /// Print the runtime-spec features JSON.
    Features,
    /// Write a default config.json into the bundle.
    Spec(SpecArgs),
    /// Show the container's stdout/stderr log.
    Logs(LogsArgs),
    /// Diagnose what this host can run and which VMM would be used.
    Check,
    /// The warm pool of pre-booted VMs that `create` claims.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Internal: the per-container VM monitor (started by `create`).
    #[command(hide = true)]
    Monitor(MonitorArgs),
    /// Internal: relays a detached exec's stdio and signals (started by `exec --detach`).
    #[command(hide = true)]
    ExecRelay(ExecRelayArgs),
    /// Internal: the libkrun VMM of one container (started by its monitor).
    #[command(hide = true)]
    LibkrunVmm(LibkrunVmmArgs),
}

#[derive(Subcommand, Debug, Clone)]
pub enum PoolCommand {
    /// Keep idle VMs ready for this --root's creates (runs until SIGTERM).
    Serve(PoolServeArgs),
    /// Show the pool's idle, booting and claimed VMs and its hit/miss counts.
    Status(PoolStatusArgs),
    /// Internal: one pooled VM (started by `pool serve`).
    #[command(hide = true)]
    Member(PoolMemberArgs),
}

/// Flags over `[pool]` in the host config file.
#[derive(Args, Debug, Clone, Default)]
pub struct PoolServeArgs {
    /// Idle VMs kept ready.
    #[arg(long)]
    pub min_idle: Option<u32>,
    /// Idle VMs kept while creates miss.
    #[arg(long)]
    pub max_idle: Option<u32>,
    /// Seconds an idle VM lives before it is replaced.
    #[arg(long)]
    pub ttl: Option<u64>,
    /// vCPUs of each VM (containers of another size boot cold).
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// RAM of each VM in MiB (containers of another size boot cold).
    #[arg(long)]
    pub ram_mib: Option<u32>,
    /// Guest RAM all idle and booting VMs may take together, MiB (0: no limit).
    #[arg(long)]
    pub memory_budget_mib: Option<u64>,
    /// Seconds between health checks of each idle VM.
    #[arg(long)]
    pub health_interval: Option<u64>,
}

#[derive(Args, Debug, Clone)]
pub struct PoolStatusArgs {
    #[arg(short = 'f', long, value_enum, default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,
}

#[derive(Args, Debug, Clone)]
pub struct PoolMemberArgs {
    #[arg(long)]
    pub vcpus: u32,
    #[arg(long)]
    pub ram_mib: u32,
    #[arg(long, value_enum, default_value_t)]
    pub rootfs_cache: RootfsCache,
    pub name: String,
}

#[derive(Args, Debug, Clone)]
pub struct LibkrunVmmArgs {
    /// The VM's configuration (`libkrun.json` in the container's run dir).
    #[arg(long)]
    pub config: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct ExecRelayArgs {
    /// The exec's process as OCI process JSON (removed once read).
    #[arg(long)]
    pub process_json: PathBuf,
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    pub id: String,
}

#[derive(Args, Debug, Clone)]
pub struct IdArgs {
    pub id: String,
}

#[derive(Args, Debug, Clone, Default)]
pub struct CreateArgs {
    /// Path to the bundle directory.
    #[arg(short = 'b', long, default_value = ".")]
    pub bundle: PathBuf,
    /// Write the container pid (the VM monitor) to this file.
    #[arg(long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
    /// Unix socket that receives the pty master when process.terminal is true.
    #[arg(long, value_name = "SOCKET")]
    pub console_socket: Option<PathBuf>,
    /// Unix socket that receives a pidfd of the container pid.
    #[arg(long, value_name = "SOCKET")]
    pub pidfd_socket: Option<PathBuf>,
    /// Accepted for runc compatibility (the VM has its own root).
    #[arg(long)]
    pub no_pivot: bool,
    /// Accepted for runc compatibility (the VM has its own keyring).
    #[arg(long)]
    pub no_new_keyring: bool,
    /// Pass N additional fds (3..3+N-1) on.
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    pub id: String,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub create: CreateArgs,
    /// Do not wait for the container; print nothing and return after start.
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// Keep the container's state after it exits.
    #[arg(long)]
    pub keep: bool,
}

#[derive(Args, Debug, Clone)]
pub struct KillArgs {
    /// Signal every process in the container.
    #[arg(short = 'a', long)]
    pub all: bool,
    pub id: String,
    /// Signal as a number, a name or SIGNAME (default SIGTERM).
    #[arg(default_value = "SIGTERM")]
    pub signal: String,
}

#[derive(Args, Debug, Clone)]
pub struct DeleteArgs {
    /// Stop a running container first; succeed if it does not exist.
    #[arg(short = 'f', long)]
    pub force: bool,
    pub id: String,
}

#[derive(Args, Debug, Clone)]
pub struct ExecArgs {
    /// OCI process JSON describing the process to run.
    #[arg(short = 'p', long, value_name = "FILE")]
    pub process: Option<PathBuf>,
    #[arg(long, value_name = "SOCKET")]
    pub console_socket: Option<PathBuf>,
    #[arg(long, value_name = "SOCKET")]
    pub pidfd_socket: Option<PathBuf>,
    /// Return once started; the pid file then names a host process relaying the exec.
    #[arg(short = 'd', long)]
    pub detach: bool,
    #[arg(long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    /// Allocate a pseudo-TTY.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Working directory inside the container.
    #[arg(long)]
    pub cwd: Option<String>,
    /// Environment variables (KEY=VALUE), repeatable.
    #[arg(short = 'e', long = "env")]
    pub env: Vec<String>,
    /// UID[:GID] to run as.
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    /// Additional gids, repeatable.
    #[arg(short = 'g', long = "additional-gids")]
    pub additional_gids: Vec<u32>,
    /// Capabilities to add, repeatable.
    #[arg(short = 'c', long = "cap")]
    pub cap: Vec<String>,
    #[arg(long)]
    pub no_new_privs: bool,
    #[arg(long)]
    pub process_label: Option<String>,
    #[arg(long)]
    pub apparmor: Option<String>,
    #[arg(long)]
    pub ignore_paused: bool,
    pub id: String,
    /// Command and arguments (when --process is not given).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

#[derive(Args, Debug, Clone)]
pub struct ListArgs {
    #[arg(short = 'f', long, value_enum, default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,
    /// Print only the IDs.
    #[arg(short = 'q', long)]
    pub quiet: bool,
}

#[derive(Args, Debug, Clone)]
pub struct PsArgs {
    #[arg(short = 'f', long, value_enum, default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,
    pub id: String,
    /// Accepted for runc compatibility (ps options are not supported).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub ps_args: Vec<String>,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Args, Debug, Clone)]
pub struct EventsArgs {
    /// Print statistics once and exit.
    #[arg(long)]
    pub stats: bool,
    /// Interval between statistics.
    #[arg(long, default_value = "5s")]
    pub interval: String,
    pub id: String,
}

#[derive(Args, Debug, Clone)]
pub struct UpdateArgs {
    /// LinuxResources JSON file, or `-` for stdin.
    #[arg(short = 'r', long)]
    pub resources: Option<String>,
    #[arg(long)]
    pub memory: Option<String>,
    #[arg(long)]
    pub cpu_quota: Option<i64>,
    #[arg(long)]
    pub cpu_period: Option<u64>,
    #[arg(long)]
    pub cpuset_cpus: Option<String>,
    #[arg(long)]
    pub pids_limit: Option<i64>,
    pub id: String,
}

#[derive(Args, Debug, Clone)]
pub struct SpecArgs {
    #[arg(short = 'b', long, default_value = ".")]
    pub bundle: PathBuf,
    /// Generate a config for a rootless container.
    #[arg(long)]
    pub rootless: bool,
}

#[derive(Args, Debug, Clone)]
pub struct LogsArgs {
    /// Keep printing new lines until the container stops.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Print only the last N lines.
    #[arg(long, value_name = "N")]
    pub tail: Option<usize>,
    /// Only lines at or after this time (RFC3339, or a duration like 10m).
    #[arg(long, value_name = "T")]
    pub since: Option<String>,
    /// Prefix each line with its time.
    #[arg(short = 't', long)]
    pub timestamps: bool,
    pub id: String,
}

#[derive(Args, Debug, Clone)]
pub struct MonitorArgs {
    pub id: String,
}

/// runc's `--version` output.
pub fn version_text() -> String {
    format!(
        "krun-oci version {}\ncommit: {}\nspec: {}\n",
        env!("CARGO_PKG_VERSION"),
        option_env!("KRUN_OCI_COMMIT").unwrap_or("unknown"),
        crate::spec::OCI_VERSION
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("krun-oci").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    fn create(args: &[&str]) -> CreateArgs {
        match parse(args).command {
            Some(Command::Create(c)) => c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn create_flags_in_any_order_and_form() {
        for args in [
            &["create", "--bundle", "/b", "--pid-file", "/p", "c1"][..],
            &["create", "--bundle=/b", "--pid-file=/p", "c1"],
            &["create", "c1", "--bundle", "/b", "--pid-file=/p"],
            &["create", "-b", "/b", "c1", "--pid-file", "/p"],
        ] {
            let c = create(args);
            assert_eq!(c.id, "c1");
            assert_eq!(c.bundle, PathBuf::from("/b"));
            assert_eq!(c.pid_file, Some(PathBuf::from("/p")));
        }
        let c = create(&[
            "create",
            "--console-socket",
            "/s",
            "--preserve-fds=2",
            "--no-pivot",
            "x",
        ]);
        assert_eq!(c.console_socket, Some(PathBuf::from("/s")));
        assert_eq!(c.preserve_fds, 2);
        assert_eq!(create(&["create", "x"]).bundle, PathBuf::from("."));
    }

    #[test]
    fn global_flags() {
        let cli = parse(&[
            "--root",
            "/r",
            "--log=/l",
            "--log-format",
            "json",
            "--debug",
            "--systemd-cgroup",
            "--rootless=false",
            "state",
            "x",
        ]);
        assert_eq!(cli.root, Some(PathBuf::from("/r")));
        assert_eq!(cli.log, Some(PathBuf::from("/l")));
        assert_eq!(cli.log_format, LogFormat::Json);
        assert!(cli.debug && cli.systemd_cgroup);
        assert_eq!(cli.rootless.as_deref(), Some("false"));
        // `--rootless VALUE` is not accepted (runc takes only the `=` form).
        assert!(Cli::try_parse_from(["krun-oci", "--rootless", "true", "state", "x"]).is_err());
        assert!(Cli::try_parse_from(["krun-oci", "--bogus", "state", "x"]).is_err());
    }

    #[test]
    fn kill_forms() {
        for (args, all, sig) in [
            (&["kill", "x"][..], false, "SIGTERM"),
            (&["kill", "x", "9"], false, "9"),
            (&["kill", "--all", "x", "KILL"], true, "KILL"),
            (&["kill", "x", "SIGKILL", "-a"], true, "SIGKILL"),
        ] {
            match parse(args).command {
                Some(Command::Kill(k)) => {
                    assert_eq!((k.all, k.signal.as_str(), k.id.as_str()), (all, sig, "x"))
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn delete_and_run_aliases() {
        match parse(&["delete", "x", "-f"]).command {
            Some(Command::Delete(d)) => assert!(d.force),
            other => panic!("{other:?}"),
        }
        match parse(&["run", "-d", "-b", "/b", "x", "--keep"]).command {
            Some(Command::Run(r)) => {
                assert!(r.detach && r.keep);
                assert_eq!(r.create.bundle, PathBuf::from("/b"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn exec_positional_form_keeps_command_flags() {
        match parse(&[
            "exec", "-t", "--cwd", "/tmp", "-e", "A=1", "-e=B=2", "-u", "1:2", "x", "sh", "-c",
            "exit 3",
        ])
        .command
        {
            Some(Command::Exec(e)) => {
                assert!(e.tty);
                assert_eq!(e.cwd.as_deref(), Some("/tmp"));
                assert_eq!(e.env, vec!["A=1", "B=2"]);
                assert_eq!(e.user.as_deref(), Some("1:2"));
                assert_eq!(e.id, "x");
                assert_eq!(e.command, vec!["sh", "-c", "exit 3"]);
            }
            other => panic!("{other:?}"),
        }
        match parse(&[
            "exec",
            "--pid-file",
            "/p",
            "--process",
            "/f",
            "--detach",
            "x",
        ])
        .command
        {
            Some(Command::Exec(e)) => {
                assert!(e.detach);
                assert_eq!(e.process, Some(PathBuf::from("/f")));
                assert!(e.command.is_empty());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn list_and_version() {
        match parse(&["list", "--format", "json", "-q"]).command {
            Some(Command::List(l)) => assert!(l.quiet && l.format == OutputFormat::Json),
            other => panic!("{other:?}"),
        }
        assert!(parse(&["--version"]).version);
        let v = version_text();
        let lines: Vec<_> = v.lines().collect();
        assert!(lines[0].starts_with("krun-oci version "));
        assert!(lines[1].starts_with("commit: "));
        assert!(lines[2].starts_with("spec: 1."));
    }
}
