//! `conformance soak`: many lifecycles of mixed workloads, a few at a time, each
//! checked (state, exit code, output); then a leak check against a snapshot of the
//! host taken before. Prints one summary line.
use anyhow::{anyhow, ensure, Context, Result};
use serde_json::json;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use krun_oci_testkit::ids;
use krun_oci_testkit::leaks::{self, Snapshot};

use crate::harness::{self, Config, Ctx, Tracked};
use crate::pool::PoolRun;

/// What one lifecycle runs; cycle `i` runs `WORKLOADS[i % 6]`.
#[derive(Clone, Copy, Debug)]
enum Workload {
    /// The main exits on its own with 7.
    ExitsSeven,
    /// `kill TERM`, which the main traps: 143.
    Terminated,
    /// `kill KILL`: 137.
    Killed,
    /// `run` in the foreground: its own exit code is the main's, 3.
    Run,
    /// An exec that exits 5, then `kill KILL`.
    ExecFails,
    /// An exec on a terminal (`exec -t`) that exits 4, then `kill KILL`.
    ExecTty,
}

const WORKLOADS: [Workload; 6] = [
    Workload::ExitsSeven,
    Workload::Terminated,
    Workload::Killed,
    Workload::Run,
    Workload::ExecFails,
    Workload::ExecTty,
];

impl Workload {
    fn main(self) -> serde_json::Value {
        match self {
            Workload::ExitsSeven => json!(["sh", "-c", "echo soak-out; exit 7"]),
            Workload::Terminated => json!([
                "sh",
                "-c",
                "trap 'exit 143' TERM; echo ready; while true; do sleep 0.1; done"
            ]),
            Workload::Run => json!(["sh", "-c", "echo soak-run; exit 3"]),
            Workload::Killed | Workload::ExecFails | Workload::ExecTty => {
                json!(["sh", "-c", "echo ready; exec sleep 1000"])
            }
        }
    }
}

pub struct SoakArgs {
    pub runtime: PathBuf,
    pub cycles: usize,
    pub parallel: usize,
    pub timeout: Duration,
    pub pool: Option<u32>,
}

pub fn soak(args: SoakArgs) -> Result<i32> {
    harness::become_subreaper()?;
    let t0 = Instant::now();
    let dir = tempfile::Builder::new().prefix("soak-").tempdir()?;
    let pool = args
        .pool
        .map(|n| PoolRun::start(&args.runtime, n))
        .transpose()?;
    let root = pool
        .as_ref()
        .map(PoolRun::root)
        .unwrap_or_else(|| dir.path().join("root"));
    let cfg = Arc::new(Config {
        runtime: args.runtime.clone(),
        checker: None,
        cmd_timeout: args.timeout,
        preflight_error: None,
        shared_root: Some(root.clone()),
    });
    let daemon = pool.as_ref().map(PoolRun::daemon_pid);
    let before = Snapshot::take(daemon);
    let next = AtomicUsize::new(0);
    let passed = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|s| -> Result<()> {
        let mut workers = Vec::new();
        for w in 0..args.parallel.max(1) {
            let worker_dir = dir.path().join(format!("worker{w}"));
            fs::create_dir_all(&worker_dir)?;
            let mut ctx = Ctx::new(
                cfg.clone(),
                worker_dir,
                Arc::new(Mutex::new(Tracked::default())),
            )?;
            // One bundle per workload and worker: a rootfs holds one container's exit code.
            let bundles = WORKLOADS
                .iter()
                .map(|w| ctx.bundle(|c| c["process"]["args"] = w.main()))
                .collect::<Result<Vec<_>>>()?;
            let (next, passed, failures) = (&next, &passed, &failures);
            workers.push(s.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= args.cycles {
                    return;
                }
                let w = WORKLOADS[i % WORKLOADS.len()];
                let id = ctx.new_id();
                match cycle(&mut ctx, &bundles[i % WORKLOADS.len()], w, &id) {
                    Ok(()) => {
                        passed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("cycle {i} {w:?}: {e:#}"));
                        let _ = ctx.rt(&["delete", "--force", &id]);
                    }
                }
            }));
        }
        for w in workers {
            w.join().map_err(|_| anyhow!("a soak worker panicked"))?;
        }
        Ok(())
    })?;
    let leaks = leaks(&before, daemon, &root, pool.is_some());
    let (hits, misses) = pool.map(PoolRun::stop).unwrap_or_default();
    let failures = failures.into_inner().unwrap();
    for f in failures.iter().take(20) {
        eprintln!("# FAIL {f}");
    }
    for l in &leaks {
        eprintln!("# LEAK {l}");
    }
    let pool_note = match args.pool {
        Some(_) => format!(", pool hits {hits}, misses {misses}"),
        None => String::new(),
    };
    println!(
        "soak: {} cycles, {} at a time: {} passed, {} failed, {} leaks, {:.0} s{pool_note}",
        args.cycles,
        args.parallel,
        passed.load(Ordering::Relaxed),
        failures.len(),
        leaks.len(),
        t0.elapsed().as_secs_f64()
    );
    // Nothing may outlive the soak, leaked or not.
    harness::kill_orphans();
    Ok(i32::from(!failures.is_empty() || !leaks.is_empty()))
}

