//! End-to-end lifecycle on real microVMs (QEMU; TCG on hosts without hardware
//! KVM), driven only through the krun-oci binary.

mod common;

use std::fs;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn read(p: &std::path::Path) -> String {
    fs::read_to_string(p).unwrap_or_default()
}

/// A runtime whose guests show every log level on the console, guest-init's
/// info lines after the boot included.
fn verbose_guest() -> Runtime {
    Runtime {
        kernel_cmdline: Some("loglevel=7".into()),
        ..Runtime::new()
    }
}

/// The console of container `id`'s VM (a cold boot's).
fn guest_console(rt: &Runtime, id: &str) -> String {
    read(&rt.root.path().join(id).join("run/console.log"))
}

/// create → state created → start → wait → state stopped with the code.
fn run_to_exit(test: &str, args: &[&str]) -> (i32, i32, String, String, serde_json::Value) {
    run_to_exit_with(test, args, |_| {})
}

/// [`run_to_exit`] with `edit` applied to the config.
fn run_to_exit_with(
    test: &str,
    args: &[&str],
    edit: impl FnOnce(&mut serde_json::Value),
) -> (i32, i32, String, String, serde_json::Value) {
    become_subreaper();
    let rt = Runtime::new();
    let b = TestBundle::new(args);
    b.write_config(edit);
    let (out, err) = (b.path().join("out"), b.path().join("err"));
    let pid = rt.create(test, &b, &out, &err);
    assert_eq!(rt.state(test)["status"], "created");
    assert_eq!(rt.state(test)["pid"], pid);
    let helpers = rt.helper_pids(test);
    assert!(!helpers.is_empty());
    rt.ok(&["start", test]);
    let code = wait_exit(pid);
    let state = rt.state(test);
    assert_eq!(state["status"], "stopped");
    assert!(
        state["annotations"].get("krun-oci.oom-killed").is_none(),
        "no OOM kill, yet {state}"
    );
    let logs = rt.ok(&["logs", test]);
    rt.ok(&["delete", test]);
    assert_cleaned_up(&rt, test, &helpers);
    assert!(
        !b.rootfs().join(".a3s_exit_code").exists(),
        "delete leaves the exit-code file"
    );
    (
        code,
        state["exitCode"].as_i64().unwrap() as i32,
        read(&out),
        read(&err),
        serde_json::json!({"logs": logs}),
    )
}

#[test]
fn exit_code_zero_and_output() {
    if !vm_available("exit_code_zero_and_output") {
        return;
    }
    let (code, state_code, out, err, logs) =
        run_to_exit("ok0", &["sh", "-c", "echo out-line; echo err-line >&2"]);
    assert_eq!((code, state_code), (0, 0));
    assert_eq!(out, "out-line\n");
    assert_eq!(err, "err-line\n");
    assert!(logs["logs"].as_str().unwrap().contains("out-line"));
}

#[test]
fn exit_code_seven() {
    if !vm_available("exit_code_seven") {
        return;
    }
    let (code, state_code, ..) = run_to_exit("seven", &["sh", "-c", "exit 7"]);
    assert_eq!((code, state_code), (7, 7));
}

