//! Host <-> guest wire protocol of krun-oci.
//!
//! Every connection carries length-prefixed frames:
//!
//! ```text
//! +----------------+------------+-----------------------+
//! | u32 BE: len    | u8: kind   | payload (len-1 bytes) |
//! +----------------+------------+-----------------------+
//! ```
//!
//! `len` counts the kind byte plus the payload and is checked against
//! [`MAX_FRAME_LEN`] *before* anything is allocated: the host treats the guest as
//! hostile. [`FrameKind::Message`] payloads are JSON-encoded [`Message`]s; the
//! stdio kinds carry raw bytes. The first frame on every connection, in each
//! direction, is [`Message::Hello`] with [`PROTOCOL_VERSION`].

pub mod contract;
pub mod mounts;
pub mod net;

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

pub use oci_spec::runtime::Process;

/// Bumped on every incompatible change of frames or messages.
pub const PROTOCOL_VERSION: u32 = 7;

/// Largest accepted frame body (kind byte + payload).
pub const MAX_FRAME_LEN: u32 = 1024 * 1024 + 1;

/// Largest stdio chunk a sender puts in one frame.
pub const MAX_DATA_CHUNK: usize = 64 * 1024;

/// Stdin bytes the host may have sent but the guest not yet acknowledged with
/// [`Message::StdinAck`]. Kept well below the guest's vsock receive buffer
/// (256 KiB) so a connection never runs out of credit: vhost-device-vsock stalls
/// both directions of a connection whose guest side is out of credit while the
/// guest is also sending (measured: 10 MiB through `cat` hung without it).
pub const STDIN_WINDOW: usize = 64 * 1024;

/// Largest single `write` a sender makes. Linux guests from 6.12.y (and Debian's
/// 6.12 backports) build a vsock packet of more than ~32 KiB from page fragments,
/// i.e. several data descriptors. vhost-device-vsock 0.3 (the `virtio-vsock`
/// 0.10 parser) accepts one data descriptor and drops such a packet
/// (`DescriptorLengthTooSmall`): bytes are lost and the connection stalls. One
/// packet never spans more than one write, so writes of at most 16 KiB keep
/// every packet in one descriptor on any kernel.
pub const MAX_WRITE: usize = 16 * 1024;

/// Guest vsock port of the control service (spawn-main, signal, ps, heartbeat, shutdown).
pub const CONTROL_PORT: u32 = 1024;
/// Guest vsock port of the exec service (one connection per exec session).
pub const EXEC_PORT: u32 = 1025;
/// Guest vsock port of the pty service (exec sessions with a terminal).
pub const PTY_PORT: u32 = 1026;
/// Host port the guest dials as soon as it is up: the ready beacon, which then
/// stays open as the event stream (main's stdio, main-exited).
pub const HOST_EVENTS_PORT: u32 = 1030;
/// Context id of the host in AF_VSOCK.
pub const HOST_CID: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("frame length {0} exceeds the maximum of {MAX_FRAME_LEN}")]
    FrameTooLong(u32),
    #[error("empty frame")]
    EmptyFrame,
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("connection closed")]
    Closed,
    #[error("protocol version mismatch: peer speaks {peer}, we speak {PROTOCOL_VERSION}")]
    VersionMismatch { peer: u32 },
    #[error("unexpected message: {0}")]
    Unexpected(String),
    #[error("payload of {0} bytes is too large for one frame")]
    PayloadTooLarge(usize),
    #[error(transparent)]
    Io(#[from] io::Error),
}

pub type Result<T> = std::result::Result<T, ProtocolError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    Message = 0x01,
    Stdout = 0x02,
    Stderr = 0x03,
    Stdin = 0x04,
    /// End of the input stream (no payload).
    StdinClose = 0x05,
}

impl TryFrom<u8> for FrameKind {
    type Error = ProtocolError;
    fn try_from(b: u8) -> Result<Self> {
        Ok(match b {
            0x01 => Self::Message,
            0x02 => Self::Stdout,
            0x03 => Self::Stderr,
            0x04 => Self::Stdin,
            0x05 => Self::StdinClose,
            other => return Err(ProtocolError::UnknownKind(other)),
        })
    }
}

/// Which process(es) a signal goes to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignalTarget {
    /// The container's main process.
    Main,
    /// Every process in the guest except init (`kill --all`).
    All,
    /// The process of one exec session.
    Exec(String),
}

