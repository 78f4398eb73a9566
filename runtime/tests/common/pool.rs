//! `krun-oci pool serve` for the end-to-end tests.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::{eventually, Runtime, KRUN_OCI};

/// A pool daemon serving the runtime's root, stopped (SIGTERM) when dropped.
pub struct Pool {
    child: Option<Child>,
    pub root: std::path::PathBuf,
}

impl Pool {
    pub fn serve(rt: &Runtime, idle: u32) -> Pool {
        let log = rt.root.path().join("pool.log");
        let child = Command::new(KRUN_OCI)
            .arg("--root")
            .arg(rt.root.path())
            .arg("--log")
            .arg(&log)
            .args(["pool", "serve", "--min-idle", &idle.to_string()])
            .args(["--max-idle", &idle.to_string(), "--health-interval", "2"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pool = Pool {
            child: Some(child),
            root: rt.root.path().to_owned(),
        };
        pool.wait_idle(idle);
        pool
    }

    /// `pool status`, or `None` while the daemon is not (yet) answering.
    pub fn try_status(&self) -> Option<Value> {
        let out = Command::new(KRUN_OCI)
            .arg("--root")
            .arg(&self.root)
            .args(["pool", "status", "--format", "json"])
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    pub fn status(&self) -> Value {
        self.try_status().expect("the pool daemon answers")
    }

    pub fn wait_idle(&self, n: u32) {
        eventually(
            &format!("{n} idle pooled VMs"),
            Duration::from_secs(120),
            || {
                self.try_status()
                    .is_some_and(|s| s["idle"].as_u64() >= Some(u64::from(n)))
            },
        );
    }

    /// Pids of the members (idle, booting or claimed) the daemon knows.
    pub fn member_pids(&self) -> Vec<i32> {
        self.status()["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["pid"].as_i64().unwrap() as i32)
            .collect()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Waits for the daemon once it was killed.
    pub fn reap(&mut self) {
        let _ = self.child.take().map(|mut c| c.wait());
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.stop();
    }
}
