//! The warm pool on real microVMs: `krun-oci pool serve` started by the test,
//! containers created on its VMs through the krun-oci binary, each fallback to
//! the cold path, and what the daemon's or a monitor's SIGKILL leaves (nothing).

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::pool::Pool;
use common::*;
use serde_json::Value;

fn monitor_log(rt: &Runtime, id: &str) -> String {
    fs::read_to_string(rt.root.path().join(id).join("monitor.log")).unwrap_or_default()
}

fn was_pooled(rt: &Runtime, id: &str) -> bool {
    monitor_log(rt, id).contains("(pool hit)")
}

/// Nothing of the pool is left: no member process, directory, run dir or socket.
fn assert_pool_gone(root: &Path, pids: &[i32]) {
    for &p in pids {
        eventually(
            &format!("pool process {p} to exit"),
            Duration::from_secs(15),
            || !alive(p),
        );
    }
    let paths = krun_oci::pool::PoolPaths::for_root(root);
    eventually(
        "the pool's member directories to go",
        Duration::from_secs(10),
        || {
            fs::read_dir(&paths.dir)
                .map(|rd| rd.flatten().all(|e| !e.path().is_dir()))
                .unwrap_or(true)
        },
    );
    eventually("the pool's socket to go", Duration::from_secs(10), || {
        !paths.socket.exists()
    });
}

fn files_in(dir: &Path) -> usize {
    fs::read_dir(dir).map(|rd| rd.count()).unwrap_or(0)
}

#[test]
fn a_pool_hit_runs_the_whole_lifecycle_with_binds_kept_as_configured() {
    if !vm_available("a_pool_hit_runs_the_whole_lifecycle_with_binds_kept_as_configured") {
        return;
    }
    become_subreaper();
    let rt = Runtime::new();
    let mut pool = Pool::serve(&rt, 1);
    let data = tempfile::tempdir().unwrap();
    let (ro, rw) = (data.path().join("ro"), data.path().join("rw"));
    fs::create_dir_all(&ro).unwrap();
    fs::create_dir_all(&rw).unwrap();
    fs::write(ro.join("f"), "from-host\n").unwrap();
    let b = TestBundle::new(&[
        "sh",
        "-c",
        "cat /ro/f; (echo x > /ro/new) 2>/dev/null || echo ro-refused; echo y > /rw/new; \
         echo root > /in-root; read line; echo got-$line; exit 7",
    ]);
    b.write_config(|c| {
        let mounts = c["mounts"].as_array_mut().unwrap();
        mounts.push(serde_json::json!({"destination": "/ro", "type": "bind",
            "source": ro, "options": ["rbind", "ro"]}));
        mounts.push(serde_json::json!({"destination": "/rw", "type": "bind",
            "source": rw, "options": ["rbind", "rw"]}));
    });
    let rootfs_entries = files_in(&b.rootfs());
    let (out, err) = (b.path().join("out"), b.path().join("err"));
    // The container's stdin: create's, as with runc.
    let stdin = b.path().join("in");
    fs::write(&stdin, "ping\n").unwrap();
    let pid_file = b.path().join("pid");
    let status = rt
        .cmd(&[
            "create",
            "--bundle",
            b.path().to_str().unwrap(),
            "--pid-file",
        ])
        .arg(&pid_file)
        .arg("hit")
        .stdin(fs::File::open(&stdin).unwrap())
        .stdout(fs::File::create(&out).unwrap())
        .stderr(fs::File::create(&err).unwrap())
        .status()
        .unwrap();
    assert!(
        status.success(),
        "create: {}",
        fs::read_to_string(&err).unwrap_or_default()
    );
    let pid: i32 = fs::read_to_string(&pid_file).unwrap().parse().unwrap();
    assert!(
        was_pooled(&rt, "hit"),
        "not a pool hit: {}",
        monitor_log(&rt, "hit")
    );
    assert_eq!(pool.status()["hits"], 1);
    assert_eq!(rt.state("hit")["status"], "created");
    assert_eq!(rt.state("hit")["pid"], pid);
    let helpers = rt.helper_pids("hit");
    assert!(
        helpers.len() >= 4,
        "member and its VM's processes: {helpers:?}"
    );
    rt.ok(&["start", "hit"]);
    assert_eq!(wait_exit(pid), 7);
    let state = rt.state("hit");
    assert_eq!(state["status"], "stopped");
    assert_eq!(state["exitCode"], 7);
    let stdout = fs::read_to_string(&out).unwrap();
    assert!(stdout.contains("from-host"), "{stdout}");
    assert!(
        stdout.contains("ro-refused"),
        "a read-only bind was writable: {stdout}"
    );
    assert!(stdout.contains("got-ping"), "{stdout}");
    assert!(!ro.join("new").exists());
    assert_eq!(fs::read_to_string(rw.join("new")).unwrap(), "y\n");
    assert_eq!(
        fs::read_to_string(b.rootfs().join("in-root")).unwrap(),
        "root\n"
    );
    assert!(rt.ok(&["logs", "hit"]).contains("got-ping"));
    rt.ok(&["delete", "hit"]);
    assert_cleaned_up(&rt, "hit", &helpers);
    // The member's directories went with it; the root and the binds' sources did not.
    // (plus /in-root and the mount points /ro and /rw the guest made, as runc does)
    assert_eq!(files_in(&b.rootfs()), rootfs_entries + 3);
    assert!(b.rootfs().join("bin/busybox").exists());
    assert_eq!(fs::read_to_string(ro.join("f")).unwrap(), "from-host\n");
    // The pool refills, and its own shutdown leaves nothing.
    pool.wait_idle(1);
    let pids: Vec<i32> = pool.member_pids().into_iter().chain([pool.pid()]).collect();
    let root = pool.root.clone();
    pool.stop();
    assert_pool_gone(&root, &pids);
}

