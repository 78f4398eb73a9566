//! A hostile guest against the real host: VMs booted with the test guest of
//! `make hostile-init` (init/src/guest/hostile.rs, `KRUN_OCI_HOSTILE_INIT`), which
//! sends oversized, truncated and malformed frames, lies about the exit code,
//! floods output and plants symlinks where the host reads. The host must stay
//! bounded, never panic, never follow the symlinks, never report the VM's end
//! as exit 0, and leave nothing behind.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

/// How long the host may take to end a container whose guest broke the protocol.
const ENDED_WITHIN: Duration = Duration::from_secs(30);

/// The hostile init, or why the test cannot run (a failure under KRUN_OCI_REQUIRE_VM=1).
fn hostile_init(test: &str) -> Option<PathBuf> {
    if !vm_available(test) {
        return None;
    }
    match std::env::var_os("KRUN_OCI_HOSTILE_INIT").map(PathBuf::from) {
        Some(p) if p.exists() => Some(p),
        _ => {
            let why = "KRUN_OCI_HOSTILE_INIT unset or missing (`make hostile-init` builds it; `make test` sets it)";
            if std::env::var("KRUN_OCI_REQUIRE_VM").as_deref() == Ok("1") {
                panic!("{test}: {why}");
            }
            eprintln!("SKIPPED {test}: {why}");
            None
        }
    }
}

/// A container whose main asks the hostile guest for `mode`.
fn hostile_bundle(mode: &[&str]) -> TestBundle {
    let mut args = vec!["/hostile"];
    args.extend_from_slice(mode);
    let b = TestBundle::new(&args);
    // Present and executable, so nothing on the host side refuses the main early.
    fs::write(b.rootfs().join("hostile"), "#!/bin/sh\nexit 99\n").unwrap();
    let exec = <fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755);
    fs::set_permissions(b.rootfs().join("hostile"), exec).unwrap();
    b
}

fn monitor_log(rt: &Runtime, id: &str) -> String {
    fs::read_to_string(rt.root.path().join(id).join("monitor.log")).unwrap_or_default()
}

/// Creates and starts a hostile container; returns its monitor pid and helpers.
fn start(rt: &Runtime, id: &str, b: &TestBundle) -> (i32, Vec<i32>) {
    let null = Path::new("/dev/null");
    let pid = rt.create(id, b, null, &b.path().join("create.err"));
    let helpers = rt.helper_pids(id);
    rt.ok(&["start", id]);
    (pid, helpers)
}

/// The host ended the container on its own: the monitor exited (bounded) with
/// `want`, did not panic, and `state` agrees.
fn ended(rt: &Runtime, id: &str, pid: i32, want: i32) {
    eventually("the monitor to end the container", ENDED_WITHIN, || {
        !alive(pid)
    });
    let code = wait_exit(pid);
    let log = monitor_log(rt, id);
    assert!(
        !log.contains("panicked"),
        "{id}: the monitor panicked:\n{log}"
    );
    assert_eq!(code, want, "{id}: monitor exit; its log:\n{log}");
    let st = rt.state(id);
    assert_eq!(st["status"], "stopped", "{id}: {st}");
    assert_eq!(st["exitCode"], want, "{id}: {st}");
}

/// [`ended`], then `delete` leaves nothing behind.
fn ended_cleanly(rt: &Runtime, id: &str, pid: i32, helpers: &[i32], want: i32) {
    ended(rt, id, pid, want);
    rt.ok(&["delete", id]);
    assert_cleaned_up(rt, id, helpers);
}

fn frames_case(test: &str, mode: &str) {
    let Some(init) = hostile_init(test) else {
        return;
    };
    become_subreaper();
    let rt = Runtime::with_init(init);
    let b = hostile_bundle(&[mode]);
    let (pid, helpers) = start(&rt, mode, &b);
    // The guest broke the protocol: the link is dropped and the VM ended, with
    // the code of a lost VM, never the guest's word.
    ended_cleanly(
        &rt,
        mode,
        pid,
        &helpers,
        krun_oci::container::LOST_EXIT_CODE,
    );
}

#[test]
fn an_oversized_frame_drops_the_link() {
    frames_case("an_oversized_frame_drops_the_link", "oversized");
}

#[test]
fn a_truncated_frame_drops_the_link() {
    frames_case("a_truncated_frame_drops_the_link", "truncated");
}

#[test]
fn a_malformed_frame_drops_the_link() {
    frames_case("a_malformed_frame_drops_the_link", "malformed");
}

/// `MainExited` with 70000, then power-off: no process exits so; the host
/// records a lost VM (255), not the lie and not the power-off's 0.
#[test]
fn an_impossible_exit_code_is_not_believed() {
    frames_case("an_impossible_exit_code_is_not_believed", "lying-exit");
}

