//! guest-init in the host-sandbox harness: fresh pid+mount(+uts) namespaces via
//! `unshare`, a busybox directory as the container root, unix sockets instead
//! of vsock. A small host-side client speaks the protocol crate.
//!
//! Needs root (namespaces, mounts) and /bin/busybox; without them the tests
//! fail, they do not skip. Deadlines below only turn a hang into a failure;
//! nothing asserts on how long anything takes.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use krun_oci_protocol::{
    self as proto, contract, ExecRequest, Frame, Message, Process, RefusalKind, SignalTarget,
    CONTROL_PORT, EXEC_PORT, HOST_EVENTS_PORT, PTY_PORT,
};

const DEADLINE: Duration = Duration::from_secs(60);
const APPLETS: &[&str] = &[
    "sh", "true", "false", "echo", "cat", "sleep", "kill", "dd", "head", "stty", "tty", "id", "ls",
    "hostname",
];

struct Sandbox {
    dir: tempfile::TempDir,
    child: Child,
    listener: UnixListener,
    events: Option<UnixStream>,
}

/// The init under test: `KRUN_OCI_INIT_TEST_BIN` (e.g. the static build), else
/// the one cargo built for this test run.
fn init_binary() -> PathBuf {
    std::env::var_os("KRUN_OCI_INIT_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_krun-oci-init").into())
}

fn build_rootfs(root: &Path) {
    for d in ["bin", "tmp", "proc", "dev", "sys", "run", "etc"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("/bin/busybox (busybox-static)");
    for a in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(a)).unwrap();
    }
}

