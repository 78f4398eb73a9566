//! Faults on real microVMs: a process of the VM killed, an ID raced, a create
//! deleted while it boots, a main that floods its output. In every case the
//! container ends `stopped` with a non-zero code (a death is never exit 0),
//! `delete` works and nothing is left behind.

mod common;

use std::fs;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long a dead VM may take to show as `stopped`: the monitor notices a
/// helper's death at once (pidfds); this only bounds a hang.
const STOPPED_WITHIN: Duration = Duration::from_secs(30);

fn comm(pid: i32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn cmdline(pid: i32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Waits for the monitor to exit (bounded: it must not hang) and returns its code.
fn exit_within(pid: i32, limit: Duration) -> i32 {
    // A zombie is not alive: it has exited and waits for us to reap it.
    eventually("the monitor to exit", limit, || !alive(pid));
    wait_exit(pid)
}

/// Kills the one helper of a running container that `pick` selects and checks
/// the container ends stopped, non-zero, and deletes cleanly.
fn kill_helper(test: &str, with_bind: bool, pick: impl Fn(i32) -> bool) {
    if !vm_available(test) {
        return;
    }
    become_subreaper();
    let rt = Runtime::new();
    let b = TestBundle::new(&["sleep", "1000"]);
    let shared = tempfile::tempdir().unwrap();
    if with_bind {
        let src = shared.path().to_str().unwrap().to_string();
        b.write_config(|c| {
            c["mounts"].as_array_mut().unwrap().push(serde_json::json!({
                "destination": "/shared", "type": "bind", "source": src,
                "options": ["rbind", "rw"]
            }));
        });
    }
    let id = "victim";
    let pid = rt.create(id, &b, &b.path().join("o"), &b.path().join("e"));
    rt.ok(&["start", id]);
    let helpers = rt.helper_pids(id);
    let chosen: Vec<i32> = helpers.iter().copied().filter(|&p| pick(p)).collect();
    assert_eq!(
        chosen.len(),
        1,
        "{test}: helpers {:?}",
        helpers.iter().map(|&p| cmdline(p)).collect::<Vec<_>>()
    );
    kill(Pid::from_raw(chosen[0]), Signal::SIGKILL).unwrap();
    let code = exit_within(pid, STOPPED_WITHIN);
    assert_ne!(code, 0, "{test}: a dead VM reported as exit 0");
    let st = rt.state(id);
    assert_eq!(st["status"], "stopped", "{test}: {st}");
    assert_ne!(st["exitCode"], 0, "{test}: {st}");
    rt.ok(&["delete", id]);
    assert_cleaned_up(&rt, id, &helpers);
}

#[test]
fn sigkill_of_qemu() {
    kill_helper("sigkill_of_qemu", false, |p| comm(p).starts_with("qemu"));
}

#[test]
fn sigkill_of_the_rootfs_virtiofsd() {
    kill_helper("sigkill_of_the_rootfs_virtiofsd", true, |p| {
        comm(p) == "virtiofsd" && !cmdline(p).contains("virtiofs-mounts.sock")
    });
}

#[test]
fn sigkill_of_the_bind_mounts_virtiofsd() {
    kill_helper("sigkill_of_the_bind_mounts_virtiofsd", true, |p| {
        comm(p) == "virtiofsd" && cmdline(p).contains("virtiofs-mounts.sock")
    });
}

#[test]
fn sigkill_of_vhost_device_vsock() {
    kill_helper("sigkill_of_vhost_device_vsock", false, |p| {
        comm(p).starts_with("vhost-device")
    });
}

/// Two `create`s of one ID at once: exactly one wins; the other fails with
/// runc's words and touches nothing of the winner's.
#[test]
fn two_concurrent_creates_of_one_id() {
    if !vm_available("two_concurrent_creates_of_one_id") {
        return;
    }
    become_subreaper();
    let rt = Runtime::new();
    let b = TestBundle::new(&["sleep", "1000"]);
    let racers: Vec<_> = (0..2)
        .map(|i| {
            let pid_file = b.path().join(format!("racer{i}.pid"));
            // A file, not a pipe: the winner's monitor keeps create's stdio.
            let err = b.path().join(format!("racer{i}.err"));
            let child = rt
                .cmd(&[
                    "create",
                    "--bundle",
                    b.path().to_str().unwrap(),
                    "--pid-file",
                    pid_file.to_str().unwrap(),
                    "twin",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(fs::File::create(&err).unwrap())
                .spawn()
                .unwrap();
            (pid_file, err, child)
        })
        .collect();
    let results: Vec<_> = racers
        .into_iter()
        .map(|(pid_file, err, mut child)| {
            let status = child.wait().unwrap();
            (pid_file, fs::read_to_string(err).unwrap(), status)
        })
        .collect();
    let (won, lost): (Vec<_>, Vec<_>) = results.iter().partition(|(_, _, s)| s.success());
    assert_eq!((won.len(), lost.len()), (1, 1), "{results:?}");
    let (_, err, status) = lost[0];
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("already exists"), "{err}");
    // The winner is whole: it starts, runs, dies of KILL as 137.
    let pid: i32 = fs::read_to_string(&won[0].0).unwrap().parse().unwrap();
    assert_eq!(rt.state("twin")["status"], "created");
    rt.ok(&["start", "twin"]);
    assert_eq!(rt.state("twin")["status"], "running");
    let helpers = rt.helper_pids("twin");
    rt.ok(&["kill", "twin", "KILL"]);
    assert_eq!(exit_within(pid, STOPPED_WITHIN), 137);
    rt.ok(&["delete", "twin"]);
    assert_cleaned_up(&rt, "twin", &helpers);
}

/// `delete --force` while `create` is still booting the VM: both end, the
/// container is gone, and no process, state dir or run dir of it is left.
#[test]
fn delete_force_while_create_boots() {
    if !vm_available("delete_force_while_create_boots") {
        return;
    }
    become_subreaper();
    let rt = Runtime::new();
    let b = TestBundle::new(&["sleep", "1000"]);
    let create = rt
        .cmd(&["create", "--bundle", b.path().to_str().unwrap(), "early"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The VM is booting once its helpers are recorded.
    eventually("create to start booting", STOPPED_WITHIN, || {
        fs::read(rt.root.path().join("early/state.json"))
            .ok()
            .and_then(|d| serde_json::from_slice::<serde_json::Value>(&d).ok())
            .is_some_and(|v| v["helper_pids"].as_array().is_some_and(|a| !a.is_empty()))
    });
    let helpers = rt.helper_pids("early");
    let out = rt.run(&["delete", "--force", "early"]);
    assert!(
        out.status.success(),
        "delete --force: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created = create.wait_with_output().unwrap();
    // Create either lost the race (exit 1, with a reason) or finished first and
    // its container was deleted; gone either way.
    if !created.status.success() {
        assert_eq!(created.status.code(), Some(1));
        assert!(!created.stderr.is_empty());
    }
    let st = rt.run(&["state", "early"]);
    assert!(!st.status.success());
    assert!(String::from_utf8_lossy(&st.stderr).contains("does not exist"));
    for &p in &helpers {
        eventually("a helper of the deleted VM to exit", STOPPED_WITHIN, || {
            !alive(p)
        });
    }
    assert_cleaned_up(&rt, "early", &helpers);
}

/// A main that writes as fast as it can for 10 s: the host answers `state`
/// meanwhile, the monitor's memory stays small, the json-file log stays within
/// its two files of 10 MiB, and `logs` shows the last line.
#[test]
fn a_flood_of_output_stays_bounded() {
    if !vm_available("a_flood_of_output_stays_bounded") {
        return;
    }
    become_subreaper();
    let rt = Runtime::new();
    let b = TestBundle::new(&[
        "sh",
        "-c",
        // `yes` dies mid-line and the shell reports it on stderr: the extra echo ends
        // the line and stderr is discarded, so the log's last entry is "done".
        "exec 2>/dev/null; timeout 10 yes 'flood flood flood flood flood flood flood flood'; echo; echo done; exit 3",
    ]);
    let null = std::path::Path::new("/dev/null");
    let pid = rt.create("flood", &b, null, null);
    rt.ok(&["start", "flood"]);
    let t0 = Instant::now();
    let mut max_rss_kb = 0u64;
    while t0.elapsed() < Duration::from_secs(8) {
        assert_eq!(rt.state("flood")["status"], "running");
        max_rss_kb = max_rss_kb.max(rss_kb(pid));
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(exit_within(pid, Duration::from_secs(120)), 3);
    assert!(max_rss_kb < 64 * 1024, "monitor RSS {max_rss_kb} kB");
    let dir = rt.root.path().join("flood");
    let size = |name: &str| fs::metadata(dir.join(name)).map(|m| m.len()).unwrap_or(0);
    let max = krun_oci::logs::DEFAULT_MAX_SIZE;
    assert!(size("container.log.1") > 0, "the log never rotated");
    for name in ["container.log", "container.log.1"] {
        assert!(size(name) <= max, "{name}: {} bytes", size(name));
    }
    assert!(!dir.join("container.log.2").exists());
    let out = rt.run(&["logs", "--tail", "1", "flood"]);
    assert!(out.status.success());
    if String::from_utf8_lossy(&out.stdout) != "done\n" {
        let last = rt.run(&["logs", "--tail", "4", "--timestamps", "flood"]);
        let tail_of = |name: &str| {
            let t = fs::read(dir.join(name)).unwrap_or_default();
            String::from_utf8_lossy(&t[t.len().saturating_sub(600)..]).into_owned()
        };
        panic!(
            "logs --tail 1: {:?} / {:?}; --tail 4: {:?} / {:?}; sizes {} {}; end of container.log: {:?}; of .1: {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&last.stdout),
            String::from_utf8_lossy(&last.stderr),
            size("container.log"),
            size("container.log.1"),
            tail_of("container.log"),
            tail_of("container.log.1"),
        );
    }
    let helpers = rt.helper_pids("flood");
    rt.ok(&["delete", "flood"]);
    assert_cleaned_up(&rt, "flood", &helpers);
}
