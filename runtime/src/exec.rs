//! `exec`: a process inside the running VM, over the guest's exec (or pty) port.
//! One implementation for the CLI (`krun-oci exec`) and the shim (which calls
//! [`spawn_detached`] directly).
//!
//! The exec's stdio is relayed by a host process: the caller itself
//! ([`run_attached`]), or a detached relay child ([`spawn_detached`]) whose pid
//! goes to `--pid-file`. That pid lives as long as the guest process, forwards
//! the signals it receives into it, and exits with its status (conmon waits on
//! it; containerd's shim signals it).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use krun_oci_protocol::{self as proto, ExecRequest, Frame, Message, Process, SignalTarget};
use oci_spec::runtime::UserBuilder;
use serde::{Deserialize, Serialize};

use crate::container::Container;
use crate::error::{Error, ErrorReport, IoContext, Result};
use crate::guest::{GuestClient, GuestLink};
use crate::relay::{self, Forward, RawMode, StdinWindow};
use crate::state::{StateStore, Status};

/// How the exec's process differs from the container's (the positional form of `exec`).
#[derive(Debug, Clone, Default)]
pub struct ExecOverrides {
    pub args: Vec<String>,
    pub cwd: Option<String>,
    pub env: Vec<String>,
    pub user: Option<(u32, Option<u32>)>,
    pub additional_gids: Vec<u32>,
    pub tty: bool,
    pub no_new_privs: bool,
}

/// Parses `UID[:GID]`.
pub fn parse_user(s: &str) -> Result<(u32, Option<u32>)> {
    let bad = || Error::InvalidInput(format!("invalid --user {s:?}: want UID[:GID]"));
    let (u, g) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g.parse().map_err(|_| bad())?)),
        None => (s, None),
    };
    Ok((u.parse().map_err(|_| bad())?, g))
}

/// Merges environments: later entries override earlier ones with the same key.
pub fn merge_env(base: &[String], overrides: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for kv in base.iter().chain(overrides) {
        let key = kv.split('=').next().unwrap_or("");
        out.retain(|e| e.split('=').next().unwrap_or("") != key);
        out.push(kv.clone());
    }
    out
}

/// The exec's process: the container's process (env, user, caps, rlimits...) with
/// the exec's args, cwd, env and user on top.
pub fn process_from_overrides(base: &Process, o: &ExecOverrides) -> Result<Process> {
    if o.args.is_empty() {
        return Err(Error::InvalidInput(
            "exec needs a command (or --process FILE)".into(),
        ));
    }
    let mut p = base.clone();
    p.set_args(Some(o.args.clone()));
    p.set_terminal(Some(o.tty));
    if let Some(cwd) = &o.cwd {
        p.set_cwd(PathBuf::from(cwd));
    }
    p.set_env(Some(merge_env(
        p.env().as_deref().unwrap_or_default(),
        &o.env,
    )));
    if let Some((uid, gid)) = o.user {
        let user = UserBuilder::default()
            .uid(uid)
            .gid(gid.unwrap_or(0))
            .additional_gids(o.additional_gids.clone())
            .build()?;
        p.set_user(user);
    } else if !o.additional_gids.is_empty() {
        p.user_mut()
            .set_additional_gids(Some(o.additional_gids.clone()));
    }
    if o.no_new_privs {
        p.set_no_new_privileges(Some(true));
    }
    Ok(p)
}

/// A process given as an OCI process JSON (`--process FILE`): used as given, with
/// the container's environment underneath its own.
pub fn process_from_file(base: &Process, mut p: Process) -> Process {
    p.set_env(Some(merge_env(
        base.env().as_deref().unwrap_or_default(),
        p.env().as_deref().unwrap_or_default(),
    )));
    p
}

/// Where the exec's process comes from.
#[derive(Debug, Clone)]
pub enum ProcessSource {
    /// An OCI process JSON (`--process FILE`, the shim's exec spec).
    Given(Box<Process>),
    /// The container's process with these changes (`exec ID CMD...`).
    Overrides(ExecOverrides),
}

/// The exec's process for container `c`.
pub fn process_for(c: &Container, source: ProcessSource) -> Result<Process> {
    let base = c.config_snapshot()?.process().clone().unwrap_or_default();
    match source {
        ProcessSource::Given(p) => Ok(process_from_file(&base, *p)),
        ProcessSource::Overrides(o) => process_from_overrides(&base, &o),
    }
}

