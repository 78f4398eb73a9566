//! create / start / state / kill / delete / pid file.
use super::{fails, fails_with, sleeper, tests, Test};
use crate::harness::{pid_alive, wait_file, write_json, Ctx, Exit};
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::fs;

pub fn tests() -> Vec<Test> {
    tests![
        "create/basic" => create_basic,
        "create/flags-after-id" => create_flags_after_id,
        "create/bundle-short-flag" => create_bundle_short,
        "create/duplicate-id" => create_duplicate,
        "create/invalid-id" => create_invalid_id,
        "create/missing-bundle" => create_missing_bundle,
        "create/invalid-oci-version" => create_invalid_version,
        "create/unknown-keys-ignored" => create_unknown_keys,
        "create/args-not-run-before-start" => create_not_run,
        "create/config-edit-after-create-ignored" => create_edit_after,
        "create/pid-file-format" => create_pid_file,
        "create/missing-executable" => create_missing_exe,
        "create/stdio-is-containers" => create_stdio,
        "start/twice" => start_twice,
        "start/unknown" => start_unknown,
        "start/stopped" => start_stopped,
        "start/exec-fails-after-release" => start_exec_fails,
        "state/fields" => state_fields,
        "state/annotations" => state_annotations,
        "state/transitions" => state_transitions,
        "state/exit-code" => state_exit_code,
        "state/unknown" => state_unknown,
        "kill/signal-forms" => kill_forms,
        "kill/sigkill-exit-code" => kill_sigkill,
        "kill/created" => kill_created,
        "kill/stopped" => kill_stopped,
        "kill/all" => kill_all,
        "kill/unknown" => kill_unknown,
        "delete/running" => delete_running,
        "delete/force-running" => delete_force_running,
        "delete/created-consistent" => delete_created,
        "delete/created-without-force" => delete_created_without_force,
        "delete/stopped" => delete_stopped,
        "delete/force-missing" => delete_force_missing,
        "delete/missing" => delete_missing,
        "delete/nothing-left-behind" => delete_leftovers,
        "pidfile/wait-exit-code" => pidfile_wait,
        "pidfile/signal-forwarded" => pidfile_signal,
        "create/preserve-fds" => create_preserve_fds,
        "create/interrupted-then-delete-force" => create_interrupted,
    ]
}

fn create_basic(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(sleeper)?;
    let id = ctx.new_id();
    let c = ctx.create(&b, &id, &[])?;
    ensure!(pid_alive(c.pid), "container pid {} is not alive", c.pid);
    ensure!(ctx.status(&id)? == "created", "status is not created");
    Ok(())
}

fn create_flags_after_id(ctx: &mut Ctx) -> Result<()> {
    ctx.require_container()?;
    let b = ctx.bundle(sleeper)?;
    let id = ctx.new_id();
    let pf = ctx.path("pid");
    let (bs, ps) = (b.display().to_string(), pf.display().to_string());
    let out = ctx.rt(&["create", &id, "--bundle", &bs, "--pid-file", &ps])?;
    ensure!(out.ok(), "create ID --bundle B: {}", out.brief());
    if let Ok(p) = fs::read_to_string(&pf) {
        ctx.track_pid(p.parse().unwrap_or(0));
    }
    ensure!(ctx.status(&id)? == "created", "status is not created");
    Ok(())
}

fn create_bundle_short(ctx: &mut Ctx) -> Result<()> {
    ctx.require_container()?;
    let b = ctx.bundle(sleeper)?;
    let id = ctx.new_id();
    let pf = ctx.path("pid");
    let (bs, ps) = (b.display().to_string(), pf.display().to_string());
    let out = ctx.rt(&["create", "-b", &bs, &format!("--pid-file={ps}"), &id])?;
    ensure!(out.ok(), "create -b B --pid-file=P: {}", out.brief());
    if let Ok(p) = fs::read_to_string(&pf) {
        ctx.track_pid(p.parse().unwrap_or(0));
    }
    ensure!(ctx.status(&id)? == "created", "status is not created");
    Ok(())
}

fn create_duplicate(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(sleeper)?;
    let id = ctx.new_id();
    let c = ctx.create(&b, &id, &[])?;
    let b2 = ctx.bundle(sleeper)?;
    let bs = b2.display().to_string();
    let out = ctx.rt(&["create", "--bundle", &bs, &id])?;
    fails_with(&out, "container with given ID already exists")?;
    ensure!(ctx.status(&id)? == "created", "first container disturbed");
    ensure!(pid_alive(c.pid), "first container's pid died");
    Ok(())
}