/// One lifecycle, every step checked; ends with the container deleted.
fn cycle(ctx: &mut Ctx, bundle: &Path, w: Workload, id: &str) -> Result<()> {
    if let Workload::Run = w {
        let b = bundle.display().to_string();
        let out = ctx.rt(&["run", "--bundle", &b, id])?;
        ensure!(out.code == Some(3), "run: {}", out.brief());
        ensure!(
            out.stdout.contains("soak-run"),
            "run's stdout: {:?}",
            out.stdout
        );
        // As runc's: without --keep the container is deleted when it ends.
        ensure!(!ctx.rt(&["state", id])?.ok(), "state answers after run");
        return Ok(());
    }
    let created = ctx.create(bundle, id, &[])?;
    ensure!(ctx.status(id)? == "created", "not created after create");
    ctx.start(id)?;
    let stdout = created.out.stdout_path.clone();
    let wait_ready = |what: &str| -> Result<()> {
        let deadline = Instant::now() + ctx.cfg.cmd_timeout;
        while !fs::read_to_string(&stdout)
            .unwrap_or_default()
            .contains(what)
        {
            ensure!(Instant::now() < deadline, "the main never printed {what:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    };
    let code = match w {
        Workload::ExitsSeven => {
            let code = ctx.wait_pid(created.pid)?.code();
            wait_ready("soak-out")?;
            code
        }
        Workload::Terminated => {
            wait_ready("ready")?;
            ensure!(ctx.status(id)? == "running", "not running after start");
            kill(ctx, id, "TERM")?;
            ctx.wait_pid(created.pid)?.code()
        }
        Workload::Killed | Workload::ExecFails | Workload::ExecTty => {
            wait_ready("ready")?;
            ensure!(ctx.status(id)? == "running", "not running after start");
            match w {
                Workload::ExecFails => {
                    let out = ctx.rt(&["exec", id, "sh", "-c", "echo soak-exec; exit 5"])?;
                    ensure!(out.code == Some(5), "exec: {}", out.brief());
                    ensure!(
                        out.stdout.contains("soak-exec"),
                        "exec's stdout: {:?}",
                        out.stdout
                    );
                }
                Workload::ExecTty => exec_on_a_terminal(ctx, id)?,
                _ => {}
            }
            kill(ctx, id, "KILL")?;
            ctx.wait_pid(created.pid)?.code()
        }
        Workload::Run => unreachable!("handled above"),
    };
    let want = match w {
        Workload::ExitsSeven => 7,
        Workload::Terminated => 143,
        _ => 137,
    };
    ensure!(code == want, "the monitor exited {code}, wanted {want}");
    stopped_then_deleted(ctx, id, want)
}

fn kill(ctx: &mut Ctx, id: &str, signal: &str) -> Result<()> {
    let out = ctx.rt(&["kill", id, signal])?;
    ensure!(out.ok(), "kill {signal}: {}", out.brief());
    Ok(())
}

fn stopped_then_deleted(ctx: &mut Ctx, id: &str, code: i32) -> Result<()> {
    let st = ctx.state(id)?;
    ensure!(
        st["status"] == "stopped" && st["exitCode"] == code,
        "state after the exit: {st}"
    );
    let out = ctx.rt(&["delete", id])?;
    ensure!(out.ok(), "delete: {}", out.brief());
    ensure!(
        !ctx.rt(&["state", id])?.ok(),
        "state still answers after delete"
    );
    Ok(())
}

/// `exec -t` with a real terminal as its stdio (as a shell's would be).
fn exec_on_a_terminal(ctx: &mut Ctx, id: &str) -> Result<()> {
    let pty = nix::pty::openpty(None, None)?;
    let mut cmd = Command::new(&ctx.cfg.runtime);
    cmd.arg("--root").arg(&ctx.root).args([
        "exec",
        "-t",
        id,
        "sh",
        "-c",
        "[ -t 0 ] && echo soak-tty; exit 4",
    ]);
    cmd.stdin(Stdio::from(pty.slave.try_clone()?))
        .stdout(Stdio::from(pty.slave.try_clone()?))
        .stderr(Stdio::from(pty.slave.try_clone()?));
    // SAFETY: setsid and TIOCSCTTY are async-signal-safe: the terminal becomes the
    // exec's controlling terminal.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::setsid();
            libc::ioctl(0, libc::TIOCSCTTY, 0);
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("spawning exec -t")?;
    // The command holds copies of the slave: the master reads EOF (EIO) only
    // once the exec's are the last.
    drop(cmd);
    drop(pty.slave);
    let mut master = fs::File::from(pty.master);
    let (tx, output) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 || out.len() > 64 * 1024 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        let _ = tx.send(String::from_utf8_lossy(&out).into_owned());
    });
    let deadline = Instant::now() + ctx.cfg.cmd_timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(anyhow!("exec -t did not end"));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = output
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| anyhow!("the terminal stayed open after exec -t exited"))?;
    ensure!(
        status.code() == Some(4),
        "exec -t exited {status:?}: {out:?}"
    );
    ensure!(out.contains("soak-tty"), "exec -t output: {out:?}");
    Ok(())
}

/// The kit's leaks since `before`, and this soak's own: a state dir or a cgroup of
/// one of its containers left.
fn leaks(before: &Snapshot, daemon: Option<i32>, root: &Path, pooled: bool) -> Vec<String> {
    leaks::leaks(before, daemon, || {
        harness::reap_zombies();
        let mut out = Vec::new();
        let state_dirs = leaks::entries(root, |n| pooled && n == ".pool");
        if !state_dirs.is_empty() {
            out.push(format!("state dirs: {state_dirs:?}"));
        }
        out.extend(leaks::cgroups_named(&ids::prefix(harness::ID_STEM)));
        out
    })
}
