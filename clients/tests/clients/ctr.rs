//! containerd's `ctr` through containerd-shim-krun-v2 (`shim_*`) and through the
//! stock runc shim with `--runc-binary` krun-oci (`runc_shim_*`).
use std::fs;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use krun_oci_clients::command::{self, Background};
use krun_oci_clients::image;
use krun_oci_clients::terminal::Terminal;
use krun_oci_testkit::wait::Poll;

use crate::check::{Check, EXIT_WAIT, OUTPUT_WAIT, SETTLE};
use crate::session::Shim;

/// Without a VM: a bad command must fail create with runc's words, through the shim.
pub fn shim_create_error(c: &mut Check) {
    let out = run_args(c, Shim::Krun, &["--rm"], &["bad1", "/no/such/binary"]);
    if out.ok() {
        c.fail("create of a missing binary succeeded");
    }
    c.expect_out("shim error", &out.stdout, "no such file or directory");
    c.s.ctr_run(&["containers", "rm", "bad1"]);
}

/// `ctr run FLAGS RUNTIME --rootfs ROOTFS ARGS` (stderr into stdout).
fn run_args(c: &Check, shim: Shim, flags: &[&str], args: &[&str]) -> command::Ran {
    command::combined(&mut run_command(c, shim, flags, args))
}

fn run_command(c: &Check, shim: Shim, flags: &[&str], args: &[&str]) -> Command {
    let mut cmd = c.s.ctr(&["run"]);
    cmd.args(flags)
        .args(c.s.runtime_flags(shim))
        .arg("--rootfs")
        .arg(&c.s.rootfs)
        .args(args);
    cmd
}

/// `ctr run --rm`: exit code, stdout and stderr.
pub fn shim_run(c: &mut Check) {
    let out = run_args(
        c,
        Shim::Krun,
        &["--rm"],
        &[
            "k1",
            "sh",
            "-c",
            "echo hello-from-shim; echo to-stderr >&2; exit 3",
        ],
    );
    c.expect_code("shim run", out.code, 3);
    c.expect_out("shim run", &out.stdout, "hello-from-shim");
    c.expect_out("shim run", &out.stdout, "to-stderr");
}

pub fn runc_shim_run(c: &mut Check) {
    let out = run_args(
        c,
        Shim::Runc,
        &["--rm"],
        &["r1", "sh", "-c", "echo hello-from-runc-shim; exit 4"],
    );
    c.expect_code("runc shim run", out.code, 4);
    c.expect_out("runc shim run", &out.stdout, "hello-from-runc-shim");
}

/// `ctr run --rm ID sh -c SCRIPT` in the background, its output into the file
/// `<work>/ID.out`; returns once the workload printed `ready` (its trap is
/// installed: a signal sent before would kill a shell that has none yet).
fn run_until_ready(c: &mut Check, shim: Shim, id: &str, script: &str) -> (Background, bool) {
    let out_path = c.s.work.join(format!("{id}.out"));
    let file = fs::File::create(&out_path).expect("creating the output file");
    let mut cmd = run_command(c, shim, &["--rm"], &[id, "sh", "-c", script]);
    cmd.stdout(file.try_clone().expect("dup")).stderr(file);
    let run = Background::spawn(&mut cmd).expect("spawning ctr run");
    let ready = c.wait_output("ready", || {
        fs::read_to_string(&out_path).unwrap_or_default()
    });
    (run, ready)
}

