//! podman (through conmon) with `--runtime krun-oci`, on its own storage.
use std::fs;

use krun_oci_clients::command::{self, Ran};
use krun_oci_clients::terminal::Terminal;

use crate::check::{Check, EXIT_WAIT, OUTPUT_WAIT};
use crate::ctr::type_line;

/// `podman ARGS` with stderr into stdout.
pub fn podman(c: &Check, args: &[&str]) -> Ran {
    command::combined(&mut c.s.podman(args))
}

/// `podman run VERB_FLAGS COMMON_FLAGS ARGS` as a command.
fn run_command(c: &Check, flags: &[&str], isolated: bool, args: &[&str]) -> std::process::Command {
    let mut cmd = c.s.podman(&["run"]);
    cmd.args(flags)
        .args(c.s.podman_run_flags(isolated))
        .args(args);
    cmd
}

/// `podman run --rm`: exit code and stdout.
pub fn podman_run(c: &mut Check) {
    let cidfile = c.s.work.join("cid");
    let cidfile_arg = cidfile.display().to_string();
    let out = command::combined(&mut run_command(
        c,
        &["--rm", "--cidfile", &cidfile_arg],
        true,
        &["sh", "-c", "echo hello-podman; exit 7"],
    ));
    c.s.track_podman_id(fs::read_to_string(&cidfile).unwrap_or_default().trim());
    c.expect_code("podman run", out.code, 7);
    c.expect_out("podman run", &out.stdout, "hello-podman");
}

/// `podman run -d FLAGS` (no network where `isolated`): the ID (stdout only: a
/// warning on stderr is not part of it), tracked for the leak checks.
pub fn detached(c: &mut Check, flags: &[&str], isolated: bool, args: &[&str]) -> Option<String> {
    let mut all_flags = vec!["-d"];
    all_flags.extend(flags);
    let out = command::output(&mut run_command(c, &all_flags, isolated, args));
    if !out.ok() {
        let what = all_flags.join(" ");
        c.fail(format!("podman run {what}: {} {}", out.stdout, out.stderr));
        return None;
    }
    let cid = out.text().trim().to_string();
    c.s.track_podman_id(&cid);
    Some(cid)
}

/// A detached container whose workload printed `started` (in `podman logs`).
fn started(c: &mut Check, script: &str) -> Option<String> {
    let cid = detached(c, &[], true, &["sh", "-c", script])?;
    wait_logged(c, &cid, "started");
    Some(cid)
}

/// Waits until `podman logs` (its stdout) shows `want`.
pub fn wait_logged(c: &mut Check, cid: &str, want: &str) -> bool {
    let s = c.s;
    c.wait_output(want, || {
        command::output(&mut s.podman(&["logs", cid])).stdout
    })
}

/// `podman inspect --format FORMAT`.
fn inspect(c: &Check, cid: &str, format: &str) -> String {
    command::output(&mut c.s.podman(&["inspect", "--format", format, cid]))
        .text()
        .to_string()
}

fn expect_ok(c: &mut Check, out: Ran, what: &str) {
    if !out.ok() {
        c.fail(what);
    }
}

const LOOP: &str = "echo started; while :; do sleep 1; done";

/// podman stop is graceful: the SIGTERM trap runs, no SIGKILL fallback (exit 0, not 137).
pub fn podman_stop(c: &mut Check) {
    let Some(cid) = started(
        c,
        "trap \"echo got-term; exit 0\" TERM; echo started; while :; do sleep 1; done",
    ) else {
        return;
    };
    let stopped = podman(c, &["stop", "-t", "300", &cid]);
    expect_ok(c, stopped, "podman stop failed");
    let code = inspect(c, &cid, "{{.State.ExitCode}}");
    c.expect_code("podman stop", code, 0);
    let logs = podman(c, &["logs", &cid]).stdout;
    c.expect_out("podman stop", &logs, "got-term");
    let removed = podman(c, &["rm", "-f", &cid]);
    expect_ok(c, removed, "podman rm failed");
}

/// podman exec (conmon -> krun-oci exec --detach): exit code and output; -t gets a pty.
pub fn podman_exec(c: &mut Check) {
    let Some(cid) = started(c, LOOP) else {
        return;
    };
    let out = podman(c, &["exec", &cid, "sh", "-c", "echo exec-out; exit 5"]);
    c.expect_code("podman exec", out.code, 5);
    c.expect_out("podman exec", &out.stdout, "exec-out");
    // podman wants a terminal for -t.
    let script = "[ -t 1 ] && echo exec-tty-ok; exit 6";
    match Terminal::spawn(&mut c.s.podman(&["exec", "-t", &cid, "sh", "-c", script])) {
        Ok(term) => {
            let (code, screen) = term.wait();
            c.expect_code("podman exec -t", code, 6);
            c.expect_out("podman exec -t", &screen, "exec-tty-ok");
        }
        Err(e) => c.fail(format!("podman exec -t: {e:#}")),
    }
    let removed = podman(c, &["rm", "-f", &cid]);
    expect_ok(c, removed, "podman rm -f failed");
}