/// One boot step and when it finished, in microseconds since guest-init started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootTiming {
    pub step: String,
    pub micros: u64,
}

/// A guest process as listed by `ps`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestProcess {
    pub pid: i32,
    pub ppid: i32,
    pub uid: u32,
    pub cmd: String,
}

/// A seccomp filter compiled on the host (classic BPF, as `struct sock_filter[]`
/// in native byte order) and the `seccomp(SECCOMP_SET_MODE_FILTER)` flags to
/// install it with. Guest-init installs it in every container process, last
/// before exec (before dropping privileges when `noNewPrivileges` is off, as runc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeccompProgram {
    pub flags: u32,
    pub filter: Vec<u8>,
}

impl SeccompProgram {
    /// Size of one BPF instruction (`struct sock_filter`).
    pub const INSN_LEN: usize = 8;
    /// The kernel's `BPF_MAXINSNS`.
    pub const MAX_INSNS: usize = 4096;

    /// Number of instructions, or why the program cannot be installed.
    pub fn insns(&self) -> std::result::Result<usize, String> {
        let n = self.filter.len() / Self::INSN_LEN;
        if !self.filter.len().is_multiple_of(Self::INSN_LEN) || n == 0 || n > Self::MAX_INSNS {
            return Err(format!(
                "seccomp program of {} bytes is not 1..={} instructions",
                self.filter.len(),
                Self::MAX_INSNS
            ));
        }
        Ok(n)
    }
}

/// How an exec session's stdio is wired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ExecRequest {
    /// Unique per container; used to signal the session.
    pub id: String,
    pub process: Process,
    /// Allocate a pty in the guest (stdout frames then carry the terminal output).
    #[serde(default)]
    pub tty: bool,
    /// Initial terminal size (rows, cols) when `tty`.
    #[serde(default)]
    pub size: Option<(u16, u16)>,
}

/// Control messages. Requests carry no id: each connection serves one
/// request/response exchange at a time, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// First frame in each direction of every connection.
    Hello {
        version: u32,
    },
    /// Guest -> host, first message on the events stream: the ready beacon.
    Ready {
        init_version: String,
        timings: Vec<BootTiming>,
    },
    /// Liveness probe (either direction); answered with `HeartbeatAck`.
    Heartbeat,
    HeartbeatAck,
    /// Host -> guest on the control port, once after `Ready` and before `SpawnMain`:
    /// apply the per-container guest setup the config asks for (hostname, sysctls,
    /// mounts, ...). The process part is ignored here. Answered `Ack` or `Nack`.
    Setup {
        spec: Box<oci_spec::runtime::Spec>,
        /// `linux.seccomp`, compiled by the host (the guest has no libseccomp).
        #[serde(default)]
        seccomp: Option<SeccompProgram>,
        /// The NICs the VM was given and how to configure them (empty: loopback
        /// only). Guest-init brings `lo` up in every case.
        #[serde(default)]
        network: Vec<net::NetInterface>,
        /// A VM booted before its container (a pooled VM, booted with
        /// `krun_oci.root=deferred`) has no root yet: the container's root is
        /// this entry of the `rootfs` share, switched into before the rest of
        /// the setup. `None` on a VM that booted into its root.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deferred_root: Option<String>,
        /// Fork the spec's process once set up, and have it wait before its exec
        /// for `SpawnMain` (naming no process or the same one): `start` then has
        /// only the exec left. False when create-time hooks still run after setup.
        #[serde(default)]
        prepare_main: bool,
        /// Where `spec.process`'s program is, as the guest's own lookup (its
        /// PATH search) would name it: found by the host in the root filesystem,
        /// and sent only where no mount of the container's covers a path that
        /// lookup looks at. The guest then skips its own (each miss on PATH is a
        /// virtio-fs round trip, negative lookups are not cached).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        main_program: Option<String>,
    },
    /// Host -> guest on the control port, at start and before `SpawnMain`: links
    /// that appeared in the container's network namespace after create, attached
    /// to the VM's spare NIC. Answered `Ack` or `Nack`.
    ConfigureNetwork {
        network: Vec<net::NetInterface>,
    },
    /// Host -> guest on the control port, at the end of create: wait until the
    /// main `Setup` prepared is set up and waiting before its exec. Answered
    /// `Ack` (also when nothing was prepared), or `Nack` with the reason it could
    /// not be set up, in `SpawnMain`'s words and kinds: create then fails, as
    /// runc's does when `runc init` cannot get that far.
    AwaitMain,
    /// Host -> guest: run the container's main process now. Accepted exactly once.
    SpawnMain {
        /// `None`: `spec.process` of the `Setup` applied, which the host's `start`
        /// always means (decoding a process costs ~1 ms under TCG: a third of
        /// the guest's part of a pool hit's `start`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        process: Option<Process>,
    },
    /// Guest -> host reply to `SpawnMain`.
    MainStarted {
        pid: i32,
    },
    /// Guest -> host on the events stream: the main process exited with `code`
    /// (WEXITSTATUS or 128+signal). Sent after all of its output.
    MainExited {
        code: i32,
        /// The guest's OOM killer killed a process while the main ran (containerd's
        /// TaskOOM, Docker's `OOMKilled`).
        #[serde(default)]
        oom_killed: bool,
    },
    /// Host -> guest: deliver `signal` to `target`.
    Signal {
        target: SignalTarget,
        signal: i32,
    },
    /// Host -> guest: start an exec session (on the exec or pty port).
    Exec(ExecRequest),
    /// Guest -> host: the exec session's process runs with this (guest) pid.
    ExecStarted {
        pid: i32,
    },
    /// Guest -> host: the exec session's process exited (after its output).
    ExecExited {
        code: i32,
    },
    /// Guest -> host: `bytes` of stdin were consumed (written to the process or
    /// dropped because its stdin is closed); opens the host's [`STDIN_WINDOW`] again.
    StdinAck {
        bytes: u32,
    },
    /// Host -> guest: terminal size changed.
    Resize {
        rows: u16,
        cols: u16,
    },
    /// Host -> guest: set the container's pids limit (runc's rule: 0 leaves it,
    /// negative lifts it) -> `Ack`/`Nack`. For `update`.
    UpdatePids {
        limit: i64,
    },
    /// Host -> guest: list processes.
    Ps,
    Processes {
        processes: Vec<GuestProcess>,
    },
    /// Host -> guest: stop everything and power off.
    Shutdown,
    /// Generic success reply.
    Ack,
    /// Generic failure reply; `reason` is shown to the user, `kind` (where
    /// set) is what the host acts on (exec's 127/126).
    Nack {
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kind: Option<RefusalKind>,
    },
}