/// `ctr task kill`: SIGTERM runs the workload's trap; SIGKILL gives 137.
fn kill_scenario(c: &mut Check, shim: Shim) {
    let (run, ready) = run_until_ready(
        c,
        shim,
        "kt",
        "trap \"echo trapped; exit 42\" TERM; echo ready; while :; do sleep 1; done",
    );
    if ready {
        if !c.s.ctr_run(&["task", "kill", "kt"]).ok() {
            c.fail("ctr task kill failed");
        }
    } else {
        c.s.ctr_run(&["task", "kill", "-s", "SIGKILL", "kt"]);
    }
    c.expect_code("kill TERM", run.wait(), 42);
    let out = fs::read_to_string(c.s.work.join("kt.out")).unwrap_or_default();
    c.expect_out("kill TERM", &out, "trapped");
    let (run, ready) = run_until_ready(
        c,
        shim,
        "kk",
        "trap \"\" TERM; echo ready; while :; do sleep 1; done",
    );
    let killed = c.s.ctr_run(&["task", "kill", "-s", "SIGKILL", "kk"]).ok();
    if ready && !killed {
        c.fail("ctr task kill -s SIGKILL failed");
    }
    c.expect_code("kill KILL", run.wait(), 137);
}

pub fn shim_kill(c: &mut Check) {
    kill_scenario(c, Shim::Krun);
}

pub fn runc_shim_kill(c: &mut Check) {
    kill_scenario(c, Shim::Runc);
}

/// A `ctr events` subscription (all namespaces), read into memory; ended when dropped.
struct Events {
    child: Child,
    text: Arc<Mutex<String>>,
}

impl Events {
    /// Returns once the subscription is up: an event published now comes
    /// through. Labelling our namespace publishes /namespaces/update until one
    /// arrives.
    fn subscribe(c: &mut Check) -> Option<Events> {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&c.s.sock)
            .arg("events")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                c.fail(format!("ctr events: {e}"));
                return None;
            }
        };
        let text = Arc::new(Mutex::new(String::new()));
        let (mut stdout, sink) = (child.stdout.take().expect("piped"), text.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let events = Events { child, text };
        c.s.ctr_run(&["namespaces", "create", &c.s.ns]);
        let mut n = 0;
        let up = Poll::new(600, std::time::Duration::from_millis(100)).until(|| {
            if events.text.lock().unwrap().contains("/namespaces/update") {
                return true;
            }
            n += 1;
            c.s.ctr_run(&[
                "namespaces",
                "label",
                &c.s.ns,
                &format!("krun-test-sync={n}"),
            ]);
            false
        });
        if !up {
            c.fail("ctr events never subscribed");
        }
        Some(events)
    }

    /// The events of our namespace so far, one a line.
    fn ours(&self, ns: &str) -> Vec<String> {
        let marker = format!(" {ns} ");
        self.text
            .lock()
            .unwrap()
            .lines()
            .filter(|l| l.contains(&marker))
            .map(String::from)
            .collect()
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `ctr task ls` lists `id` RUNNING.
fn wait_task_running(c: &mut Check, id: &str) -> bool {
    let running = OUTPUT_WAIT.until(|| task_listed(c, id, "RUNNING"));
    if !running {
        c.fail(format!("task {id} never ran"));
    }
    running
}

/// Whether `ctr task ls` lists `id` with `status`.
fn task_listed(c: &Check, id: &str, status: &str) -> bool {
    c.s.ctr_run(&["task", "ls"]).stdout.lines().any(|l| {
        let mut fields = l.split_whitespace();
        fields.next() == Some(id) && fields.any(|f| f == status)
    })
}

/// `ctr task exec`: exit code and output; the task and exec events, and the
/// task's TaskExit before its TaskDelete.
fn exec_scenario(c: &mut Check, shim: Shim) {
    let Some(events) = Events::subscribe(c) else {
        return;
    };
    let started = run_args(
        c,
        shim,
        &["-d"],
        &["ke", "sh", "-c", "while :; do sleep 1; done"],
    );
    if !started.ok() {
        c.fail("ctr run -d failed");
        return;
    }
    if !wait_task_running(c, "ke") {
        return;
    }
    let out = c.s.ctr_run(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "ke",
        "sh",
        "-c",
        "echo exec-out; exit 5",
    ]);
    if out.stdout.contains("not implemented") || out.stdout.contains("Unimplemented") {
        c.fail(format!("exec: not available yet: {}", out.stdout));
    } else {
        c.expect_code("exec", out.code, 5);
        c.expect_out("exec", &out.stdout, "exec-out");
    }
    c.s.ctr_run(&["task", "kill", "-s", "SIGKILL", "ke"]);
    if !c.s.ctr_run(&["task", "rm", "ke"]).ok() {
        std::thread::sleep(std::time::Duration::from_secs(1));
        c.s.ctr_run(&["task", "rm", "-f", "ke"]);
    }
    if !c.s.ctr_run(&["containers", "rm", "ke"]).ok() {
        c.fail("container ke could not be removed");
    }
    let ours = events.ours(&c.s.ns);
    drop(events);
    let all = ours.join("\n");
    let position = |topic: &str| {
        let topic = format!(" {topic} ");
        let at: Vec<usize> = (0..ours.len())
            .filter(|&i| ours[i].contains(&topic))
            .collect();
        at
    };
    for topic in [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/exit",
        "/tasks/delete",
    ] {
        if position(topic).is_empty() {
            c.fail(format!("exec: no {topic} event: {all}"));
        }
    }
    // The task's own TaskExit (the last one: the exec's comes first) precedes its TaskDelete.
    match (
        position("/tasks/exit").last(),
        position("/tasks/delete").first(),
    ) {
        (Some(exit), Some(delete)) if exit < delete => {}
        _ => c.fail(format!("exec: TaskExit does not precede TaskDelete: {all}")),
    }
}

