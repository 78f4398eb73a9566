//! Real clients against krun-oci: containerd (`ctr`) with containerd-shim-krun-v2
//! and with the stock runc shim pointed at krun-oci (`--runc-binary`), and podman
//! with `--runtime krun-oci`, on real microVMs. It starts its own containerd
//! (own root, state and socket under a temp dir) and gives podman its own
//! storage; after every scenario nothing may be left: no VM, helper, shim,
//! socket, state or cgroup.
//!
//! `cargo test -p krun-oci-clients --test clients [-- NAME...]` runs every
//! scenario, or the NAMEs. Env: KRUN_OCI_BIN_DIR (krun-oci and the shim; default
//! the target directory this test was built in), KRUN_OCI_INIT (the guest init),
//! KRUN_OCI_REQUIRE_VM=1 (a VM that cannot boot fails the run instead of skipping
//! the VM scenarios). One closing line: `clients: N passed, M failed`; exit 1 on
//! a failure, 0 with `SKIP: why` where it cannot run here.
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;

#[path = "clients/check.rs"]
mod check;
#[path = "clients/ctr.rs"]
mod ctr;
#[path = "clients/network.rs"]
mod network;
#[path = "clients/podman.rs"]
mod podman;
#[path = "clients/session.rs"]
mod session;

use check::Check;
use session::Session;

type Scenario = fn(&mut Check);

/// Needs no VM: a bad command fails create with runc's words, through the shim.
const WITHOUT_VM: (&str, Scenario) = ("shim_create_error", ctr::shim_create_error);

/// In this order (`shim_*` with containerd-shim-krun-v2, `runc_shim_*` with the
/// stock runc shim and `--runc-binary`).
const WITH_VM: [(&str, Scenario); 25] = [
    ("shim_run", ctr::shim_run),
    ("runc_shim_run", ctr::runc_shim_run),
    ("shim_kill", ctr::shim_kill),
    ("runc_shim_kill", ctr::runc_shim_kill),
    ("shim_exec", ctr::shim_exec),
    ("runc_shim_exec", ctr::runc_shim_exec),
    ("shim_tty", ctr::shim_tty),
    ("runc_shim_tty", ctr::runc_shim_tty),
    ("shim_image", ctr::shim_image),
    ("runc_shim_image", ctr::runc_shim_image),
    ("shim_pause", ctr::shim_pause),
    ("runc_shim_pause", ctr::runc_shim_pause),
    ("podman_run", podman::podman_run),
    ("podman_stop", podman::podman_stop),
    ("podman_exec", podman::podman_exec),
    ("podman_logs_kill", podman::podman_logs_kill),
    ("podman_rm_force", podman::podman_rm_force),
    ("podman_pause", podman::podman_pause),
    ("podman_update", podman::podman_update),
    ("podman_it", podman::podman_it),
    ("podman_network", network::podman_network),
    ("shim_cni", network::shim_cni),
    ("runc_shim_cni", network::runc_shim_cni),
    ("shim_oom", ctr::shim_oom),
    ("shim_host_config", ctr::shim_host_config),
];

fn main() {
    std::process::exit(run());
}

fn run() -> i32 {
    // Arguments name scenarios; the flags cargo passes to every test are not ours.
    let wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let known = |n: &str| n == WITHOUT_VM.0 || WITH_VM.iter().any(|(name, _)| *name == n);
    if let Some(unknown) = wanted.iter().find(|n| !known(n)) {
        println!("clients: no scenario named {unknown:?}");
        return 1;
    }
    let selected = |name: &str| wanted.is_empty() || wanted.iter().any(|w| w == name);
    let session = match Session::start() {
        Ok(s) => Arc::new(s),
        Err(session::NotHere(why)) => {
            println!("SKIP: {why}");
            return 0;
        }
    };
    let _teardown = session::TeardownOnDrop(session.clone());
    session::teardown_on_signals(&session);
    let mut summary = Summary::default();
    if selected(WITHOUT_VM.0) {
        summary.run(&session, WITHOUT_VM);
    }
    let vm_scenarios: Vec<_> = WITH_VM.into_iter().filter(|(n, _)| selected(n)).collect();
    if !vm_scenarios.is_empty() {
        match session.vm_probe() {
            Ok(()) => {
                for scenario in vm_scenarios {
                    summary.run(&session, scenario);
                }
            }
            Err(reason) => {
                println!("VM probe: no microVM boots here: {reason}");
                if std::env::var("KRUN_OCI_REQUIRE_VM").as_deref() == Ok("1") {
                    summary.failed(
                        "setup",
                        vec!["KRUN_OCI_REQUIRE_VM=1 but no VM boots".into()],
                    );
                } else {
                    let names: Vec<_> = vm_scenarios.iter().map(|(n, _)| *n).collect();
                    println!("SKIP: VM scenarios ({}): no VM boots", names.join(" "));
                    summary.vm_skipped = true;
                }
            }
        }
    }
    summary.finish(&session)
}

#[derive(Default)]
struct Summary {
    passed: usize,
    failed: usize,
    failure_lines: Vec<String>,
    vm_skipped: bool,
}

impl Summary {
    /// Runs one scenario, then the leak check; a panic fails the scenario.
    fn run(&mut self, session: &Session, (name, scenario): (&str, Scenario)) {
        println!("== {name}");
        let mut check = Check::new(session);
        if let Err(panic) = panic::catch_unwind(AssertUnwindSafe(|| scenario(&mut check))) {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            check.fail(format!("panicked: {why}"));
        }
        for leak in session.leftovers() {
            check.fail(leak);
        }
        if check.failures.is_empty() {
            self.passed += 1;
            println!("  ok");
        } else {
            self.failed(name, check.failures);
        }
    }

    fn failed(&mut self, name: &str, failures: Vec<String>) {
        self.failed += 1;
        self.failure_lines
            .extend(failures.into_iter().map(|f| format!("{name}: {f}")));
    }

    /// The failures (with containerd's warnings and errors), then the one summary line.
    fn finish(self, session: &Session) -> i32 {
        if self.failed > 0 {
            // Warnings and errors only: debug lines would bury them.
            println!("-- containerd log (warnings and errors, tail):");
            for line in session.containerd_complaints(20) {
                println!("{line}");
            }
            println!("-- failures:");
            for line in &self.failure_lines {
                println!("  {line}");
            }
        }
        println!(
            "clients: {} passed, {} failed{}",
            self.passed,
            self.failed,
            if self.vm_skipped {
                ", VM scenarios skipped"
            } else {
                ""
            }
        );
        i32::from(self.failed > 0)
    }
}

/// Where krun-oci and the shim are: KRUN_OCI_BIN_DIR, else the target directory
/// of this build (target/<profile>/deps/clients-HASH → target/<profile>).
fn bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("KRUN_OCI_BIN_DIR") {
        return Some(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.parent()?.to_path_buf())
}
