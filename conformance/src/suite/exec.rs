//! exec, and the console socket for create and exec.
use super::{fails, fails_with, sleeper, tests, Test};
use crate::harness::{pid_alive, write_json, Ctx, Exit};
use anyhow::{anyhow, bail, ensure, Context, Result};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use serde_json::json;
use std::fs;
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

pub fn tests() -> Vec<Test> {
    tests![
        "exec/exit-code" => exec_exit_code,
        "exec/env-cwd-user" => exec_env_cwd_user,
        "exec/process-file" => exec_process_file,
        "exec/detach-pid-file" => exec_detach,
        "exec/detach-signal-forwarded" => exec_detach_signal,
        "exec/not-running" => exec_not_running,
        "exec/unknown" => exec_unknown,
        "console/create" => console_create,
        "console/terminal-requires-socket" => console_requires_socket,
        "console/socket-without-terminal" => console_without_terminal,
        "console/exec" => console_exec,
        "namespaces/exec-joins-main" => exec_joins_main,
        "namespaces/user-mappings" => user_mappings,
    ]
}

/// A running sleeper container.
fn running(ctx: &mut Ctx) -> Result<(String, std::path::PathBuf)> {
    let b = ctx.bundle(sleeper)?;
    let id = ctx.new_id();
    ctx.create(&b, &id, &[])?;
    ctx.start(&id)?;
    Ok((id, b))
}

/// Prints the caller's namespaces, one per line (busybox readlink takes one path).
const NS_LINKS: &str = "for n in uts ipc mnt cgroup user; do readlink /proc/self/ns/$n; done";

/// An exec runs in the main's namespaces (uts, ipc, mount, cgroup, user), and
/// the main's hostname and cgroup root are the container's.
fn exec_joins_main(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(|c| {
        let ns = c["linux"]["namespaces"].as_array_mut().expect("namespaces");
        if !ns.iter().any(|n| n["type"] == "cgroup") {
            ns.push(json!({"type": "cgroup"}));
        }
        c["hostname"] = json!("ns-main");
        c["process"]["args"] = json!([
            "sh",
            "-c",
            format!("({NS_LINKS}) > /ns-main.tmp; mv /ns-main.tmp /ns-main; sleep 100000")
        ]);
    })?;
    let id = ctx.new_id();
    ctx.create(&b, &id, &[])?;
    ctx.start(&id)?;
    let main_file = b.join("rootfs/ns-main");
    crate::harness::wait_file(&main_file, ctx.cfg.cmd_timeout)?;
    let main = fs::read_to_string(&main_file)?;
    let out = ctx.rt(&["exec", &id, "sh", "-c", NS_LINKS])?;
    ensure!(out.ok(), "exec: {}", out.brief());
    let exec = out.stdout.clone();
    ensure!(main == exec, "main's namespaces:\n{main}exec's:\n{exec}");
    let out = ctx.rt(&["exec", &id, "sh", "-c", "hostname; cat /proc/self/cgroup"])?;
    ensure!(
        out.stdout.starts_with("ns-main\n"),
        "exec's hostname: {}",
        out.brief()
    );
    ensure!(
        out.stdout.contains("0::/\n"),
        "exec's cgroup (a cgroup namespace): {}",
        out.brief()
    );
    Ok(())
}

