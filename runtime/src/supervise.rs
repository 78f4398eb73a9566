//! Host process supervision, a leaf under every module that starts or watches
//! processes (the monitor, the VMM backends, the pool, exec): facts from /proc,
//! pidfds, helpers that die with their spawner, detached children that report
//! on a sync pipe, and the tail of a child's log.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{IoContext, Result};

/// Env var naming the fd of the pipe on which the monitor reports to `create`.
pub const SYNC_FD_ENV: &str = "KRUN_OCI_SYNC_FD";

/// Start time (clock ticks since boot, field 22 of /proc/PID/stat), or `None`
/// if the process does not exist.
pub fn start_time(pid: i32) -> Option<u64> {
    if pid <= 0 {
        return None;
    }
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: skip past the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // rest starts at field 3 (state); field 22 is the 20th after it.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Process state letter (field 3), e.g. 'Z' for a zombie.
pub fn state_letter(pid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

/// True if `pid` still runs the same process that had `start_time` (and is not a zombie).
pub fn is_alive(pid: i32, start: u64) -> bool {
    start_time(pid) == Some(start) && state_letter(pid) != Some('Z')
}

/// A pidfd for `pid` (`None` on kernels without pidfd_open, or if it is gone).
pub fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes no pointers; it returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: fd is a fresh descriptor nothing else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A child spawned from a thread of its own that then waits for it. With
/// [`supervised`]'s parent-death signal, which fires when the spawning *thread*
/// ends, the child lives exactly as long as it is watched.
pub struct WaitedChild {
    pub pid: i32,
    pidfd: Option<OwnedFd>,
    /// `Some` once reaped: the status, or `None` if waiting failed.
    exit: Arc<Mutex<Option<Option<ExitStatus>>>>,
    waiter: Option<JoinHandle<()>>,
}

impl WaitedChild {
    /// Spawns `cmd` from a thread named `name`.
    pub fn spawn(name: &str, mut cmd: Command) -> std::io::Result<WaitedChild> {
        let exit = Arc::new(Mutex::new(None));
        let thread_exit = exit.clone();
        let (tx, rx) = mpsc::channel::<std::io::Result<u32>>();
        let waiter = std::thread::Builder::new()
            .name(name.chars().take(15).collect())
            .spawn(move || {
                let mut child = match cmd.spawn() {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let _ = tx.send(Ok(child.id()));
                let status = child.wait().ok();
                *thread_exit.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
            })?;
        let pid = match rx.recv() {
            Ok(Ok(pid)) => pid as i32,
            Ok(Err(e)) => {
                let _ = waiter.join();
                return Err(e);
            }
            Err(_) => {
                let _ = waiter.join();
                return Err(std::io::Error::other("the waiter thread died during spawn"));
            }
        };
        Ok(WaitedChild {
            pid,
            pidfd: pidfd_open(pid),
            exit,
            waiter: Some(waiter),
        })
    }

    /// Non-blocking: `Some` once the child was reaped (`Some(None)`: waiting failed).
    pub fn exit(&mut self) -> Option<Option<ExitStatus>> {
        let exit = *self.exit.lock().unwrap_or_else(|e| e.into_inner());
        if exit.is_some() {
            self.join();
        }
        exit
    }

    /// SIGKILL unless already reaped, then waits for the reaping.
    pub fn kill(&mut self) {
        if self.exit().is_none() {
            match &self.pidfd {
                // SAFETY: pidfd_send_signal on our own pidfd with no siginfo; it
                // fails harmlessly once the child is reaped.
                Some(fd) => unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        fd.as_raw_fd(),
                        libc::SIGKILL,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    );
                },
                // No pidfd (kernel < 5.3): the waiter records the exit right after
                // reaping, so the pid can only have been reused within that window.
                None => {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(self.pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        self.join();
    }

    fn join(&mut self) {
        if let Some(t) = self.waiter.take() {
            let _ = t.join();
        }
    }
}

impl Drop for WaitedChild {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `child` until it exits or `limit` passes.
pub fn wait_timeout(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let t0 = Instant::now();
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if t0.elapsed() >= limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Last `max` bytes of a file, lossily decoded.
pub(crate) fn tail(path: &Path, max: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max as u64)));
    let mut buf = Vec::new();
    let _ = f.take(max as u64).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Prepares a VMM or helper process: stdout/stderr to `log`, no stdin, its own
/// process group, and `PR_SET_PDEATHSIG(SIGKILL)` so it dies with the spawning
/// thread (spawn it from a thread that lives as long as the VM).
pub(crate) fn supervised(
    cmd: &mut std::process::Command,
    log: &std::path::Path,
) -> crate::Result<()> {
    use std::os::unix::process::CommandExt;
    let out = std::fs::File::create(log).ctx(|| format!("create {}", log.display()))?;
    let err = out.try_clone().ctx(|| "dup log fd".into())?;
    cmd.stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls (prctl, getppid) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("parent exited during spawn"));
            }
            Ok(())
        });
    }
    Ok(())
}