/// runc's rules for a terminal and a console socket.
pub fn check_terminal(tty: bool, console_socket: bool, detach: bool) -> Result<()> {
    match (tty, console_socket, detach) {
        (false, true, _) => Err(Error::InvalidInput(
            "cannot use console socket if runc will not detach or allocate tty".into(),
        )),
        (true, false, true) => Err(Error::InvalidInput(
            "cannot allocate tty if runc will detach without setting console socket".into(),
        )),
        _ => Ok(()),
    }
}

/// Checks the container can take an exec and that the command can exist in it
/// (where a mount decides, the guest tells).
pub fn prepare(c: &Container, process: &Process) -> Result<GuestLink> {
    let link = link_for_exec(c)?;
    let covered = crate::bundle::Covered::of(&c.config_snapshot()?);
    crate::bundle::find_process_program(&c.record.rootfs, process, &covered)?;
    Ok(link)
}

/// The link to a container that can take an exec now (created or running).
fn link_for_exec(c: &Container) -> Result<GuestLink> {
    match c.status() {
        Status::Created | Status::Running => c.record.link.clone().ok_or(Error::NotRunning),
        Status::Paused => Err(Error::Paused),
        _ => Err(Error::NotRunning),
    }
}

/// A started exec session.
pub struct ExecSession {
    pub id: String,
    pub guest_pid: i32,
    link: GuestLink,
    reader: UnixStream,
    writer: Arc<Mutex<UnixStream>>,
}

impl ExecSession {
    /// Starts `process` in the guest.
    pub fn start(
        link: &GuestLink,
        process: Process,
        tty: bool,
        size: Option<(u16, u16)>,
    ) -> Result<Self> {
        let port = if tty {
            proto::PTY_PORT
        } else {
            proto::EXEC_PORT
        };
        // An exec lasts as long as its process: no limit on the guest's replies.
        let mut s = crate::guest::open(link, port, None)?;
        let id = format!(
            "exec-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        proto::send(
            &mut s,
            Message::Exec(ExecRequest {
                id: id.clone(),
                process,
                tty,
                size,
            }),
        )?;
        let guest_pid = match crate::guest::bounded_reply(proto::recv(&mut s)?) {
            Message::ExecStarted { pid } => pid,
            Message::Nack { reason, kind } => return Err(Error::refused("exec", reason, kind)),
            other => return Err(crate::guest::unexpected("exec", &other)),
        };
        let reader = s.try_clone().ctx(|| "exec session".into())?;
        Ok(Self {
            id,
            guest_pid,
            link: link.clone(),
            reader,
            writer: Arc::new(Mutex::new(s)),
        })
    }

    /// Relays stdio until the guest process exits; returns its status.
    /// `tty_fd` is the terminal whose size follows SIGWINCH (our stdin or a host pty).
    pub fn relay(self, input: OwnedFd, out: OwnedFd, err: OwnedFd, tty_fd: Option<OwnedFd>) -> i32 {
        let window = Arc::new(StdinWindow::default());
        relay::spawn_input_pump(input, self.writer.clone(), window.clone());
        let (link, id, writer) = (self.link.clone(), self.id.clone(), self.writer.clone());
        relay::forward_signals(tty_fd, move |forward| match forward {
            // The exec's own terminal: resized on its own connection.
            Forward::Resize { rows, cols } => {
                if let Ok(mut w) = writer.lock() {
                    let _ = proto::send(&mut *w, Message::Resize { rows, cols });
                }
            }
            Forward::Signal(sig) => {
                let _ = GuestClient::connect(&link)
                    .and_then(|mut g| g.signal(SignalTarget::Exec(id.clone()), sig));
            }
        });
        let (mut out, mut err) = (File::from(out), File::from(err));
        let mut reader = self.reader;
        loop {
            match proto::read_frame(&mut reader) {
                Ok(Frame::Stdout(d)) => {
                    let _ = out.write_all(&d);
                }
                Ok(Frame::Stderr(d)) => {
                    let _ = err.write_all(&d);
                }
                Ok(Frame::Message(Message::StdinAck { bytes })) => window.release(bytes as usize),
                Ok(Frame::Message(Message::ExecExited { code })) => {
                    return crate::container::reported_exit_code(code)
                        .unwrap_or(crate::container::LOST_EXIT_CODE)
                }
                Ok(_) => {}
                Err(e) => {
                    log::warn!("exec session {} lost: {e}", self.id);
                    return crate::container::LOST_EXIT_CODE;
                }
            }
        }
    }
}

