//! Command-line surface: --log JSON, error wording and exit status, list/ps, features, spec, version.
use super::{fails_with, sleeper, tests, Test};
use crate::harness::Ctx;
use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use std::fs;

pub fn tests() -> Vec<Test> {
    tests![
        "log/json-format" => log_json,
        "log/flag-equals-form" => log_equals,
        "log/appends" => log_appends,
        "errors/exit-status-1" => errors_exit_status,
        "list/empty-is-null" => list_empty,
        "list/json" => list_json,
        "list/quiet" => list_quiet,
        "ps/json" => ps_json,
        "features/json" => features_json,
        "spec/default" => spec_default,
        "spec/refuses-overwrite" => spec_overwrite,
        "spec/rootless" => spec_rootless,
        "cli/version" => cli_version,
        "cli/global-flags" => cli_global_flags,
        "list/table" => list_table,
        "pause/resume" => pause_resume,
        "update/resources" => update_resources,
        "events/stats" => events_stats,
    ]
}

/// Every line of a --log-format json file is one object with level, msg and an RFC3339 time.
fn check_json_log(path: &std::path::Path, want_msg: &str) -> Result<()> {
    ensure!(path.exists(), "no --log file written");
    let lines = crate::harness::check_log_lines(path)?;
    ensure!(!lines.is_empty(), "the --log file is empty");
    let found = lines
        .iter()
        .any(|v| v["level"] == "error" && v["msg"].as_str().unwrap_or("").contains(want_msg));
    ensure!(
        found,
        "no level=error line containing {want_msg:?}: {lines:?}"
    );
    Ok(())
}

fn log_json(ctx: &mut Ctx) -> Result<()> {
    let log = ctx.path("log.json");
    let (l, r) = (log.display().to_string(), ctx.root.display().to_string());
    let out = ctx.raw(&[
        "--root",
        &r,
        "--log",
        &l,
        "--log-format",
        "json",
        "state",
        "conf-no-such-container",
    ])?;
    fails_with(&out, "container does not exist")?;
    check_json_log(&log, "container does not exist")
}

fn log_equals(ctx: &mut Ctx) -> Result<()> {
    let log = ctx.path("log.json");
    let (l, r) = (log.display().to_string(), ctx.root.display().to_string());
    let out = ctx.raw(&[
        &format!("--root={r}"),
        &format!("--log={l}"),
        "--log-format=json",
        "kill",
        "conf-no-such-container",
        "KILL",
    ])?;
    fails_with(&out, "container does not exist")?;
    check_json_log(&log, "container does not exist")
}

fn errors_exit_status(ctx: &mut Ctx) -> Result<()> {
    for args in [
        &["state", "conf-no-such-container"][..],
        &["start", "conf-no-such-container"][..],
        &["delete", "conf-no-such-container"][..],
    ] {
        let out = ctx.rt(args)?;
        ensure!(
            out.code == Some(1),
            "{args:?}: {}, want exit status 1",
            out.brief()
        );
        ensure!(!out.stderr.trim().is_empty(), "{args:?}: nothing on stderr");
    }
    Ok(())
}

fn list_empty(ctx: &mut Ctx) -> Result<()> {
    let out = ctx.rt(&["list", "--format", "json"])?;
    ensure!(out.ok(), "list: {}", out.brief());
    ensure!(
        out.stdout.trim() == "null",
        "empty list printed {:?}, want null",
        out.stdout.trim()
    );
    Ok(())
}

fn list_json(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(sleeper)?;
    let id = ctx.new_id();
    let c = ctx.create(&b, &id, &[])?;
    let out = ctx.rt(&["list", "--format=json"])?;
    ensure!(out.ok(), "list: {}", out.brief());
    let v: Value = serde_json::from_str(&out.stdout).context("list output is not JSON")?;
    let arr = v.as_array().context("list JSON is not an array")?;
    ensure!(arr.len() == 1, "list has {} entries, want 1", arr.len());
    let e = &arr[0];
    ensure!(e["id"] == id.as_str(), "list id {}", e["id"]);
    ensure!(e["status"] == "created", "list status {}", e["status"]);
    ensure!(e["pid"] == c.pid, "list pid {}", e["pid"]);
    Ok(())
}

fn list_quiet(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(sleeper)?;
    let id = ctx.new_id();
    ctx.create(&b, &id, &[])?;
    let out = ctx.rt(&["list", "-q"])?;
    ensure!(out.ok(), "list -q: {}", out.brief());
    ensure!(out.stdout.trim() == id, "list -q printed {:?}", out.stdout);
    Ok(())
}