/// Makes `cmd` a detached child (its own session) that reports on a sync pipe:
/// returns the read end; the write end reaches the child as the fd named by
/// [`SYNC_FD_ENV`]. Used for the VM monitor and the detached exec relay.
pub fn detached_with_sync_pipe(cmd: &mut std::process::Command) -> Result<(OwnedFd, OwnedFd)> {
    use std::os::unix::process::CommandExt;
    let (read_end, write_end) = nix::unistd::pipe()?;
    let write_fd = write_end.as_raw_fd();
    cmd.env(SYNC_FD_ENV, write_fd.to_string());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            // Let the sync pipe's write end survive exec.
            let flags = libc::fcntl(write_fd, libc::F_GETFD);
            libc::fcntl(write_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            Ok(())
        });
    }
    // The caller drops the write end once the child is spawned.
    Ok((read_end, write_end))
}

/// Takes the sync pipe's write end from the environment.
pub(crate) fn take_sync_pipe() -> Option<File> {
    take_inherited_fd(SYNC_FD_ENV).map(File::from)
}

/// Takes an fd our parent passed us, named by the environment variable `env`
/// (removed), and keeps it out of every process we spawn.
pub(crate) fn take_inherited_fd(env: &str) -> Option<OwnedFd> {
    let fd: i32 = std::env::var(env).ok()?.parse().ok()?;
    std::env::remove_var(env);
    // SAFETY: the parent passed this fd for exactly this purpose; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let _ = nix::fcntl::fcntl(
        &fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    Some(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive() {
        let me = std::process::id() as i32;
        let st = start_time(me).unwrap();
        assert!(is_alive(me, st));
        assert!(!is_alive(me, st + 1));
        assert!(!is_alive(0, st));
        assert_eq!(start_time(-5), None);
    }

    #[test]
    fn tail_keeps_the_end() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("log");
        fs::write(&f, "0123456789").unwrap();
        assert_eq!(tail(&f, 4), "6789");
        assert_eq!(tail(&f, 100), "0123456789");
        assert_eq!(tail(&d.path().join("none"), 4), "");
    }

    #[test]
    fn a_waited_child_is_reaped_and_killed() {
        let mut done = WaitedChild::spawn("t", {
            let mut c = Command::new("sh");
            c.args(["-c", "exit 3"]);
            c
        })
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = done.exit() {
                break s.unwrap();
            }
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(status.code(), Some(3));
        let mut sleeper = WaitedChild::spawn("t", {
            let mut c = Command::new("sleep");
            c.arg("60");
            c
        })
        .unwrap();
        assert!(sleeper.exit().is_none());
        sleeper.kill();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            sleeper.exit().unwrap().unwrap().signal(),
            Some(libc::SIGKILL)
        );
        assert!(WaitedChild::spawn("t", Command::new("/no/such/program")).is_err());
    }

    #[test]
    fn a_pidfd_for_a_live_process_only() {
        assert!(pidfd_open(std::process::id() as i32).is_some());
        assert!(pidfd_open(-1).is_none());
    }
}