pub fn shim_exec(c: &mut Check) {
    exec_scenario(c, Shim::Krun);
}

pub fn runc_shim_exec(c: &mut Check) {
    exec_scenario(c, Shim::Runc);
}

/// `ctr run -t` on a terminal: the pty comes through the console socket; keys
/// go in, output and the exit code come out; `ctr task exec -t` alongside.
fn tty_scenario(c: &mut Check, shim: Shim) {
    let mut cmd = run_command(c, shim, &["-t", "--rm"], &["kty", "sh"]);
    let mut term = match Terminal::spawn(&mut cmd) {
        Ok(t) => t,
        Err(e) => return c.fail(format!("ctr run -t: {e:#}")),
    };
    if !wait_task_running(c, "kty") {
        return;
    }
    c.wait_output("#", || term.screen());
    type_line(c, &mut term, "[ -t 0 ] && echo \"tty-$((6*7))\"");
    c.wait_output("tty-42", || term.screen());
    let exec = Terminal::spawn(&mut c.s.ctr(&[
        "task",
        "exec",
        "-t",
        "--exec-id",
        "et",
        "kty",
        "sh",
        "-c",
        "[ -t 1 ] && echo exec-tty-ok; exit 6",
    ]));
    match exec {
        Ok(exec) => {
            let (code, screen) = exec.wait();
            c.expect_code("exec -t", code, 6);
            c.expect_out("exec -t", &screen, "exec-tty-ok");
        }
        Err(e) => c.fail(format!("ctr task exec -t: {e:#}")),
    }
    type_line(c, &mut term, "exit 9");
    let code = term.exit_within(EXIT_WAIT);
    c.expect_code(
        "ctr run -t",
        code.map(|c| c.to_string()).unwrap_or_default(),
        9,
    );
}

pub fn type_line(c: &mut Check, term: &mut Terminal, line: &str) {
    if let Err(e) = term.type_line(line) {
        c.fail(format!("{e:#}"));
    }
}

pub fn shim_tty(c: &mut Check) {
    tty_scenario(c, Shim::Krun);
}

pub fn runc_shim_tty(c: &mut Check) {
    tty_scenario(c, Shim::Runc);
}

const IMAGE_REF: &str = "krun-test.local/busybox:latest";