fn create_invalid_id(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(sleeper)?;
    let bs = b.display().to_string();
    for bad in ["../escape", "a/b", "has space", ".."] {
        let out = ctx.rt(&["create", "--bundle", &bs, bad])?;
        if out.ok() {
            let _ = ctx.rt(&["delete", "--force", bad]);
            bail!("create accepted invalid ID {bad:?}");
        }
    }
    ensure!(
        !ctx.dir.join("escape").exists(),
        "an invalid ID wrote outside the root"
    );
    Ok(())
}

fn create_missing_bundle(ctx: &mut Ctx) -> Result<()> {
    let id = ctx.new_id();
    let missing = ctx.path("no-such-bundle").display().to_string();
    let out = ctx.rt(&["create", "--bundle", &missing, &id])?;
    fails(&out)?;
    crate::harness::no_trace(ctx, &id)?;
    Ok(())
}

fn create_invalid_version(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(|c| {
        sleeper(c);
        c["ociVersion"] = json!("not-a-version");
    })?;
    let id = ctx.new_id();
    let bs = b.display().to_string();
    let out = ctx.rt(&["create", "--bundle", &bs, &id])?;
    fails(&out).context("ociVersion \"not-a-version\" was accepted")?;
    crate::harness::no_trace(ctx, &id)?;
    Ok(())
}

fn create_unknown_keys(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(|c| {
        sleeper(c);
        c["org.conformance.unknownTopLevel"] = json!({"nested": [1, 2, 3]});
        c["annotations"] = json!({"org.conformance.unknown": "value"});
    })?;
    let id = ctx.new_id();
    ctx.create(&b, &id, &[])?;
    Ok(())
}

fn create_not_run(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(|c| c["process"]["args"] = json!(["sh", "-c", "touch /ran"]))?;
    let id = ctx.new_id();
    let c = ctx.create(&b, &id, &[])?;
    let marker = b.join("rootfs/ran");
    ensure!(!marker.exists(), "process.args ran before start");
    ctx.start(&id)?;
    ctx.wait_pid(c.pid)?;
    ensure!(marker.exists(), "process.args did not run after start");
    Ok(())
}

fn create_edit_after(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(|c| c["process"]["args"] = json!(["sh", "-c", "touch /original"]))?;
    let id = ctx.new_id();
    let c = ctx.create(&b, &id, &[])?;
    let p = b.join("config.json");
    let mut cfg: Value = serde_json::from_str(&fs::read_to_string(&p)?)?;
    cfg["process"]["args"] = json!(["sh", "-c", "touch /edited"]);
    write_json(&p, &cfg)?;
    ctx.start(&id)?;
    ctx.wait_pid(c.pid)?;
    ensure!(
        !b.join("rootfs/edited").exists(),
        "config.json edited after create took effect"
    );
    ensure!(
        b.join("rootfs/original").exists(),
        "the created process did not run"
    );
    Ok(())
}

fn create_pid_file(ctx: &mut Ctx) -> Result<()> {
    ctx.require_container()?;
    let b = ctx.bundle(sleeper)?;
    let id = ctx.new_id();
    let pf = ctx.path("pid");
    let (bs, ps) = (b.display().to_string(), pf.display().to_string());
    let out = ctx.rt(&["create", "--bundle", &bs, "--pid-file", &ps, &id])?;
    ensure!(out.ok(), "create: {}", out.brief());
    let text = fs::read_to_string(&pf).context("no pid file when create returned")?;
    let ok = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) && !text.starts_with('0');
    ensure!(
        ok,
        "pid file is {text:?}, want a bare decimal pid (no newline)"
    );
    let pid: i32 = text.parse()?;
    ctx.track_pid(pid);
    ensure!(pid_alive(pid), "pid {pid} from the pid file is not alive");
    let st = ctx.state(&id)?;
    ensure!(
        st["pid"] == json!(pid),
        "state pid {} != pid file {pid}",
        st["pid"]
    );
    Ok(())
}

