//! `exec`: a process inside the running VM, over the guest's exec (or pty) port.
//!
//! The exec's stdio is relayed by a host process: `krun-oci exec` itself, or — with
//! `--detach` — a relay child whose pid goes to `--pid-file`. That pid lives as
//! long as the guest process, forwards the signals it receives into it, and exits
//! with its status (conmon waits on it; containerd's shim signals it).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use krun_oci_protocol::{self as proto, ExecRequest, Frame, Message, Process, SignalTarget};
use oci_spec::runtime::UserBuilder;

use crate::container::Container;
use crate::error::{Error, Result};
use crate::guest::GuestLink;
use crate::monitor;
use crate::state::Status;

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

/// Checks the container can take an exec and that the command exists in its rootfs.
pub fn prepare(c: &Container, process: &Process) -> Result<GuestLink> {
    match c.status() {
        Status::Created | Status::Running => {}
        Status::Paused => return Err(Error::Paused),
        _ => return Err(Error::NotRunning),
    }
    let arg0 = process
        .args()
        .as_ref()
        .and_then(|a| a.first())
        .cloned()
        .unwrap_or_default();
    let path = process
        .env()
        .as_deref()
        .unwrap_or_default()
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .to_string();
    crate::bundle::resolve_executable(&c.record.rootfs, &arg0, &path, process.cwd())?;
    c.record.link.clone().ok_or(Error::NotRunning)
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
        let mut s = link
            .connect(port, monitor::CONTROL_TIMEOUT)
            .map_err(|e| Error::Guest(format!("connecting to the guest: {e}")))?;
        proto::handshake(&mut s)?;
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
            Message::Nack { reason } => return Err(Error::InvalidInput(reason)),
            other => {
                return Err(Error::Guest(format!(
                    "unexpected reply to exec: {}",
                    crate::guest::brief(&other)
                )))
            }
        };
        let reader = s.try_clone().map_err(|e| Error::Guest(e.to_string()))?;
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
        spawn_input_pump(input, self.writer.clone(), window.clone());
        self.forward_signals(tty_fd);
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

    fn forward_signals(&self, tty_fd: Option<OwnedFd>) {
        let Ok(mut signals) = signal_hook::iterator::Signals::new(crate::signal::relayed_signals())
        else {
            return;
        };
        let (link, id, writer) = (self.link.clone(), self.id.clone(), self.writer.clone());
        std::thread::spawn(move || {
            for sig in signals.forever() {
                if sig == libc::SIGWINCH {
                    if let Some((rows, cols)) =
                        tty_fd.as_ref().and_then(crate::console::window_size)
                    {
                        if let Ok(mut w) = writer.lock() {
                            let _ = proto::send(&mut *w, Message::Resize { rows, cols });
                        }
                    }
                    continue;
                }
                let msg = Message::Signal {
                    target: SignalTarget::Exec(id.clone()),
                    signal: sig,
                };
                if let Ok(mut c) = monitor::connect_control(&link) {
                    let _ = monitor::request(&mut c, msg);
                }
            }
        });
    }
}

/// The host's side of the stdin flow control: at most [`proto::STDIN_WINDOW`]
/// bytes sent and not yet acknowledged by the guest.
#[derive(Debug, Default)]
pub struct StdinWindow {
    in_flight: Mutex<usize>,
    changed: std::sync::Condvar,
}

impl StdinWindow {
    /// Blocks until `n` more bytes fit in the window.
    fn acquire(&self, n: usize) {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        while *in_flight > 0 && *in_flight + n > proto::STDIN_WINDOW {
            in_flight = self
                .changed
                .wait(in_flight)
                .unwrap_or_else(|e| e.into_inner());
        }
        *in_flight += n;
    }

    /// The guest consumed `n` bytes.
    pub fn release(&self, n: usize) {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        *in_flight = in_flight.saturating_sub(n);
        self.changed.notify_all();
    }
}

/// Copies `input` into Stdin frames (within the guest's window) until EOF, then
/// sends StdinClose.
pub fn spawn_input_pump(input: OwnedFd, writer: Arc<Mutex<UnixStream>>, window: Arc<StdinWindow>) {
    std::thread::spawn(move || {
        let mut input = File::from(input);
        let mut buf = vec![0u8; proto::STDIN_WINDOW / 2];
        loop {
            let frame = match input.read(&mut buf) {
                Ok(0) | Err(_) => Frame::StdinClose,
                Ok(n) => {
                    window.acquire(n);
                    Frame::Stdin(buf[..n].to_vec())
                }
            };
            let last = frame == Frame::StdinClose;
            let sent = writer
                .lock()
                .map(|mut w| proto::write_frame(&mut *w, &frame).is_ok())
                .unwrap_or(false);
            if last || !sent {
                return;
            }
        }
    });
}

/// Puts a terminal in raw mode for the life of the guard.
pub struct RawMode {
    fd: OwnedFd,
    saved: nix::sys::termios::Termios,
}

impl RawMode {
    pub fn enable(fd: &impl AsFd) -> Option<Self> {
        use nix::sys::termios;
        let saved = termios::tcgetattr(fd).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(fd, termios::SetArg::TCSANOW, &raw).ok()?;
        Some(Self {
            fd: fd.as_fd().try_clone_to_owned().ok()?,
            saved,
        })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ =
            nix::sys::termios::tcsetattr(&self.fd, nix::sys::termios::SetArg::TCSANOW, &self.saved);
    }
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