fn ps_json(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(sleeper)?;
    let id = ctx.new_id();
    ctx.create(&b, &id, &[])?;
    ctx.start(&id)?;
    let out = ctx.rt(&["ps", "--format", "json", &id])?;
    ensure!(out.ok(), "ps: {}", out.brief());
    let v: Value = serde_json::from_str(&out.stdout).context("ps output is not JSON")?;
    let arr = v.as_array().context("ps JSON is not an array")?;
    ensure!(!arr.is_empty(), "ps lists no pids");
    ensure!(
        arr.iter().all(|p| p.as_u64().is_some_and(|p| p > 0)),
        "ps JSON is not an array of pids: {v}"
    );
    Ok(())
}

fn features_json(ctx: &mut Ctx) -> Result<()> {
    let out = ctx.rt(&["features"])?;
    ensure!(out.ok(), "features: {}", out.brief());
    let v: Value = serde_json::from_str(&out.stdout).context("features output is not JSON")?;
    for k in ["ociVersionMin", "ociVersionMax"] {
        ensure!(v[k].is_string(), "features lacks {k}");
    }
    let hooks: Vec<&str> = v["hooks"]
        .as_array()
        .context("features lacks hooks")?
        .iter()
        .filter_map(|h| h.as_str())
        .collect();
    for h in [
        "prestart",
        "createRuntime",
        "createContainer",
        "startContainer",
        "poststart",
        "poststop",
    ] {
        ensure!(hooks.contains(&h), "features hooks lack {h}: {hooks:?}");
    }
    ensure!(v["mountOptions"].is_array(), "features lacks mountOptions");
    Ok(())
}

fn spec_default(ctx: &mut Ctx) -> Result<()> {
    let dir = ctx.path("specdir");
    fs::create_dir_all(&dir)?;
    let d = dir.display().to_string();
    let out = ctx.rt(&["spec", "--bundle", &d])?;
    ensure!(out.ok(), "spec: {}", out.brief());
    let v: Value = serde_json::from_str(&fs::read_to_string(dir.join("config.json"))?)
        .context("spec's config.json")?;
    ensure!(
        v["ociVersion"]
            .as_str()
            .is_some_and(|s| s.starts_with("1.")),
        "ociVersion {}",
        v["ociVersion"]
    );
    ensure!(
        v["root"]["path"] == "rootfs",
        "root.path {}",
        v["root"]["path"]
    );
    ensure!(
        v["process"]["args"]
            .as_array()
            .is_some_and(|a| !a.is_empty()),
        "no process.args"
    );
    Ok(())
}

fn spec_overwrite(ctx: &mut Ctx) -> Result<()> {
    let dir = ctx.path("specdir");
    fs::create_dir_all(&dir)?;
    fs::write(dir.join("config.json"), "{\"mine\": true}")?;
    let d = dir.display().to_string();
    let out = ctx.rt(&["spec", "--bundle", &d])?;
    fails_with(&out, "File config.json exists. Remove it first")?;
    let kept = fs::read_to_string(dir.join("config.json"))?;
    if kept != "{\"mine\": true}" {
        bail!("spec overwrote config.json");
    }
    Ok(())
}

fn cli_version(ctx: &mut Ctx) -> Result<()> {
    let out = ctx.raw(&["--version"])?;
    ensure!(out.ok(), "--version: {}", out.brief());
    let first = out.stdout.lines().next().unwrap_or("");
    ensure!(
        first.contains(" version "),
        "first line {first:?} lacks \"NAME version X\""
    );
    ensure!(
        out.stdout.lines().any(|l| l.starts_with("spec: 1.")),
        "no `spec: 1.x` line: {:?}",
        out.stdout
    );
    Ok(())
}

fn cli_global_flags(ctx: &mut Ctx) -> Result<()> {
    let r = ctx.root.display().to_string();
    for flags in [
        &["--root", &r, "--debug", "list", "--format", "json"][..],
        &["--root", &r, "--rootless=false", "list", "--format", "json"][..],
        &["--root", &r, "--systemd-cgroup", "list", "--format", "json"][..],
        &[
            "--root",
            &r,
            "--log-format",
            "text",
            "list",
            "--format",
            "json",
        ][..],
    ] {
        let out = ctx.raw(flags)?;
        ensure!(out.ok(), "{flags:?}: {}", out.brief());
        ensure!(
            out.stdout.trim() == "null",
            "{flags:?} printed {:?}",
            out.stdout.trim()
        );
    }
    Ok(())
}

