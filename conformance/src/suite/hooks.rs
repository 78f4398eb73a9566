//! Hooks: order, the state on stdin, failure semantics, timeouts. All hooks here are host
//! shell commands in the runtime namespace (prestart, createRuntime, poststart, poststop).
use super::{fails, sleeper, tests, Test};
use crate::harness::{pid_alive, sh_hook, Ctx};
use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use std::fs;
use std::time::{Duration, Instant};

pub fn tests() -> Vec<Test> {
    tests![
        "hooks/order" => hooks_order,
        "hooks/stdin-state" => hooks_stdin,
        "hooks/start-container" => hooks_start_container,
        "hooks/create-container" => hooks_create_container,
        "hooks/create-runtime-failure-aborts" => hooks_create_fail,
        "hooks/poststart-failure-warns" => hooks_poststart_fail,
        "hooks/poststop-failure-warns" => hooks_poststop_fail,
        "hooks/timeout" => hooks_timeout,
    ]
}

fn log_lines(p: &std::path::Path) -> Vec<String> {
    fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn hooks_order(ctx: &mut Ctx) -> Result<()> {
    let log = ctx.path("hooklog");
    let l = log.display().to_string();
    let h = |name: &str| sh_hook(&format!("echo {name} >> {l}"));
    let b = ctx.bundle(|c| {
        sleeper(c);
        c["hooks"] = json!({
            "prestart": [h("prestart")],
            "createRuntime": [h("createRuntime"), h("createRuntime2")],
            "poststart": [h("poststart")],
            "poststop": [h("poststop")],
        });
    })?;
    let id = ctx.new_id();
    let c = ctx.create(&b, &id, &[])?;
    let got = log_lines(&log);
    ensure!(
        got == ["prestart", "createRuntime", "createRuntime2"],
        "after create: {got:?}"
    );
    ctx.start(&id)?;
    let got = log_lines(&log);
    ensure!(
        got.len() == 4 && got[3] == "poststart",
        "after start: {got:?}"
    );
    let out = ctx.rt(&["kill", &id, "KILL"])?;
    ensure!(out.ok(), "kill: {}", out.brief());
    ctx.wait_pid(c.pid)?;
    ctx.wait_status(&id, "stopped")?;
    let out = ctx.rt(&["delete", &id])?;
    ensure!(out.ok(), "delete: {}", out.brief());
    let got = log_lines(&log);
    ensure!(
        got.len() == 5 && got[4] == "poststop",
        "after delete: {got:?}"
    );
    Ok(())
}

fn hooks_stdin(ctx: &mut Ctx) -> Result<()> {
    let s1 = ctx.path("state-createRuntime");
    let s2 = ctx.path("state-poststop");
    let (a, p) = (s1.display().to_string(), s2.display().to_string());
    let b = ctx.bundle(|c| {
        sleeper(c);
        c["hooks"] = json!({
            "createRuntime": [sh_hook(&format!("cat > {a}"))],
            "poststop": [sh_hook(&format!("cat > {p}"))],
        });
    })?;
    let id = ctx.new_id();
    let c = ctx.create(&b, &id, &[])?;
    ctx.start(&id)?;
    let out = ctx.rt(&["kill", &id, "KILL"])?;
    ensure!(out.ok(), "kill: {}", out.brief());
    ctx.wait_pid(c.pid)?;
    ctx.wait_status(&id, "stopped")?;
    let out = ctx.rt(&["delete", &id])?;
    ensure!(out.ok(), "delete: {}", out.brief());
    let bundle = fs::canonicalize(&b)?.display().to_string();
    for (file, statuses) in [(&s1, &["creating", "created"][..]), (&s2, &["stopped"][..])] {
        let text = fs::read_to_string(file).context("hook wrote no stdin copy")?;
        let st: Value = serde_json::from_str(&text)
            .with_context(|| format!("hook stdin is not state JSON: {text:?}"))?;
        ensure!(st["id"] == json!(id), "hook state id {}", st["id"]);
        // The stopped state a poststop hook sees may carry no pid.
        if file == &s1 {
            ensure!(
                st["pid"] == json!(c.pid),
                "createRuntime state pid {} != {}",
                st["pid"],
                c.pid
            );
        }
        ensure!(
            st["bundle"] == json!(bundle),
            "hook state bundle {}",
            st["bundle"]
        );
        ensure!(st["ociVersion"].is_string(), "hook state lacks ociVersion");
        let s = st["status"].as_str().unwrap_or("");
        ensure!(
            statuses.contains(&s),
            "hook state status {s:?}, want one of {statuses:?}"
        );
    }
    Ok(())
}

/// startContainer runs in the container (its path resolves there), during start, before the
/// main process. The rootfs has /.conformance-rootfs and the host does not: a hook in the wrong
/// mount namespace reports to a host file in the test dir instead of writing the host's /.
fn hooks_start_container(ctx: &mut Ctx) -> Result<()> {
    let wrong = ctx.path("wrong-namespace");
    let w = wrong.display().to_string();
    let b = ctx.bundle(|c| {
        c["process"]["args"] = json!(["sh", "-c", "echo main >> /hooklog"]);
        c["hooks"] = json!({"startContainer": [sh_hook(&format!(
            "if [ -e /.conformance-rootfs ]; then echo startContainer >> /hooklog; else echo x >> {w}; fi"
        ))]});
    })?;
    let log = b.join("rootfs/hooklog");
    let id = ctx.new_id();
    let c = ctx.create(&b, &id, &[])?;
    ensure!(
        log_lines(&log).is_empty(),
        "startContainer ran during create"
    );
    ctx.start(&id)?;
    ctx.wait_pid(c.pid)?;
    ensure!(
        log_lines(&wrong).is_empty(),
        "startContainer ran outside the container's root"
    );
    let got = log_lines(&log);
    ensure!(
        got == ["startContainer", "main"],
        "the container's /hooklog: {got:?}"
    );
    Ok(())
}

/// createContainer runs during create, before pivot_root: its path resolves in the runtime
/// namespace, so a host path written by it is visible on the host.
fn hooks_create_container(ctx: &mut Ctx) -> Result<()> {
    let log = ctx.path("hooklog");
    let l = log.display().to_string();
    let b = ctx.bundle(|c| {
        sleeper(c);
        c["hooks"] = json!({"createContainer": [sh_hook(&format!("echo createContainer >> {l}"))]});
    })?;
    let id = ctx.new_id();
    ctx.create(&b, &id, &[])?;
    let got = log_lines(&log);
    ensure!(got == ["createContainer"], "after create: {got:?}");
    Ok(())
}

fn hooks_create_fail(ctx: &mut Ctx) -> Result<()> {
    ctx.require_container()?;
    let b = ctx.bundle(|c| {
        c["process"]["args"] = json!(["sh", "-c", "touch /ran"]);
        c["hooks"] = json!({"createRuntime": [sh_hook("exit 1")]});
    })?;
    let id = ctx.new_id();
    let pf = ctx.path("pid");
    let (bs, ps) = (b.display().to_string(), pf.display().to_string());
    let out = ctx.rt(&["create", "--bundle", &bs, "--pid-file", &ps, &id])?;
    fails(&out).context("create with a failing createRuntime hook")?;
    if let Ok(p) = fs::read_to_string(&pf) {
        let pid: i32 = p.trim().parse().unwrap_or(0);
        ctx.track_pid(pid);
        let _ = ctx.wait_pid(pid);
        ensure!(!pid_alive(pid), "container pid {pid} left alive");
    }
    crate::harness::no_trace(ctx, &id)?;
    ensure!(!b.join("rootfs/ran").exists(), "the main process ran");
    Ok(())
}

fn hooks_poststart_fail(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(|c| {
        sleeper(c);
        c["hooks"] = json!({"poststart": [sh_hook("exit 1")]});
    })?;
    let id = ctx.new_id();
    ctx.create(&b, &id, &[])?;
    let out = ctx.rt(&["start", &id])?;
    ensure!(
        out.ok(),
        "spec: a failing poststart hook is a warning; start: {}",
        out.brief()
    );
    ensure!(ctx.status(&id)? == "running", "container not running");
    Ok(())
}

fn hooks_poststop_fail(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(|c| {
        c["hooks"] = json!({"poststop": [sh_hook("exit 1")]});
    })?;
    let id = ctx.new_id();
    let c = ctx.create(&b, &id, &[])?;
    ctx.start(&id)?;
    ctx.wait_pid(c.pid)?;
    ctx.wait_status(&id, "stopped")?;
    let out = ctx.rt(&["delete", &id])?;
    ensure!(
        out.ok(),
        "spec: a failing poststop hook is a warning; delete: {}",
        out.brief()
    );
    fails(&ctx.rt(&["state", &id])?).context("state after delete")?;
    Ok(())
}

fn hooks_timeout(ctx: &mut Ctx) -> Result<()> {
    ctx.require_container()?;
    let b = ctx.bundle(|c| {
        sleeper(c);
        let mut h = sh_hook("exec sleep 60");
        h["timeout"] = json!(1);
        c["hooks"] = json!({"createRuntime": [h]});
    })?;
    let id = ctx.new_id();
    let bs = b.display().to_string();
    let t0 = Instant::now();
    let out = ctx.rt(&["create", "--bundle", &bs, &id])?;
    fails(&out).context("create with a hook past its timeout")?;
    ensure!(
        t0.elapsed() < Duration::from_secs(50),
        "create waited for the hook instead of its 1 s timeout"
    );
    crate::harness::no_trace(ctx, &id)?;
    Ok(())
}