/// Runs `process` in container `id` with the caller's stdio (or, with
/// `console_socket`, a pty sent there) and waits: the guest process's status.
pub fn run_attached(
    store: &StateStore,
    id: &str,
    process: Process,
    console_socket: Option<&Path>,
) -> Result<i32> {
    let c = Container::load(store, id)?;
    let link = prepare(&c, &process)?;
    let tty = process.terminal().unwrap_or(false);
    run_session(&link, process, tty, console_socket, None)
}

/// How a detached exec's relay is started.
pub struct DetachedExec<'a> {
    /// The krun-oci binary, run as `exec-relay`.
    pub exe: &'a Path,
    /// The relay's stdio (the guest process's); `None`: the caller's, or none
    /// with a console socket.
    pub stdio: Option<[OwnedFd; 3]>,
    pub console_socket: Option<&'a Path>,
}

/// What the relay tells its starter on the sync pipe: one JSON line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RelayReport {
    Started { guest_pid: i32 },
    Failed { error: ErrorReport },
}

/// Starts `process` in container `id` under a detached relay process (its own
/// session, outliving the caller); returns the relay's pid once the guest
/// process runs, or the exec's error, kind intact.
pub fn spawn_detached(
    store: &StateStore,
    id: &str,
    process: &Process,
    how: DetachedExec,
) -> Result<i32> {
    use std::process::{Command, Stdio};
    let c = Container::load(store, id)?;
    // Checked here too, so the common failures come back typed without a relay.
    prepare(&c, process)?;
    let json = c.dir.path.join(format!(
        "exec-{}-{}.json",
        std::process::id(),
        RELAY_COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    ));
    crate::state::write_atomic(&json, &serde_json::to_vec(process)?)
        .ctx(|| format!("writing {}", json.display()))?;
    let mut cmd = Command::new(how.exe);
    cmd.arg("--root")
        .arg(store.root())
        .arg("exec-relay")
        .arg("--process-json")
        .arg(&json);
    if let Some(s) = how.console_socket {
        cmd.arg("--console-socket").arg(s);
    }
    cmd.arg(id);
    match how.stdio {
        Some([i, o, e]) => {
            cmd.stdin(i).stdout(o).stderr(e);
        }
        // The pty is the exec's stdio; keep none of the caller's pipes open.
        None if how.console_socket.is_some() => {
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
        }
        None => {}
    }
    let (read_end, write_end) = crate::supervise::detached_with_sync_pipe(&mut cmd)?;
    let spawned = cmd.spawn();
    drop(write_end);
    drop(cmd);
    let child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_file(&json);
            return Err(e).ctx(|| format!("starting the exec relay {}", how.exe.display()));
        }
    };
    let mut report = Vec::new();
    let _ = File::from(read_end)
        .take(64 * 1024)
        .read_to_end(&mut report);
    let pid = child.id() as i32;
    // The relay outlives us: its parent becomes our subreaper (or init), who
    // waits for it; we never do.
    drop(child);
    let _ = std::fs::remove_file(&json);
    let line = report.split(|&b| b == b'\n').next().unwrap_or_default();
    match serde_json::from_slice::<RelayReport>(line) {
        Ok(RelayReport::Started { .. }) => Ok(pid),
        Ok(RelayReport::Failed { error }) => Err(error.into()),
        Err(_) => Err(Error::Guest(
            "the exec relay exited before the process started".into(),
        )),
    }
}

static RELAY_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The detached relay process (`krun-oci exec-relay`): reports the start on the
/// sync pipe, relays, and returns the guest process's status (its exit status).
pub fn relay_main(
    store: &StateStore,
    id: &str,
    process_json: &Path,
    console_socket: Option<&Path>,
) -> i32 {
    let mut sync = crate::supervise::take_sync_pipe();
    let mut report = |r: RelayReport| {
        if let Some(mut f) = sync.take() {
            let mut line = serde_json::to_vec(&r).unwrap_or_default();
            line.push(b'\n');
            let _ = f.write_all(&line);
        }
    };
    let prepared = (|| -> Result<(GuestLink, Process)> {
        let c = Container::load(store, id)?;
        let process: Process = serde_json::from_slice(
            &std::fs::read(process_json).ctx(|| format!("reading {}", process_json.display()))?,
        )?;
        let _ = std::fs::remove_file(process_json);
        // The starter resolved the program; the container may have stopped since.
        Ok((link_for_exec(&c)?, process))
    })();
    let (link, process) = match prepared {
        Ok(v) => v,
        Err(e) => {
            report(RelayReport::Failed { error: e.report() });
            return 1;
        }
    };
    let tty = process.terminal().unwrap_or(false);
    let mut started = |r: std::result::Result<i32, ErrorReport>| {
        report(match r {
            Ok(guest_pid) => RelayReport::Started { guest_pid },
            Err(error) => RelayReport::Failed { error },
        })
    };
    run_session(&link, process, tty, console_socket, Some(&mut started))
        .unwrap_or(crate::container::LOST_EXIT_CODE)
}