fn create_missing_exe(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(|c| c["process"]["args"] = json!(["/no/such/binary"]))?;
    let id = ctx.new_id();
    let bs = b.display().to_string();
    let out = ctx.rt(&["create", "--bundle", &bs, &id])?;
    fails(&out).context("create accepted a missing process.args[0]")?;
    ensure!(
        out.stderr.contains("executable file not found in")
            || out.stderr.contains("no such file or directory"),
        "wording podman maps to 127 missing: {:?}",
        out.stderr.trim()
    );
    crate::harness::no_trace(ctx, &id)?;
    Ok(())
}

fn create_stdio(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(|c| {
        c["process"]["args"] = json!([
            "sh",
            "-c",
            "echo conformance-stdout; echo conformance-stderr >&2"
        ])
    })?;
    let id = ctx.new_id();
    let c = ctx.create(&b, &id, &[])?;
    ctx.start(&id)?;
    ctx.wait_pid(c.pid)?;
    let out = fs::read_to_string(&c.out.stdout_path)?;
    ensure!(
        out.contains("conformance-stdout"),
        "create's stdout lacks the workload's output: {out:?}"
    );
    let err_path = c.out.stdout_path.with_extension("err");
    let err = fs::read_to_string(err_path)?;
    ensure!(
        err.contains("conformance-stderr"),
        "create's stderr lacks the workload's stderr: {err:?}"
    );
    Ok(())
}

fn start_twice(ctx: &mut Ctx) -> Result<()> {
    let b = ctx
        .bundle(|c| c["process"]["args"] = json!(["sh", "-c", "echo x >> /count; sleep 100000"]))?;
    let id = ctx.new_id();
    ctx.create(&b, &id, &[])?;
    ctx.start(&id)?;
    fails(&ctx.rt(&["start", &id])?).context("second start")?;
    wait_file(&b.join("rootfs/count"), ctx.cfg.cmd_timeout)?;
    ensure!(
        ctx.status(&id)? == "running",
        "not running after second start"
    );
    // The file can be seen before its first line is (`>>` creates, then writes).
    let deadline = std::time::Instant::now() + ctx.cfg.cmd_timeout;
    while fs::read_to_string(b.join("rootfs/count"))?.is_empty()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let n = fs::read_to_string(b.join("rootfs/count"))?.lines().count();
    ensure!(n == 1, "main process ran {n} times");
    Ok(())
}

fn start_unknown(ctx: &mut Ctx) -> Result<()> {
    fails_with(
        &ctx.rt(&["start", "conf-no-such-container"])?,
        "container does not exist",
    )
}

fn start_stopped(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(|c| c["process"]["args"] = json!(["sh", "-c", "echo x >> /count"]))?;
    let id = ctx.new_id();
    let c = ctx.create(&b, &id, &[])?;
    ctx.start(&id)?;
    ctx.wait_pid(c.pid)?;
    ctx.wait_status(&id, "stopped")?;
    fails(&ctx.rt(&["start", &id])?).context("start on stopped")?;
    ensure!(ctx.status(&id)? == "stopped", "status changed");
    let n = fs::read_to_string(b.join("rootfs/count"))?.lines().count();
    ensure!(n == 1, "main process ran {n} times");
    Ok(())
}

/// runc's `start` returns once `runc init` has its word; the exec comes after.
/// A program the kernel refuses (ENOEXEC: found and executable, so create has
/// nothing to say) is the process's own failure: start succeeds, the container
/// stops with a failure status, and the reason is on its stderr.
fn start_exec_fails(ctx: &mut Ctx) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let b = ctx.bundle(|c| c["process"]["args"] = json!(["/bin/not-a-program"]))?;
    let program = b.join("rootfs/bin/not-a-program");
    fs::write(&program, b"neither ELF nor script\n")?;
    fs::set_permissions(&program, fs::Permissions::from_mode(0o755))?;
    let id = ctx.new_id();
    let c = ctx.create(&b, &id, &[])?;
    ctx.start(&id)?;
    let exit = ctx.wait_pid(c.pid)?;
    ensure!(
        exit.code() != 0,
        "the container exited 0 after a failed exec"
    );
    ctx.wait_status(&id, "stopped")?;
    let err = fs::read_to_string(c.out.stdout_path.with_extension("err"))?;
    ensure!(
        err.contains("exec format error"),
        "the container's stderr lacks the exec's failure: {err:?}"
    );
    Ok(())
}

