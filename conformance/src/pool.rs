//! `run --pool N`: the suite against krun-oci with its warm pool serving the
//! one root all tests share; each test starts with the pool full again, so its
//! first creates take pooled VMs, and the run reports hits and misses.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub struct PoolRun {
    runtime: PathBuf,
    dir: tempfile::TempDir,
    idle: u32,
    daemon: Child,
}

impl PoolRun {
    pub fn start(runtime: &Path, idle: u32) -> Result<PoolRun> {
        let dir = tempfile::Builder::new().prefix("conf-pool-").tempdir()?;
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root)?;
        let daemon = Command::new(runtime)
            .arg("--root")
            .arg(&root)
            .arg("--log")
            .arg(dir.path().join("pool.log"))
            .args(["pool", "serve", "--min-idle", &idle.to_string()])
            .args(["--max-idle", &idle.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {} pool serve", runtime.display()))?;
        crate::harness::POOL_DAEMON.store(daemon.id() as i32, std::sync::atomic::Ordering::Relaxed);
        let run = PoolRun {
            runtime: runtime.to_owned(),
            dir,
            idle,
            daemon,
        };
        let t0 = Instant::now();
        while run
            .status()
            .is_none_or(|s| s["idle"].as_u64() < Some(u64::from(idle)))
        {
            if t0.elapsed() > Duration::from_secs(180) {
                bail!(
                    "the pool did not fill within 180 s: {}",
                    std::fs::read_to_string(run.dir.path().join("pool.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!(
            "# pool: {idle} idle VMs after {} ms",
            t0.elapsed().as_millis()
        );
        Ok(run)
    }

    pub fn daemon_pid(&self) -> i32 {
        self.daemon.id() as i32
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn status(&self) -> Option<Value> {
        let out = Command::new(&self.runtime)
            .arg("--root")
            .arg(self.root())
            .args(["pool", "status", "--format", "json"])
            .stdin(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Waits (bounded) until the pool is full again.
    pub fn wait_full(&self) {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) {
            if self
                .status()
                .is_some_and(|s| s["idle"].as_u64() >= Some(u64::from(self.idle)))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("# pool: not full again within 30 s");
    }

    /// Stops the daemon; returns (hits, misses).
    pub fn stop(mut self) -> (u64, u64) {
        let counts = self
            .status()
            .map(|s| {
                (
                    s["hits"].as_u64().unwrap_or(0),
                    s["misses"].as_u64().unwrap_or(0),
                )
            })
            .unwrap_or_default();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.daemon.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.daemon.wait();
        crate::harness::POOL_DAEMON.store(0, std::sync::atomic::Ordering::Relaxed);
        counts
    }
}