/// `ctr images import` of an OCI image layout built from the test rootfs, then
/// `ctr run IMAGE`: the rootfs is the snapshotter's (overlayfs) mount, handed
/// to the shim in CreateTask; nothing of it stays mounted.
fn image_scenario(c: &mut Check, shim: Shim, id: &str) {
    let tar = c.s.work.join("image.tar");
    if !fs::metadata(&tar).is_ok_and(|m| m.len() > 0) {
        if let Err(e) = image::write_layout(&c.s.rootfs, &tar) {
            let _ = fs::remove_file(&tar);
            return c.fail(format!("building the OCI image layout failed: {e:#}"));
        }
    }
    let base = IMAGE_REF.rsplit_once(':').map_or(IMAGE_REF, |(b, _)| b);
    let tar_arg = tar.display().to_string();
    let out =
        c.s.ctr_run(&["images", "import", "--base-name", base, &tar_arg]);
    if !out.ok() {
        return c.fail(format!("ctr images import: {}", out.stdout));
    }
    let out = c.s.ctr_run(&["images", "ls", "-q"]);
    if !out.stdout.lines().any(|l| l == IMAGE_REF) {
        return c.fail(format!("ctr images ls lacks {IMAGE_REF}: {}", out.stdout));
    }
    let mut cmd = c.s.ctr(&["run", "--rm"]);
    cmd.args(c.s.runtime_flags(shim)).args([
        IMAGE_REF,
        id,
        "sh",
        "-c",
        "cat /etc/image-marker; echo from-image; exit 3",
    ]);
    let out = command::combined(&mut cmd);
    c.expect_code("run image", out.code, 3);
    c.expect_out("run image", &out.stdout, image::MARKER.trim_end());
    c.expect_out("run image", &out.stdout, "from-image");
    c.s.ctr_run(&["containers", "rm", id]);
    // The shim mounted the snapshot at <bundle>/rootfs: nothing of it stays mounted.
    let bundle = format!("/{}/{id}/", c.s.ns);
    let mounts = SETTLE.settle(|| {
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&bundle))
            .map(String::from)
            .collect()
    });
    if !mounts.is_empty() {
        c.fail(format!("run image: mounts left: {}", mounts.join("\n")));
    }
    let out = c.s.ctr_run(&["images", "rm", "--sync", IMAGE_REF]);
    if !out.ok() {
        c.fail(format!("ctr images rm: {}", out.stdout));
    }
}

pub fn shim_image(c: &mut Check) {
    image_scenario(c, Shim::Krun, "ki");
}

pub fn runc_shim_image(c: &mut Check) {
    image_scenario(c, Shim::Runc, "ri");
}

/// Whether the host cgroup at `path` (a cgroupsPath) is frozen: the v1 freezer,
/// else v2's cgroup.freeze.
fn cgroup_frozen(path: &str) -> bool {
    let v1 = format!("/sys/fs/cgroup/freezer{path}/freezer.state");
    match fs::read_to_string(&v1) {
        Ok(state) => state.contains("FROZEN"),
        Err(_) => fs::read_to_string(format!("/sys/fs/cgroup{path}/cgroup.freeze"))
            .is_ok_and(|f| f.contains('1')),
    }
}

/// `ctr task pause`: PAUSED, the VM's host cgroup (`/<ns>/<id>`) frozen, exec
/// refused; `ctr task resume`: RUNNING, thawed, the workload goes on (its
/// counter moves).
fn pause_scenario(c: &mut Check, shim: Shim, id: &str) {
    let script = "i=0; while :; do i=$((i+1)); echo $i >/tmp/count; sleep 0.1; done";
    if !run_args(c, shim, &["-d"], &[id, "sh", "-c", script]).ok() {
        return c.fail("ctr run -d failed");
    }
    if !wait_task_running(c, id) {
        return;
    }
    if !c.s.ctr_run(&["task", "pause", id]).ok() {
        c.fail("ctr task pause failed");
    }
    if !task_listed(c, id, "PAUSED") {
        let ls = c.s.ctr_run(&["task", "ls"]).stdout;
        c.fail(format!("task not PAUSED: {ls}"));
    }
    let cgroup = format!("/{}/{id}", c.s.ns);
    if !cgroup_frozen(&cgroup) {
        c.fail(format!("the VM's cgroup {cgroup} is not frozen"));
    }
    if c.s
        .ctr_run(&["task", "exec", "--exec-id", "p1", id, "true"])
        .ok()
    {
        c.fail("exec in a paused task succeeded");
    }
    if !c.s.ctr_run(&["task", "resume", id]).ok() {
        c.fail("ctr task resume failed");
    }
    wait_task_running(c, id);
    if cgroup_frozen(&cgroup) {
        c.fail("the VM's cgroup is still frozen after resume");
    }
    // The workload runs again: its counter moves on from what it reads now.
    let count = |exec_id: &str| {
        command::output(&mut c.s.ctr(&[
            "task",
            "exec",
            "--exec-id",
            exec_id,
            id,
            "cat",
            "/tmp/count",
        ]))
        .text()
        .to_string()
    };
    let first = count("p2");
    let mut n = 0;
    let moved = SETTLE.until(|| {
        let now = count(&format!("p3-{n}"));
        n += 1;
        !now.is_empty() && now != first
    });
    if !moved {
        c.fail(format!("the counter stayed at '{first}' after resume"));
    }
    c.s.ctr_run(&["task", "kill", "-s", "SIGKILL", id]);
    SETTLE.until(|| c.s.ctr_run(&["task", "rm", id]).ok());
    if !c.s.ctr_run(&["containers", "rm", id]).ok() {
        c.fail(format!("container {id} could not be removed"));
    }
}

