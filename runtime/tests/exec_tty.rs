//! End-to-end exec and terminals on real microVMs, through the krun-oci binary.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

/// A running `sleep` container to exec into.
fn running(rt: &Runtime, id: &str) -> (TestBundle, i32) {
    become_subreaper();
    let b = TestBundle::new(&["sleep", "100000"]);
    let pid = rt.create(id, &b, &b.path().join("o"), &b.path().join("e"));
    rt.ok(&["start", id]);
    (b, pid)
}

fn exec_code(rt: &Runtime, id: &str, cmd: &[&str]) -> i32 {
    let mut args = vec!["exec", id];
    args.extend_from_slice(cmd);
    rt.run(&args).status.code().unwrap()
}

fn finish(rt: &Runtime, id: &str, pid: i32) {
    let helpers = rt.helper_pids(id);
    rt.ok(&["kill", id, "KILL"]);
    assert_eq!(wait_exit(pid), 137);
    rt.ok(&["delete", id]);
    assert_cleaned_up(rt, id, &helpers);
}

#[test]
fn exec_exit_codes_stdin_and_concurrency() {
    if !vm_available("exec_exit_codes_stdin_and_concurrency") {
        return;
    }
    let rt = Runtime::new();
    let (b, pid) = running(&rt, "ex");
    assert_eq!(exec_code(&rt, "ex", &["true"]), 0);
    assert_eq!(exec_code(&rt, "ex", &["false"]), 1);
    assert_eq!(exec_code(&rt, "ex", &["sh", "-c", "exit 42"]), 42);
    assert_eq!(exec_code(&rt, "ex", &["sh", "-c", "kill -9 $$"]), 137);
    let missing = rt.run(&["exec", "ex", "no-such-command"]);
    assert_eq!(missing.status.code(), Some(127));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("executable file not found in $PATH"));
    // Present but not executable: 126.
    let noexec = b.rootfs().join("noexec");
    fs::write(&noexec, "#!/bin/sh\necho ran\n").unwrap();
    fs::set_permissions(&noexec, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let denied = rt.run(&["exec", "ex", "/noexec"]);
    assert_eq!(denied.status.code(), Some(126), "{denied:?}");
    // env, cwd and user.
    let out = rt.ok(&[
        "exec",
        "-e",
        "FOO=bar",
        "--cwd",
        "/tmp",
        "-u",
        "1000:1000",
        "ex",
        "sh",
        "-c",
        "echo $FOO $(pwd) $(id -u):$(id -g)",
    ]);
    assert_eq!(out, "bar /tmp 1000:1000\n");
    // 10 MiB through cat, byte-exact.
    let data: Vec<u8> = (0..10 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let input = b.path().join("in");
    fs::write(&input, &data).unwrap();
    let out = rt
        .cmd(&["exec", "ex", "cat"])
        .stdin(fs::File::open(&input).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        out.stdout == data,
        "cat returned {} bytes, not the 10 MiB sent",
        out.stdout.len()
    );
    // 20 concurrent execs, each with its own code.
    let children: Vec<_> = (0..20)
        .map(|i| {
            let code = format!("exit {}", i + 1);
            let c = rt
                .cmd(&["exec", "ex", "sh", "-c", &code])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            (i + 1, c)
        })
        .collect();
    for (want, mut c) in children {
        assert_eq!(c.wait().unwrap().code(), Some(want));
    }
    let ps: Vec<i32> = serde_json::from_str(&rt.ok(&["ps", "--format", "json", "ex"])).unwrap();
    assert!(ps.contains(&1), "guest pids: {ps:?}");
    finish(&rt, "ex", pid);
    // exec into a stopped or deleted container fails cleanly.
    let out = rt.run(&["exec", "ex", "true"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("container does not exist"));
}

#[test]
fn exec_detached_pid_forwards_signals_and_exits_with_code() {
    if !vm_available("exec_detached_pid_forwards_signals_and_exits_with_code") {
        return;
    }
    let rt = Runtime::new();
    let (b, pid) = running(&rt, "ed");
    let pid_file = b.path().join("exec.pid");
    let out = b.path().join("exec.out");
    let status = rt
        .cmd(&[
            "exec",
            "--detach",
            "--pid-file",
            pid_file.to_str().unwrap(),
            "ed",
            "sh",
            "-c",
            "trap 'echo got-usr1' USR1; trap 'echo trapped; exit 9' TERM; echo up; \
             while true; do sleep 0.1; done",
        ])
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out).unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    let relay: i32 = fs::read_to_string(&pid_file).unwrap().parse().unwrap();
    eventually("exec output", Duration::from_secs(30), || {
        fs::read_to_string(&out).unwrap_or_default().contains("up")
    });
    // Any catchable signal is relayed, not only the stop signals.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(relay),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .unwrap();
    eventually("USR1 trapped", Duration::from_secs(30), || {
        fs::read_to_string(&out)
            .unwrap_or_default()
            .contains("got-usr1")
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(relay),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(wait_exit(relay), 9);
    assert!(fs::read_to_string(&out).unwrap().contains("trapped"));
    finish(&rt, "ed", pid);
    let out = rt.run(&["exec", "--detach", "ed", "true"]);
    assert!(!out.status.success());
}

/// A console-socket receiver as conmon and go-runc implement it: one message,
/// exactly one fd, the data is the pty's name.
fn receive_master(listener: &UnixListener) -> OwnedFd {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let (s, _) = listener.accept().unwrap();
    let mut buf = [0u8; 4096];
    let mut fds = Vec::new();
    let n = {
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 2]);
        let msg =
            recvmsg::<()>(s.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::empty()).unwrap();
        for c in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(f) = c {
                fds.extend(f);
            }
        }
        msg.bytes
    };
    assert_eq!(fds.len(), 1, "exactly one fd");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("/dev/pts/"));
    // SAFETY: the fd was just received and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fds[0]) }
}

