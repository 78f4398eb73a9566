//! Host side of the link to the guest: one `connect(port)` whatever carries
//! vsock, and [`GuestClient`], the one typed client of guest-init's control port
//! (the monitor, lifecycle verbs, exec and the pool all go through it).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use krun_oci_protocol::{self as proto, GuestProcess, Message, SignalTarget};
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

/// How long the guest gets to answer a control request.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

/// What `Setup` tells the guest about the main.
#[derive(Debug, Default)]
pub struct MainPlan {
    /// Fork and set it up right away, to wait before its exec for `start`.
    pub prepare: bool,
    /// Its program as the container names it, where the host could tell
    /// (`crate::bundle::find_program`).
    pub program: Option<PathBuf>,
}

/// A control connection to guest-init (handshake done): one method per request,
/// each answer checked, a `Nack` turned into [`Error::GuestRefused`].
pub struct GuestClient {
    conn: UnixStream,
}

/// Dials guest `port` now and does the handshake; the guest must answer (the
/// connect and each reply) within `limit`.
pub fn dial(link: &GuestLink, port: u32, limit: Duration) -> Result<UnixStream> {
    let mut conn = link
        .connect(port, limit)
        .map_err(|e| Error::Guest(format!("connecting to the guest: {e}")))?;
    conn.set_read_timeout(Some(limit))
        .ctx(|| "guest connection".into())?;
    proto::handshake(&mut conn)?;
    Ok(conn)
}

/// A handshaken connection to guest `port`: the monitor's spare when it has one
/// ([`crate::spares`]), else dialed now. Replies then wait at most `limit`
/// (`None`: as long as they take).
pub fn open(link: &GuestLink, port: u32, limit: Option<Duration>) -> Result<UnixStream> {
    let conn = match crate::spares::take(link, port) {
        Some(spare) => spare,
        None => dial(link, port, limit.unwrap_or(CONTROL_TIMEOUT))?,
    };
    conn.set_read_timeout(limit)
        .ctx(|| "guest connection".into())?;
    Ok(conn)
}

impl GuestClient {
    /// Connects within [`CONTROL_TIMEOUT`].
    pub fn connect(link: &GuestLink) -> Result<Self> {
        Self::connect_within(link, CONTROL_TIMEOUT)
    }

    /// Connects (a spare of the monitor's, else dialed) where the guest must
    /// answer each request within `limit`.
    pub fn connect_within(link: &GuestLink, limit: Duration) -> Result<Self> {
        Ok(Self {
            conn: open(link, proto::CONTROL_PORT, Some(limit))?,
        })
    }

    /// Dials now, never through the spares: for the VM's own supervisor (the
    /// monitor, a pool member), which serves them.
    pub fn dial(link: &GuestLink, limit: Duration) -> Result<Self> {
        Ok(Self {
            conn: dial(link, proto::CONTROL_PORT, limit)?,
        })
    }

    /// A client over a handshaken control connection.
    #[cfg(test)]
    pub(crate) fn from_stream(conn: UnixStream) -> Self {
        Self { conn }
    }

    /// The connection, for [`crate::spares::serve`] to hand on.
    pub fn into_stream(self) -> UnixStream {
        self.conn
    }

    /// One request; the reply unless it is a `Nack`.
    fn call(&mut self, context: &'static str, msg: Message) -> Result<Message> {
        proto::send(&mut self.conn, msg)?;
        match bounded_reply(proto::recv(&mut self.conn)?) {
            Message::Nack { reason, kind } => Err(Error::refused(context, reason, kind)),
            other => Ok(other),
        }
    }

    /// A request answered `Ack`.
    fn acked(&mut self, context: &'static str, msg: Message) -> Result<()> {
        match self.call(context, msg)? {
            Message::Ack => Ok(()),
            other => Err(unexpected(context, &other)),
        }
    }