pub fn shim_pause(c: &mut Check) {
    pause_scenario(c, Shim::Krun, "kp");
}

pub fn runc_shim_pause(c: &mut Check) {
    pause_scenario(c, Shim::Runc, "rp");
}

/// The guest's OOM killer ends the workload: exit 137 and containerd's TaskOOM
/// (/tasks/oom) from containerd-shim-krun-v2 (the stock runc shim watches the
/// VM's host cgroup, which never sees the guest's OOM kill).
pub fn shim_oom(c: &mut Check) {
    let Some(events) = Events::subscribe(c) else {
        return;
    };
    let out = run_args(
        c,
        Shim::Krun,
        &["--rm", "--memory-limit", "134217728"],
        &["ko", "tail", "/dev/zero"],
    );
    c.expect_code("OOM kill", out.code, 137);
    let oom = Poll::new(100, std::time::Duration::from_millis(100)).until(|| {
        events
            .ours(&c.s.ns)
            .iter()
            .any(|e| e.contains(" /tasks/oom "))
    });
    if !oom {
        c.fail(format!(
            "no /tasks/oom event: {}",
            events.ours(&c.s.ns).join("\n")
        ));
    }
}

/// The host config file (/etc/krun-oci/config.toml; KRUN_OCI_CONFIG here) holds
/// for containerd-shim-krun-v2 as for the CLI: `vmm = "libkrun"` makes the
/// shim's create use libkrun (on a host without hardware KVM it fails, naming
/// libkrun).
pub fn shim_host_config(c: &mut Check) {
    if let Err(e) = fs::write(&c.s.host_config, "vmm = \"libkrun\"\n") {
        return c.fail(format!("writing the host config: {e}"));
    }
    let out = run_args(c, Shim::Krun, &["-d"], &["khc", "sleep", "100000"]);
    if out.ok() {
        let state = c.s.shim_state.join(&c.s.ns).join("khc/state.json");
        let vmm = fs::read(&state)
            .map_err(|e| e.to_string())
            .and_then(|d| {
                serde_json::from_slice::<serde_json::Value>(&d).map_err(|e| e.to_string())
            })
            .map(|v| v["vmm"].as_str().unwrap_or_default().to_string())
            .unwrap_or_else(|e| e);
        if vmm != "libkrun" {
            c.fail(format!(
                "host config: vmm=libkrun, yet the shim's VM is '{vmm}'"
            ));
        }
        c.s.ctr_run(&["task", "kill", "-s", "SIGKILL", "khc"]);
        c.s.ctr_run(&["task", "rm", "-f", "khc"]);
    } else {
        c.expect_out("host config", &out.stdout, "libkrun");
    }
    c.s.ctr_run(&["containers", "rm", "khc"]);
    let _ = fs::write(&c.s.host_config, "");
}