fn state_fields(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(sleeper)?;
    let id = ctx.new_id();
    let c = ctx.create(&b, &id, &[])?;
    let st = ctx.state(&id)?;
    ensure!(st["ociVersion"].is_string(), "ociVersion missing");
    ensure!(st["id"] == json!(id), "id is {}", st["id"]);
    ensure!(
        st["status"] == json!("created"),
        "status is {}",
        st["status"]
    );
    ensure!(st["pid"] == json!(c.pid), "pid is {}", st["pid"]);
    let bundle = fs::canonicalize(&b)?;
    ensure!(
        st["bundle"] == json!(bundle.display().to_string()),
        "bundle is {}, want the absolute path {}",
        st["bundle"],
        bundle.display()
    );
    if let Some(created) = st.get("created").and_then(|v| v.as_str()) {
        chrono::DateTime::parse_from_rfc3339(created)
            .with_context(|| format!("created {created:?} is not RFC3339"))?;
    }
    Ok(())
}

fn state_annotations(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(|c| {
        sleeper(c);
        c["annotations"] = json!({"org.conformance.key": "value"});
    })?;
    let id = ctx.new_id();
    ctx.create(&b, &id, &[])?;
    let st = ctx.state(&id)?;
    ensure!(
        st["annotations"]["org.conformance.key"] == json!("value"),
        "state annotations are {}",
        st["annotations"]
    );
    Ok(())
}

fn state_transitions(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(sleeper)?;
    let id = ctx.new_id();
    let c = ctx.create(&b, &id, &[])?;
    ensure!(ctx.status(&id)? == "created", "not created after create");
    ctx.start(&id)?;
    ensure!(ctx.status(&id)? == "running", "not running after start");
    let out = ctx.rt(&["kill", &id, "KILL"])?;
    ensure!(out.ok(), "kill: {}", out.brief());
    ctx.wait_pid(c.pid)?;
    ctx.wait_status(&id, "stopped")?;
    Ok(())
}

fn state_exit_code(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(|c| c["process"]["args"] = json!(["sh", "-c", "exit 3"]))?;
    let id = ctx.new_id();
    let c = ctx.create(&b, &id, &[])?;
    ctx.start(&id)?;
    ctx.wait_pid(c.pid)?;
    ctx.wait_status(&id, "stopped")?;
    let st = ctx.state(&id)?;
    ensure!(
        st["exitCode"] == json!(3),
        "state exitCode is {}, want 3",
        st["exitCode"]
    );
    Ok(())
}

fn state_unknown(ctx: &mut Ctx) -> Result<()> {
    let out = ctx.rt(&["state", "conf-no-such-container"])?;
    fails_with(&out, "container does not exist")?;
    ensure!(out.code == Some(1), "exit status {:?}, want 1", out.code);
    Ok(())
}