    /// Applies the container's config (`Setup`; docs/protocol.md has each field).
    /// `main`: whether the guest prepares the main at once, and where its program is.
    pub fn setup(
        &mut self,
        spec: oci_spec::runtime::Spec,
        seccomp: Option<proto::SeccompProgram>,
        network: Vec<proto::net::NetInterface>,
        deferred_root: Option<String>,
        main: MainPlan,
    ) -> Result<()> {
        let setup = Message::Setup {
            spec: Box::new(spec),
            seccomp,
            network,
            deferred_root,
            prepare_main: main.prepare,
            main_program: main.program.map(|p| p.to_string_lossy().into_owned()),
        };
        self.acked("guest setup failed", setup)
    }

    /// Sets up NICs added after create.
    pub fn configure_network(&mut self, network: Vec<proto::net::NetInterface>) -> Result<()> {
        self.acked(
            "guest network setup failed",
            Message::ConfigureNetwork { network },
        )
    }

    /// Waits until the main `setup` had prepared is set up and waiting (its
    /// failure in runc's words: create fails as runc's does).
    pub fn await_main(&mut self) -> Result<()> {
        self.acked("create", Message::AwaitMain)
    }

    /// Runs the container's main, the process of the spec `setup` gave the
    /// guest; returns its guest pid.
    pub fn spawn_main(&mut self) -> Result<i32> {
        match self.call("start", Message::SpawnMain { process: None })? {
            Message::MainStarted { pid } => Ok(pid),
            other => Err(unexpected("spawn-main", &other)),
        }
    }

    pub fn signal(&mut self, target: SignalTarget, signal: i32) -> Result<()> {
        self.acked("signal", Message::Signal { target, signal })
    }

    /// The main's terminal size.
    pub fn resize(&mut self, rows: u16, cols: u16) -> Result<()> {
        self.acked("resize", Message::Resize { rows, cols })
    }

    pub fn update_pids(&mut self, limit: i64) -> Result<()> {
        self.acked("update", Message::UpdatePids { limit })
    }

    pub fn ps(&mut self) -> Result<Vec<GuestProcess>> {
        match self.call("ps", Message::Ps)? {
            Message::Processes { processes } => Ok(processes),
            other => Err(unexpected("ps", &other)),
        }
    }

    /// Asks guest-init to stop everything and power off.
    pub fn shutdown(&mut self) -> Result<()> {
        self.acked("shutdown", Message::Shutdown)
    }

    /// A liveness probe.
    pub fn heartbeat(&mut self) -> Result<()> {
        match self.call("heartbeat", Message::Heartbeat)? {
            Message::HeartbeatAck => Ok(()),
            other => Err(unexpected("heartbeat", &other)),
        }
    }
}

/// A reply of the wrong kind.
pub fn unexpected(context: &str, reply: &Message) -> Error {
    Error::Guest(format!("unexpected reply to {context}: {}", brief(reply)))
}

/// How host processes reach guest vsock ports, and where guest connect-outs land.
/// Stored in the container state so every CLI invocation can reach the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuestLink {
    /// vhost-device-vsock's hybrid socket: connect to `uds`, write `CONNECT <port>\n`,
    /// read `OK <hostport>\n`; guest connections to host port P arrive on `<uds>_P`.
    HybridVsock { uds: PathBuf },
    /// One unix socket per port in `dir`: guest port P is `dir/guest-P.sock`, host port P
    /// is `dir/host-P.sock` (libkrun's `krun_add_vsock_port2`, and the host-sandbox harness).
    PortSockets { dir: PathBuf },
}

/// What the guest said, for an error or a log line: the guest is hostile and a
/// message can be a megabyte, so at most [`BRIEF_LEN`] characters of it.
pub fn brief(msg: &impl std::fmt::Debug) -> String {
    bounded(format!("{msg:?}"))
}

/// `text` cut to [`BRIEF_LEN`] characters.
pub fn bounded(mut text: String) -> String {
    if let Some((cut, _)) = text.char_indices().nth(BRIEF_LEN) {
        text.truncate(cut);
        text.push_str("...");
    }
    text
}

/// A reply read from the guest, with a `Nack`'s reason (shown to users and
/// logged as is) cut by [`bounded`].
pub fn bounded_reply(reply: krun_oci_protocol::Message) -> krun_oci_protocol::Message {
    match reply {
        krun_oci_protocol::Message::Nack { reason, kind } => krun_oci_protocol::Message::Nack {
            reason: bounded(reason),
            kind,
        },
        other => other,
    }
}

