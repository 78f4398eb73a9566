//! External commands, each bounded by a timeout: a hung client fails its
//! scenario instead of the run. The limit is generous (a TCG boot is slow, and
//! the first one may build the guest image): it is not a performance assertion.
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long any one client command may run.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(600);

/// What a finished command gave.
#[derive(Debug, Default)]
pub struct Ran {
    /// The exit code as a shell reports it: 128+N when killed by signal N, 124
    /// when it ran past its limit (as timeout(1)), 127 when it could not start.
    pub code: i32,
    pub stdout: String,
    /// Empty where [`combined`] merged it into `stdout`.
    pub stderr: String,
}

impl Ran {
    pub fn ok(&self) -> bool {
        self.code == 0
    }

    /// stdout without its trailing newlines, as `$(...)` gives it.
    pub fn text(&self) -> &str {
        self.stdout.trim_end_matches('\n')
    }
}

/// A shell's exit code for `status`.
pub fn shell_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(255)
}

/// Runs `cmd` (stdin from /dev/null) with stdout and stderr apart.
pub fn output(cmd: &mut Command) -> Ran {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    run(cmd, |child| {
        vec![read_all(child.stdout.take()), read_all(child.stderr.take())]
    })
}

/// Runs `cmd` with stderr into stdout (`2>&1`): one stream, in the order written.
pub fn combined(cmd: &mut Command) -> Ran {
    let (read, write) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => return could_not_start(&e.into()),
    };
    let stderr = match write.try_clone() {
        Ok(w) => w,
        Err(e) => return could_not_start(&e),
    };
    cmd.stdout(write).stderr(stderr);
    let mut read = Some(std::fs::File::from(read));
    run(cmd, move |_| vec![read_all(read.take())])
}

fn could_not_start(e: &std::io::Error) -> Ran {
    Ran {
        code: 127,
        stderr: e.to_string(),
        ..Ran::default()
    }
}

/// Spawns `cmd` in its own process group (killed whole on expiry), starts the
/// readers `readers` makes, and waits for the exit and the readers' EOF, all
/// within [`COMMAND_LIMIT`].
fn run(cmd: &mut Command, readers: impl FnOnce(&mut Child) -> Vec<mpsc::Receiver<String>>) -> Ran {
    cmd.stdin(Stdio::null()).process_group(0);
    let spawned = cmd.spawn();
    // The command holds our copies of its stdio: the pipes reach EOF only once
    // the child's are the last.
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return could_not_start(&e),
    };
    let deadline = Instant::now() + COMMAND_LIMIT;
    let streams = readers(&mut child);
    let code = wait_until(&mut child, deadline);
    let mut texts = streams
        .into_iter()
        .map(|r| r.recv_timeout(deadline.saturating_duration_since(Instant::now())));
    let stdout = texts.next().and_then(Result::ok).unwrap_or_default();
    let stderr = texts.next().and_then(Result::ok).unwrap_or_default();
    Ran {
        code,
        stdout,
        stderr,
    }
}

/// A reader thread for `stream` that sends everything it read at EOF.
fn read_all(stream: Option<impl Read + Send + 'static>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut stream) = stream {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = stream.read_to_end(&mut bytes);
            let _ = tx.send(String::from_utf8_lossy(&bytes).into_owned());
        });
    } else {
        let _ = tx.send(String::new());
    }
    rx
}

/// Waits for `child` until `deadline`; past it, SIGKILLs its process group and
/// answers 124.
pub fn wait_until(child: &mut Child, deadline: Instant) -> i32 {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return shell_code(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            _ => {
                kill_group(child);
                return 124;
            }
        }
    }
}

/// SIGKILLs the process group `child` leads, and reaps the child.
pub fn kill_group(child: &mut Child) {
    let _ = kill(Pid::from_raw(-(child.id() as i32)), Signal::SIGKILL);
    let _ = child.kill();
    let _ = child.wait();
}

/// A command running in the background in its own process group, its stdout
/// and stderr going where the caller pointed them; killed when dropped.
pub struct Background {
    child: Option<Child>,
    deadline: Instant,
}

impl Background {
    pub fn spawn(cmd: &mut Command) -> std::io::Result<Background> {
        cmd.stdin(Stdio::null()).process_group(0);
        let spawned = cmd.spawn();
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        Ok(Background {
            child: Some(spawned?),
            deadline: Instant::now() + COMMAND_LIMIT,
        })
    }

    /// Its exit code, waiting at most until its limit.
    pub fn wait(mut self) -> i32 {
        let deadline = self.deadline;
        self.child
            .take()
            .map_or(127, |mut c| wait_until(&mut c, deadline))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_group(&mut c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combined_keeps_both_streams_and_the_code() {
        let ran = combined(Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]));
        assert_eq!(ran.code, 3);
        assert_eq!(ran.stdout, "out\nerr\n");
    }

    #[test]
    fn output_keeps_them_apart_and_a_signal_is_128_plus() {
        let ran = output(Command::new("sh").args(["-c", "echo out; echo err >&2; kill -9 $$"]));
        assert_eq!(
            (ran.code, ran.text(), ran.stderr.as_str()),
            (137, "out", "err\n")
        );
    }

    #[test]
    fn a_missing_program_is_127() {
        assert_eq!(output(&mut Command::new("/no/such/program")).code, 127);
    }
}
