//! Spare guest connections: the container's monitor keeps one connection per
//! guest port dialed and handshaken ahead, and hands it to the CLI that asks
//! (`SCM_RIGHTS` over a unix socket beside the guest link), then dials the next.
//! `start`, `exec` and the other verbs so skip the vsock connect and the
//! protocol handshake, each a round trip through the guest, while every CLI
//! still has a connection of its own (nothing is serialised through the monitor).
//! The replacement is dialed once requests pause ([`REFILL_QUIET`]), not at once:
//! its accept and handshake run in the guest, beside the request just handed over.
//! The first spares are dialed the same way, a pause after create (which leaves
//! its control connection as the first spare).
//!
//! The monitor is a cache, not a gate: a CLI that finds no socket, no answer
//! within [`ASK_TIMEOUT`] (a stopped monitor) or no spare dials the guest itself.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use krun_oci_protocol as proto;
use serde::{Deserialize, Serialize};

use crate::error::{IoContext, Result};
use crate::guest::{self, GuestLink};
use crate::pool::wire;

/// The guest ports spares are kept for.
pub const PORTS: [u32; 3] = [proto::CONTROL_PORT, proto::EXEC_PORT, proto::PTY_PORT];
/// How long a CLI waits for the monitor's answer before dialing itself.
pub const ASK_TIMEOUT: Duration = Duration::from_millis(500);
/// How long the monitor gives the guest to accept and handshake a spare.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long requests must pause before the monitor dials the spares it handed
/// out. Dialed at once, a replacement's accept and handshake ran in the guest
/// before the request its predecessor was handed to: a pool hit's `start` waited
/// ~3 ms of its ~7 ms guest round trip for them. A request in the pause finds no
/// spare and dials itself, as without a monitor.
const REFILL_QUIET: Duration = Duration::from_millis(100);

/// A CLI's request: a spare connection to guest `port`.
#[derive(Debug, Serialize, Deserialize)]
struct Want {
    port: u32,
}

/// The monitor's answer; the connection comes with it when `granted`.
#[derive(Debug, Serialize, Deserialize)]
struct Answer {
    granted: bool,
}

/// A handshaken connection to guest `port` from the monitor serving `link`'s
/// spares, or `None` (the caller dials).
pub fn take(link: &GuestLink, port: u32) -> Option<UnixStream> {
    let path = link.spares_path();
    // Not served (a pool member, the sandbox before ready, an old monitor): no wait.
    if !path.exists() {
        return None;
    }
    let asked = (|| {
        let sock = wire::connect(&path, ASK_TIMEOUT)?;
        wire::send(&sock, &Want { port }, &[])?;
        wire::recv::<Answer>(&sock)
    })();
    match asked {
        Ok((Answer { granted: true }, mut fds)) if fds.len() == 1 => {
            fds.pop().map(|fd: OwnedFd| UnixStream::from(fd))
        }
        Ok(_) => None,
        Err(e) => {
            log::debug!("no spare guest connection: {e}");
            None
        }
    }
}

/// Serves `link`'s spares from a thread of the calling process (the monitor),
/// for as long as it lives. `control`: a handshaken control connection to keep
/// as the first spare (the one `Setup` went over).
pub fn serve(link: GuestLink, control: Option<UnixStream>) -> Result<()> {
    serve_with(link, control, REFILL_QUIET)
}