fn list_table(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(sleeper)?;
    let id = ctx.new_id();
    ctx.create(&b, &id, &[])?;
    let out = ctx.rt(&["list"])?;
    ensure!(out.ok(), "list: {}", out.brief());
    let mut lines = out.stdout.lines();
    let header = lines.next().unwrap_or("");
    ensure!(
        header.split_whitespace().take(4).collect::<Vec<_>>() == ["ID", "PID", "STATUS", "BUNDLE"],
        "table header {header:?}"
    );
    ensure!(
        lines.any(|l| l.split_whitespace().next() == Some(id.as_str()) && l.contains("created")),
        "no row for {id}: {:?}",
        out.stdout
    );
    Ok(())
}

fn running(ctx: &mut Ctx) -> Result<String> {
    let b = ctx.bundle(sleeper)?;
    let id = ctx.new_id();
    ctx.create(&b, &id, &[])?;
    ctx.start(&id)?;
    Ok(id)
}

fn pause_resume(ctx: &mut Ctx) -> Result<()> {
    let id = running(ctx)?;
    let out = ctx.rt(&["pause", &id])?;
    ensure!(out.ok(), "pause: {}", out.brief());
    ensure!(ctx.status(&id)? == "paused", "not paused after pause");
    let out = ctx.rt(&["resume", &id])?;
    ensure!(out.ok(), "resume: {}", out.brief());
    ensure!(ctx.status(&id)? == "running", "not running after resume");
    Ok(())
}

fn update_resources(ctx: &mut Ctx) -> Result<()> {
    let id = running(ctx)?;
    let f = ctx.path("resources.json");
    fs::write(&f, r#"{"pids": {"limit": 512}}"#)?;
    let p = f.display().to_string();
    let out = ctx.rt(&["update", "--resources", &p, &id])?;
    ensure!(out.ok(), "update --resources: {}", out.brief());
    Ok(())
}

fn events_stats(ctx: &mut Ctx) -> Result<()> {
    let id = running(ctx)?;
    let out = ctx.rt(&["events", "--stats", &id])?;
    ensure!(out.ok(), "events --stats: {}", out.brief());
    let line = out.stdout.lines().next().unwrap_or("");
    let v: Value = serde_json::from_str(line).with_context(|| format!("not JSON: {line:?}"))?;
    ensure!(v["type"] == "stats", "event type {}", v["type"]);
    ensure!(v["id"] == id.as_str(), "event id {}", v["id"]);
    // runc and libcgroups name the fields differently; both report cpu and memory.
    for k in ["cpu", "memory"] {
        ensure!(
            v["data"][k].as_object().is_some_and(|o| !o.is_empty()),
            "no {k} statistics: {line}"
        );
    }
    Ok(())
}

fn log_appends(ctx: &mut Ctx) -> Result<()> {
    let log = ctx.path("log.json");
    fs::write(
        &log,
        "{\"level\":\"info\",\"msg\":\"kept\",\"time\":\"2020-01-01T00:00:00Z\"}\n",
    )?;
    let (l, r) = (log.display().to_string(), ctx.root.display().to_string());
    for _ in 0..2 {
        let args = [
            "--root",
            &r,
            "--log",
            &l,
            "--log-format",
            "json",
            "state",
            "conf-no-such-container",
        ];
        fails_with(&ctx.raw(&args)?, "container does not exist")?;
    }
    let text = fs::read_to_string(&log)?;
    ensure!(
        text.starts_with("{\"level\":\"info\",\"msg\":\"kept\""),
        "--log truncated the file: {text:?}"
    );
    let errors = text
        .lines()
        .filter(|l| l.contains("container does not exist"))
        .count();
    ensure!(
        errors == 2,
        "{errors} error lines after two failures, want 2 (one per fatal error)"
    );
    check_json_log(&log, "container does not exist")
}

fn spec_rootless(ctx: &mut Ctx) -> Result<()> {
    let dir = ctx.path("specdir");
    fs::create_dir_all(&dir)?;
    let d = dir.display().to_string();
    let out = ctx.rt(&["spec", "--rootless", "--bundle", &d])?;
    ensure!(out.ok(), "spec --rootless: {}", out.brief());
    let v: Value = serde_json::from_str(&fs::read_to_string(dir.join("config.json"))?)?;
    let ns = v["linux"]["namespaces"]
        .as_array()
        .context("no linux.namespaces")?;
    ensure!(
        ns.iter().any(|n| n["type"] == "user"),
        "no user namespace: {ns:?}"
    );
    ensure!(v["linux"]["uidMappings"].is_array(), "no uidMappings");
    Ok(())
}
