//! `conformance`: the project's OCI runtime conformance suite. Drives a runtime only through its
//! command line, as runc's clients do; runc is the oracle. See conformance/README.md.
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

mod harness;
mod pool;
mod report;
mod soak;
mod suite;

use harness::{Config, Ctx, Skip, Tracked};
use report::{Outcome, TestResult};

#[derive(Parser)]
#[command(
    name = "conformance",
    about = "OCI runtime conformance suite (runc as the oracle)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Format {
    Tap,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Many lifecycles of mixed workloads (exit 7, TERM, KILL, run, a failing exec, a
    /// tty exec), a few at a time, each checked; then a leak check; one summary line.
    Soak {
        /// The runtime binary.
        #[arg(long)]
        runtime: PathBuf,
        #[arg(long, default_value_t = 1000)]
        cycles: usize,
        /// Lifecycles at once.
        #[arg(long, default_value_t = 2)]
        parallel: usize,
        /// Seconds any one command or wait may take.
        #[arg(long, default_value_t = 180)]
        timeout: u64,
        /// Serve the creates from krun-oci's warm pool of this many idle VMs.
        #[arg(long)]
        pool: Option<u32>,
    },
    /// Print the test names.
    List {
        #[arg(long)]
        filter: Option<String>,
    },
    /// Run the suite against a runtime binary.
    Run {
        /// The runtime binary (runc, krun-oci, ...).
        #[arg(long)]
        runtime: PathBuf,
        /// Name used in the expected-differences list (default: the binary's file name).
        #[arg(long)]
        runtime_name: Option<String>,
        /// Comma-separated patterns: `*` globs, otherwise substrings of the test name.
        #[arg(long)]
        filter: Option<String>,
        #[arg(long, value_enum, default_value = "tap")]
        format: Format,
        /// Also write the JSON results here (with --format tap).
        #[arg(long)]
        json_out: Option<PathBuf>,
        /// Exit 0 iff every failure is listed here for this runtime.
        #[arg(long)]
        expected_failures: Option<PathBuf>,
        /// The static in-container checker (default: next to this binary's target dir).
        #[arg(long, env = "CONFORMANCE_CHECKER")]
        checker: Option<PathBuf>,
        /// Seconds one runtime command may take (a VM boot is slow under TCG).
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Seconds one test may take in all.
        #[arg(long, default_value_t = 240)]
        test_timeout: u64,
        /// First run one trivial container; if that fails, tests that need a container fail at
        /// once with its reason (keeps a run against a runtime that cannot boot short).
        #[arg(long)]
        preflight: bool,
        /// Run krun-oci's warm pool with this many idle VMs for the whole suite
        /// (all tests then share one --root, the pool's).
        #[arg(long)]
        pool: Option<u32>,
    },
    /// Side-by-side Markdown table from two JSON result files.
    Compare {
        #[arg(long)]
        oracle: PathBuf,
        #[arg(long)]
        subject: PathBuf,
        #[arg(long)]
        expected: PathBuf,
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

fn selected(filter: Option<&str>) -> Vec<suite::Test> {
    let pats: Vec<&str> = filter
        .map(|f| f.split(',').filter(|p| !p.is_empty()).collect())
        .unwrap_or_default();
    suite::all()
        .into_iter()
        .filter(|t| {
            pats.is_empty()
                || pats.iter().any(|p| {
                    if p.contains('*') {
                        report::glob(p, t.name)
                    } else {
                        t.name.contains(p)
                    }
                })
        })
        .collect()
}

/// The checker: explicit, else target/x86_64-unknown-linux-gnu/release/ beside this binary's
/// target dir. Only a static one can run in the busybox rootfs.
fn find_checker(explicit: Option<PathBuf>) -> Option<PathBuf> {
    let candidates: Vec<PathBuf> = match explicit {
        Some(p) => vec![p],
        None => {
            let exe = std::env::current_exe().ok()?;
            let target = exe.parent()?.parent()?.to_path_buf();
            vec![
                target.join("x86_64-unknown-linux-gnu/release/conformance-checker"),
                target.join("x86_64-unknown-linux-gnu/debug/conformance-checker"),
            ]
        }
    };
    candidates
        .into_iter()
        .find(|p| is_static(p))
        .and_then(|p| std::fs::canonicalize(p).ok())
}

/// No PT_INTERP program header means nothing to load: good enough for a busybox rootfs.
fn is_static(p: &Path) -> bool {
    let Ok(b) = std::fs::read(p) else {
        return false;
    };
    let u16_at = |o: usize| {
        b.get(o..o + 2)
            .map(|s| u16::from_le_bytes([s[0], s[1]]) as usize)
    };
    let u64_at = |o: usize| {
        b.get(o..o + 8)
            .map(|s| u64::from_le_bytes(s.try_into().unwrap_or([0; 8])) as usize)
    };
    // 64-bit little-endian ELF only (x86_64).
    if !b.starts_with(b"\x7fELF\x02\x01") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        b.get(o..o + 4) != Some(&3u32.to_le_bytes()[..])
    })
}

