//! The single reaper of guest-init.
//!
//! Design: *reap all and dispatch*. Only the reaper thread calls `waitpid`, and
//! only while it holds the registry lock. Every spawn (main and exec sessions)
//! holds that same lock from before the fork until the new pid is registered, so:
//! - a child that exits at once is never reaped before its waiter is registered
//!   (its status goes to its handler: `exec -- false` reports 1, never a stolen 0);
//! - std's own `waitpid` on a failed exec (inside `Command::spawn`) cannot race
//!   with the reaper;
//! - everything unregistered (orphans reparented to PID 1) is reaped and dropped.
//!
//! We chose this over a `waitid(P_ALL, WNOWAIT)` peek because a peek returns the
//! same unreaped managed zombie again and again until its handler collects it,
//! which stalls orphan reaping behind it.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};

/// The container-visible exit code of a wait status: WEXITSTATUS, or 128+signal.
pub fn exit_code(status: &WaitStatus) -> Option<i32> {
    match *status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}

/// Waiters for managed children, by pid.
#[derive(Default)]
pub struct Registry {
    waiters: HashMap<i32, Sender<i32>>,
}

impl Registry {
    /// Registers `pid` as managed; its exit code arrives on the returned channel.
    pub fn register(&mut self, pid: i32) -> Receiver<i32> {
        let (tx, rx) = mpsc::channel();
        self.waiters.insert(pid, tx);
        rx
    }
}

#[derive(Default)]
pub struct Reaper {
    registry: Mutex<Registry>,
}

impl Reaper {
    /// Takes the registry lock. Hold it across a spawn and register the pid before
    /// releasing it.
    pub fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reaps every exited child, handing managed ones' codes to their waiters.
    pub fn reap_all(&self) {
        let mut reg = self.lock();
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
                Ok(WaitStatus::StillAlive) => break,
                Ok(status) => {
                    let (Some(pid), Some(code)) = (status.pid(), exit_code(&status)) else {
                        continue;
                    };
                    match reg.waiters.remove(&pid.as_raw()) {
                        Some(tx) => {
                            let _ = tx.send(code);
                        }
                        None => log::debug!("reaped orphan {pid} ({code})"),
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(_) => break, // ECHILD: nothing left to wait for
            }
        }
    }

    /// Runs forever: reap, then sleep until SIGCHLD (blocked in every thread by
    /// [`block_sigchld`]) or a timeout, whichever comes first.
    pub fn run(&self) -> ! {
        let mut set = SigSet::empty();
        set.add(Signal::SIGCHLD);
        loop {
            self.reap_all();
            wait_signal(&set, Duration::from_millis(500));
        }
    }
}

/// Blocks SIGCHLD in the calling thread (call before starting threads so all
/// inherit it). Children get a clean mask: `Command` resets it before exec.
pub fn block_sigchld() {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None);
}

fn wait_signal(set: &SigSet, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: valid pointers to a sigset and a timespec; the siginfo is optional.
    unsafe {
        libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &ts);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::unistd::Pid;

    #[test]
    fn codes() {
        let p = Pid::from_raw(5);
        assert_eq!(exit_code(&WaitStatus::Exited(p, 0)), Some(0));
        assert_eq!(exit_code(&WaitStatus::Exited(p, 7)), Some(7));
        assert_eq!(
            exit_code(&WaitStatus::Signaled(p, Signal::SIGKILL, false)),
            Some(137)
        );
        assert_eq!(
            exit_code(&WaitStatus::Signaled(p, Signal::SIGTERM, true)),
            Some(143)
        );
        assert_eq!(exit_code(&WaitStatus::StillAlive), None);
    }

    #[test]
    #[allow(clippy::zombie_processes)] // the reaper under test collects it
    fn registered_child_gets_its_own_code() {
        use std::os::unix::process::CommandExt;
        let reaper = Reaper::default();
        let mut reg = reaper.lock();
        let child = std::process::Command::new("/bin/sh")
            .args(["-c", "exit 3"])
            .process_group(0)
            .spawn()
            .unwrap();
        let rx = reg.register(child.id() as i32);
        drop(reg);
        let code = loop {
            reaper.reap_all();
            if let Ok(c) = rx.recv_timeout(Duration::from_millis(50)) {
                break c;
            }
        };
        assert_eq!(code, 3);
    }
}