fn kill_forms(ctx: &mut Ctx) -> Result<()> {
    let script = "trap 'echo USR1 >> /sig' USR1; trap 'echo HUP >> /sig' HUP; \
                  trap 'echo USR2 >> /sig' USR2; trap 'echo TERM >> /sig; exit 0' TERM; \
                  touch /ready; while :; do sleep 0.05; done";
    let b = ctx.bundle(|c| c["process"]["args"] = json!(["sh", "-c", script]))?;
    let id = ctx.new_id();
    let c = ctx.create(&b, &id, &[])?;
    ctx.start(&id)?;
    wait_file(&b.join("rootfs/ready"), ctx.cfg.cmd_timeout)?;
    let sig = b.join("rootfs/sig");
    for (n, form) in [(1, "USR1"), (2, "SIGHUP"), (3, "12")].iter() {
        let out = ctx.rt(&["kill", &id, form])?;
        ensure!(out.ok(), "kill {form}: {}", out.brief());
        let deadline = std::time::Instant::now() + ctx.cfg.cmd_timeout;
        while fs::read_to_string(&sig).unwrap_or_default().lines().count() < *n {
            ensure!(
                std::time::Instant::now() < deadline,
                "signal {form} never reached the workload"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    let out = ctx.rt(&["kill", &id])?;
    ensure!(out.ok(), "kill (default SIGTERM): {}", out.brief());
    let exit = ctx.wait_pid(c.pid)?;
    let got = fs::read_to_string(&sig)?;
    ensure!(got == "USR1\nHUP\nUSR2\nTERM\n", "workload saw {got:?}");
    ensure!(exit == Exit::Code(0), "exit after TERM trap: {exit:?}");
    Ok(())
}

fn kill_sigkill(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(sleeper)?;
    let id = ctx.new_id();
    let c = ctx.create(&b, &id, &[])?;
    ctx.start(&id)?;
    let out = ctx.rt(&["kill", &id, "9"])?;
    ensure!(out.ok(), "kill 9: {}", out.brief());
    let exit = ctx.wait_pid(c.pid)?;
    ensure!(
        exit.code() == 137,
        "waitpid gave {exit:?}, want SIGKILL / 137"
    );
    ctx.wait_status(&id, "stopped")?;
    Ok(())
}

fn kill_created(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(|c| c["process"]["args"] = json!(["sh", "-c", "touch /ran"]))?;
    let id = ctx.new_id();
    let c = ctx.create(&b, &id, &[])?;
    let out = ctx.rt(&["kill", &id, "SIGKILL"])?;
    ensure!(out.ok(), "kill on created: {}", out.brief());
    ctx.wait_pid(c.pid)?;
    ctx.wait_status(&id, "stopped")?;
    ensure!(!b.join("rootfs/ran").exists(), "the main process ran");
    Ok(())
}

fn kill_stopped(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(|_| {})?;
    let id = ctx.new_id();
    let c = ctx.create(&b, &id, &[])?;
    ctx.start(&id)?;
    ctx.wait_pid(c.pid)?;
    ctx.wait_status(&id, "stopped")?;
    fails_with(&ctx.rt(&["kill", &id, "KILL"])?, "container not running")?;
    ensure!(ctx.status(&id)? == "stopped", "status changed");
    Ok(())
}

fn kill_all(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(|c| {
        c["process"]["args"] = json!([
            "sh",
            "-c",
            "sleep 100000 & sleep 100000 & touch /ready; wait"
        ])
    })?;
    let id = ctx.new_id();
    let c = ctx.create(&b, &id, &[])?;
    ctx.start(&id)?;
    wait_file(&b.join("rootfs/ready"), ctx.cfg.cmd_timeout)?;
    let out = ctx.rt(&["kill", "--all", &id, "KILL"])?;
    ensure!(out.ok(), "kill --all: {}", out.brief());
    ctx.wait_pid(c.pid)?;
    ctx.wait_status(&id, "stopped")?;
    Ok(())
}

fn kill_unknown(ctx: &mut Ctx) -> Result<()> {
    fails_with(
        &ctx.rt(&["kill", "conf-no-such-container", "KILL"])?,
        "container does not exist",
    )
}

fn delete_running(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(sleeper)?;
    let id = ctx.new_id();
    let c = ctx.create(&b, &id, &[])?;
    ctx.start(&id)?;
    let out = ctx.rt(&["delete", &id])?;
    fails_with(
        &out,
        &format!("cannot delete container {id} that is not stopped: running"),
    )?;
    ensure!(ctx.status(&id)? == "running", "status changed");
    ensure!(pid_alive(c.pid), "pid died");
    Ok(())
}

fn delete_force_running(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(sleeper)?;
    let id = ctx.new_id();
    let c = ctx.create(&b, &id, &[])?;
    ctx.start(&id)?;
    let out = ctx.rt(&["delete", "--force", &id])?;
    ensure!(out.ok(), "delete --force: {}", out.brief());
    fails_with(&ctx.rt(&["state", &id])?, "container does not exist")?;
    let _ = ctx.wait_pid(c.pid);
    ensure!(!pid_alive(c.pid), "pid {} survived delete --force", c.pid);
    Ok(())
}

fn delete_created(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(|c| c["process"]["args"] = json!(["sh", "-c", "touch /ran"]))?;
    let id = ctx.new_id();
    let c = ctx.create(&b, &id, &[])?;
    let out = ctx.rt(&["delete", &id])?;
    if out.ok() {
        fails(&ctx.rt(&["state", &id])?).context("deleted, yet state still answers")?;
        let _ = ctx.wait_pid(c.pid);
        ensure!(!pid_alive(c.pid), "deleted, yet pid {} is alive", c.pid);
    } else {
        ensure!(ctx.status(&id)? == "created", "refused, yet status changed");
    }
    ensure!(!b.join("rootfs/ran").exists(), "the main process ran");
    Ok(())
}

/// runc deletes a `created` container without `--force` (containerd's runc shim
/// relies on it): the main never runs, the pid is gone, nothing answers `state`.
fn delete_created_without_force(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(|c| c["process"]["args"] = json!(["sh", "-c", "touch /ran"]))?;
    let id = ctx.new_id();
    let c = ctx.create(&b, &id, &[])?;
    let out = ctx.rt(&["delete", &id])?;
    ensure!(out.ok(), "delete of a created container: {}", out.brief());
    fails_with(&ctx.rt(&["state", &id])?, "container does not exist")?;
    let _ = ctx.wait_pid(c.pid);
    ensure!(!pid_alive(c.pid), "deleted, yet pid {} is alive", c.pid);
    ensure!(!b.join("rootfs/ran").exists(), "the main process ran");
    Ok(())
}

fn delete_stopped(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(|_| {})?;
    let id = ctx.new_id();
    let c = ctx.create(&b, &id, &[])?;
    ctx.start(&id)?;
    ctx.wait_pid(c.pid)?;
    ctx.wait_status(&id, "stopped")?;
    let out = ctx.rt(&["delete", &id])?;
    ensure!(out.ok(), "delete: {}", out.brief());
    fails_with(&ctx.rt(&["state", &id])?, "container does not exist")?;
    Ok(())
}

fn delete_force_missing(ctx: &mut Ctx) -> Result<()> {
    let out = ctx.rt(&["delete", "--force", "conf-no-such-container"])?;
    ensure!(
        out.ok(),
        "delete --force on a missing container: {}",
        out.brief()
    );
    Ok(())
}

fn delete_missing(ctx: &mut Ctx) -> Result<()> {
    fails_with(
        &ctx.rt(&["delete", "conf-no-such-container"])?,
        "container does not exist",
    )
}

fn delete_leftovers(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(sleeper)?;
    let id = ctx.new_id();
    let c = ctx.create(&b, &id, &[])?;
    ctx.start(&id)?;
    let out = ctx.rt(&["kill", &id, "KILL"])?;
    ensure!(out.ok(), "kill: {}", out.brief());
    ctx.wait_pid(c.pid)?;
    ctx.wait_status(&id, "stopped")?;
    let out = ctx.rt(&["delete", &id])?;
    ensure!(out.ok(), "delete: {}", out.brief());
    let left: Vec<String> = fs::read_dir(&ctx.root)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    ensure!(
        left.iter().all(|n| !n.contains(&id)),
        "state root still has {left:?}"
    );
    let list = ctx.rt(&["list", "--format", "json"])?;
    ensure!(
        list.stdout.trim() == "null",
        "list after delete: {:?}",
        list.stdout.trim()
    );
    let strays = processes_mentioning(&id);
    ensure!(
        strays.is_empty(),
        "processes mentioning the ID remain: {strays:?}"
    );
    let mut rootfs_mounts = Vec::new();
    let bundle = fs::canonicalize(&b)?.display().to_string();
    for line in fs::read_to_string("/proc/self/mountinfo")?.lines() {
        if line.contains(&bundle) || line.contains(&id) {
            rootfs_mounts.push(line.to_string());
        }
    }
    ensure!(
        rootfs_mounts.is_empty(),
        "host mounts remain: {rootfs_mounts:?}"
    );
    let cgroups = cgroups_named(&id);
    ensure!(cgroups.is_empty(), "cgroups remain: {cgroups:?}");
    Ok(())
}

/// Cgroup directories named `id` (the default path `/<id>`), in any v1 hierarchy or v2.
fn cgroups_named(id: &str) -> Vec<String> {
    let mut out = Vec::new();
    let root = std::path::Path::new("/sys/fs/cgroup");
    let mut dirs = vec![root.to_path_buf()];
    if let Ok(rd) = fs::read_dir(root) {
        dirs.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
    }
    for d in dirs {
        let p = d.join(id);
        if p.is_dir() {
            out.push(p.display().to_string());
        }
    }
    out
}

/// Host processes whose command line mentions `needle` (a VMM, a helper, a shim left behind).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    let me = std::process::id().to_string();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) || name == me {
            continue;
        }
        if let Ok(cmd) = fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) && crate::harness::pid_alive(name.parse().unwrap_or(0)) {
                out.push(format!("{name}: {}", cmd.trim()));
            }
        }
    }
    out
}