#[test]
fn creates_fall_back_to_a_cold_boot() {
    if !vm_available("creates_fall_back_to_a_cold_boot") {
        return;
    }
    become_subreaper();
    let rt = Runtime::new();
    let mut pool = Pool::serve(&rt, 1);
    let run = |id: &str, edit: &dyn Fn(&mut Value)| {
        let b = TestBundle::new(&["sh", "-c", "echo ran"]);
        b.write_config(edit);
        let (out, err) = (b.path().join("out"), b.path().join("err"));
        let pid = rt.create(id, &b, &out, &err);
        let pooled = was_pooled(&rt, id);
        rt.ok(&["start", id]);
        assert_eq!(wait_exit(pid), 0, "{id}");
        assert!(fs::read_to_string(&out).unwrap().contains("ran"), "{id}");
        let helpers = rt.helper_pids(id);
        rt.ok(&["delete", id]);
        assert_cleaned_up(&rt, id, &helpers);
        pooled
    };
    // Another shape: cold, counted as a miss.
    assert!(!run("other-shape", &|c| c["annotations"]
        ["krun-oci.ram_mib"] =
        "256".into()));
    // Opted out: cold, and the daemon is not even asked.
    assert!(!run("opted-out", &|c| c["annotations"]["krun-oci.pool"] =
        "false".into()));
    assert_eq!(pool.status()["misses"], 1);
    assert_eq!(pool.status()["idle"], 1);
    // The one idle VM taken, the next create finds the pool empty (it refills
    // one boot at a time): cold.
    let b = TestBundle::new(&["sleep", "30"]);
    let first = rt.create("first", &b, &b.path().join("out"), &b.path().join("err"));
    assert!(was_pooled(&rt, "first"));
    assert!(!run("empty-pool", &|_| {}));
    assert!(pool.status()["misses"].as_u64() >= Some(2));
    rt.ok(&["kill", "first", "KILL"]);
    wait_exit(first);
    let helpers = rt.helper_pids("first");
    rt.ok(&["delete", "first"]);
    assert_cleaned_up(&rt, "first", &helpers);
    // The daemon down: cold.
    let root = pool.root.clone();
    let pids: Vec<i32> = pool.member_pids().into_iter().chain([pool.pid()]).collect();
    pool.stop();
    assert_pool_gone(&root, &pids);
    assert!(!run("daemon-down", &|_| {}));
}