/// How much of a guest message [`brief`] keeps.
pub const BRIEF_LEN: usize = 200;

/// Upper bound for the hybrid handshake's reply line.
const MAX_HANDSHAKE_LINE: usize = 64;

/// Reads one `\n`-terminated line byte by byte, so nothing after it is consumed.
fn read_line_exact(s: &mut UnixStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < MAX_HANDSHAKE_LINE {
        if s.read(&mut b)? == 0 {
            break;
        }
        if b[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(b[0]);
    }
    Err(io::Error::new(
        io::ErrorKind::ConnectionRefused,
        "guest connection closed during the vsock handshake",
    ))
}

impl GuestLink {
    /// Connects to a listening guest port.
    pub fn connect(&self, port: u32, timeout: Duration) -> io::Result<UnixStream> {
        match self {
            GuestLink::HybridVsock { uds } => {
                let mut s = UnixStream::connect(uds)?;
                s.set_read_timeout(Some(timeout))?;
                s.write_all(format!("CONNECT {port}\n").as_bytes())?;
                let line = read_line_exact(&mut s)?;
                if !line.starts_with("OK ") {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        format!("guest port {port} refused the connection"),
                    ));
                }
                s.set_read_timeout(None)?;
                Ok(s)
            }
            GuestLink::PortSockets { dir } => {
                UnixStream::connect(dir.join(proto::contract::guest_port_socket(port)))
            }
        }
    }

    /// Where a guest connection to host port `port` arrives (a unix socket the host binds).
    pub fn host_port_path(&self, port: u32) -> PathBuf {
        match self {
            GuestLink::HybridVsock { uds } => {
                let mut p = uds.clone().into_os_string();
                p.push(format!("_{port}"));
                p.into()
            }
            GuestLink::PortSockets { dir } => dir.join(proto::contract::host_port_socket(port)),
        }
    }

    /// Where the VM's supervisor serves spare connections ([`crate::spares`]):
    /// beside the link's own socket(s).
    pub fn spares_path(&self) -> PathBuf {
        match self {
            GuestLink::HybridVsock { uds } => uds.with_file_name("spares.sock"),
            GuestLink::PortSockets { dir } => dir.join("spares.sock"),
        }
    }

    /// Where a listening guest port is exposed as a unix socket (PortSockets only).
    pub fn guest_port_path(&self, port: u32) -> Option<PathBuf> {
        match self {
            GuestLink::HybridVsock { .. } => None,
            GuestLink::PortSockets { dir } => {
                Some(dir.join(proto::contract::guest_port_socket(port)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;

    #[test]
    fn hybrid_handshake() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock");
        let l = UnixListener::bind(&uds).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            assert_eq!(line, "CONNECT 1024\n");
            s.write_all(b"OK 5\n").unwrap();
            s.write_all(b"x").unwrap();
        });
        let link = GuestLink::HybridVsock { uds: uds.clone() };
        let mut s = link.connect(1024, Duration::from_secs(5)).unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
        t.join().unwrap();
        assert_eq!(link.host_port_path(1030), dir.path().join("vsock_1030"));
    }

    #[test]
    fn what_the_guest_said_is_bounded() {
        assert_eq!(bounded("short".into()), "short");
        let long = bounded("é".repeat(10 * BRIEF_LEN));
        assert_eq!(long.chars().count(), BRIEF_LEN + 3);
        assert!(long.ends_with("..."));
        let nack = krun_oci_protocol::Message::nack("n".repeat(1 << 20));
        assert!(brief(&nack).starts_with("Nack { reason: \"nnn"));
        assert!(brief(&nack).len() < 2 * BRIEF_LEN);
    }

    #[test]
    fn hybrid_refusal_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock");
        let l = UnixListener::bind(&uds).unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            drop(s);
        });
        let link = GuestLink::HybridVsock { uds };
        assert!(link.connect(1024, Duration::from_secs(5)).is_err());
        t.join().unwrap();
    }
}