/// Why guest-init refused a request, where the host needs more than the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalKind {
    /// The program to run does not exist (ENOENT at lookup or exec).
    ExecutableNotFound,
    /// The program cannot be run (EACCES, a directory, no exec bit).
    PermissionDenied,
}

impl Message {
    /// A `Nack` the host only shows.
    pub fn nack(reason: impl Into<String>) -> Message {
        Message::Nack {
            reason: reason.into(),
            kind: None,
        }
    }
}

/// One decoded frame.
// Messages carry an inline OCI process spec; frames are short-lived, boxing buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Message(Message),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Stdin(Vec<u8>),
    StdinClose,
}

impl Frame {
    /// Serializes the frame (header included).
    pub fn encode(&self) -> Result<Vec<u8>> {
        let (kind, payload): (FrameKind, std::borrow::Cow<'_, [u8]>) = match self {
            Frame::Message(m) => (FrameKind::Message, serde_json::to_vec(m)?.into()),
            Frame::Stdout(d) => (FrameKind::Stdout, d.as_slice().into()),
            Frame::Stderr(d) => (FrameKind::Stderr, d.as_slice().into()),
            Frame::Stdin(d) => (FrameKind::Stdin, d.as_slice().into()),
            Frame::StdinClose => (FrameKind::StdinClose, (&[][..]).into()),
        };
        let body_len = payload.len() + 1;
        if body_len > MAX_FRAME_LEN as usize {
            return Err(ProtocolError::PayloadTooLarge(payload.len()));
        }
        let mut out = Vec::with_capacity(4 + body_len);
        out.extend_from_slice(&(body_len as u32).to_be_bytes());
        out.push(kind as u8);
        out.extend_from_slice(&payload);
        Ok(out)
    }

