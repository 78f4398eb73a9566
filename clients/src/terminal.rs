//! A client on a terminal of the test's own (what `ctr run -t`, `ctr task exec
//! -t`, `podman run -it` and `podman exec -t` want): a pty whose slave is the
//! client's controlling terminal and stdio, whose master the test reads (the
//! screen) and writes (keys).
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use krun_oci_testkit::wait::Poll;
use nix::pty::{openpty, Winsize};

use crate::command::{kill_group, wait_until, COMMAND_LIMIT};

/// How long the screen may stay open after the client exited (its last output
/// still on the way).
const DRAIN: Duration = Duration::from_secs(10);

pub struct Terminal {
    child: Option<Child>,
    deadline: Instant,
    keys: File,
    screen: Arc<Mutex<Vec<u8>>>,
    closed: Arc<(Mutex<bool>, std::sync::Condvar)>,
}

impl Terminal {
    /// Spawns `cmd` as a session leader with a fresh 120x30 terminal as its
    /// controlling terminal and stdio: the client is the terminal's foreground
    /// process group, as under a shell.
    pub fn spawn(cmd: &mut Command) -> Result<Terminal> {
        let size = Winsize {
            ws_row: 30,
            ws_col: 120,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = openpty(Some(&size), None).context("openpty")?;
        cmd.stdin(Stdio::from(pty.slave.try_clone()?))
            .stdout(Stdio::from(pty.slave.try_clone()?))
            .stderr(Stdio::from(pty.slave.try_clone()?));
        // SAFETY: setsid and ioctl are async-signal-safe; the new session takes
        // the slave (stdin by now) as its controlling terminal.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let spawned = cmd.spawn();
        // Every copy of the slave in this process must go, or the master never
        // reads EOF (EIO) once the client and its children have closed theirs.
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        drop(pty.slave);
        let child = spawned.context("spawning the client on a terminal")?;
        let master = File::from(pty.master);
        let keys = master.try_clone()?;
        let screen = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let (screen_w, closed_w) = (screen.clone(), closed.clone());
        thread::spawn(move || {
            let mut master = master;
            let mut buf = [0u8; 4096];
            while let Ok(n) = master.read(&mut buf) {
                if n == 0 {
                    break;
                }
                screen_w.lock().unwrap().extend_from_slice(&buf[..n]);
            }
            *closed_w.0.lock().unwrap() = true;
            closed_w.1.notify_all();
        });
        Ok(Terminal {
            child: Some(child),
            deadline: Instant::now() + COMMAND_LIMIT,
            keys,
            screen,
            closed,
        })
    }

    /// Everything the terminal showed so far (escape sequences included).
    pub fn screen(&self) -> String {
        String::from_utf8_lossy(&self.screen.lock().unwrap()).into_owned()
    }

    /// Whether the screen showed `text` within `poll`.
    pub fn shows(&self, text: &str, poll: Poll) -> bool {
        poll.until(|| self.screen().contains(text))
    }

    /// Types `line` and Enter.
    pub fn type_line(&mut self, line: &str) -> Result<()> {
        self.keys
            .write_all(format!("{line}\r").as_bytes())
            .context("typing on the terminal")
    }

    /// The client's exit code if it exits within `poll`; else None (still running).
    pub fn exit_within(&mut self, poll: Poll) -> Option<i32> {
        let child = self.child.as_mut()?;
        let mut code = None;
        poll.until(|| {
            code = child
                .try_wait()
                .ok()
                .flatten()
                .map(crate::command::shell_code);
            code.is_some()
        });
        if code.is_some() {
            self.child = None;
            self.drain();
        }
        code
    }

    /// The client's exit code (bounded by the command limit) and the whole screen.
    pub fn wait(mut self) -> (i32, String) {
        let code = match self.child.take() {
            Some(mut child) => wait_until(&mut child, self.deadline),
            None => 127,
        };
        self.drain();
        (code, self.screen())
    }

    /// Waits (bounded) for the screen's last output: the master's EOF.
    fn drain(&self) {
        let (closed, cv) = &*self.closed;
        let guard = closed.lock().unwrap();
        let _ = cv.wait_timeout_while(guard, DRAIN, |closed| !*closed);
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_group(&mut child);
        }
    }
}