/// The test in progress, for the interrupt handler: (its temp dir, what it created).
type Current = Arc<Mutex<Option<(PathBuf, Arc<Mutex<Tracked>>)>>>;

/// On SIGINT/SIGTERM/SIGHUP: clean up the test in progress (delete --force, kill orphans: VMs
/// included) before exiting, so an interrupted run leaves nothing behind either.
fn cleanup_on_signal(cfg: Arc<Config>, current: Current) -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            eprintln!("# interrupted (signal {sig}): cleaning up");
            if let Some((dir, track)) = current.lock().unwrap().take() {
                harness::cleanup(&cfg, &cfg.state_root(&dir), &dir, &track);
                let _ = std::fs::remove_dir_all(&dir);
            }
            harness::kill_orphans();
            std::process::exit(128 + sig);
        }
    });
    Ok(())
}

fn run_one(
    cfg: &Arc<Config>,
    t: &suite::Test,
    test_timeout: Duration,
    current: &Current,
) -> TestResult {
    let t0 = Instant::now();
    let tmp = match tempfile::Builder::new().prefix("conf-").tempdir() {
        Ok(d) => d,
        Err(e) => {
            return TestResult {
                name: t.name.into(),
                outcome: Outcome::Fail(format!("tempdir: {e}")),
                millis: 0,
            }
        }
    };
    let track = Arc::new(Mutex::new(Tracked::default()));
    *current.lock().unwrap() = Some((tmp.path().to_path_buf(), track.clone()));
    let (tx, rx) = mpsc::channel();
    let (cfg2, dir, track2, f) = (cfg.clone(), tmp.path().to_path_buf(), track.clone(), t.run);
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut ctx = Ctx::new(cfg2, dir, track2)?;
            f(&mut ctx)
        }));
        let _ = tx.send(r);
    });
    let outcome = match rx.recv_timeout(test_timeout) {
        Ok(Ok(Ok(()))) => Outcome::Pass,
        Ok(Ok(Err(e))) => match e.downcast_ref::<Skip>() {
            Some(s) => Outcome::Skip(s.0.clone()),
            None => Outcome::Fail(format!("{e:#}")),
        },
        Ok(Err(_)) => Outcome::Fail("the test panicked".into()),
        Err(_) => Outcome::Fail(format!("test timed out after {test_timeout:?}")),
    };
    // The interrupt handler takes the test over if it got here first.
    if current.lock().unwrap().take().is_none() {
        std::thread::park();
    }
    // Every test ran the runtime with `--log F --log-format json`, as containerd does.
    let outcome = match (
        outcome,
        harness::check_log_lines(&tmp.path().join(harness::RUNTIME_LOG)),
    ) {
        (Outcome::Pass, Err(e)) => Outcome::Fail(format!("--log: {e:#}")),
        (o, _) => o,
    };
    let notes = harness::cleanup(cfg, &cfg.state_root(tmp.path()), tmp.path(), &track);
    for n in notes {
        eprintln!("# cleanup {}: {n}", t.name);
    }
    TestResult {
        name: t.name.into(),
        outcome,
        millis: t0.elapsed().as_millis(),
    }
}