    /// Decodes a frame body (kind byte + payload) whose length was already checked.
    pub fn decode_body(body: &[u8]) -> Result<Frame> {
        let (&kind, payload) = body.split_first().ok_or(ProtocolError::EmptyFrame)?;
        Ok(match FrameKind::try_from(kind)? {
            FrameKind::Message => Frame::Message(serde_json::from_slice(payload)?),
            FrameKind::Stdout => Frame::Stdout(payload.to_vec()),
            FrameKind::Stderr => Frame::Stderr(payload.to_vec()),
            FrameKind::Stdin => Frame::Stdin(payload.to_vec()),
            FrameKind::StdinClose => Frame::StdinClose,
        })
    }
}

/// Checks a frame header and returns the body length it announces.
pub fn body_len(header: [u8; 4]) -> Result<usize> {
    let len = u32::from_be_bytes(header);
    if len == 0 {
        return Err(ProtocolError::EmptyFrame);
    }
    if len > MAX_FRAME_LEN {
        return Err(ProtocolError::FrameTooLong(len));
    }
    Ok(len as usize)
}

/// Incremental decoder for non-blocking and async readers: push bytes as they
/// arrive, pop complete frames. Never buffers more than one maximal frame.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds received bytes.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Returns the next complete frame, `Ok(None)` if more bytes are needed, or an
    /// error for a malformed stream (after which the connection must be dropped).
    pub fn next_frame(&mut self) -> Result<Option<Frame>> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = body_len([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])?;
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let frame = Frame::decode_body(&self.buf[4..4 + len]);
        self.buf.drain(..4 + len);
        frame.map(Some)
    }

    /// Bytes buffered but not yet decoded.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// Reads one frame from a blocking reader. A clean EOF before the header is
/// [`ProtocolError::Closed`].
pub fn read_frame<R: Read>(r: &mut R) -> Result<Frame> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Err(ProtocolError::Closed),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = body_len(header)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Frame::decode_body(&body)
}

/// Writes one frame to a blocking writer, in writes of at most [`MAX_WRITE`] bytes.
pub fn write_frame<W: Write>(w: &mut W, frame: &Frame) -> Result<()> {
    for piece in frame.encode()?.chunks(MAX_WRITE) {
        w.write_all(piece)?;
    }
    w.flush()?;
    Ok(())
}

/// Writes a control message.
pub fn send<W: Write>(w: &mut W, msg: Message) -> Result<()> {
    write_frame(w, &Frame::Message(msg))
}

/// Reads frames until a control message arrives; stdio frames in between are an error.
pub fn recv<R: Read>(r: &mut R) -> Result<Message> {
    match read_frame(r)? {
        Frame::Message(m) => Ok(m),
        other => Err(ProtocolError::Unexpected(format!("{other:?}"))),
    }
}

/// Sends our `Hello` and checks the peer's. Both sides call this first.
pub fn handshake<S: Read + Write>(s: &mut S) -> Result<()> {
    send(
        s,
        Message::Hello {
            version: PROTOCOL_VERSION,
        },
    )?;
    expect_hello(recv(s)?)
}

/// Checks that `msg` is a `Hello` of our version.
pub fn expect_hello(msg: Message) -> Result<()> {
    match msg {
        Message::Hello { version } if version == PROTOCOL_VERSION => Ok(()),
        Message::Hello { version } => Err(ProtocolError::VersionMismatch { peer: version }),
        other => Err(ProtocolError::Unexpected(format!("{other:?}"))),
    }
}

