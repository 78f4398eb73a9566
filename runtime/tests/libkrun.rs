//! End-to-end on the libkrun backend, driven only through the krun-oci binary with
//! `--vmm libkrun`. Runs where hardware KVM is usable (detect's assessment) and
//! libkrun has a kernel; elsewhere prints `SKIPPED <test>: <reason>` and passes,
//! unless KRUN_OCI_REQUIRE_LIBKRUN=1, where a skip is a failure.

mod common;

use std::fs;
use std::process::Stdio;

use common::*;
use krun_oci::image;
use krun_oci::vmm::detect::{assess_kvm, HostFacts};
use krun_oci::vmm::libkrun;

/// Why libkrun VMs cannot run here, if they cannot.
fn blocker() -> Option<String> {
    let kvm = assess_kvm(&HostFacts::probe());
    if !kvm.usable {
        return Some(kvm.to_string());
    }
    if which("busybox").is_none() {
        return Some("busybox missing (apt-get install busybox-static)".into());
    }
    if !std::env::var_os("KRUN_OCI_INIT").is_some_and(|p| std::path::Path::new(&p).exists()) {
        return Some("static krun-oci-init not built (run `make build`)".into());
    }
    let opts = match krun_oci::boot::image_options(krun_oci::vmm::VmmChoice::Libkrun) {
        Ok(o) => o,
        Err(e) => return Some(format!("image options: {e}")),
    };
    let img = match image::ensure(&opts) {
        Ok(i) => i,
        Err(e) => return Some(format!("no guest image: {e}")),
    };
    libkrun::choose_kernel(&img, libkrun::libkrunfw_available())
        .err()
        .map(|e| e.to_string())
}

fn libkrun_available(test: &str) -> bool {
    let Some(why) = blocker() else { return true };
    if std::env::var("KRUN_OCI_REQUIRE_LIBKRUN").as_deref() == Ok("1") {
        panic!("{test}: libkrun tests required but cannot run: {why}");
    }
    eprintln!("SKIPPED {test}: {why}");
    false
}

fn create(rt: &Runtime, id: &str, b: &TestBundle) -> i32 {
    let pid_file = b.path().join(format!("{id}.pid"));
    let err = b.path().join("err");
    let status = rt
        .cmd(&[
            "--vmm",
            "libkrun",
            "create",
            "--bundle",
            b.path().to_str().unwrap(),
            "--pid-file",
            pid_file.to_str().unwrap(),
            id,
        ])
        .stdin(Stdio::null())
        .stdout(fs::File::create(b.path().join("out")).unwrap())
        .stderr(fs::File::create(&err).unwrap())
        .status()
        .unwrap();
    assert!(
        status.success(),
        "create failed: {}",
        fs::read_to_string(&err).unwrap_or_default()
    );
    fs::read_to_string(&pid_file).unwrap().parse().unwrap()
}

#[test]
fn libkrun_lifecycle_and_exec() {
    let test = "libkrun_lifecycle_and_exec";
    if !libkrun_available(test) {
        return;
    }
    become_subreaper();
    let rt = Runtime::new();
    // The main waits for a file an exec creates, then exits 7.
    let b = TestBundle::new(&[
        "sh",
        "-c",
        "echo main-out; while [ ! -e /tmp/go ]; do sleep 0.05; done; exit 7",
    ]);
    let pid = create(&rt, "lk", &b);
    let state = rt.state("lk");
    assert_eq!(state["status"], "created");
    assert_eq!(state["pid"], pid);
    let helpers = rt.helper_pids("lk");
    assert_eq!(helpers.len(), 1, "one libkrun VMM process: {helpers:?}");
    rt.ok(&["start", "lk"]);
    assert_eq!(rt.state("lk")["status"], "running");
    // exec: output, exit codes.
    let out = rt.ok(&["exec", "lk", "sh", "-c", "echo in-guest; uname -s"]);
    assert_eq!(out, "in-guest\nLinux\n");
    assert_eq!(
        rt.run(&["exec", "lk", "sh", "-c", "exit 42"]).status.code(),
        Some(42)
    );
    rt.ok(&["exec", "lk", "touch", "/tmp/go"]);
    assert_eq!(wait_exit(pid), 7);
    let state = rt.state("lk");
    assert_eq!(state["status"], "stopped");
    assert_eq!(state["exitCode"], 7);
    assert_eq!(
        fs::read_to_string(b.path().join("out")).unwrap(),
        "main-out\n"
    );
    rt.ok(&["delete", "lk"]);
    assert_cleaned_up(&rt, "lk", &helpers);
}