/// [`serve`], the replacements dialed once requests pause for `quiet`.
fn serve_with(link: GuestLink, control: Option<UnixStream>, quiet: Duration) -> Result<()> {
    let path = link.spares_path();
    let listener = wire::listen(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .ctx(|| format!("securing {}", path.display()))?;
    std::thread::Builder::new()
        .name("spares".into())
        .spawn(move || {
            let mut spares: HashMap<u32, UnixStream> = HashMap::new();
            if let Some(c) = control {
                spares.insert(proto::CONTROL_PORT, c);
            }
            // Whether the spares need filling once requests pause (a failed
            // dial is retried after the next request, not in a loop). At first
            // too: a `start` right after create takes the control spare, and
            // dials made then would run in the guest beside it, its request
            // queued behind them.
            let mut asked_since_fill = true;
            loop {
                let pause = asked_since_fill.then_some(quiet);
                let asked = wire::readable(&listener, pause).and_then(|ready| match ready {
                    true => wire::accept(&listener, ASK_TIMEOUT),
                    false => Ok(None),
                });
                match asked {
                    Ok(Some(conn)) => {
                        answer(&conn, &mut spares);
                        asked_since_fill = true;
                    }
                    Ok(None) if asked_since_fill => {
                        fill(&link, &mut spares);
                        asked_since_fill = false;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        log::warn!("spares: {e}");
                        return;
                    }
                }
            }
        })
        .ctx(|| "starting the spares thread".into())?;
    Ok(())
}

/// Dials a spare for every port that has none (a failure is retried at the next request).
fn fill(link: &GuestLink, spares: &mut HashMap<u32, UnixStream>) {
    for port in PORTS {
        if spares.contains_key(&port) {
            continue;
        }
        match guest::dial(link, port, DIAL_TIMEOUT) {
            Ok(s) => {
                spares.insert(port, s);
            }
            Err(e) => log::debug!("spares: port {port}: {e}"),
        }
    }
}

/// Answers one CLI: its port's spare if there is one. Never dials here, so
/// the CLI waits only for this hand-over; it dials itself on a refusal.
fn answer(conn: &OwnedFd, spares: &mut HashMap<u32, UnixStream>) {
    let Ok((Want { port }, _)) = wire::recv::<Want>(conn) else {
        return;
    };
    match spares.remove(&port).filter(idle_and_open) {
        Some(spare) => {
            use std::os::fd::AsFd;
            let _ = wire::send(conn, &Answer { granted: true }, &[spare.as_fd()]);
        }
        None => {
            let _ = wire::send(conn, &Answer { granted: false }, &[]);
        }
    }
}

/// Whether a spare is still good to hand over: open, and nothing unread on it
/// (the guest says nothing on an idle connection; a closed one reads as EOF).
fn idle_and_open(spare: &UnixStream) -> bool {
    use nix::sys::socket::{recv, MsgFlags};
    use std::os::fd::AsRawFd;
    let mut byte = [0u8; 1];
    let peeked = recv(
        spare.as_raw_fd(),
        &mut byte,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    );
    peeked == Err(nix::errno::Errno::EAGAIN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::GuestClient;
    use krun_oci_protocol::Message;
    use std::os::unix::net::UnixListener;
    use std::path::Path;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A guest stand-in on `PortSockets`: each port greets and answers heartbeats;
    /// returns how many connections it accepted.
    fn fake_guest(dir: &Path) -> Arc<AtomicUsize> {
        let accepted = Arc::new(AtomicUsize::new(0));
        for port in PORTS {
            let l = UnixListener::bind(dir.join(proto::contract::guest_port_socket(port))).unwrap();
            let accepted = accepted.clone();
            std::thread::spawn(move || {
                for conn in l.incoming() {
                    let mut c = conn.unwrap();
                    accepted.fetch_add(1, Ordering::SeqCst);
                    std::thread::spawn(move || {
                        proto::handshake(&mut c).unwrap();
                        while let Ok(Message::Heartbeat) = proto::recv(&mut c) {
                            proto::send(&mut c, Message::HeartbeatAck).unwrap();
                        }
                    });
                }
            });
        }
        accepted
    }

    /// Waits until the fake guest has accepted `n` connections (at most 5 s).
    fn await_accepted(accepted: &AtomicUsize, n: usize) -> usize {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while accepted.load(Ordering::SeqCst) < n && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        accepted.load(Ordering::SeqCst)
    }

    #[test]
    fn spares_are_handed_over_ready_and_refilled_once_requests_pause() {
        let d = tempfile::tempdir().unwrap();
        let link = GuestLink::PortSockets {
            dir: d.path().to_owned(),
        };
        // Nothing served: no spare, and no wait.
        assert!(take(&link, proto::CONTROL_PORT).is_none());
        let accepted = fake_guest(d.path());
        // A pause far longer than this test's back-to-back requests take.
        let quiet = Duration::from_millis(500);
        serve_with(link.clone(), None, quiet).unwrap();
        let mode = std::fs::metadata(link.spares_path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Dialed once a pause has passed (a `start` may follow create at once),
        // then one per port.
        assert_eq!(accepted.load(Ordering::SeqCst), 0);
        assert_eq!(await_accepted(&accepted, 3), 3);
        for round in 0..3 {
            // Handshaken already: the first frame on it is a request.
            let spare = take(&link, proto::CONTROL_PORT)
                .unwrap_or_else(|| panic!("no spare in round {round}"));
            let mut client = GuestClient::from_stream(spare);
            client.heartbeat().unwrap();
            // Refilled after the pause, not in it.
            assert_eq!(await_accepted(&accepted, 4 + round), 4 + round);
        }
        // Right after a hand-over the port has none, and nothing is dialed while
        // requests keep coming.
        assert!(take(&link, proto::EXEC_PORT).is_some());
        assert!(take(&link, proto::EXEC_PORT).is_none());
        assert_eq!(accepted.load(Ordering::SeqCst), 6);
        assert_eq!(await_accepted(&accepted, 7), 7);
        let (a, b) = UnixStream::pair().unwrap();
        assert!(idle_and_open(&a));
        drop(b);
        assert!(!idle_and_open(&a), "a closed spare is not handed over");
        // Not a port spares are kept for: refused, the caller dials.
        assert!(take(&link, 4242).is_none());
        std::thread::sleep(quiet * 2);
        assert_eq!(accepted.load(Ordering::SeqCst), 7, "nothing to refill");
    }

    #[test]
    fn a_monitor_that_does_not_answer_is_not_waited_for() {
        let d = tempfile::tempdir().unwrap();
        let link = GuestLink::PortSockets {
            dir: d.path().to_owned(),
        };
        // Bound and listening, never answering (a stopped monitor): given up
        // after ASK_TIMEOUT (this test would hang otherwise).
        let _listener = wire::listen(&link.spares_path()).unwrap();
        assert!(take(&link, proto::CONTROL_PORT).is_none());
    }
}