fn pidfile_wait(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(|c| c["process"]["args"] = json!(["sh", "-c", "exit 7"]))?;
    let id = ctx.new_id();
    let c = ctx.create(&b, &id, &[])?;
    ctx.start(&id)?;
    let exit = ctx.wait_pid(c.pid)?;
    ensure!(
        exit == Exit::Code(7),
        "waitpid(pid file's pid) gave {exit:?}, want exit 7"
    );
    Ok(())
}

/// conmon and the shims signal the pid from the pid file directly: the workload must get it.
fn pidfile_signal(ctx: &mut Ctx) -> Result<()> {
    let script = "trap 'echo USR1 > /sig; exit 3' USR1; touch /ready; while :; do sleep 0.05; done";
    let b = ctx.bundle(|c| c["process"]["args"] = json!(["sh", "-c", script]))?;
    let id = ctx.new_id();
    let c = ctx.create(&b, &id, &[])?;
    ctx.start(&id)?;
    wait_file(&b.join("rootfs/ready"), ctx.cfg.cmd_timeout)?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c.pid),
        nix::sys::signal::Signal::SIGUSR1,
    )?;
    let exit = ctx.wait_pid(c.pid)?;
    ensure!(
        exit == Exit::Code(3),
        "after kill(pid, SIGUSR1): {exit:?}, want the trap's exit 3"
    );
    Ok(())
}