/// Reads from the terminal until `want` shows up (bounded).
fn read_until(master: &mut fs::File, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    nix::fcntl::fcntl(
        &*master,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .unwrap();
    while !seen.contains(want) {
        assert!(
            Instant::now() < deadline,
            "terminal never showed {want:?}; saw {seen:?}"
        );
        match master.read(&mut buf) {
            Ok(n) if n > 0 => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    seen
}

fn resize(master: &fs::File, rows: u16, cols: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    assert_eq!(
        // SAFETY: TIOCSWINSZ reads a winsize from the pointer.
        unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) },
        0
    );
}

/// Types into the shell, checks echo and resize, exits it with 4. The master is
/// returned, to be closed only after the process exited (closing it hangs up).
fn drive_shell(master: OwnedFd) -> fs::File {
    let mut m = fs::File::from(master);
    m.write_all(b"echo h''i\n").unwrap();
    read_until(&mut m, "hi\r\n");
    resize(&m, 50, 132);
    // The size reaches the guest asynchronously (SIGWINCH -> resize message).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        m.write_all(b"stty size\n").unwrap();
        let seen = read_until(&mut m, "\r\n$ ");
        if seen.contains("50 132") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "size never reached the guest: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    m.write_all(b"exit 4\n").unwrap();
    m
}

#[test]
fn console_socket_for_create_and_exec() {
    if !vm_available("console_socket_for_create_and_exec") {
        return;
    }
    become_subreaper();
    let rt = Runtime::new();
    let b = TestBundle::new(&["sh"]);
    b.write_config(|c| {
        c["process"]["terminal"] = serde_json::json!(true);
        c["process"]["env"] = serde_json::json!(["PATH=/bin", "PS1=$ ", "TERM=xterm"]);
    });
    let sock = b.path().join("console.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let pid_file = b.path().join("pid");
    let receiver = std::thread::spawn(move || {
        let m = receive_master(&listener);
        (m, listener)
    });
    let out = rt.run(&[
        "create",
        "--bundle",
        b.path().to_str().unwrap(),
        "--console-socket",
        sock.to_str().unwrap(),
        "--pid-file",
        pid_file.to_str().unwrap(),
        "tty",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (master, listener) = receiver.join().unwrap();
    let pid: i32 = fs::read_to_string(&pid_file).unwrap().parse().unwrap();
    rt.ok(&["start", "tty"]);
    // exec -t with a console socket while the main's shell runs.
    let exec_pid_file = b.path().join("exec.pid");
    let receiver = std::thread::spawn(move || (receive_master(&listener), listener));
    let st = rt
        .cmd(&[
            "exec",
            "-t",
            "--detach",
            "--console-socket",
            sock.to_str().unwrap(),
            "--pid-file",
            exec_pid_file.to_str().unwrap(),
            "-e",
            "PS1=$ ",
            "tty",
            "sh",
        ])
        .stdin(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let (exec_master, listener) = receiver.join().unwrap();
    let relay: i32 = fs::read_to_string(&exec_pid_file).unwrap().parse().unwrap();
    let exec_master = drive_shell(exec_master);
    assert_eq!(wait_exit(relay), 4);
    drop(exec_master);
    // The same without --detach: krun-oci exec itself relays, resizes included.
    let receiver = std::thread::spawn(move || receive_master(&listener));
    let mut attached = rt
        .cmd(&[
            "exec",
            "-t",
            "--console-socket",
            sock.to_str().unwrap(),
            "-e",
            "PS1=$ ",
            "tty",
            "sh",
        ])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let exec_master = drive_shell(receiver.join().unwrap());
    assert_eq!(attached.wait().unwrap().code(), Some(4));
    drop(exec_master);
    let master = drive_shell(master);
    assert_eq!(wait_exit(pid), 4);
    drop(master);
    rt.ok(&["delete", "tty"]);
    assert!(!Path::new(&rt.root.path().join("tty")).exists());
}

/// `exec -t` with a terminal as its stdin (a person at a shell): input and echo,
/// ^C typed as a character interrupts the guest's foreground command (the guest's
/// line discipline sends SIGINT), and the window size follows the host terminal.
#[test]
fn exec_t_on_a_terminal_relays_input_ctrl_c_and_resizes() {
    if !vm_available("exec_t_on_a_terminal_relays_input_ctrl_c_and_resizes") {
        return;
    }
    let rt = Runtime::new();
    let (_b, pid) = running(&rt, "et");
    let pty = nix::pty::openpty(None, None).unwrap();
    let slave = pty.slave;
    let mut cmd = rt.cmd(&["exec", "-t", "-e", "PS1=$ ", "et", "sh"]);
    cmd.stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave.try_clone().unwrap()));
    // SAFETY: setsid and TIOCSCTTY are async-signal-safe: the terminal becomes
    // krun-oci's controlling terminal, as a login shell's would.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::setsid();
            libc::ioctl(0, libc::TIOCSCTTY, 0);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(slave);
    let mut m = fs::File::from(pty.master);
    m.write_all(b"sleep 101\n").unwrap();
    eventually(
        "sleep 101 to run in the guest",
        Duration::from_secs(30),
        || {
            let out = rt.run(&["exec", "et", "sh", "-c", "ps | grep -c '[s]leep 101'"]);
            String::from_utf8_lossy(&out.stdout).trim() == "1"
        },
    );
    m.write_all(b"\x03").unwrap();
    m.write_all(b"echo after-$((2+3))\n").unwrap();
    read_until(&mut m, "after-5");
    let m = drive_shell(OwnedFd::from(m));
    assert_eq!(child.wait().unwrap().code(), Some(4));
    drop(m);
    finish(&rt, "et", pid);
}