impl Sandbox {
    /// Starts init but does not answer its ready beacon yet.
    fn launch() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        build_rootfs(&rootfs);
        let listener = UnixListener::bind(
            dir.path()
                .join(contract::host_port_socket(HOST_EVENTS_PORT)),
        )
        .unwrap();
        listener.set_nonblocking(true).unwrap();
        let log = std::fs::File::create(dir.path().join("init.log")).unwrap();
        let child = Command::new("unshare")
            .args(["--pid", "--mount", "--uts", "--fork", "--kill-child"])
            .arg(init_binary())
            .env("KRUN_OCI_INIT_SANDBOX", dir.path())
            .env("KRUN_OCI_INIT_ROOTFS", &rootfs)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("unshare");
        Sandbox {
            dir,
            child,
            listener,
            events: None,
        }
    }

    fn start() -> Self {
        let mut s = Self::launch();
        s.accept_events();
        s
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("init.log")).unwrap_or_default()
    }

    fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    /// Accepts the ready beacon: Hello both ways, then Ready.
    fn accept_events(&mut self) {
        let end = Instant::now() + DEADLINE;
        let mut s = loop {
            match self.listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if let Some(st) = self.child.try_wait().unwrap() {
                        panic!("init exited early ({st}): {}", self.log());
                    }
                    assert!(Instant::now() < end, "no ready beacon: {}", self.log());
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        proto::handshake(&mut s).unwrap();
        match proto::recv(&mut s).unwrap() {
            Message::Ready {
                init_version,
                timings,
            } => {
                assert!(!init_version.is_empty());
                assert!(timings.iter().any(|t| t.step == "listeners"), "{timings:?}");
            }
            other => panic!("expected Ready, got {other:?}"),
        }
        self.events = Some(s);
    }

    fn events(&mut self) -> &mut UnixStream {
        self.events.as_mut().expect("events stream")
    }

    fn connect(&self, port: u32) -> UnixStream {
        let s =
            UnixStream::connect(self.dir.path().join(contract::guest_port_socket(port))).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s
    }

    fn control(&self) -> UnixStream {
        let mut s = self.connect(CONTROL_PORT);
        proto::handshake(&mut s).unwrap();
        s
    }

    fn request(&self, msg: Message) -> Message {
        let mut c = self.control();
        proto::send(&mut c, msg).unwrap();
        proto::recv(&mut c).unwrap()
    }

    fn spawn_main(&self, p: Process) -> i32 {
        match self.request(Message::SpawnMain { process: Some(p) }) {
            Message::MainStarted { pid } => pid,
            other => panic!("spawn-main: {other:?}; log: {}", self.log()),
        }
    }

    /// Reads the events stream until MainExited: (stdout, stderr, code).
    fn collect_main(&mut self) -> (Vec<u8>, Vec<u8>, i32) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        loop {
            match proto::read_frame(self.events()).unwrap() {
                Frame::Stdout(d) => out.extend(d),
                Frame::Stderr(d) => err.extend(d),
                Frame::Message(Message::MainExited { code, .. }) => return (out, err, code),
                // Flow control for the stdin the test sent.
                Frame::Message(Message::StdinAck { .. }) => {}
                other => panic!("unexpected on events: {other:?}"),
            }
        }
    }

    fn exit_code_file(&self) -> String {
        std::fs::read_to_string(self.rootfs().join(contract::EXIT_CODE_FILE)).unwrap()
    }

    /// After MainExited init powers off (exits in the harness) by itself.
    fn wait_exit(&mut self) {
        let end = Instant::now() + DEADLINE;
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < end, "init did not exit: {}", self.log());
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Kill init (PID 1 of the namespace; every process of the namespace dies
        // and is reaped with it) while unshare is alive to reap init, then let
        // unshare exit. Killing unshare first would orphan init to the host.
        let pid = self.child.id();
        if let Ok(children) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
            for c in children
                .split_whitespace()
                .filter_map(|c| c.parse::<i32>().ok())
            {
                // SAFETY: kill(2) on a pid we just read as unshare's child.
                unsafe { libc::kill(c, libc::SIGKILL) };
            }
        }
        let end = Instant::now() + DEADLINE;
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < end {
            thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn process(args: &[&str]) -> Process {
    let mut p = Process::default();
    p.set_args(Some(args.iter().map(|s| s.to_string()).collect()));
    p
}

fn sh(script: &str) -> Process {
    process(&["sh", "-c", script])
}

/// Runs one exec session; returns (stdout, stderr, code) or the Nack reason.
fn exec(
    sb: &Sandbox,
    port: u32,
    req: ExecRequest,
    stdin: &[u8],
) -> Result<(Vec<u8>, Vec<u8>, i32), String> {
    let mut c = sb.connect(port);
    proto::handshake(&mut c).unwrap();
    proto::send(&mut c, Message::Exec(req)).unwrap();
    match proto::recv(&mut c).unwrap() {
        Message::ExecStarted { pid } => assert!(pid > 1),
        Message::Nack { reason, .. } => return Err(reason),
        other => panic!("exec: {other:?}"),
    }
    let mut w = c.try_clone().unwrap();
    let input = stdin.to_vec();
    let feeder = thread::spawn(move || {
        for chunk in proto::chunks(&input) {
            proto::write_frame(&mut w, &Frame::Stdin(chunk.to_vec())).unwrap();
        }
        let _ = proto::write_frame(&mut w, &Frame::StdinClose);
    });
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = loop {
        match proto::read_frame(&mut c).unwrap() {
            Frame::Stdout(d) => out.extend(d),
            Frame::Stderr(d) => err.extend(d),
            Frame::Message(Message::ExecExited { code }) => break code,
            Frame::Message(Message::StdinAck { .. }) => {}
            other => panic!("unexpected in exec session: {other:?}"),
        }
    };
    feeder.join().unwrap();
    Ok((out, err, code))
}

fn exec_req(id: &str, p: Process) -> ExecRequest {
    ExecRequest {
        id: id.into(),
        process: p,
        tty: false,
        size: None,
    }
}

#[test]
fn spawn_main_runs_once_and_reports_zero() {
    let mut sb = Sandbox::start();
    // The main waits for a line on stdin so it is surely alive for both requests.
    let p = sh("read x; echo out; echo err >&2; exit 0");
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    let replies: Vec<Message> = thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|_| {
                let (b, p, sb) = (barrier.clone(), p.clone(), &sb);
                s.spawn(move || {
                    let mut c = sb.control();
                    b.wait();
                    proto::send(&mut c, Message::SpawnMain { process: Some(p) }).unwrap();
                    proto::recv(&mut c).unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let started = replies
        .iter()
        .filter(|m| matches!(m, Message::MainStarted { .. }))
        .count();
    let refused = replies
        .iter()
        .filter(|m| matches!(m, Message::Nack { reason, .. } if reason.contains("already")))
        .count();
    assert_eq!((started, refused), (1, 1), "{replies:?}");
    // A third one, after the fact, is refused too.
    assert!(matches!(
        sb.request(Message::SpawnMain { process: Some(p) }),
        Message::Nack { .. }
    ));

    proto::write_frame(sb.events(), &Frame::Stdin(b"go\n".to_vec())).unwrap();
    proto::write_frame(sb.events(), &Frame::StdinClose).unwrap();
    let (out, err, code) = sb.collect_main();
    assert_eq!(
        (out.as_slice(), err.as_slice(), code),
        (&b"out\n"[..], &b"err\n"[..], 0)
    );
    assert_eq!(sb.exit_code_file(), "0");
    sb.wait_exit();
}

fn main_exit_code(script: &str) -> (i32, String) {
    let mut sb = Sandbox::start();
    sb.spawn_main(sh(script));
    let (_, _, code) = sb.collect_main();
    sb.wait_exit();
    (code, sb.exit_code_file())
}

#[test]
fn exit_code_seven() {
    assert_eq!(main_exit_code("exit 7"), (7, "7".to_string()));
}

#[test]
fn exit_code_sigkill_is_137() {
    assert_eq!(main_exit_code("kill -9 $$"), (137, "137".to_string()));
}

/// What the main leaves running gets SIGTERM, then SIGKILL after the grace
/// period when it ignores TERM; the main's code is still reported and written,
/// and init goes on to power off. The second leftover keeps the main's stdout
/// open: the output drain must not wait for it forever.
#[test]
fn leftovers_are_terminated_after_the_main_exits() {
    let script = "(trap '' TERM; exec sleep 1000) >/dev/null 2>&1 & \
                  (trap '' TERM; sleep 1000) & echo bye; exit 5";
    let mut sb = Sandbox::start();
    sb.spawn_main(sh(script));
    let (out, _, code) = sb.collect_main();
    assert_eq!((out.as_slice(), code), (&b"bye\n"[..], 5));
    assert_eq!(sb.exit_code_file(), "5");
    sb.wait_exit();
}

#[test]
fn stdout_and_stderr_separate_and_in_order() {
    let mut sb = Sandbox::start();
    sb.spawn_main(sh(
        "i=0; while [ $i -lt 300 ]; do echo o$i; echo e$i >&2; i=$((i+1)); done",
    ));
    let (out, err, code) = sb.collect_main();
    let want = |p: &str| (0..300).map(|i| format!("{p}{i}\n")).collect::<String>();
    assert_eq!(String::from_utf8(out).unwrap(), want("o"));
    assert_eq!(String::from_utf8(err).unwrap(), want("e"));
    assert_eq!(code, 0);
}

#[test]
fn one_mib_written_right_before_exit_is_not_lost() {
    let mut sb = Sandbox::start();
    sb.spawn_main(sh("dd if=/dev/zero bs=65536 count=16 2>/dev/null; exit 3"));
    let (out, _, code) = sb.collect_main();
    assert_eq!(out.len(), 1 << 20);
    assert!(out.iter().all(|&b| b == 0));
    assert_eq!(code, 3);
    assert_eq!(sb.exit_code_file(), "3");
}

#[test]
fn orphaned_grandchild_is_reaped() {
    let mut sb = Sandbox::start();
    // The inner shell backgrounds a short sleep and exits: the sleep is
    // reparented to init and must be reaped when it ends.
    sb.spawn_main(sh("sh -c 'sleep 0.1 & echo $!'; exec sleep 1000"));
    let mut line = Vec::new();
    while !line.ends_with(b"\n") {
        match proto::read_frame(sb.events()).unwrap() {
            Frame::Stdout(d) => line.extend(d),
            other => panic!("unexpected: {other:?}"),
        }
    }
    let orphan: i32 = String::from_utf8(line).unwrap().trim().parse().unwrap();
    let end = Instant::now() + DEADLINE;
    loop {
        let Message::Processes { processes } = sb.request(Message::Ps) else {
            panic!("ps")
        };
        assert!(processes.iter().any(|p| p.pid == 1));
        if !processes.iter().any(|p| p.pid == orphan) {
            // Gone from /proc: reaped, not a zombie.
            break;
        }
        assert!(
            Instant::now() < end,
            "orphan {orphan} never reaped: {processes:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        sb.request(Message::Signal {
            target: SignalTarget::Main,
            signal: 9
        }),
        Message::Ack
    );
    let (_, _, code) = sb.collect_main();
    assert_eq!(code, 137);
}

#[test]
fn fifty_concurrent_execs_get_their_own_codes() {
    let sb = Sandbox::start();
    let results: Vec<(i32, i32)> = thread::scope(|s| {
        let hs: Vec<_> = (0..50)
            .map(|i| {
                let sb = &sb;
                s.spawn(move || {
                    let (p, want) = match i % 3 {
                        0 => (process(&["true"]), 0),
                        1 => (process(&["false"]), 1),
                        _ => (sh(&format!("exit {i}")), i),
                    };
                    let (_, _, code) =
                        exec(sb, EXEC_PORT, exec_req(&format!("e{i}"), p), b"").unwrap();
                    (code, want)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (code, want)) in results.iter().enumerate() {
        assert_eq!(code, want, "exec {i}");
    }
}

#[test]
fn connect_before_serving_is_accepted() {
    let mut sb = Sandbox::launch();
    let sock = sb
        .dir
        .path()
        .join(contract::guest_port_socket(CONTROL_PORT));
    let end = Instant::now() + DEADLINE;
    while !sock.exists() {
        assert!(Instant::now() < end, "listener never bound: {}", sb.log());
        thread::sleep(Duration::from_millis(5));
    }
    // Init is bound but blocked on our (unanswered) beacon: it is not serving yet.
    let mut early = sb.connect(CONTROL_PORT);
    proto::send(
        &mut early,
        Message::Hello {
            version: proto::PROTOCOL_VERSION,
        },
    )
    .unwrap();
    proto::send(&mut early, Message::Heartbeat).unwrap();
    sb.accept_events();
    proto::expect_hello(proto::recv(&mut early).unwrap()).unwrap();
    assert_eq!(proto::recv(&mut early).unwrap(), Message::HeartbeatAck);
}

fn raw(s: &mut UnixStream, bytes: &[u8]) {
    s.write_all(bytes).unwrap();
}

fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = ((payload.len() + 1) as u32).to_be_bytes().to_vec();
    v.push(kind);
    v.extend_from_slice(payload);
    v
}

fn expect_nack(s: &mut UnixStream) -> String {
    match proto::recv(s) {
        Ok(Message::Nack { reason, .. }) => reason,
        other => panic!("expected Nack, got {other:?}"),
    }
}

fn expect_closed(s: &mut UnixStream) {
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    // Whatever came (at most a Nack), the guest closed the connection.
}

#[test]
fn malformed_frames_are_rejected_and_init_keeps_serving() {
    let sb = Sandbox::start();

    // Not a Hello first.
    let mut c = sb.connect(CONTROL_PORT);
    proto::expect_hello(proto::recv(&mut c).unwrap()).unwrap();
    proto::send(&mut c, Message::Heartbeat).unwrap();
    expect_nack(&mut c);
    expect_closed(&mut c);

    // Wrong version.
    let mut c = sb.connect(CONTROL_PORT);
    proto::send(&mut c, Message::Hello { version: 999 }).unwrap();
    proto::recv(&mut c).unwrap();
    expect_nack(&mut c);

    // Bad frames whose length is intact: Nack, and the connection goes on.
    let mut c = sb.control();
    raw(&mut c, &frame(0x01, b"{not json"));
    assert!(expect_nack(&mut c).contains("malformed"));
    raw(&mut c, &frame(0x99, b"x"));
    expect_nack(&mut c);
    raw(&mut c, &frame(0x02, b"stdout on control"));
    expect_nack(&mut c);
    raw(&mut c, &frame(0x01, br#"{"type":"no_such_message"}"#));
    expect_nack(&mut c);
    raw(&mut c, &frame(0x01, &vec![b'['; 1 << 20]));
    expect_nack(&mut c);
    proto::send(&mut c, Message::Heartbeat).unwrap();
    assert_eq!(proto::recv(&mut c).unwrap(), Message::HeartbeatAck);

    // Oversized length: rejected on the header, connection dropped.
    raw(&mut c, &[0xff, 0xff, 0xff, 0xff, 0x01]);
    assert!(expect_nack(&mut c).contains("exceeds"));
    expect_closed(&mut c);

    // Empty frame.
    let mut c = sb.control();
    raw(&mut c, &[0, 0, 0, 0]);
    expect_nack(&mut c);
    expect_closed(&mut c);

    // Truncated frame, then the host goes away.
    let mut c = sb.control();
    raw(&mut c, &[0, 0, 0, 100, 0x01, b'{']);
    c.shutdown(std::net::Shutdown::Write).unwrap();
    expect_closed(&mut c);

    // Garbage on the exec and pty ports.
    for port in [EXEC_PORT, PTY_PORT] {
        let mut c = sb.connect(port);
        proto::expect_hello(proto::recv(&mut c).unwrap()).unwrap();
        raw(&mut c, &[0x7f, 0, 0, 0]);
        expect_closed(&mut c);
    }

    // Still serving.
    assert_eq!(sb.request(Message::Heartbeat), Message::HeartbeatAck);
    assert!(matches!(sb.request(Message::Ps), Message::Processes { .. }));
}

#[test]
fn spawn_errors_are_worded_for_clients_and_allow_a_retry() {
    let mut sb = Sandbox::start();
    // The reason in runc's words, the kind for the host's 127/126.
    let refusal = |m| match m {
        Message::Nack { reason, kind } => (reason, kind),
        other => panic!("expected Nack, got {other:?}"),
    };
    let (r, kind) = refusal(sb.request(Message::SpawnMain {
        process: Some(process(&["no-such-cmd"])),
    }));
    assert!(r.contains("executable file not found in $PATH"), "{r}");
    assert_eq!(kind, Some(RefusalKind::ExecutableNotFound));
    let (r, kind) = refusal(sb.request(Message::SpawnMain {
        process: Some(process(&["/bin/nope"])),
    }));
    assert!(r.contains("no such file or directory"), "{r}");
    assert_eq!(kind, Some(RefusalKind::ExecutableNotFound));
    std::fs::write(sb.rootfs().join("tmp/data"), "x").unwrap();
    let (r, kind) = refusal(sb.request(Message::SpawnMain {
        process: Some(process(&["/tmp/data"])),
    }));
    assert!(r.contains("permission denied"), "{r}");
    assert_eq!(kind, Some(RefusalKind::PermissionDenied));
    // No process named and no Setup that gave one: nothing to run.
    let (r, kind) = refusal(sb.request(Message::SpawnMain { process: None }));
    assert!(r.contains("no process to run"), "{r}");
    assert_eq!(kind, None);
    // A bad cwd is not about the program.
    let mut bad_cwd = process(&["true"]);
    bad_cwd.set_cwd("/no-such-dir".into());
    let (r, kind) = refusal(sb.request(Message::SpawnMain {
        process: Some(bad_cwd),
    }));
    assert!(r.contains("chdir to cwd"), "{r}");
    assert_eq!(kind, None);
    let e = exec(
        &sb,
        EXEC_PORT,
        exec_req("x", process(&["no-such-cmd"])),
        b"",
    )
    .unwrap_err();
    assert!(e.contains("executable file not found in $PATH"), "{e}");
    // Nothing ran: the real spawn still works.
    sb.spawn_main(process(&["true"]));
    assert_eq!(sb.collect_main().2, 0);
}

#[test]
fn exec_stdin_roundtrip_and_user() {
    let sb = Sandbox::start();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (out, _, code) = exec(&sb, EXEC_PORT, exec_req("cat", process(&["cat"])), &data).unwrap();
    assert_eq!(code, 0);
    assert!(out == data, "cat returned {} bytes", out.len());

    let mut p = process(&["id"]);
    p.user_mut().set_uid(1000);
    p.user_mut().set_gid(1001);
    let (out, _, code) = exec(&sb, EXEC_PORT, exec_req("id", p), b"").unwrap();
    let out = String::from_utf8(out).unwrap();
    assert_eq!(code, 0);
    assert!(
        out.contains("uid=1000") && out.contains("gid=1001"),
        "{out}"
    );

    // The process's stdio are pipes, never sockets (clients and programs that
    // check their stdout's type see what they would under runc).
    let (out, _, code) = exec(
        &sb,
        EXEC_PORT,
        exec_req(
            "fds",
            sh("for f in 0 1 2; do busybox readlink /proc/self/fd/$f; done"),
        ),
        b"",
    )
    .unwrap();
    let out = String::from_utf8(out).unwrap();
    assert_eq!(code, 0);
    assert_eq!(
        out.lines().filter(|l| l.starts_with("pipe:")).count(),
        3,
        "{out}"
    );
}

#[test]
fn pty_exec_has_a_terminal_of_the_requested_size() {
    let sb = Sandbox::start();
    let req = ExecRequest {
        id: "t".into(),
        process: sh("stty size; tty"),
        tty: true,
        size: Some((50, 132)),
    };
    let (out, err, code) = exec(&sb, PTY_PORT, req, b"").unwrap();
    let out = String::from_utf8_lossy(&out);
    assert_eq!(code, 0, "{out}");
    assert!(err.is_empty());
    assert!(out.contains("50 132"), "{out}");
    assert!(out.contains("/dev/pts/"), "{out}");
}

#[test]
fn terminal_main_is_resizable() {
    let mut sb = Sandbox::start();
    let mut p = sh("read x; stty size");
    p.set_terminal(Some(true));
    sb.spawn_main(p);
    assert_eq!(
        sb.request(Message::Resize {
            rows: 40,
            cols: 100
        }),
        Message::Ack
    );
    proto::write_frame(sb.events(), &Frame::Stdin(b"go\n".to_vec())).unwrap();
    let (out, err, code) = sb.collect_main();
    let out = String::from_utf8_lossy(&out);
    assert!(err.is_empty());
    assert_eq!(code, 0);
    assert!(out.contains("40 100"), "{out}");
}

#[test]
fn signal_reaches_an_exec_session_and_shutdown_powers_off() {
    let mut sb = Sandbox::start();
    let mut c = sb.connect(EXEC_PORT);
    proto::handshake(&mut c).unwrap();
    proto::send(
        &mut c,
        Message::Exec(exec_req("s", process(&["sleep", "1000"]))),
    )
    .unwrap();
    assert!(matches!(
        proto::recv(&mut c).unwrap(),
        Message::ExecStarted { .. }
    ));
    let unknown = Message::Signal {
        target: SignalTarget::Exec("nope".into()),
        signal: 15,
    };
    assert!(matches!(sb.request(unknown), Message::Nack { .. }));
    let bad = Message::Signal {
        target: SignalTarget::Exec("s".into()),
        signal: 999,
    };
    assert!(matches!(sb.request(bad), Message::Nack { .. }));
    let main = Message::Signal {
        target: SignalTarget::Main,
        signal: 15,
    };
    assert!(
        matches!(sb.request(main), Message::Nack { .. }),
        "no main yet"
    );
    let term = Message::Signal {
        target: SignalTarget::Exec("s".into()),
        signal: 15,
    };
    assert_eq!(sb.request(term), Message::Ack);
    assert_eq!(
        proto::recv(&mut c).unwrap(),
        Message::ExecExited { code: 143 }
    );

    assert_eq!(sb.request(Message::Shutdown), Message::Ack);
    sb.wait_exit();
}