/// Splits `data` into frames of at most [`MAX_DATA_CHUNK`] bytes.
pub fn chunks(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    data.chunks(MAX_DATA_CHUNK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(f: Frame) {
        let bytes = f.encode().unwrap();
        let mut cur = io::Cursor::new(bytes.clone());
        assert_eq!(read_frame(&mut cur).unwrap(), f);
        let mut d = Decoder::new();
        d.push(&bytes);
        assert_eq!(d.next_frame().unwrap(), Some(f));
        assert_eq!(d.pending(), 0);
    }

    /// Records the size of every `write` call.
    #[derive(Default)]
    struct WriteSizes {
        bytes: Vec<u8>,
        sizes: Vec<usize>,
    }

    impl Write for WriteSizes {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.sizes.push(buf.len());
            self.bytes.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_full_data_frame_goes_out_in_small_writes() {
        let frame = Frame::Stdout((0..MAX_DATA_CHUNK).map(|i| i as u8).collect());
        let mut w = WriteSizes::default();
        write_frame(&mut w, &frame).unwrap();
        assert!(w.sizes.len() > 1, "one write of {} bytes", w.bytes.len());
        assert!(w.sizes.iter().all(|&n| n <= MAX_WRITE), "{:?}", w.sizes);
        assert_eq!(read_frame(&mut io::Cursor::new(w.bytes)).unwrap(), frame);
    }

    #[test]
    fn frames_roundtrip() {
        roundtrip(Frame::Message(Message::Hello { version: 1 }));
        roundtrip(Frame::Message(Message::Signal {
            target: SignalTarget::Exec("e1".into()),
            signal: 15,
        }));
        roundtrip(Frame::Message(Message::SpawnMain {
            process: Some(Process::default()),
        }));
        roundtrip(Frame::Message(Message::SpawnMain { process: None }));
        roundtrip(Frame::Message(Message::AwaitMain));
        roundtrip(Frame::Stdout(b"hello\n".to_vec()));
        roundtrip(Frame::Stderr(vec![0, 255, 10]));
        roundtrip(Frame::Stdin(vec![]));
        roundtrip(Frame::StdinClose);
    }

    #[test]
    fn oversized_length_rejected_before_allocation() {
        // Claims 4 GiB; must fail on the header alone.
        let mut cur = io::Cursor::new(vec![0xff, 0xff, 0xff, 0xff, 0x01]);
        assert!(matches!(
            read_frame(&mut cur),
            Err(ProtocolError::FrameTooLong(_))
        ));
        let mut d = Decoder::new();
        d.push(&[0x7f, 0, 0, 0]);
        assert!(matches!(
            d.next_frame(),
            Err(ProtocolError::FrameTooLong(_))
        ));
    }

    #[test]
    fn truncated_and_bad_frames() {
        let bytes = Frame::Stdout(b"abcdef".to_vec()).encode().unwrap();
        let mut cur = io::Cursor::new(bytes[..7].to_vec());
        assert!(matches!(read_frame(&mut cur), Err(ProtocolError::Io(_))));
        let mut cur = io::Cursor::new(Vec::new());
        assert!(matches!(read_frame(&mut cur), Err(ProtocolError::Closed)));
        let mut cur = io::Cursor::new(vec![0, 0, 0, 0]);
        assert!(matches!(
            read_frame(&mut cur),
            Err(ProtocolError::EmptyFrame)
        ));
        let mut cur = io::Cursor::new(vec![0, 0, 0, 1, 0x99]);
        assert!(matches!(
            read_frame(&mut cur),
            Err(ProtocolError::UnknownKind(0x99))
        ));
        let mut cur = io::Cursor::new(vec![0, 0, 0, 3, 0x01, b'{', b'x']);
        assert!(matches!(
            read_frame(&mut cur),
            Err(ProtocolError::Malformed(_))
        ));
    }

    #[test]
    fn payload_too_large_is_an_error() {
        let f = Frame::Stdout(vec![0; MAX_FRAME_LEN as usize]);
        assert!(matches!(f.encode(), Err(ProtocolError::PayloadTooLarge(_))));
    }

    #[test]
    fn handshake_checks_version() {
        assert!(expect_hello(Message::Hello {
            version: PROTOCOL_VERSION
        })
        .is_ok());
        assert!(matches!(
            expect_hello(Message::Hello { version: 99 }),
            Err(ProtocolError::VersionMismatch { peer: 99 })
        ));
        assert!(expect_hello(Message::Ack).is_err());
    }

    proptest! {
        // The decoder never panics and never holds more than one frame's worth
        // of bytes beyond what it was given, whatever arrives.
        #[test]
        fn decoder_survives_arbitrary_input(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..32)) {
            let mut d = Decoder::new();
            for c in &chunks {
                d.push(c);
                while let Ok(Some(_)) = d.next_frame() {}
            }
        }

        #[test]
        fn read_frame_survives_arbitrary_input(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut cur = io::Cursor::new(bytes);
            while read_frame(&mut cur).is_ok() {}
        }

        #[test]
        fn data_frames_roundtrip(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let f = Frame::Stdout(data);
            let mut d = Decoder::new();
            let bytes = f.encode().unwrap();
            // Feed byte by byte.
            let mut out = None;
            for b in &bytes {
                d.push(std::slice::from_ref(b));
                if let Some(fr) = d.next_frame().unwrap() { out = Some(fr); }
            }
            prop_assert_eq!(out, Some(f));
        }
    }
}