/// `linux.uidMappings`/`gidMappings` with a user namespace: the workload's
/// `/proc/self/uid_map` and `gid_map` are exactly the config's, and it runs as
/// its uid 0 there.
fn user_mappings(ctx: &mut Ctx) -> Result<()> {
    ctx.require_container()?;
    let r = ctx.checker_report(
        &[
            "--probe",
            "/proc/self/uid_map",
            "--probe",
            "/proc/self/gid_map",
        ],
        |c| {
            let ns = c["linux"]["namespaces"].as_array_mut().expect("namespaces");
            ns.push(json!({"type": "user"}));
            c["linux"]["uidMappings"] =
                json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
            c["linux"]["gidMappings"] =
                json!([{"containerID": 0, "hostID": 200000, "size": 65536}]);
        },
    )?;
    let fields = |path: &str| -> Vec<String> {
        r["probes"][path]["content"]
            .as_str()
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    ensure!(
        fields("/proc/self/uid_map") == ["0", "100000", "65536"],
        "uid_map {}",
        r["probes"]["/proc/self/uid_map"]
    );
    ensure!(
        fields("/proc/self/gid_map") == ["0", "200000", "65536"],
        "gid_map {}",
        r["probes"]["/proc/self/gid_map"]
    );
    ensure!(
        r["uid"] == 0 && r["gid"] == 0,
        "uid {} gid {}, want 0 in the namespace",
        r["uid"],
        r["gid"]
    );
    Ok(())
}

fn exec_exit_code(ctx: &mut Ctx) -> Result<()> {
    let (id, _) = running(ctx)?;
    for (cmd, want) in [("exit 5", 5), ("true", 0), ("false", 1)] {
        let out = ctx.rt(&["exec", &id, "sh", "-c", cmd])?;
        ensure!(
            out.code == Some(want),
            "exec `{cmd}`: {}, want exit {want}",
            out.brief()
        );
    }
    Ok(())
}

fn exec_env_cwd_user(ctx: &mut Ctx) -> Result<()> {
    let (id, _) = running(ctx)?;
    let out = ctx.rt(&[
        "exec",
        "--cwd",
        "/tmp",
        "-e",
        "CONF_VAR=conf-value",
        "-u",
        "1000:1000",
        &id,
        "sh",
        "-c",
        "echo \"$CONF_VAR $(pwd) $(id -u) $(id -g)\"",
    ])?;
    ensure!(out.ok(), "exec: {}", out.brief());
    ensure!(
        out.stdout.trim() == "conf-value /tmp 1000 1000",
        "exec saw {:?}",
        out.stdout.trim()
    );
    Ok(())
}

fn exec_process_file(ctx: &mut Ctx) -> Result<()> {
    let (id, _) = running(ctx)?;
    let pf = ctx.path("process.json");
    write_json(
        &pf,
        &json!({
            "terminal": false, "user": {"uid": 0, "gid": 0}, "cwd": "/work",
            "env": ["PATH=/bin", "CONF_VAR=from-process-file"],
            "args": ["sh", "-c", "echo \"$CONF_VAR $(pwd)\"; exit 6"],
        }),
    )?;
    let p = pf.display().to_string();
    let out = ctx.rt(&["exec", "--process", &p, &id])?;
    ensure!(
        out.code == Some(6),
        "exec --process: {}, want exit 6",
        out.brief()
    );
    ensure!(
        out.stdout.trim() == "from-process-file /work",
        "saw {:?}",
        out.stdout.trim()
    );
    Ok(())
}

fn exec_detach(ctx: &mut Ctx) -> Result<()> {
    let (id, b) = running(ctx)?;
    let pf = ctx.path("exec-pid");
    let p = pf.display().to_string();
    let out = ctx.rt(&[
        "exec",
        "--detach",
        "--pid-file",
        &p,
        &id,
        "sh",
        "-c",
        "while [ ! -e /go ]; do sleep 0.02; done; exit 4",
    ])?;
    ensure!(out.ok(), "exec --detach: {}", out.brief());
    let text = fs::read_to_string(&pf).context("no pid file when exec --detach returned")?;
    ensure!(
        !text.is_empty() && text.bytes().all(|c| c.is_ascii_digit()),
        "exec pid file is {text:?}, want a bare decimal pid"
    );
    let pid: i32 = text.parse()?;
    ctx.track_pid(pid);
    ensure!(pid_alive(pid), "exec pid {pid} is not alive");
    fs::write(b.join("rootfs/go"), "")?;
    let exit = ctx.wait_pid(pid)?;
    ensure!(
        exit == Exit::Code(4),
        "waitpid(exec pid) gave {exit:?}, want exit 4"
    );
    Ok(())
}

/// The Rust runc shim signals exec pids directly: the exec'd process must get the signal.
fn exec_detach_signal(ctx: &mut Ctx) -> Result<()> {
    let (id, b) = running(ctx)?;
    let pf = ctx.path("exec-pid");
    let p = pf.display().to_string();
    let out = ctx.rt(&[
        "exec",
        "--detach",
        "--pid-file",
        &p,
        &id,
        "sh",
        "-c",
        "trap 'exit 9' TERM; touch /exec-ready; while :; do sleep 0.05; done",
    ])?;
    ensure!(out.ok(), "exec --detach: {}", out.brief());
    let pid: i32 = fs::read_to_string(&pf)?.trim().parse()?;
    ctx.track_pid(pid);
    crate::harness::wait_file(&b.join("rootfs/exec-ready"), ctx.cfg.cmd_timeout)?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let exit = ctx.wait_pid(pid)?;
    ensure!(
        exit == Exit::Code(9),
        "after kill(exec pid, SIGTERM): {exit:?}, want exit 9"
    );
    Ok(())
}

fn exec_not_running(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(|_| {})?;
    let id = ctx.new_id();
    let c = ctx.create(&b, &id, &[])?;
    ctx.start(&id)?;
    ctx.wait_pid(c.pid)?;
    ctx.wait_status(&id, "stopped")?;
    let out = ctx.rt(&["exec", &id, "true"])?;
    fails(&out).context("exec in a stopped container")?;
    // runc 1.1: "cannot exec in a stopped container"; the contract: "not running".
    ensure!(
        out.stderr.contains("not running") || out.stderr.contains("stopped container"),
        "exec in a stopped container, stderr: {:?}",
        out.stderr.trim()
    );
    Ok(())
}

fn exec_unknown(ctx: &mut Ctx) -> Result<()> {
    fails_with(
        &ctx.rt(&["exec", "conf-no-such-container", "true"])?,
        "container does not exist",
    )
}

/// What a console-socket receiver got.
struct Console {
    name: String,
    master: OwnedFd,
}

/// Accepts one connection on `path` and receives the pty master the way go-runc and conmon do:
/// one message, SCM_RIGHTS with exactly one fd.
fn receive_console(listener: UnixListener, timeout: Duration) -> Result<Console> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                ensure!(
                    Instant::now() < deadline,
                    "nobody connected to the console socket"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e.into()),
        }
    };
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut buf = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; 8]);
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::empty(),
    )?;
    let mut fds = Vec::new();
    let mut cmsgs = 0;
    for c in msg.cmsgs()? {
        cmsgs += 1;
        if let ControlMessageOwned::ScmRights(v) = c {
            fds.extend(v);
        }
    }
    let n = msg.bytes;
    // SAFETY: these fds were just received and are owned by nobody else.
    let owned: Vec<OwnedFd> = fds
        .iter()
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    ensure!(cmsgs == 1, "{cmsgs} control messages, want exactly 1");
    ensure!(
        owned.len() == 1,
        "{} fds in SCM_RIGHTS, want exactly 1",
        owned.len()
    );
    let name = String::from_utf8_lossy(&buf[..n]).into_owned();
    let master = owned.into_iter().next().ok_or_else(|| anyhow!("no fd"))?;
    ensure!(
        nix::unistd::isatty(&master)?,
        "the received fd is not a terminal"
    );
    Ok(Console { name, master })
}

