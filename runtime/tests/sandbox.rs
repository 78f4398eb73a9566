//! The lifecycle, exec and failure paths on the sandbox backend: the real
//! krun-oci binary, VM monitor and guest-init, with guest-init run on the host
//! in its own namespaces instead of in a VM. These need no QEMU and no KVM, so
//! they also run where VMs cannot; the VM tests (lifecycle.rs, exec_tty.rs...)
//! cover the same verbs on real VMs.

mod common;

use std::fs;
use std::process::Stdio;
use std::time::Duration;

use common::*;

#[test]
fn create_start_exit_code_delete() {
    if !sandbox_available("create_start_exit_code_delete") {
        return;
    }
    become_subreaper();
    let rt = Runtime::sandbox();
    let b = TestBundle::new(&["sh", "-c", "echo out-line; echo err-line >&2; exit 7"]);
    let (out, err) = (b.path().join("out"), b.path().join("err"));
    let pid = rt.create("sb1", &b, &out, &err);
    assert_eq!(rt.state("sb1")["status"], "created");
    let helpers = rt.helper_pids("sb1");
    assert!(!helpers.is_empty());
    // Created: the main has not run.
    assert_eq!(fs::read_to_string(&out).unwrap(), "");
    rt.ok(&["start", "sb1"]);
    assert_eq!(wait_exit(pid), 7);
    assert_eq!(rt.state("sb1")["status"], "stopped");
    assert_eq!(fs::read_to_string(&out).unwrap(), "out-line\n");
    assert_eq!(fs::read_to_string(&err).unwrap(), "err-line\n");
    // The json-file log, each stream back on its own.
    let logs = rt.run(&["logs", "sb1"]);
    assert!(logs.status.success());
    assert_eq!(String::from_utf8_lossy(&logs.stdout), "out-line\n");
    assert_eq!(String::from_utf8_lossy(&logs.stderr), "err-line\n");
    rt.ok(&["delete", "sb1"]);
    let mut pids = helpers;
    pids.push(pid);
    assert_cleaned_up(&rt, "sb1", &pids);
}

#[test]
fn exec_codes_and_kill() {
    if !sandbox_available("exec_codes_and_kill") {
        return;
    }
    become_subreaper();
    let rt = Runtime::sandbox();
    let b = TestBundle::new(&[
        "sh",
        "-c",
        "trap 'echo trapped; exit 42' TERM; echo ready; while :; do sleep 1; done",
    ]);
    let (out, err) = (b.path().join("out"), b.path().join("err"));
    let pid = rt.create("sb2", &b, &out, &err);
    rt.ok(&["start", "sb2"]);
    eventually("the main's first line", Duration::from_secs(30), || {
        fs::read_to_string(&out)
            .unwrap_or_default()
            .contains("ready")
    });
    let code = |args: &[&str]| {
        let mut all = vec!["exec", "sb2"];
        all.extend_from_slice(args);
        rt.run(&all).status.code()
    };
    assert_eq!(code(&["sh", "-c", "exit 5"]), Some(5));
    let missing = rt.run(&["exec", "sb2", "no-such-command"]);
    assert_eq!(missing.status.code(), Some(127));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("executable file not found in $PATH"),
        "{missing:?}"
    );
    let noexec = b.rootfs().join("noexec");
    fs::write(&noexec, "#!/bin/sh\necho ran\n").unwrap();
    fs::set_permissions(&noexec, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    assert_eq!(code(&["/noexec"]), Some(126));
    // stdin in, stdout out.
    let piped = rt
        .cmd(&["exec", "sb2", "cat"])
        .stdin(fs::File::open(b.rootfs().join("etc/passwd")).unwrap())
        .output()
        .unwrap();
    assert!(piped.status.success());
    assert_eq!(
        piped.stdout,
        fs::read(b.rootfs().join("etc/passwd")).unwrap()
    );
    // --detach: the pid file names a relay that exits with the guest process's code.
    let pid_file = b.path().join("exec.pid");
    rt.ok(&[
        "exec",
        "--detach",
        "--pid-file",
        pid_file.to_str().unwrap(),
        "sb2",
        "sh",
        "-c",
        "sleep 0.2; exit 9",
    ]);
    let relay: i32 = fs::read_to_string(&pid_file).unwrap().parse().unwrap();
    assert_eq!(wait_exit(relay), 9);
    // SIGTERM reaches the main's trap.
    rt.ok(&["kill", "sb2", "TERM"]);
    assert_eq!(wait_exit(pid), 42);
    assert!(fs::read_to_string(&out).unwrap().contains("trapped"));
    let helpers = rt.helper_pids("sb2");
    rt.ok(&["delete", "sb2"]);
    assert_cleaned_up(&rt, "sb2", &helpers);
}

/// A guest-init that dies at once fails create with the reason and its output
/// (the sandbox's console), exit status 1, and nothing left behind.
#[test]
fn a_guest_that_never_gets_ready_fails_create_cleanly() {
    if !sandbox_available("a_guest_that_never_gets_ready_fails_create_cleanly") {
        return;
    }
    // A static binary that is not guest-init: busybox prints its usage and exits.
    let busybox = which("busybox").unwrap();
    let rt = Runtime::with_init(busybox);
    let rt = Runtime {
        sandbox: true,
        ..rt
    };
    let b = TestBundle::new(&["true"]);
    let out = rt
        .cmd(&["create", "--bundle", b.path().to_str().unwrap(), "sb3"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("before the guest was ready") && err.contains("console:"),
        "{err}"
    );
    // The end of busybox's usage text.
    assert!(err.contains("busybox"), "{err}");
    assert_cleaned_up(&rt, "sb3", &[]);
    let left: Vec<_> = fs::read_dir(rt.root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Without the explicit allowance the sandbox is refused: it is no VM.
#[test]
fn the_sandbox_backend_must_be_allowed() {
    let rt = Runtime::new();
    let b = TestBundle::new(&["true"]);
    let out = rt
        .cmd(&[
            "--vmm",
            "sandbox",
            "create",
            "--bundle",
            b.path().to_str().unwrap(),
            "sb4",
        ])
        .env_remove(krun_oci::vmm::sandbox::ALLOW_ENV)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(krun_oci::vmm::sandbox::ALLOW_ENV), "{err}");
    assert_cleaned_up(&rt, "sb4", &[]);
}