/// Starts an exec session and relays it with our stdio (or a console-socket pty).
/// `started` is told the guest pid once the process runs (or why it did not).
fn run_session(
    link: &GuestLink,
    process: Process,
    tty: bool,
    console_socket: Option<&Path>,
    mut started: Option<&mut dyn FnMut(std::result::Result<i32, ErrorReport>)>,
) -> Result<i32> {
    let mut tell = |r: Result<i32>| -> Result<i32> {
        if let Some(cb) = started.as_mut() {
            cb(r.as_ref().map(|&pid| pid).map_err(Error::report));
        }
        r
    };
    let (input, out, err, tty_fd, local_tty) = match session_stdio(tty, console_socket) {
        Ok(v) => v,
        Err(e) => return tell(Err(e)),
    };
    let size = tty_fd.as_ref().and_then(crate::console::window_size);
    let session = match ExecSession::start(link, process, tty, size) {
        Ok(s) => s,
        Err(e) => return tell(Err(e)),
    };
    tell(Ok(session.guest_pid))?;
    let _raw = local_tty
        .then(|| tty_fd.as_ref().and_then(RawMode::enable))
        .flatten();
    Ok(session.relay(input, out, err, tty_fd))
}

type SessionStdio = (OwnedFd, OwnedFd, OwnedFd, Option<OwnedFd>, bool);

/// The session's stdin, stdout, stderr, the terminal whose size it follows, and
/// whether that terminal is our own (put in raw mode while the session runs).
fn session_stdio(tty: bool, console_socket: Option<&Path>) -> Result<SessionStdio> {
    let dup = |fd: i32| {
        // SAFETY: fds 0/1/2 stay open for the life of the process; we duplicate them.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
            .try_clone_to_owned()
            .ctx(|| "dup".into())
    };
    let Some(socket) = console_socket else {
        let stdin_is_tty = nix::unistd::isatty(std::io::stdin().as_fd()).unwrap_or(false);
        let tty_fd = if tty && stdin_is_tty {
            Some(dup(0)?)
        } else {
            None
        };
        let local = tty_fd.is_some();
        return Ok((dup(0)?, dup(1)?, dup(2)?, tty_fd, local));
    };
    // A session of our own, so the pty becomes our controlling terminal and the
    // client's resizes arrive as SIGWINCH. Fails harmlessly where we already
    // lead a session (the detached relay) or a process group.
    let _ = nix::unistd::setsid();
    let pty = crate::console::send_pty_to_console_socket(socket)?;
    let f = || pty.slave.try_clone().ctx(|| "dup pty".into());
    Ok((f()?, f()?, f()?, Some(f()?), false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_env() {
        assert_eq!(parse_user("1000").unwrap(), (1000, None));
        assert_eq!(parse_user("1:2").unwrap(), (1, Some(2)));
        assert!(parse_user("root").is_err());
        assert!(parse_user("1:x").is_err());
        let env = merge_env(
            &["PATH=/bin".into(), "A=1".into(), "B=2".into()],
            &["A=3".into(), "C=4".into()],
        );
        assert_eq!(env, vec!["PATH=/bin", "B=2", "A=3", "C=4"]);
    }

    #[test]
    fn overrides_apply_on_the_container_process() {
        let mut base = Process::default();
        base.set_env(Some(vec!["PATH=/bin".into(), "X=1".into()]));
        let o = ExecOverrides {
            args: vec!["sh".into()],
            cwd: Some("/tmp".into()),
            env: vec!["X=2".into()],
            user: Some((7, Some(8))),
            additional_gids: vec![9],
            tty: true,
            no_new_privs: false,
        };
        let p = process_from_overrides(&base, &o).unwrap();
        assert_eq!(p.args().as_ref().unwrap(), &vec!["sh".to_string()]);
        assert_eq!(p.cwd(), &PathBuf::from("/tmp"));
        assert_eq!(
            p.env().as_ref().unwrap(),
            &vec!["PATH=/bin".to_string(), "X=2".to_string()]
        );
        assert_eq!((p.user().uid(), p.user().gid()), (7, 8));
        assert_eq!(p.user().additional_gids().as_ref().unwrap(), &vec![9]);
        assert_eq!(p.terminal(), Some(true));
        assert!(process_from_overrides(&base, &ExecOverrides::default()).is_err());
    }
}