/// Reads from the pty master until `needle` shows up (bounded).
fn read_until(master: &OwnedFd, needle: &str, timeout: Duration) -> Result<String> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        ensure!(
            !left.is_zero(),
            "console never showed {needle:?}: {:?}",
            String::from_utf8_lossy(&got)
        );
        let mut pfd = [PollFd::new(master.as_fd(), PollFlags::POLLIN)];
        let ms =
            PollTimeout::try_from(left.as_millis().min(1000) as i32).unwrap_or(PollTimeout::MAX);
        if poll(&mut pfd, ms)? == 0 {
            continue;
        }
        let mut buf = [0u8; 4096];
        match nix::unistd::read(master, &mut buf) {
            Ok(0) | Err(nix::errno::Errno::EIO) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => bail!("read console: {e}"),
        }
    }
    let s = String::from_utf8_lossy(&got).into_owned();
    ensure!(s.contains(needle), "console output {s:?} lacks {needle:?}");
    Ok(s)
}

fn listen(ctx: &mut Ctx) -> Result<(UnixListener, String)> {
    let p = ctx.path("console.sock");
    Ok((UnixListener::bind(&p)?, p.display().to_string()))
}

fn console_create(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(|c| {
        c["process"]["terminal"] = json!(true);
        c["process"]["args"] = json!([
            "sh",
            "-c",
            "[ -t 0 ] && [ -t 1 ] && echo console-is-a-tty; echo via-dev-console >/dev/console; sleep 100000"
        ]);
    })?;
    let id = ctx.new_id();
    let (l, sock) = listen(ctx)?;
    let timeout = ctx.cfg.cmd_timeout;
    let rx = std::thread::spawn(move || receive_console(l, timeout));
    ctx.create(&b, &id, &["--console-socket", &sock])?;
    let con = rx.join().map_err(|_| anyhow!("receiver panicked"))??;
    ensure!(!con.name.is_empty(), "the message carried no pty name");
    ctx.start(&id)?;
    // /dev/console is the container's terminal too (runc binds the pty slave there).
    let out = read_until(&con.master, "via-dev-console", ctx.cfg.cmd_timeout)?;
    ensure!(out.contains("console-is-a-tty"), "console output {out:?}");
    Ok(())
}

fn console_requires_socket(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(|c| {
        sleeper(c);
        c["process"]["terminal"] = json!(true);
    })?;
    let id = ctx.new_id();
    let bs = b.display().to_string();
    fails(&ctx.rt(&["create", "--bundle", &bs, &id])?)
        .context("terminal: true without --console-socket was accepted")
}

fn console_without_terminal(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(sleeper)?;
    let id = ctx.new_id();
    let (_l, sock) = listen(ctx)?;
    let bs = b.display().to_string();
    fails(&ctx.rt(&["create", "--bundle", &bs, "--console-socket", &sock, &id])?)
        .context("--console-socket with terminal: false was accepted")
}

fn console_exec(ctx: &mut Ctx) -> Result<()> {
    let (id, _) = running(ctx)?;
    let (l, sock) = listen(ctx)?;
    let timeout = ctx.cfg.cmd_timeout;
    let rx = std::thread::spawn(move || receive_console(l, timeout));
    let pf = ctx.path("exec-pid");
    let p = pf.display().to_string();
    let out = ctx.rt(&[
        "exec",
        "-t",
        "--detach",
        "--console-socket",
        &sock,
        "--pid-file",
        &p,
        &id,
        "sh",
        "-c",
        "[ -t 0 ] && echo exec-console-is-a-tty; sleep 100000",
    ])?;
    ensure!(
        out.ok(),
        "exec -t --detach --console-socket: {}",
        out.brief()
    );
    if let Ok(t) = fs::read_to_string(&pf) {
        ctx.track_pid(t.trim().parse().unwrap_or(0));
    }
    let con = rx.join().map_err(|_| anyhow!("receiver panicked"))??;
    read_until(&con.master, "exec-console-is-a-tty", ctx.cfg.cmd_timeout)?;
    Ok(())
}
