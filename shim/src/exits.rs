//! Exit statuses of the shim's children.
//!
//! The shim is a subreaper: the containerd-shim crate's SIGCHLD handler reaps
//! every child (VM monitors, exec relays, and whatever gets orphaned to us) and
//! publishes `(pid, status)` on its monitor bus. This module keeps every status it
//! sees, so a waiter that registers after the process already died (a monitor
//! that failed fast, a `krun-oci exec --detach` that returned before we looked)
//! still gets it — nobody calls `waitpid` itself, which would race the reaper.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

use containerd_shim::monitor::{ExitEvent, Subject, Topic};

/// How a process ended: its status (`128+signal` when killed) and when we saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub status: u32,
    pub at: SystemTime,
}

#[derive(Default)]
pub struct Exits {
    seen: Mutex<HashMap<i32, Exit>>,
    changed: Condvar,
}

impl Exits {
    /// Subscribes to the reaper's bus. Call before the first child is spawned.
    pub fn start() -> Arc<Self> {
        let exits = Arc::new(Self::default());
        match containerd_shim::monitor::monitor_subscribe(Topic::Pid) {
            Ok(sub) => {
                let e = exits.clone();
                std::thread::Builder::new()
                    .name("exits".into())
                    .spawn(move || {
                        while let Ok(ExitEvent { subject, exit_code }) = sub.rx.recv() {
                            if let Subject::Pid(pid) = subject {
                                e.record(pid, exit_code);
                            }
                        }
                    })
                    .expect("spawning the exits thread");
            }
            Err(e) => log::error!("cannot subscribe to child exits: {e}"),
        }
        exits
    }

    pub fn record(&self, pid: i32, status: i32) {
        let exit = Exit {
            status: (status & 0xff) as u32,
            at: SystemTime::now(),
        };
        self.seen.lock().unwrap().insert(pid, exit);
        self.changed.notify_all();
    }

    pub fn get(&self, pid: i32) -> Option<Exit> {
        self.seen.lock().unwrap().get(&pid).copied()
    }

    /// Waits for `pid` to exit.
    pub fn wait(&self, pid: i32) -> Exit {
        let mut seen = self.seen.lock().unwrap();
        loop {
            if let Some(e) = seen.get(&pid) {
                return *e;
            }
            seen = self.changed.wait(seen).unwrap();
        }
    }

    /// Waits for `pid` at most `timeout`; `None` if it is still running.
    pub fn wait_timeout(&self, pid: i32, timeout: Duration) -> Option<Exit> {
        let seen = self.seen.lock().unwrap();
        let (seen, _) = self
            .changed
            .wait_timeout_while(seen, timeout, |s| !s.contains_key(&pid))
            .unwrap();
        seen.get(&pid).copied()
    }

    /// Drops what is known about `pid` (once nobody will ask again; pids are reused).
    pub fn forget(&self, pid: i32) {
        self.seen.lock().unwrap().remove(&pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiter_that_comes_late_still_gets_the_status() {
        let exits = Arc::new(Exits::default());
        exits.record(42, 137);
        assert_eq!(exits.wait(42).status, 137);
        assert_eq!(exits.wait_timeout(43, Duration::from_millis(1)), None);
        let e = exits.clone();
        let waiter = std::thread::spawn(move || e.wait(43).status);
        exits.record(43, 3);
        assert_eq!(waiter.join().unwrap(), 3);
        exits.forget(43);
        assert_eq!(exits.get(43), None);
    }
}