/// `--preserve-fds 1`: the caller's fd 3 reaches the workload as fd 3.
fn create_preserve_fds(ctx: &mut Ctx) -> Result<()> {
    ctx.require_container()?;
    let b = ctx.bundle(|c| c["process"]["args"] = json!(["sh", "-c", "echo through-fd3 >&3"]))?;
    let id = ctx.new_id();
    let sink = ctx.path("fd3-sink");
    let f = fs::File::create(&sink)?;
    let pf = ctx.path("pid");
    let (bs, ps) = (b.display().to_string(), pf.display().to_string());
    let args = [
        "create",
        "--bundle",
        &bs,
        "--pid-file",
        &ps,
        "--preserve-fds",
        "1",
        &id,
    ];
    let out = ctx.rt_with_fd3(&args, &f)?;
    drop(f);
    ensure!(out.ok(), "create --preserve-fds 1: {}", out.brief());
    let pid: i32 = fs::read_to_string(&pf)?.trim().parse()?;
    ctx.track_pid(pid);
    ctx.start(&id)?;
    ctx.wait_pid(pid)?;
    let got = fs::read_to_string(&sink)?;
    ensure!(got == "through-fd3\n", "fd 3 received {got:?}");
    Ok(())
}

/// conmon or a shim can die while `create` runs. A createRuntime hook holds create at a known
/// point (the container, or VM, exists); create is SIGKILLed there; `delete --force ID` must then
/// leave nothing: no state, no process (VMM, helper, init) left behind.
fn create_interrupted(ctx: &mut Ctx) -> Result<()> {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    ctx.require_container()?;
    let marker = ctx.path("hook-reached");
    let m = marker.display().to_string();
    let b = ctx.bundle(|c| {
        sleeper(c);
        c["hooks"] = json!({"createRuntime": [crate::harness::sh_hook(&format!("touch {m}; exec sleep 600"))]});
    })?;
    let id = ctx.new_id();
    let log = fs::File::create(ctx.path("create.out"))?;
    let mut child = Command::new(&ctx.cfg.runtime)
        .arg("--root")
        .arg(&ctx.root)
        .args(["create", "--bundle"])
        .arg(&b)
        .arg(&id)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()?;
    let reached = wait_file(&marker, ctx.cfg.cmd_timeout);
    // SIGKILL create and its hook (same process group); the rest is the runtime's to clean.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(-(child.id() as i32)),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = child.wait();
    reached.context("create never reached its createRuntime hook")?;
    let out = ctx.rt(&["delete", "--force", &id])?;
    ensure!(
        out.ok(),
        "delete --force after an interrupted create: {}",
        out.brief()
    );
    crate::harness::no_trace(ctx, &id)?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut left = Vec::new();
    while std::time::Instant::now() < deadline {
        crate::harness::reap_zombies();
        left = crate::harness::orphans()
            .into_iter()
            .filter(|p| pid_alive(*p))
            .map(|p| {
                let cmd = fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                format!(
                    "{p}: {}",
                    String::from_utf8_lossy(&cmd).replace('\0', " ").trim()
                )
            })
            .collect();
        if left.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    ensure!(left.is_empty(), "processes left behind: {left:?}");
    let strays = processes_mentioning(&id);
    ensure!(
        strays.is_empty(),
        "processes mentioning the ID remain: {strays:?}"
    );
    Ok(())
}