/// `run` (create + start + wait + delete) with a Kubernetes-length ID (64 hex)
/// under a root as long as containerd's: the VM's socket paths must still fit
/// in a sockaddr_un. `--keep` leaves the stopped container for `delete`.
#[test]
fn run_with_a_long_id_under_a_long_root() {
    if !vm_available("run_with_a_long_id_under_a_long_root") {
        return;
    }
    let rt = Runtime::new();
    let root = rt
        .root
        .path()
        .join("run/containerd/io.containerd.runtime.v2.task/k8s.io");
    let root = root.to_str().unwrap();
    let cli = |args: &[&str]| {
        let mut c = std::process::Command::new(KRUN_OCI);
        c.arg("--root").arg(root).args(args);
        c
    };
    let ok = |args: &[&str]| {
        let out = cli(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let id = "8d2f4c6e0a1b3c5d7e9f0a2b4c6d8e0f1a3b5c7d9e1f3a5b7c9d1e3f5a7b9c1d";
    let b = TestBundle::new(&["sh", "-c", "echo from-run; exit 7"]);
    let bundle = b.path().to_str().unwrap();
    let out = cli(&["run", "-b", bundle, id]).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from-run\n");
    let list = ok(&["list", "-q"]);
    assert_eq!(list.trim(), "", "run left {list:?}");

    let out = cli(&["run", "--keep", "-b", bundle, id]).output().unwrap();
    assert_eq!(out.status.code(), Some(7));
    let state: serde_json::Value = serde_json::from_str(&ok(&["state", id])).unwrap();
    assert_eq!(
        (state["status"].as_str(), state["exitCode"].as_i64()),
        (Some("stopped"), Some(7))
    );
    ok(&["delete", id]);
    let dir = krun_oci::state::ContainerDir {
        id: id.into(),
        path: std::path::Path::new(root).join(id),
    };
    assert!(!dir.path.exists() && !dir.run_dir().exists());
}

#[test]
fn exit_code_137_when_killed_in_guest() {
    if !vm_available("exit_code_137_when_killed_in_guest") {
        return;
    }
    // Without a pid namespace of its own (there, the main is PID 1, which its own
    // namespace cannot kill, as with runc).
    let (code, state_code, ..) = run_to_exit_with("k137", &["sh", "-c", "kill -9 $$"], |c| {
        c["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .retain(|n| n["type"] != "pid");
    });
    assert_eq!((code, state_code), (137, 137));
}

#[test]
fn output_before_exit_is_not_lost() {
    if !vm_available("output_before_exit_is_not_lost") {
        return;
    }
    let (code, _, out, ..) = run_to_exit(
        "mib",
        &["sh", "-c", "head -c 1048576 /dev/zero | tr '\\0' x; exit 3"],
    );
    assert_eq!(code, 3);
    assert_eq!(out.len(), 1024 * 1024);
    assert!(out.bytes().all(|b| b == b'x'));
}

#[test]
fn json_log_separates_streams() {
    if !vm_available("json_log_separates_streams") {
        return;
    }
    become_subreaper();
    let rt = Runtime::new();
    let b = TestBundle::new(&["sh", "-c", "echo a; echo b >&2; echo c"]);
    let pid = rt.create("streams", &b, &b.path().join("o"), &b.path().join("e"));
    rt.ok(&["start", "streams"]);
    assert_eq!(wait_exit(pid), 0);
    let log = read(&rt.root.path().join("streams/container.log"));
    let entries: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let by_stream = |s: &str| -> String {
        entries
            .iter()
            .filter(|e| e["stream"] == s)
            .map(|e| e["log"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(by_stream("stdout"), "a\nc\n");
    assert_eq!(by_stream("stderr"), "b\n");
    for e in &entries {
        chrono::DateTime::parse_from_rfc3339(e["time"].as_str().unwrap()).unwrap();
    }
    // Order across the two streams is not defined (two pipes in the guest), so
    // `--tail 1` must print whatever entry the file holds last, on its stream.
    let last = entries.last().unwrap();
    let out = rt.run(&["logs", "--tail", "1", "streams"]);
    let printed = if last["stream"] == "stdout" {
        &out.stdout
    } else {
        &out.stderr
    };
    assert_eq!(
        String::from_utf8_lossy(printed),
        last["log"].as_str().unwrap()
    );
    rt.ok(&["delete", "streams"]);
}

#[test]
fn lifecycle_errors_have_no_effect() {
    if !vm_available("lifecycle_errors_have_no_effect") {
        return;
    }
    become_subreaper();
    let rt = Runtime::new();
    let b = TestBundle::new(&[
        "sh",
        "-c",
        "trap 'echo got-term; exit 42' TERM; echo ready; while true; do sleep 0.1; done",
    ]);
    let (out, err) = (b.path().join("o"), b.path().join("e"));
    let pid = rt.create("errs", &b, &out, &err);
    // Duplicate ID.
    let dup = rt.run(&["create", "--bundle", b.path().to_str().unwrap(), "errs"]);
    assert!(!dup.status.success());
    assert!(String::from_utf8_lossy(&dup.stderr).contains("container with given ID already exists"));
    rt.ok(&["start", "errs"]);
    // start twice
    let again = rt.run(&["start", "errs"]);
    assert!(!again.status.success());
    assert_eq!(rt.state("errs")["status"], "running");
    // delete while running
    let del = rt.run(&["delete", "errs"]);
    assert!(!del.status.success());
    assert!(String::from_utf8_lossy(&del.stderr)
        .contains("cannot delete container errs that is not stopped: running"));
    assert_eq!(rt.state("errs")["status"], "running");
    // kill TERM reaches the trap
    eventually("workload ready", Duration::from_secs(60), || {
        read(&out).contains("ready")
    });
    rt.ok(&["kill", "errs", "TERM"]);
    assert_eq!(wait_exit(pid), 42);
    assert!(read(&out).contains("got-term"));
    assert_eq!(rt.state("errs")["exitCode"], 42);
    // kill on a stopped container
    let k = rt.run(&["kill", "errs", "9"]);
    assert!(String::from_utf8_lossy(&k.stderr).contains("container not running"));
    let helpers = rt.helper_pids("errs");
    rt.ok(&["delete", "errs"]);
    assert_cleaned_up(&rt, "errs", &helpers);
    // Unknown containers.
    assert!(String::from_utf8_lossy(&rt.run(&["start", "errs"]).stderr)
        .contains("container does not exist"));
    rt.ok(&["delete", "--force", "errs"]);
}

#[test]
fn sigterm_to_monitor_reaches_workload() {
    if !vm_available("sigterm_to_monitor_reaches_workload") {
        return;
    }
    become_subreaper();
    let rt = Runtime::new();
    let b = TestBundle::new(&[
        "sh",
        "-c",
        "trap 'echo trapped; exit 5' TERM; echo ready; while true; do sleep 0.1; done",
    ]);
    let out = b.path().join("o");
    let pid = rt.create("fwd", &b, &out, &b.path().join("e"));
    rt.ok(&["start", "fwd"]);
    eventually("workload ready", Duration::from_secs(60), || {
        read(&out).contains("ready")
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(wait_exit(pid), 5);
    assert!(read(&out).contains("trapped"));
    rt.ok(&["delete", "fwd"]);
}

#[test]
fn kill_all_and_ps() {
    if !vm_available("kill_all_and_ps") {
        return;
    }
    become_subreaper();
    let rt = Runtime::new();
    let b = TestBundle::new(&["sh", "-c", "sleep 1000 & echo ready; wait"]);
    let out = b.path().join("o");
    let pid = rt.create("all", &b, &out, &b.path().join("e"));
    rt.ok(&["start", "all"]);
    eventually("workload ready", Duration::from_secs(60), || {
        read(&out).contains("ready")
    });
    let pids: Vec<i32> = serde_json::from_str(&rt.ok(&["ps", "--format", "json", "all"])).unwrap();
    assert!(pids.len() >= 2, "{pids:?}");
    assert!(rt.ok(&["ps", "all"]).contains("sleep 1000"));
    rt.ok(&["kill", "--all", "all", "KILL"]);
    assert_eq!(wait_exit(pid), 137);
    rt.ok(&["delete", "all"]);
}

/// `update`: the pids limit reaches the guest (forks beyond it fail), CPU limits
/// the VM's host cgroup; a different memory limit is refused (the VM's RAM is
/// fixed); `events --stats` reports the VM's usage.
#[test]
fn update_limits_and_events_stats() {
    if !vm_available("update_limits_and_events_stats") {
        return;
    }
    become_subreaper();
    let rt = Runtime::new();
    let b = TestBundle::new(&["sleep", "1000"]);
    let pid = rt.create("upd", &b, &b.path().join("o"), &b.path().join("e"));
    rt.ok(&["start", "upd"]);
    let helpers = rt.helper_pids("upd");
    let forks = [
        "exec",
        "upd",
        "sh",
        "-c",
        "sleep 5 & sleep 5 & sleep 5 & echo forked-3",
    ];
    assert_eq!(rt.ok(&forks), "forked-3\n");
    rt.ok(&["update", "--pids-limit", "3", "upd"]);
    let out = rt.run(&forks);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("can't fork"),
        "{out:?}"
    );
    rt.ok(&[
        "update",
        "--cpu-quota",
        "50000",
        "--cpu-period",
        "100000",
        "upd",
    ]);
    let quota = [
        "/sys/fs/cgroup/cpu/upd/cpu.cfs_quota_us",
        "/sys/fs/cgroup/cpu,cpuacct/upd/cpu.cfs_quota_us",
        "/sys/fs/cgroup/upd/cpu.max",
    ]
    .iter()
    .find_map(|p| fs::read_to_string(p).ok())
    .expect("the VM's host cgroup");
    assert!(quota.starts_with("50000"), "{quota}");
    let out = rt.run(&["update", "--memory", "1g", "upd"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("RAM is fixed"),
        "{out:?}"
    );
    let ev: serde_json::Value =
        serde_json::from_str(&rt.ok(&["events", "--stats", "upd"])).unwrap();
    assert_eq!(
        (ev["type"].as_str(), ev["id"].as_str()),
        (Some("stats"), Some("upd"))
    );
    assert!(
        ev["data"]["cpu"]["usage"]["usage_total"].as_u64() > Some(0),
        "{ev}"
    );
    rt.ok(&["kill", "upd", "KILL"]);
    assert_eq!(wait_exit(pid), 137);
    assert!(!rt
        .run(&["update", "--pids-limit", "5", "upd"])
        .status
        .success());
    rt.ok(&["delete", "upd"]);
    assert_cleaned_up(&rt, "upd", &helpers);
}

/// A VM that dies while booting (its kernel finds no init) fails create at once
/// with the reason and the console's tail, and leaves nothing behind.
#[test]
fn create_fails_cleanly_when_the_vm_dies() {
    if !vm_available("create_fails_cleanly_when_the_vm_dies") {
        return;
    }
    let rt = Runtime::new();
    let b = TestBundle::new(&["true"]);
    let out = rt
        .cmd(&["create", "--bundle", b.path().to_str().unwrap(), "dies"])
        .env("KRUN_OCI_KERNEL_CMDLINE", "rdinit=/no-such-init")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("console:") && err.contains("No working init"),
        "{err}"
    );
    assert_cleaned_up(&rt, "dies", &[]);
    let left: Vec<_> = fs::read_dir(rt.root.path())
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    let run_dir = krun_oci::state::ContainerDir {
        id: "dies".into(),
        path: rt.root.path().join("dies"),
    }
    .run_dir();
    for needle in [rt.root.path(), run_dir.as_path()] {
        let stray = Command::new("pgrep")
            .args(["-af", &needle.display().to_string()])
            .output()
            .unwrap();
        assert!(
            stray.stdout.is_empty(),
            "left: {}",
            String::from_utf8_lossy(&stray.stdout)
        );
    }
}

/// `kill ID KILL` on a guest that answers nothing (the VMM and its helpers
/// stopped) ends the VM: exit 137, state stopped, delete cleans.
#[test]
fn sigkill_ends_a_wedged_vm() {
    if !vm_available("sigkill_ends_a_wedged_vm") {
        return;
    }
    become_subreaper();
    let rt = Runtime::new();
    let b = TestBundle::new(&["sleep", "1000"]);
    let pid = rt.create("wedged", &b, &b.path().join("o"), &b.path().join("e"));
    rt.ok(&["start", "wedged"]);
    let helpers = rt.helper_pids("wedged");
    for &h in &helpers {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(h),
            nix::sys::signal::Signal::SIGSTOP,
        );
    }
    let t0 = std::time::Instant::now();
    rt.ok(&["kill", "wedged", "KILL"]);
    assert_eq!(wait_exit(pid), 137);
    assert!(
        t0.elapsed() < Duration::from_secs(25),
        "took {:?}",
        t0.elapsed()
    );
    let st = rt.state("wedged");
    assert_eq!(
        (st["status"].as_str(), st["exitCode"].as_i64()),
        (Some("stopped"), Some(137))
    );
    rt.ok(&["delete", "wedged"]);
    assert_cleaned_up(&rt, "wedged", &helpers);
}

#[test]
fn monitor_killed_means_stopped_and_cleanup() {
    if !vm_available("monitor_killed_means_stopped_and_cleanup") {
        return;
    }
    become_subreaper();
    let rt = Runtime::new();
    let b = TestBundle::new(&["sleep", "1000"]);
    let pid = rt.create("mk", &b, &b.path().join("o"), &b.path().join("e"));
    rt.ok(&["start", "mk"]);
    let helpers = rt.helper_pids("mk");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert_eq!(wait_exit(pid), 137);
    let st = rt.state("mk");
    assert_eq!(st["status"], "stopped");
    assert_ne!(st["exitCode"], 0);
    // The VMM and helpers die with the monitor.
    for &p in &helpers {
        eventually(
            "helper to die with its monitor",
            Duration::from_secs(10),
            || !alive(p),
        );
    }
    rt.ok(&["delete", "mk"]);
    assert_cleaned_up(&rt, "mk", &helpers);
}

#[test]
fn hooks_run_in_order_and_failure_aborts_create() {
    if !vm_available("hooks_run_in_order_and_failure_aborts_create") {
        return;
    }
    become_subreaper();
    let rt = Runtime::new();
    let b = TestBundle::new(&["true"]);
    let trace = b.path().join("trace");
    let hook = |name: &str| {
        serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c", format!(
            "s=$(cat); echo \"{name} $(echo \"$s\" | sed -n 's/.*\"status\":\"\\([a-z]*\\)\".*/\\1/p')\" >> {}", trace.display())]})
    };
    b.write_config(|c| {
        c["hooks"] = serde_json::json!({
            "prestart": [hook("prestart")],
            "createRuntime": [hook("createRuntime")],
            "createContainer": [hook("createContainer")],
            "poststart": [hook("poststart")],
            "poststop": [hook("poststop")],
        });
    });
    let pid = rt.create("hk", &b, &b.path().join("o"), &b.path().join("e"));
    rt.ok(&["start", "hk"]);
    assert_eq!(wait_exit(pid), 0);
    rt.ok(&["delete", "hk"]);
    assert_eq!(
        read(&trace),
        "prestart created\ncreateRuntime created\ncreateContainer created\npoststart running\npoststop stopped\n"
    );
    // A failing createRuntime hook aborts create and leaves nothing.
    b.write_config(|c| {
        c["hooks"] = serde_json::json!({"createRuntime": [{"path": "/bin/false"}]});
    });
    let out = rt.run(&["create", "--bundle", b.path().to_str().unwrap(), "hk2"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("createRuntime"));
    assert!(!rt.root.path().join("hk2").exists());
    eventually("no VM of hk2 left", Duration::from_secs(10), || {
        let ps = std::process::Command::new("pgrep")
            .args(["-f", "hk2/run"])
            .output()
            .unwrap();
        ps.stdout.is_empty()
    });
}

#[test]
fn create_validation_leaves_nothing() {
    // No VM needed: these fail before any boot.
    let rt = Runtime::new();
    if which("busybox").is_none() {
        eprintln!("SKIPPED create_validation_leaves_nothing: busybox missing");
        return;
    }
    let b = TestBundle::new(&["nonexistent-binary"]);
    let out = rt.run(&["create", "--bundle", b.path().to_str().unwrap(), "v1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("executable file not found in $PATH"));
    b.write_config(|c| c["process"]["args"] = serde_json::json!(["/nope"]));
    let out = rt.run(&["create", "--bundle", b.path().to_str().unwrap(), "v1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such file or directory"));
    b.write_config(|c| {
        c["process"]["args"] = serde_json::json!(["sh"]);
        c["ociVersion"] = serde_json::json!("bogus");
    });
    let out = rt.run(&["create", "--bundle", b.path().to_str().unwrap(), "v1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("ociVersion"));
    for bad in ["../x", "a/b", ""] {
        let out = rt.run(&["create", "--bundle", b.path().to_str().unwrap(), bad]);
        assert!(!out.status.success(), "{bad:?} accepted");
    }
    let long = "a".repeat(1024);
    assert!(!rt
        .run(&["create", "--bundle", b.path().to_str().unwrap(), &long])
        .status
        .success());
    let out = rt.run(&["create", "--bundle", "/nonexistent", "v1"]);
    assert!(!out.status.success());
    // An unknown flag: a usage error, exit 1 like runc.
    let out = rt.run(&[
        "create",
        "--no-such-flag",
        "--bundle",
        b.path().to_str().unwrap(),
        "v1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--no-such-flag"));
    // A --root that is a file.
    let file_root = b.path().join("config.json");
    let out = Command::new(KRUN_OCI)
        .arg("--root")
        .arg(&file_root)
        .args(["create", "--bundle", b.path().to_str().unwrap(), "v1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "create under a file as --root");
    assert!(file_root.is_file());
    // Terminal without console socket.
    b.write_config(|c| {
        c["ociVersion"] = serde_json::json!("1.0.2");
        c["process"]["terminal"] = serde_json::json!(true);
    });
    let out = rt.run(&["create", "--bundle", b.path().to_str().unwrap(), "v1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("console socket"));
    // Nothing was left in the root.
    let left: Vec<_> = fs::read_dir(rt.root.path())
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

/// The guest's OOM killer ends the main: exit 137, `state` carries
/// `krun-oci.oom-killed`, `events` reports `oom`; a container without an OOM
/// kill has no such annotation.
#[test]
fn an_oom_kill_is_reported() {
    if !vm_available("an_oom_kill_is_reported") {
        return;
    }
    become_subreaper();
    let rt = Runtime::new();
    // `tail` keeps all of an endless line: it grows until the OOM killer ends it.
    let b = TestBundle::new(&["tail", "/dev/zero"]);
    b.write_config(|c| c["annotations"] = serde_json::json!({"krun-oci.ram_mib": "128"}));
    let (out, err) = (b.path().join("out"), b.path().join("err"));
    let pid = rt.create("oom", &b, &out, &err);
    let helpers = rt.helper_pids("oom");
    rt.ok(&["start", "oom"]);
    assert_eq!(wait_exit(pid), 137);
    let state = rt.state("oom");
    assert_eq!(state["exitCode"], 137);
    assert_eq!(
        state["annotations"]["krun-oci.oom-killed"], "true",
        "{state}"
    );
    let events = rt.ok(&["events", "oom"]);
    assert!(
        events.lines().any(|l| l == r#"{"id":"oom","type":"oom"}"#),
        "{events}"
    );
    rt.ok(&["delete", "oom"]);
    assert_cleaned_up(&rt, "oom", &helpers);
}

/// The namespaces `linux.namespaces` lists without a path are the main's own,
/// distinct from guest-init's (PID 1 of the VM); network stays the VM's. The pid
/// namespace is left out here so that `/proc/1` is guest-init (with it the main
/// is PID 1 itself: conformance `mounts/proc`).
#[test]
fn the_main_has_its_own_namespaces_in_the_guest() {
    if !vm_available("the_main_has_its_own_namespaces_in_the_guest") {
        return;
    }
    let script = "for n in uts ipc mnt cgroup net pid; do \
        if [ \"$(readlink /proc/self/ns/$n)\" = \"$(readlink /proc/1/ns/$n)\" ]; then echo $n=init; else echo $n=own; fi; done";
    // Reading PID 1's namespace links takes CAP_SYS_PTRACE (init has more caps).
    let (code, _, out, err, _) = run_to_exit_with("ns-own", &["sh", "-c", script], |c| {
        c["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .retain(|n| n["type"] != "pid");
        for set in ["bounding", "effective", "permitted"] {
            c["process"]["capabilities"][set]
                .as_array_mut()
                .unwrap()
                .push(serde_json::json!("CAP_SYS_PTRACE"));
        }
    });
    assert_eq!(code, 0, "{err}");
    for want in [
        "uts=own",
        "ipc=own",
        "mnt=own",
        "cgroup=own",
        "net=init",
        "pid=init",
    ] {
        assert!(out.lines().any(|l| l == want), "{want} missing: {out}");
    }
}

/// The guest's cgroup2 favours moves into cgroups (`favordynmods`): without it
/// each process that joins the container cgroup, the main and every exec, waits
/// for an RCU grace period (docs/guest-init.md, Resources inside the guest).
#[test]
fn the_guest_cgroup_hierarchy_favours_moves() {
    if !vm_available("the_guest_cgroup_hierarchy_favours_moves") {
        return;
    }
    let script = "grep ' /sys/fs/cgroup ' /proc/self/mountinfo; cat /proc/self/cgroup";
    let (code, _, out, err, _) = run_to_exit("cgroup-mode", &["sh", "-c", script]);
    assert_eq!(code, 0, "{err}");
    let mount = out
        .lines()
        .find(|l| l.contains(" - cgroup2 "))
        .unwrap_or_else(|| panic!("no cgroup2 mount at /sys/fs/cgroup: {out}"));
    assert!(mount.contains("favordynmods"), "{mount}");
    // Joined all the same: its own cgroup namespace, rooted at the container cgroup.
    assert!(out.lines().any(|l| l == "0::/"), "{out}");
}

/// guest-init's log reaches the console whole: the kernel keeps only 10 lines
/// per 5 s of a /dev/kmsg writer's unless told otherwise, and a boot's and a
/// setup's steps are more (docs/guest-init.md, Console).
#[test]
fn the_guest_log_is_not_cut_short_by_the_kmsg_rate_limit() {
    let test = "kmsg-whole";
    if !vm_available(test) {
        return;
    }
    become_subreaper();
    let rt = verbose_guest();
    let b = TestBundle::new(&["true"]);
    let pid = rt.create(test, &b, &b.path().join("o"), &b.path().join("e"));
    rt.ok(&["start", test]);
    assert_eq!(wait_exit(pid), 0);
    let console = guest_console(&rt, test);
    rt.ok(&["delete", test]);
    let lines = console.lines().filter(|l| l.starts_with("krun-oci-init:"));
    assert!(lines.count() > 10, "{console}");
    // (`true` is in the root filesystem, where no mount covers it: found by the host.)
    for line in [
        "boot: ready",
        "setup: namespaces",
        "(program found by the host)",
        "main process started",
    ] {
        assert!(
            console.contains(line),
            "no {line:?} on the console:\n{console}"
        );
    }
}

/// The main's program is looked up as the container sees it. The host finds it
/// itself where no mount can change the answer, sparing the guest its PATH
/// search (`Setup.main_program`, docs/protocol.md); where a mount may, the
/// guest looks: a bind earlier on PATH wins over the root filesystem's copy,
/// and a program only a bind provides runs (an exec's here).
#[test]
fn the_main_program_is_found_as_the_container_sees_it() {
    let test = "program-lookup";
    if !vm_available(test) {
        return;
    }
    become_subreaper();
    let rt = verbose_guest();
    let script = |path: std::path::PathBuf, body: &str| {
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    };
    let tools = tempfile::tempdir().unwrap();
    script(
        tools.path().join("hello"),
        "echo hello-from-bind; exec sleep 1000",
    );
    script(tools.path().join("only-bind"), "echo only-in-bind");
    let b = TestBundle::new(&["hello"]);
    script(b.rootfs().join("bin/hello"), "echo hello-from-rootfs");
    b.write_config(|c| {
        c["mounts"].as_array_mut().unwrap().push(serde_json::json!({
            "destination": "/usr/local/bin", "type": "bind",
            "source": tools.path(), "options": ["rbind", "ro"]}));
    });
    let out = b.path().join("o");
    let pid = rt.create(test, &b, &out, &b.path().join("e"));
    rt.ok(&["start", test]);
    eventually("the main's line", Duration::from_secs(60), || {
        !read(&out).is_empty()
    });
    assert_eq!(read(&out), "hello-from-bind\n");
    assert_eq!(rt.ok(&["exec", test, "only-bind"]), "only-in-bind\n");
    let console = guest_console(&rt, test);
    assert!(
        console.contains("main prepared in") && console.contains("(program looked up here)"),
        "{console}"
    );
    rt.ok(&["kill", test, "KILL"]);
    assert_eq!(wait_exit(pid), 137);
    rt.ok(&["delete", test]);
}

/// Without create-time hooks the guest forks and sets up the main at create
/// (create returns once it is set up), and it waits before its exec (nothing of
/// it has run) until `start`; with a createRuntime hook it is forked at `start`.
/// The workload is the same either way. One that cannot be set up fails create.
#[test]
fn the_main_is_prepared_at_create_and_runs_only_at_start() {
    if !vm_available("the_main_is_prepared_at_create_and_runs_only_at_start") {
        return;
    }
    become_subreaper();
    let rt = Runtime::new();
    let main = ["sh", "-c", "echo ran > /ran; echo started; exec sleep 1000"];
    for (id, hooked) in [("prepared", false), ("hooked", true)] {
        let b = TestBundle::new(&main);
        if hooked {
            b.write_config(|c| {
                c["hooks"] = serde_json::json!({ "createRuntime": [{ "path": "/bin/true" }] });
            });
        }
        let out = b.path().join("o");
        let pid = rt.create(id, &b, &out, &b.path().join("e"));
        let cmds = |rt: &Runtime| -> Vec<String> {
            rt.ok(&["ps", id])
                .lines()
                .skip(1)
                .map(|l| l.to_string())
                .collect()
        };
        // In the guest: init, and for the prepared main the waiting child, PID 1
        // of its pid namespace (cloned into it: no relay), still guest-init's
        // image (no exec yet). Created means set up: create waited for it.
        let want = if hooked { 1 } else { 2 };
        let before = cmds(&rt);
        assert_eq!(before.len(), want, "{id}: {before:?}");
        assert!(before.iter().all(|l| l.ends_with("/init")), "{before:?}");
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            !b.rootfs().join("ran").exists(),
            "{id}: the main ran before start"
        );
        rt.ok(&["start", id]);
        eventually("the main to run", Duration::from_secs(60), || {
            read(&out).contains("started")
        });
        assert!(b.rootfs().join("ran").exists());
        assert!(rt.ok(&["ps", id]).contains("sleep 1000"), "{id}");
        rt.ok(&["kill", id, "KILL"]);
        assert_eq!(wait_exit(pid), 137);
        rt.ok(&["delete", id]);
    }
    // A main that cannot be set up fails create, as under runc, and leaves nothing.
    let b = TestBundle::new(&main);
    b.write_config(|c| c["process"]["cwd"] = serde_json::json!("/no-such-dir"));
    let out = rt.run(&["create", "--bundle", b.path().to_str().unwrap(), "bad-cwd"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chdir to cwd"), "{err}");
    assert_cleaned_up(&rt, "bad-cwd", &[]);
    // No VM helper left (virtiofsd names the rootfs on its command line).
    let rootfs = b.rootfs().to_string_lossy().into_owned();
    eventually("the VM's helpers to go", Duration::from_secs(10), || {
        fs::read_dir("/proc").unwrap().flatten().all(|e| {
            let cmdline = fs::read(e.path().join("cmdline")).unwrap_or_default();
            !String::from_utf8_lossy(&cmdline).contains(&rootfs)
        })
    });
}

/// The rootfs share's cache follows the host config file: `always` by default,
/// `auto` on request, where a file the host rewrites in place while the
/// container runs shows in the guest (docs/vmm.md).
#[test]
fn the_rootfs_cache_follows_the_host_config() {
    if !vm_available("the_rootfs_cache_follows_the_host_config") {
        return;
    }
    become_subreaper();
    let d = tempfile::tempdir().unwrap();
    let auto = d.path().join("config.toml");
    fs::write(&auto, "rootfs_cache = \"auto\"\n").unwrap();
    for (host_config, wanted) in [(None, "--cache=always"), (Some(auto), "--cache=auto")] {
        let rt = Runtime {
            host_config: host_config.clone(),
            ..Runtime::new()
        };
        let b = TestBundle::new(&["sleep", "1000"]);
        let rootfs = b.path().join("rootfs");
        let pid = rt.create("cache", &b, &b.path().join("o"), &b.path().join("e"));
        let shared_dir = format!("--shared-dir {} ", rootfs.display());
        let rootfs_share: Vec<String> = rt
            .helper_pids("cache")
            .iter()
            .filter_map(|p| fs::read(format!("/proc/{p}/cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains(&shared_dir))
            .collect();
        assert_eq!(rootfs_share.len(), 1, "{rootfs_share:?}");
        assert!(rootfs_share[0].contains(wanted), "{}", rootfs_share[0]);
        rt.ok(&["start", "cache"]);
        fs::write(rootfs.join("probe"), "one").unwrap();
        assert_eq!(rt.ok(&["exec", "cache", "cat", "/probe"]), "one");
        if host_config.is_some() {
            // Same inode, same size: only the data changes.
            fs::OpenOptions::new()
                .write(true)
                .open(rootfs.join("probe"))
                .and_then(|mut f| std::io::Write::write_all(&mut f, b"two"))
                .unwrap();
            assert_eq!(rt.ok(&["exec", "cache", "cat", "/probe"]), "two");
        }
        rt.ok(&["kill", "cache", "KILL"]);
        assert_eq!(wait_exit(pid), 137);
        rt.ok(&["delete", "cache"]);
    }
}