#[test]
fn containers_claimed_from_one_pool_see_only_their_own_root() {
    if !vm_available("containers_claimed_from_one_pool_see_only_their_own_root") {
        return;
    }
    become_subreaper();
    let rt = Runtime::new();
    let _pool = Pool::serve(&rt, 2);
    let script = "echo $0 > /mine; sleep 0.5; ls /; cat /mine";
    let a = TestBundle::new(&["sh", "-c", script, "a"]);
    let b = TestBundle::new(&["sh", "-c", script, "b"]);
    fs::write(a.rootfs().join("only-a"), "").unwrap();
    fs::write(b.rootfs().join("only-b"), "").unwrap();
    let mut pids = Vec::new();
    for (id, bundle) in [("a", &a), ("b", &b)] {
        pids.push(rt.create(
            id,
            bundle,
            &bundle.path().join("out"),
            &bundle.path().join("err"),
        ));
        assert!(was_pooled(&rt, id), "{id}: {}", monitor_log(&rt, id));
    }
    for id in ["a", "b"] {
        rt.ok(&["start", id]);
    }
    for (pid, (id, bundle, other)) in pids.into_iter().zip([("a", &a, "b"), ("b", &b, "a")]) {
        assert_eq!(wait_exit(pid), 0);
        let out = fs::read_to_string(bundle.path().join("out")).unwrap();
        assert!(out.contains(&format!("only-{id}")), "{id}: {out}");
        assert!(
            !out.contains(&format!("only-{other}")),
            "{id} sees {other}'s root: {out}"
        );
        assert_eq!(out.lines().last(), Some(id), "{out}");
        assert_eq!(
            fs::read_to_string(bundle.rootfs().join("mine")).unwrap(),
            format!("{id}\n")
        );
        let helpers = rt.helper_pids(id);
        rt.ok(&["delete", id]);
        assert_cleaned_up(&rt, id, &helpers);
    }
}

#[test]
fn sigkill_of_the_daemon_or_a_claimed_monitor_leaves_nothing() {
    if !vm_available("sigkill_of_the_daemon_or_a_claimed_monitor_leaves_nothing") {
        return;
    }
    become_subreaper();
    let rt = Runtime::new();
    let mut pool = Pool::serve(&rt, 2);
    let b = TestBundle::new(&["sleep", "60"]);
    let pid = rt.create("c", &b, &b.path().join("out"), &b.path().join("err"));
    assert!(was_pooled(&rt, "c"));
    rt.ok(&["start", "c"]);
    let helpers = rt.helper_pids("c");
    // The daemon killed: its idle VM goes, the claimed one stays the container's.
    let idle: Vec<i32> = pool
        .member_pids()
        .into_iter()
        .filter(|p| !helpers.contains(p))
        .chain([pool.pid()])
        .collect();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pool.pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    pool.reap();
    let root = pool.root.clone();
    for &p in &idle {
        eventually(
            &format!("pool process {p} to exit"),
            Duration::from_secs(15),
            || !alive(p),
        );
    }
    let socket = krun_oci::pool::PoolPaths::for_root(&root).socket;
    eventually(
        "the dead daemon's socket to go",
        Duration::from_secs(10),
        || !socket.exists(),
    );
    assert_eq!(rt.state("c")["status"], "running");
    assert!(rt
        .ok(&["exec", "c", "echo", "still-here"])
        .contains("still-here"));
    // The claimed container's monitor killed: its VM and member go with it.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_exit(pid);
    for &p in &helpers {
        eventually(&format!("pid {p} to exit"), Duration::from_secs(15), || {
            !alive(p)
        });
    }
    assert_eq!(rt.state("c")["status"], "stopped");
    rt.ok(&["delete", "c"]);
    assert_cleaned_up(&rt, "c", &helpers);
    assert_pool_gone(&root, &[]);
    assert!(
        b.rootfs().join("bin/busybox").exists(),
        "the root lost its files"
    );
}