/// podman logs has stdout and stderr; podman kill is SIGKILL (the TERM trap is moot): 137.
pub fn podman_logs_kill(c: &mut Check) {
    let Some(cid) = started(
        c,
        "trap \"\" TERM; echo to-stdout; echo to-stderr >&2; echo started; while :; do sleep 1; done",
    ) else {
        return;
    };
    let logs = podman(c, &["logs", &cid]).stdout;
    c.expect_out("podman logs", &logs, "to-stdout");
    c.expect_out("podman logs", &logs, "to-stderr");
    let killed = podman(c, &["kill", &cid]);
    expect_ok(c, killed, "podman kill failed");
    // kill does not wait for the exit: podman wait does (and prints the code).
    let waited = podman(c, &["wait", &cid]);
    if !waited.ok() {
        c.fail(format!("podman wait: {}", waited.stdout));
    }
    c.expect_code("podman wait after kill", waited.text(), 137);
    let code = inspect(c, &cid, "{{.State.ExitCode}}");
    c.expect_code("podman kill", code, 137);
    let removed = podman(c, &["rm", &cid]);
    expect_ok(c, removed, "podman rm failed");
}

/// podman rm -f on a running container: stopped and removed, nothing listed after.
pub fn podman_rm_force(c: &mut Check) {
    let Some(cid) = started(c, LOOP) else {
        return;
    };
    let out = podman(c, &["rm", "-f", &cid]);
    if !out.ok() {
        c.fail(format!("podman rm -f: {}", out.stdout));
    }
    let listed =
        command::output(
            &mut c
                .s
                .podman(&["ps", "-a", "--no-trunc", "--format", "{{.ID}}"]),
        );
    if listed.stdout.contains(&cid) {
        c.fail(format!("podman ps -a still lists {cid}"));
    }
}

/// podman pause/unpause: status paused, then running.
pub fn podman_pause(c: &mut Check) {
    let Some(cid) = started(c, LOOP) else {
        return;
    };
    let paused = podman(c, &["pause", &cid]);
    expect_ok(c, paused, "podman pause failed");
    let status = inspect(c, &cid, "{{.State.Status}}");
    c.expect_code("podman pause status", status, "paused");
    let resumed = podman(c, &["unpause", &cid]);
    expect_ok(c, resumed, "podman unpause failed");
    let status = inspect(c, &cid, "{{.State.Status}}");
    c.expect_code("podman unpause status", status, "running");
    let removed = podman(c, &["rm", "-f", &cid]);
    expect_ok(c, removed, "podman rm -f failed");
}

/// podman update (runtime `update --resources FILE`): the CPU quota lands on the
/// VM's host cgroup, which holds QEMU and its helpers.
pub fn podman_update(c: &mut Check) {
    let Some(cid) = started(c, LOOP) else {
        return;
    };
    let updated = command::output(&mut c.s.podman(&[
        "update",
        "--cpu-quota",
        "50000",
        "--cpu-period",
        "100000",
        &cid,
    ]));
    if !updated.ok() {
        c.fail(format!("podman update: {}", updated.stderr));
    }
    let quota = krun_oci_testkit::leaks::cgroup_dirs(8)
        .into_iter()
        .filter(|d| d.display().to_string().contains(&cid))
        .flat_map(|d| [d.join("cpu.cfs_quota_us"), d.join("cpu.max")])
        .find_map(|f| fs::read_to_string(f).ok())
        .unwrap_or_default();
    let quota = quota.lines().next().unwrap_or_default();
    if !quota.starts_with("50000") {
        c.fail(format!(
            "VM cgroup cpu quota after podman update: '{quota}'"
        ));
    }
    let removed = podman(c, &["rm", "-f", &cid]);
    expect_ok(c, removed, "podman rm -f failed");
}

/// podman run -it on a terminal: keys in, output and the exit code out.
pub fn podman_it(c: &mut Check) {
    let cidfile = c.s.work.join("podman-it.cid");
    let cidfile_arg = cidfile.display().to_string();
    let mut cmd = run_command(
        c,
        &["-it", "--rm", "--cidfile", &cidfile_arg],
        true,
        &["sh"],
    );
    let mut term = match Terminal::spawn(&mut cmd) {
        Ok(t) => t,
        Err(e) => return c.fail(format!("podman run -it: {e:#}")),
    };
    let mut cid = String::new();
    OUTPUT_WAIT.until(|| {
        cid = fs::read_to_string(&cidfile)
            .unwrap_or_default()
            .trim()
            .to_string();
        !cid.is_empty()
    });
    c.s.track_podman_id(&cid);
    if c.wait_output("#", || term.screen()) {
        type_line(c, &mut term, "[ -t 0 ] && echo \"tty-$((6*7))\"");
        c.wait_output("tty-42", || term.screen());
        type_line(c, &mut term, "exit 9");
    }
    let code = term.exit_within(EXIT_WAIT);
    c.expect_code(
        "podman run -it",
        code.map(|c| c.to_string()).unwrap_or_default(),
        9,
    );
    if code.is_none() {
        let screen = term.screen();
        let lines: Vec<&str> = screen.lines().filter(|l| !l.trim().is_empty()).collect();
        println!(
            "  screen: {}",
            lines[lines.len().saturating_sub(5)..].join("\n")
        );
    }
    drop(term);
    if !cid.is_empty() {
        podman(c, &["rm", "-f", &cid]);
    }
}