#[allow(clippy::too_many_arguments)]
fn run(
    runtime: PathBuf,
    runtime_name: Option<String>,
    filter: Option<String>,
    format: Format,
    json_out: Option<PathBuf>,
    expected: Option<PathBuf>,
    checker: Option<PathBuf>,
    timeout: u64,
    test_timeout: u64,
    preflight: bool,
    pool: Option<u32>,
) -> Result<i32> {
    let runtime = std::fs::canonicalize(&runtime)
        .with_context(|| format!("runtime {}", runtime.display()))?;
    let name = runtime_name.unwrap_or_else(|| {
        runtime
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    let exp = match &expected {
        Some(p) => Some(report::load_expected(p)?),
        None => None,
    };
    harness::become_subreaper()?;
    let checker = find_checker(checker);
    if checker.is_none() {
        eprintln!(
            "# no static conformance-checker found: the process/config/mounts tests will skip"
        );
    }
    let current: Current = Arc::new(Mutex::new(None));
    let mut cfg = Config {
        runtime,
        checker,
        cmd_timeout: Duration::from_secs(timeout),
        preflight_error: None,
        shared_root: None,
    };
    let pool = match pool {
        Some(n) => {
            let p = pool::PoolRun::start(&cfg.runtime, n)?;
            cfg.shared_root = Some(p.root());
            Some(p)
        }
        None => None,
    };
    cleanup_on_signal(Arc::new(cfg.clone()), current.clone())?;
    if preflight {
        let pre = suite::Test {
            name: "preflight",
            run: suite::preflight,
        };
        let arc = Arc::new(cfg);
        let r = run_one(&arc, &pre, Duration::from_secs(test_timeout), &current);
        cfg = (*arc).clone();
        match r.outcome {
            Outcome::Pass => eprintln!("# preflight: a trivial container ran ({} ms)", r.millis),
            Outcome::Fail(e) | Outcome::Skip(e) => {
                eprintln!("# preflight failed, container tests will fail at once: {e}");
                cfg.preflight_error = Some(e);
            }
        }
    }
    let cfg = Arc::new(cfg);
    let tests = selected(filter.as_deref());
    if tests.is_empty() {
        bail!("no test matches the filter");
    }
    let mut out = std::io::stdout().lock();
    if format == Format::Tap {
        writeln!(out, "TAP version 13\n1..{}", tests.len())?;
    }
    let mut results = Vec::new();
    for (i, t) in tests.iter().enumerate() {
        if let Some(p) = &pool {
            p.wait_full();
        }
        let r = run_one(&cfg, t, Duration::from_secs(test_timeout), &current);
        if format == Format::Tap {
            let e = exp
                .as_deref()
                .and_then(|e| report::lookup(e, &name, &r.name));
            writeln!(out, "{}", report::tap_line(i + 1, &r, e))?;
            out.flush()?;
        }
        results.push(r);
    }
    if let Some(p) = pool {
        let (hits, misses) = p.stop();
        eprintln!("# pool: {hits} creates on a pooled VM, {misses} misses (cold boots)");
    }
    harness::kill_orphans();
    let mut json = report::to_json(&name, &results, exp.as_deref());
    if preflight {
        json["preflight"] = match &cfg.preflight_error {
            None => serde_json::json!("ok"),
            Some(e) => serde_json::json!(e),
        };
    }
    if let Some(p) = json_out {
        std::fs::write(&p, serde_json::to_vec_pretty(&json)?)?;
    }
    let s = report::summarize(&results, exp.as_deref(), &name);
    if format == Format::Json {
        writeln!(out, "{}", serde_json::to_string_pretty(&json)?)?;
    }
    let code = if exp.is_some() {
        if format == Format::Tap {
            writeln!(
                out,
                "# {} failures listed as expected for {name}; unexpected: {:?}",
                s.expected_failures, s.unexpected_failures
            )?;
            if !s.listed_but_passing.is_empty() {
                writeln!(
                    out,
                    "# listed but now passing (shrink the list): {:?}",
                    s.listed_but_passing
                )?;
            }
            // Expected failures count as skipped so the closing line reads as CI should judge it.
            writeln!(
                out,
                "{} passed, {} failed, {} skipped",
                s.passed,
                s.unexpected_failures.len(),
                s.skipped + s.expected_failures
            )?;
        }
        // The list only shrinks: a listed test that passes fails the run until its
        // line goes; a skipped test (no VM, no checker) tested nothing.
        if format == Format::Tap && s.skipped > 0 {
            writeln!(
                out,
                "# {} tests skipped: a run against the list must run them all",
                s.skipped
            )?;
        }
        i32::from(
            !s.unexpected_failures.is_empty() || !s.listed_but_passing.is_empty() || s.skipped > 0,
        )
    } else {
        if format == Format::Tap {
            if s.skipped > 0 {
                writeln!(
                    out,
                    "{} passed, {} failed, {} skipped",
                    s.passed, s.failed, s.skipped
                )?;
            } else {
                writeln!(out, "{} passed, {} failed", s.passed, s.failed)?;
            }
        }
        i32::from(s.failed > 0)
    };
    Ok(code)
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::List { filter } => {
            for t in selected(filter.as_deref()) {
                println!("{}", t.name);
            }
            Ok(0)
        }
        Cmd::Run {
            runtime,
            runtime_name,
            filter,
            format,
            json_out,
            expected_failures,
            checker,
            timeout,
            test_timeout,
            preflight,
            pool,
        } => run(
            runtime,
            runtime_name,
            filter,
            format,
            json_out,
            expected_failures,
            checker,
            timeout,
            test_timeout,
            preflight,
            pool,
        ),
        Cmd::Soak {
            runtime,
            cycles,
            parallel,
            timeout,
            pool,
        } => soak::soak(soak::SoakArgs {
            runtime,
            cycles,
            parallel,
            timeout: Duration::from_secs(timeout),
            pool,
        }),
        Cmd::Compare {
            oracle,
            subject,
            expected,
            output,
        } => (|| {
            let read = |p: &Path| -> Result<serde_json::Value> {
                Ok(serde_json::from_str(&std::fs::read_to_string(p)?)?)
            };
            let md = report::compare_markdown(
                &read(&oracle)?,
                &read(&subject)?,
                &report::load_expected(&expected)?,
            )?;
            match output {
                Some(p) => std::fs::write(p, md)?,
                None => print!("{md}"),
            }
            Ok(0)
        })(),
    };
    match r {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("conformance: {e:#}");
            std::process::exit(2);
        }
    }
}