/// Guest-init (PID 1) dies from inside while the main runs; the guest kernel
/// panics. Signals cannot do this (the kernel drops them for PID 1), an exit can.
/// The host sees the VM gone without a report: 255, never 0.
#[test]
fn guest_init_dying_is_a_lost_vm() {
    let Some(init) = hostile_init("guest_init_dying_is_a_lost_vm") else {
        return;
    };
    become_subreaper();
    let rt = Runtime::with_init(init);
    let b = hostile_bundle(&["init-dies", "sleep", "1000"]);
    let (pid, helpers) = start(&rt, "init-dies", &b);
    ended_cleanly(
        &rt,
        "init-dies",
        pid,
        &helpers,
        krun_oci::container::LOST_EXIT_CODE,
    );
}

/// Output frames and 256 KiB unexpected messages as fast as the link takes
/// them: `state` answers, the monitor's memory and both logs stay bounded, and
/// a KILL still ends it as 137.
#[test]
fn a_flooding_guest_stays_bounded() {
    let Some(init) = hostile_init("a_flooding_guest_stays_bounded") else {
        return;
    };
    become_subreaper();
    let rt = Runtime::with_init(init);
    let b = hostile_bundle(&["flood", "sleep", "1000"]);
    let id = "flood";
    let (pid, helpers) = start(&rt, id, &b);
    let dir = rt.root.path().join(id);
    let size = |name: &str| fs::metadata(dir.join(name)).map(|m| m.len()).unwrap_or(0);
    let t0 = Instant::now();
    let mut max_rss_kb = 0u64;
    while t0.elapsed() < Duration::from_secs(8) {
        assert_eq!(rt.state(id)["status"], "running");
        max_rss_kb = max_rss_kb.max(rss_kb(pid));
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        size("container.log.1") > 0,
        "the json-file log never rotated"
    );
    rt.ok(&["kill", id, "KILL"]);
    ended(&rt, id, pid, 137);
    let max = krun_oci::logs::DEFAULT_MAX_SIZE;
    for name in ["container.log", "container.log.1"] {
        assert!(size(name) <= max, "{name}: {} bytes", size(name));
    }
    assert!(!dir.join("container.log.2").exists());
    // Five unexpected frames logged, then a count: not a line per frame.
    let log = size("monitor.log");
    assert!(log < 64 * 1024, "monitor.log grew to {log} bytes");
    assert!(max_rss_kb < 64 * 1024, "monitor RSS {max_rss_kb} kB");
    rt.ok(&["delete", id]);
    assert_cleaned_up(&rt, id, &helpers);
}

/// The guest points `/.a3s_exit_code` at a host file holding "0" and plants
/// symlinks to a host directory in the bind-mounts share, then powers off
/// without a word. The host must not read through the link (a death reported
/// as 0) and its cleanup must not reach through the planted ones.
#[test]
fn planted_symlinks_are_not_followed() {
    let Some(init) = hostile_init("planted_symlinks_are_not_followed") else {
        return;
    };
    become_subreaper();
    let rt = Runtime::with_init(init);
    let canary = tempfile::tempdir().unwrap();
    let canary_file = canary.path().join("exit-code");
    fs::write(&canary_file, "0").unwrap();
    let canary_dir = canary.path().join("precious");
    fs::create_dir(&canary_dir).unwrap();
    fs::write(canary_dir.join("keep"), "keep").unwrap();
    let b = hostile_bundle(&[
        "plant-symlinks",
        canary_file.to_str().unwrap(),
        canary_dir.to_str().unwrap(),
        "/shared",
    ]);
    let shared = tempfile::tempdir().unwrap();
    let src = shared.path().to_str().unwrap().to_string();
    b.write_config(|c| {
        c["mounts"].as_array_mut().unwrap().push(serde_json::json!({
            "destination": "/shared", "type": "bind", "source": src,
            "options": ["rbind", "rw"]
        }));
    });
    let id = "planter";
    let (pid, helpers) = start(&rt, id, &b);
    let run_dir = rt.root.path().join(id).join("run");
    let staging = fs::canonicalize(&run_dir).unwrap().join("mounts");
    eventually("the guest to end", ENDED_WITHIN, || !alive(pid));
    // The links are really there, on the host, where the host reads and cleans.
    let exit_link = b.rootfs().join(krun_oci_protocol::contract::EXIT_CODE_FILE);
    assert!(
        exit_link.is_symlink(),
        "the guest planted no exit-code link"
    );
    let errors = fs::read_to_string(b.rootfs().join(".hostile-errors")).unwrap_or_default();
    assert!(
        staging.join("planted-dir").is_symlink(),
        "the guest planted nothing in the mounts share: {errors}"
    );
    let code = wait_exit(pid);
    assert_eq!(
        code,
        krun_oci::container::LOST_EXIT_CODE,
        "{}",
        monitor_log(&rt, id)
    );
    assert_eq!(
        rt.state(id)["exitCode"],
        krun_oci::container::LOST_EXIT_CODE
    );
    rt.ok(&["delete", id]);
    assert_cleaned_up(&rt, id, &helpers);
    assert_eq!(fs::read_to_string(&canary_file).unwrap(), "0");
    assert_eq!(fs::read_to_string(canary_dir.join("keep")).unwrap(), "keep");
    assert_eq!(fs::read_dir(&canary_dir).unwrap().count(), 1);
    assert_eq!(fs::read_dir(shared.path()).unwrap().count(), 0);
}
