//! What the workload observes, through the in-container checker: process fields, hostname,
//! mounts, readonly root.
use super::{tests, Test};
use crate::harness::Ctx;
use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use std::fs;

pub fn tests() -> Vec<Test> {
    tests![
        "process/args" => args,
        "process/env" => env,
        "process/cwd" => cwd,
        "process/user" => user,
        "process/umask" => umask,
        "process/rlimits" => rlimits,
        "process/capabilities" => capabilities,
        "process/no-new-privileges" => nnp,
        "process/oom-score-adj" => oom,
        "process/exit-code" => exit_code,
        "process/oom-killed" => oom_killed,
        "config/hostname" => hostname,
        "config/sysctl" => sysctl,
        "config/readonly-root" => readonly_root,
        "config/writable-root" => writable_root,
        "mounts/tmpfs" => mount_tmpfs,
        "mounts/bind-dir-readonly" => mount_bind_dir,
        "mounts/bind-file" => mount_bind_file,
        "mounts/bind-shared-mapping" => mount_bind_shared_mapping,
        "mounts/proc" => mount_proc,
        "mounts/bind-relative-source" => mount_bind_relative,
        "mounts/bind-missing-source" => mount_bind_missing,
        "mounts/sysfs-readonly" => mount_sysfs_readonly,
        "mounts/dev-tmpfs" => mount_dev_tmpfs,
        "mounts/order-and-options" => mount_order,
        "mounts/bind-propagation" => mount_bind_propagation,
        "config/rootfs-propagation" => rootfs_propagation,
        "config/devices" => devices,
        "config/masked-paths" => masked_paths,
        "config/readonly-paths" => readonly_paths,
        "config/seccomp" => seccomp,
        "config/pids-limit" => pids_limit,
        "config/netns-path" => netns_path,
        "network/loopback-up" => loopback_up,
        "network/netns-interface" => netns_interface,
        "config/vm-size-from-resources" => vm_size_resources,
        "config/vm-size-from-annotations" => vm_size_annotations,
        "config/kernel-features" => kernel_features,
    ]
}

fn args(ctx: &mut Ctx) -> Result<()> {
    let r = ctx.checker_report(&["--probe", "/", "two words"], |_| {})?;
    ensure!(
        r["argv"] == json!(["/bin/conformance-checker", "--probe", "/", "two words"]),
        "argv {}",
        r["argv"]
    );
    Ok(())
}

fn env(ctx: &mut Ctx) -> Result<()> {
    let r = ctx.checker_report(&[], |c| {
        c["process"]["env"] = json!(["PATH=/bin", "CONF_A=1", "CONF_B=with space=and equals"]);
    })?;
    ensure!(r["env"]["CONF_A"] == "1", "CONF_A {}", r["env"]["CONF_A"]);
    ensure!(
        r["env"]["CONF_B"] == "with space=and equals",
        "CONF_B {}",
        r["env"]["CONF_B"]
    );
    ensure!(r["env"]["PATH"] == "/bin", "PATH {}", r["env"]["PATH"]);
    Ok(())
}

fn cwd(ctx: &mut Ctx) -> Result<()> {
    let r = ctx.checker_report(&[], |c| c["process"]["cwd"] = json!("/work"))?;
    ensure!(r["cwd"] == "/work", "cwd {}", r["cwd"]);
    Ok(())
}

fn user(ctx: &mut Ctx) -> Result<()> {
    let r = ctx.checker_report(&[], |c| {
        c["process"]["user"] = json!({"uid": 1000, "gid": 1001, "additionalGids": [2000, 3000]});
    })?;
    for (k, v) in [("uid", 1000), ("euid", 1000), ("gid", 1001), ("egid", 1001)] {
        ensure!(r[k] == v, "{k} {} want {v}", r[k]);
    }
    let mut g: Vec<u64> = r["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_u64())
        .collect();
    g.sort();
    g.retain(|x| *x != 1001);
    ensure!(g == [2000, 3000], "supplementary groups {}", r["groups"]);
    Ok(())
}

fn umask(ctx: &mut Ctx) -> Result<()> {
    let r = ctx.checker_report(&[], |c| c["process"]["user"]["umask"] = json!(0o027))?;
    ensure!(
        r["umask"] == 0o027,
        "umask {:?}, want 0o027",
        r["umask"].as_u64().map(|m| format!("{m:o}"))
    );
    Ok(())
}

fn rlimits(ctx: &mut Ctx) -> Result<()> {
    let r = ctx.checker_report(&[], |c| {
        c["process"]["rlimits"] = json!([
            {"type": "RLIMIT_NOFILE", "soft": 3000, "hard": 4000},
            {"type": "RLIMIT_CORE", "soft": 0, "hard": 4096},
        ]);
    })?;
    ensure!(
        r["rlimits"]["RLIMIT_NOFILE"] == json!({"soft": 3000, "hard": 4000}),
        "NOFILE {}",
        r["rlimits"]["RLIMIT_NOFILE"]
    );
    ensure!(
        r["rlimits"]["RLIMIT_CORE"] == json!({"soft": 0, "hard": 4096}),
        "CORE {}",
        r["rlimits"]["RLIMIT_CORE"]
    );
    Ok(())
}

fn cap_mask(r: &Value, field: &str) -> Option<u64> {
    u64::from_str_radix(r["status"][field].as_str()?, 16).ok()
}

fn capabilities(ctx: &mut Ctx) -> Result<()> {
    // CAP_CHOWN=0, CAP_KILL=5, CAP_NET_BIND_SERVICE=10
    let set = json!(["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
    let want: u64 = (1 << 0) | (1 << 5) | (1 << 10);
    let r = ctx.checker_report(&[], |c| {
        c["process"]["capabilities"] = json!({
            "bounding": set, "effective": set, "permitted": set, "inheritable": set, "ambient": set
        });
    })?;
    for f in ["CapBnd", "CapEff", "CapPrm", "CapInh", "CapAmb"] {
        let got = cap_mask(&r, f);
        ensure!(
            got == Some(want),
            "{f} {:?}, want {want:#x}",
            got.map(|m| format!("{m:#x}"))
        );
    }
    Ok(())
}

fn nnp(ctx: &mut Ctx) -> Result<()> {
    let r = ctx.checker_report(&[], |c| c["process"]["noNewPrivileges"] = json!(true))?;
    ensure!(
        r["status"]["NoNewPrivs"] == "1",
        "NoNewPrivs {}",
        r["status"]["NoNewPrivs"]
    );
    Ok(())
}

fn oom(ctx: &mut Ctx) -> Result<()> {
    let r = ctx.checker_report(&[], |c| c["process"]["oomScoreAdj"] = json!(123))?;
    ensure!(
        r["oom_score_adj"] == 123,
        "oom_score_adj {}",
        r["oom_score_adj"]
    );
    Ok(())
}

fn exit_code(ctx: &mut Ctx) -> Result<()> {
    let b =
        ctx.bundle(|c| c["process"]["args"] = json!(["/bin/conformance-checker", "--exit", "42"]))?;
    ctx.install_checker(&b)?;
    let (exit, out) = ctx.run_to_exit(&b)?;
    ensure!(out.contains("conformance_checker"), "no report on stdout");
    ensure!(exit.code() == 42, "exit {exit:?}, want 42");
    Ok(())
}

fn hostname(ctx: &mut Ctx) -> Result<()> {
    let r = ctx.checker_report(&[], |c| c["hostname"] = json!("conformance-host"))?;
    ensure!(
        r["hostname"] == "conformance-host",
        "hostname {}",
        r["hostname"]
    );
    Ok(())
}

/// `linux.sysctl` is applied before the workload runs (network ones are
/// per network namespace, so any runtime can set them).
fn sysctl(ctx: &mut Ctx) -> Result<()> {
    let r = ctx.checker_report(&["--probe", "/proc/sys/net/ipv4/ip_forward"], |c| {
        c["linux"]["sysctl"] = json!({"net.ipv4.ip_forward": "1"});
    })?;
    let got = &r["probes"]["/proc/sys/net/ipv4/ip_forward"]["content"];
    ensure!(got == "1\n", "net.ipv4.ip_forward reads {got}");
    Ok(())
}

fn readonly_root(ctx: &mut Ctx) -> Result<()> {
    let r = ctx.checker_report(&[], |c| c["root"]["readonly"] = json!(true))?;
    ensure!(
        r["root_writable"] == false,
        "the root is writable with root.readonly: true"
    );
    Ok(())
}

fn writable_root(ctx: &mut Ctx) -> Result<()> {
    let r = ctx.checker_report(&[], |_| {})?;
    ensure!(
        r["root_writable"] == true,
        "the root is not writable: {}",
        r["root_write_error"]
    );
    Ok(())
}

fn mount<'a>(r: &'a Value, at: &str) -> Option<&'a Value> {
    r["mounts"]
        .as_array()?
        .iter()
        .rev()
        .find(|m| m["mountpoint"] == at)
}

fn mount_tmpfs(ctx: &mut Ctx) -> Result<()> {
    let r = ctx.checker_report(&["--probe", "/conf-tmpfs"], |c| {
        let m = c["mounts"].as_array_mut().expect("spec has mounts");
        m.push(
            json!({"destination": "/conf-tmpfs", "type": "tmpfs", "source": "tmpfs",
                      "options": ["nosuid", "nodev", "size=1m", "mode=755"]}),
        );
    })?;
    let m = mount(&r, "/conf-tmpfs").ok_or_else(|| anyhow::anyhow!("no mount at /conf-tmpfs"))?;
    ensure!(m["fstype"] == "tmpfs", "fstype {}", m["fstype"]);
    ensure!(
        r["probes"]["/conf-tmpfs"]["writable"] == true,
        "tmpfs not writable"
    );
    Ok(())
}

fn mount_bind_dir(ctx: &mut Ctx) -> Result<()> {
    let src = ctx.path("bind-src");
    fs::create_dir_all(&src)?;
    fs::write(src.join("hello"), "hello from the host")?;
    let s = src.display().to_string();
    let r = ctx.checker_report(
        &["--probe", "/conf-bind/hello", "--probe", "/conf-bind"],
        |c| {
            let m = c["mounts"].as_array_mut().expect("spec has mounts");
            m.push(
                json!({"destination": "/conf-bind", "type": "bind", "source": s,
                      "options": ["rbind", "ro"]}),
            );
        },
    )?;
    let p = &r["probes"]["/conf-bind/hello"];
    ensure!(
        p["content"] == "hello from the host",
        "content {}",
        p["content"]
    );
    ensure!(
        r["probes"]["/conf-bind"]["writable"] == false,
        "ro bind mount is writable"
    );
    Ok(())
}

/// A write through a shared mapping of a file on a bind mount, with the file
/// closed first (so no close writes it back), is in the host's file once the
/// container has exited: a VM must write its dirty pages back before it stops.
fn mount_bind_shared_mapping(ctx: &mut Ctx) -> Result<()> {
    let src = ctx.path("bind-mmap");
    fs::create_dir_all(&src)?;
    let s = src.display().to_string();
    let text = "written through a shared mapping";
    let r = ctx.checker_report(&["--mmap-write", "/conf-mmap/data", text], |c| {
        let m = c["mounts"].as_array_mut().expect("spec has mounts");
        m.push(
            json!({"destination": "/conf-mmap", "type": "bind", "source": s,
                      "options": ["rbind", "rw"]}),
        );
    })?;
    ensure!(
        r["mmap_write"]["ok"] == true,
        "mmap write: {}",
        r["mmap_write"]
    );
    let on_host = fs::read_to_string(src.join("data"))?;
    ensure!(on_host == text, "the host's file holds {on_host:?}");
    Ok(())
}

/// The propagation tags of the last mount at `dest` in the checker's mount table.
fn propagation_of(r: &Value, dest: &str) -> Result<String> {
    r["mounts"]
        .as_array()
        .into_iter()
        .flatten()
        .rfind(|m| m["mountpoint"] == dest)
        .map(|m| m["optional"].as_str().unwrap_or_default().to_string())
        .ok_or_else(|| anyhow::anyhow!("{dest} is not mounted: {}", r["mounts"]))
}

/// Propagation options of bind mounts: `rshared` makes a peer group, `private`
/// none, `runbindable` an unbindable mount.
fn mount_bind_propagation(ctx: &mut Ctx) -> Result<()> {
    let src = ctx.path("bind-prop");
    fs::create_dir_all(&src)?;
    let s = src.display().to_string();
    let r = ctx.checker_report(&[], |c| {
        let m = c["mounts"].as_array_mut().expect("spec has mounts");
        for (dest, prop) in [("/p-shared", "rshared"), ("/p-private", "private"), ("/p-unbindable", "runbindable")] {
            m.push(json!({"destination": dest, "type": "bind", "source": s, "options": ["rbind", prop]}));
        }
    })?;
    let shared = propagation_of(&r, "/p-shared")?;
    ensure!(shared.contains("shared:"), "rshared bind: {shared:?}");
    let private = propagation_of(&r, "/p-private")?;
    ensure!(
        !private.contains("shared:") && !private.contains("master:"),
        "private bind: {private:?}"
    );
    let unbindable = propagation_of(&r, "/p-unbindable")?;
    ensure!(
        unbindable.contains("unbindable"),
        "runbindable bind: {unbindable:?}"
    );
    Ok(())
}

/// `linux.rootfsPropagation`: the workload's root mount has it.
fn rootfs_propagation(ctx: &mut Ctx) -> Result<()> {
    let r = ctx.checker_report(&[], |c| c["linux"]["rootfsPropagation"] = json!("rshared"))?;
    let root = propagation_of(&r, "/")?;
    ensure!(
        root.contains("shared:"),
        "rootfsPropagation rshared: / has {root:?}"
    );
    let r = ctx.checker_report(&[], |c| c["linux"]["rootfsPropagation"] = json!("private"))?;
    let root = propagation_of(&r, "/")?;
    ensure!(
        !root.contains("shared:") && !root.contains("master:"),
        "rootfsPropagation private: / has {root:?}"
    );
    Ok(())
}

fn mount_bind_file(ctx: &mut Ctx) -> Result<()> {
    let src = ctx.path("bind-file");
    fs::write(&src, "single file")?;
    let s = src.display().to_string();
    let r = ctx.checker_report(&["--probe", "/etc/conf-file"], |c| {
        let m = c["mounts"].as_array_mut().expect("spec has mounts");
        m.push(
            json!({"destination": "/etc/conf-file", "type": "bind", "source": s,
                      "options": ["bind"]}),
        );
    })?;
    let p = &r["probes"]["/etc/conf-file"];
    ensure!(p["content"] == "single file", "content {}", p["content"]);
    ensure!(p["is_dir"] == false, "became a directory");
    Ok(())
}

/// A relative bind source is taken from the bundle directory.
fn mount_bind_relative(ctx: &mut Ctx) -> Result<()> {
    let src = ctx.path("hostdir");
    fs::create_dir_all(&src)?;
    fs::write(src.join("note"), "relative to the bundle")?;
    let rel = format!(
        "../{}",
        src.file_name().unwrap_or_default().to_string_lossy()
    );
    let r = ctx.checker_report(&["--probe", "/conf-rel/note"], |c| {
        let m = c["mounts"].as_array_mut().expect("spec has mounts");
        m.push(
            json!({"destination": "/conf-rel", "type": "bind", "source": rel,
                      "options": ["rbind"]}),
        );
    })?;
    let p = &r["probes"]["/conf-rel/note"];
    ensure!(
        p["content"] == "relative to the bundle",
        "content {}",
        p["content"]
    );
    ensure!(
        p["writable"] == true,
        "a rw bind is not writable: {}",
        p["write_error"]
    );
    Ok(())
}

/// A bind of a missing source fails create with the path and the reason.
fn mount_bind_missing(ctx: &mut Ctx) -> Result<()> {
    ctx.require_container()?;
    let missing = ctx.path("missing").display().to_string();
    let m2 = missing.clone();
    let bundle = ctx.bundle(|c| {
        let m = c["mounts"].as_array_mut().expect("spec has mounts");
        m.push(
            json!({"destination": "/conf-missing", "type": "bind", "source": m2,
                      "options": ["bind"]}),
        );
    })?;
    let id = ctx.new_id();
    let b = bundle.display().to_string();
    let out = ctx.rt(&["create", "--bundle", &b, &id])?;
    ensure!(!out.ok(), "create with a missing bind source succeeded");
    ensure!(
        out.stderr.contains(&missing) && out.stderr.contains("no such file or directory"),
        "error does not name the source and the reason: {}",
        out.stderr
    );
    crate::harness::no_trace(ctx, &id)
}

/// `/sys` mounted read-only, as the default config asks.
fn mount_sysfs_readonly(ctx: &mut Ctx) -> Result<()> {
    let r = ctx.checker_report(&[], |c| {
        let m = c["mounts"].as_array_mut().expect("spec has mounts");
        m.retain(|m| m["destination"] != "/sys");
        m.push(
            json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
                      "options": ["nosuid", "noexec", "nodev", "ro"]}),
        );
    })?;
    let m = mount(&r, "/sys").ok_or_else(|| anyhow::anyhow!("no /sys mount"))?;
    ensure!(m["fstype"] == "sysfs", "/sys fstype {}", m["fstype"]);
    let opts = m["options"].as_str().unwrap_or_default();
    ensure!(
        opts.split(',').any(|o| o == "ro"),
        "/sys is not read-only: {opts}"
    );
    Ok(())
}

/// maskedPaths: a directory becomes empty, a file reads empty, a missing path is skipped.
fn masked_paths(ctx: &mut Ctx) -> Result<()> {
    let r = ctx.checker_report(
        &["--probe", "/etc/passwd", "--probe", "/proc/version"],
        |c| {
            c["linux"]["maskedPaths"] = json!(["/etc", "/proc/version", "/no/such/path"]);
        },
    )?;
    ensure!(
        r["probes"]["/etc/passwd"]["exists"] == false,
        "/etc/passwd visible under a masked /etc"
    );
    let v = &r["probes"]["/proc/version"];
    ensure!(
        v["exists"] == true && v["content"] == "",
        "/proc/version not masked: {v}"
    );
    Ok(())
}

/// readonlyPaths: read-only there, the rest of the root stays writable.
fn readonly_paths(ctx: &mut Ctx) -> Result<()> {
    let r = ctx.checker_report(&["--probe", "/tmp", "--probe", "/work"], |c| {
        c["linux"]["readonlyPaths"] = json!(["/tmp", "/no/such/path"]);
    })?;
    ensure!(
        r["probes"]["/tmp"]["writable"] == false,
        "/tmp writable despite readonlyPaths"
    );
    ensure!(
        r["probes"]["/work"]["writable"] == true,
        "/work not writable: {}",
        r["probes"]["/work"]["write_error"]
    );
    Ok(())
}

/// linux.seccomp: the filter is in force (mode 2) and its rule acts: getcwd fails.
fn seccomp(ctx: &mut Ctx) -> Result<()> {
    let r = ctx.checker_report(&[], |c| {
        c["linux"]["seccomp"] = json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": [
                {"names": ["getcwd"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
                {"names": ["no_such_syscall"], "action": "SCMP_ACT_ERRNO"}
            ]
        });
    })?;
    ensure!(
        r["status"]["Seccomp"] == "2",
        "Seccomp mode {}, want 2 (filter)",
        r["status"]["Seccomp"]
    );
    ensure!(
        r["cwd"].is_null(),
        "getcwd worked under the filter: {}",
        r["cwd"]
    );
    Ok(())
}

/// linux.resources.pids.limit: forks beyond it fail inside the container.
fn pids_limit(ctx: &mut Ctx) -> Result<()> {
    let bundle = ctx.bundle(|c| {
        c["process"]["args"] = json!([
            "sh",
            "-c",
            "exec 2>&1; for i in 1 2 3 4 5 6 7 8 9 10; do sleep 30 & done; echo all-forked"
        ]);
        c["linux"]["resources"]["pids"] = json!({"limit": 5});
    })?;
    let (exit, out) = ctx.run_to_exit(&bundle)?;
    ensure!(
        !out.contains("all-forked") && out.contains("can't fork"),
        "10 forks under a limit of 5 ({exit:?}): {out:?}"
    );
    Ok(())
}

/// A network namespace `path` is joined: the container pid (runc's init; krun-oci's
/// VM monitor, and with it the VMM) lives in that namespace.
fn netns_path(ctx: &mut Ctx) -> Result<()> {
    ctx.require_container()?;
    let holder = NetnsHolder::new()?;
    let ns_path = holder.path.clone();
    let want = fs::read_link(&ns_path)?;
    let result = (|| {
        let p = ns_path.clone();
        let bundle = ctx.bundle(|c| {
            super::sleeper(c);
            let ns = c["linux"]["namespaces"].as_array_mut().expect("namespaces");
            ns.retain(|n| n["type"] != "network");
            ns.push(json!({"type": "network", "path": p}));
        })?;
        let id = ctx.new_id();
        let created = ctx.create(&bundle, &id, &[])?;
        let got = fs::read_link(format!("/proc/{}/ns/net", created.pid))?;
        let _ = ctx.rt(&["delete", "--force", &id]);
        ensure!(got == want, "container pid is in {got:?}, want {want:?}");
        Ok(())
    })();
    drop(holder);
    result
}

/// A new network namespace held by `unshare --net sleep` (killed on drop), and its
/// `/proc/<pid>/ns/net` path once the namespace exists.
struct NetnsHolder {
    child: std::process::Child,
    path: String,
}

impl NetnsHolder {
    fn new() -> Result<NetnsHolder> {
        let child = std::process::Command::new("unshare")
            .args(["--net", "sleep", "600"])
            .spawn()
            .context("unshare --net")?;
        let holder = NetnsHolder {
            path: format!("/proc/{}/ns/net", child.id()),
            child,
        };
        // unshare execs sleep once the namespace exists.
        let own = fs::read_link("/proc/self/ns/net")?;
        (0..500)
            .find(|_| {
                let new = fs::read_link(&holder.path).is_ok_and(|l| l != own);
                if !new {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                new
            })
            .ok_or_else(|| anyhow::anyhow!("no new network namespace at {}", holder.path))?;
        Ok(holder)
    }
}

impl Drop for NetnsHolder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A main that outgrows a 128 MiB memory limit is killed by the OOM killer:
/// exit 137 (runc: the cgroup's limit; krun-oci: the VM's RAM, at least 128 MiB).
fn oom_killed(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(|c| {
        c["process"]["args"] = json!(["tail", "/dev/zero"]);
        c["linux"]["resources"]["memory"] = json!({"limit": 128u64 << 20});
    })?;
    let (exit, _) = ctx.run_to_exit(&b)?;
    ensure!(
        exit.code() == 137,
        "{exit:?}, want 137 (SIGKILL by the OOM killer)"
    );
    Ok(())
}

/// runc's default devices, as `(name, major, minor)`.
const DEFAULT_DEVICES: [(&str, u64, u64); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// The config's `/dev` tmpfs is the workload's `/dev`: runc's default device
/// nodes (0666), the fd/stdio links, `ptmx` -> `pts/ptmx`, and no other device.
fn mount_dev_tmpfs(ctx: &mut Ctx) -> Result<()> {
    let r = ctx.checker_report(&[], |_| {})?;
    let dev_mount = r["mounts"]
        .as_array()
        .into_iter()
        .flatten()
        .rfind(|m| m["mountpoint"] == "/dev")
        .ok_or_else(|| anyhow::anyhow!("no mount at /dev"))?;
    ensure!(dev_mount["fstype"] == "tmpfs", "/dev is {dev_mount}");
    let dev = &r["dev"];
    for (name, major, minor) in DEFAULT_DEVICES {
        let e = &dev[format!("/dev/{name}")];
        ensure!(
            e["type"] == "c" && e["major"] == major && e["minor"] == minor && e["mode"] == 0o666,
            "/dev/{name}: {e}, want a 0666 char device {major}:{minor}"
        );
    }
    for (link, target) in [
        ("/dev/ptmx", "pts/ptmx"),
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let e = &dev[link];
        ensure!(
            e["type"] == "l" && e["target"] == target,
            "{link}: {e}, want -> {target}"
        );
    }
    let extra: Vec<&String> = dev
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(path, e)| {
            (e["type"] == "c" || e["type"] == "b")
                && path.matches('/').count() == 2
                && !DEFAULT_DEVICES
                    .iter()
                    .any(|(n, _, _)| **path == format!("/dev/{n}"))
        })
        .map(|(path, _)| path)
        .collect();
    ensure!(
        extra.is_empty(),
        "devices beyond runc's defaults in /dev: {extra:?}"
    );
    Ok(())
}

/// `linux.devices`: each node with its type, numbers, mode and owner, parent
/// directories made.
fn devices(ctx: &mut Ctx) -> Result<()> {
    let r = ctx.checker_report(&[], |c| {
        c["linux"]["devices"] = json!([
            {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 0o640, "uid": 1000, "gid": 1001},
            {"path": "/dev/sub/zero2", "type": "c", "major": 1, "minor": 5, "fileMode": 0o600, "uid": 0, "gid": 0},
            {"path": "/dev/myfifo", "type": "p", "fileMode": 0o620, "uid": 0, "gid": 0},
        ]);
    })?;
    let dev = &r["dev"];
    for (path, kind, major, minor, mode, uid, gid) in [
        ("/dev/fuse", "c", 10, 229, 0o640, 1000, 1001),
        ("/dev/sub/zero2", "c", 1, 5, 0o600, 0, 0),
        ("/dev/myfifo", "p", 0, 0, 0o620, 0, 0),
    ] {
        let e = &dev[path];
        ensure!(
            e["type"] == kind
                && e["major"] == major
                && e["minor"] == minor
                && e["mode"] == mode
                && e["uid"] == uid
                && e["gid"] == gid,
            "{path}: {e}, want {kind} {major}:{minor} mode {mode:o} owner {uid}:{gid}"
        );
    }
    Ok(())
}

/// `mounts` reach the workload in the config's order, with their types and
/// flags (`/sys/fs/cgroup`'s type and flags are the host's business: runc mounts a
/// writable tmpfs of v1 controllers there on hybrid hosts).
fn mount_order(ctx: &mut Ctx) -> Result<()> {
    let mut wanted: Vec<(String, String, Vec<String>)> = Vec::new();
    let r = ctx.checker_report(&[], |c| {
        let mounts = c["mounts"].as_array_mut().expect("mounts");
        mounts.push(
            json!({"destination": "/data", "type": "tmpfs", "source": "tmpfs",
                           "options": ["nosuid", "nodev", "noexec", "size=1m"]}),
        );
        mounts.push(
            json!({"destination": "/data/ro", "type": "tmpfs", "source": "tmpfs",
                           "options": ["ro", "size=1m"]}),
        );
        for m in mounts.iter() {
            wanted.push((
                m["destination"].as_str().unwrap_or_default().to_string(),
                m["type"].as_str().unwrap_or_default().to_string(),
                m["options"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|o| o.as_str().map(str::to_string))
                    .collect(),
            ));
        }
    })?;
    let table: Vec<&Value> = r["mounts"].as_array().into_iter().flatten().collect();
    let mut last = 0;
    for (dest, typ, options) in &wanted {
        // Order by the first mount at each destination (when it was made); the
        // last one there is what the workload sees (a runtime may stack one, as
        // krun-oci stacks the pid namespace's /proc over the config's).
        let at = |m: &&Value| m["mountpoint"] == dest.as_str();
        let (Some(first), Some(i)) = (table.iter().position(at), table.iter().rposition(at)) else {
            anyhow::bail!("{dest} is not mounted: {}", r["mounts"]);
        };
        ensure!(
            first >= last,
            "{dest} is mounted before an earlier config entry: {}",
            r["mounts"]
        );
        last = first;
        let m = table[i];
        if dest == "/sys/fs/cgroup" {
            continue;
        }
        if typ != "bind" {
            ensure!(m["fstype"] == typ.as_str(), "{dest}: {m}, want type {typ}");
        }
        let flags: Vec<&str> = m["options"]
            .as_str()
            .unwrap_or_default()
            .split(',')
            .collect();
        for o in options {
            if matches!(o.as_str(), "ro" | "nosuid" | "nodev" | "noexec") {
                ensure!(flags.contains(&o.as_str()), "{dest}: {m}, want {o}");
            }
        }
    }
    Ok(())
}

/// In a new network namespace (`runc spec`'s default) `lo` is up with 127.0.0.1
/// and ::1, as runc's init leaves it.
fn loopback_up(ctx: &mut Ctx) -> Result<()> {
    let r = ctx.checker_report(&[], |_| {})?;
    let lo = &r["interfaces"]["lo"];
    ensure!(lo["up"] == true, "lo is not up: {lo}");
    let addrs = lo["addresses"].to_string();
    ensure!(
        addrs.contains("127.0.0.1/8"),
        "lo lacks 127.0.0.1/8: {addrs}"
    );
    ensure!(addrs.contains("::1/128"), "lo lacks ::1/128: {addrs}");
    Ok(())
}

/// A network namespace `path` with an interface (a veth end with IPv4 and IPv6
/// addresses and MTU 1400): the workload sees it as it is there, with its MAC.
fn netns_interface(ctx: &mut Ctx) -> Result<()> {
    ctx.require_container()?;
    let holder = NetnsHolder::new()?;
    let ns_path = holder.path.clone();
    let result = (|| {
        let in_ns = |args: &[&str]| -> Result<String> {
            let out = std::process::Command::new("nsenter")
                .arg(format!("--net={ns_path}"))
                .args(args)
                .output()
                .context("nsenter")?;
            ensure!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        in_ns(&[
            "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
        ])?;
        in_ns(&["ip", "addr", "add", "10.123.0.2/24", "dev", "eth0"])?;
        in_ns(&["ip", "addr", "add", "fd12::2/64", "dev", "eth0", "nodad"])?;
        in_ns(&["ip", "link", "set", "eth0", "mtu", "1400", "up"])?;
        in_ns(&["ip", "link", "set", "peer0", "up"])?;
        // /sys shows the mounter's namespace: ask ip (in the namespace) instead.
        let link = in_ns(&["ip", "-o", "link", "show", "eth0"])?;
        let mac = link
            .split("link/ether ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .ok_or_else(|| anyhow::anyhow!("no MAC in {link:?}"))?
            .to_string();
        let p = ns_path.clone();
        let r = ctx.checker_report(&[], |c| {
            let ns = c["linux"]["namespaces"].as_array_mut().expect("namespaces");
            ns.retain(|n| n["type"] != "network");
            ns.push(json!({"type": "network", "path": p}));
        })?;
        let eth0 = &r["interfaces"]["eth0"];
        ensure!(eth0["up"] == true, "eth0 is not up: {eth0}");
        ensure!(
            eth0["address"] == mac.trim(),
            "eth0 {eth0}, want MAC {}",
            mac.trim()
        );
        ensure!(eth0["mtu"] == 1400, "eth0 {eth0}, want MTU 1400");
        let addrs = eth0["addresses"].to_string();
        for want in ["10.123.0.2/24", "fd12::2/64"] {
            ensure!(addrs.contains(want), "eth0 lacks {want}: {addrs}");
        }
        // What the runtime attached is gone with the container.
        let qdiscs = in_ns(&["tc", "qdisc", "show"])?;
        ensure!(
            !qdiscs.contains("ingress"),
            "left in the namespace: {qdiscs}"
        );
        Ok(())
    })();
    drop(holder);
    result
}

/// The workload sees its limits as the machine's size: MemTotal within the memory
/// limit, as many CPUs as the quota allows.
fn vm_size_resources(ctx: &mut Ctx) -> Result<()> {
    let r = ctx.checker_report(&[], |c| {
        c["linux"]["resources"]["memory"] = json!({"limit": 256u64 << 20});
        c["linux"]["resources"]["cpu"] = json!({"quota": 100000, "period": 100000});
    })?;
    expect_size(&r, 1, 256)
}

/// krun-oci's annotations (crun-krun's `krun.*` too) size the VM.
fn vm_size_annotations(ctx: &mut Ctx) -> Result<()> {
    let r = ctx.checker_report(&[], |c| {
        c["annotations"] = json!({"krun.cpus": "2", "krun-oci.ram_mib": "192"});
    })?;
    expect_size(&r, 2, 192)
}

fn expect_size(r: &Value, cpus: u64, mib: u64) -> Result<()> {
    ensure!(r["nproc"] == cpus, "{} CPUs, want {cpus}", r["nproc"]);
    let kib = r["mem_total_kib"].as_u64().unwrap_or(0);
    // The kernel keeps some of the RAM for itself: MemTotal is a little lower.
    ensure!(
        kib <= mib * 1024 && kib >= mib * 1024 / 2,
        "MemTotal {kib} KiB, want about {mib} MiB"
    );
    Ok(())
}

/// What container workloads need from the kernel works: cgroup v2 with the cpu,
/// memory and pids controllers, IPv6 loopback, an overlay mount, POSIX message
/// queues. The workload gets what these need: CAP_SYS_ADMIN, CAP_NET_ADMIN and
/// CAP_DAC_OVERRIDE, a writable /sys/fs/cgroup, a tmpfs at /ovl.
fn kernel_features(ctx: &mut Ctx) -> Result<()> {
    let r = ctx.checker_report(&["--kernel-features"], |c| {
        // mount(2), a cgroup directory, `lo` up.
        let caps = ["CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_DAC_OVERRIDE"];
        for set in ["bounding", "effective", "permitted"] {
            if let Some(list) = c["process"]["capabilities"][set].as_array_mut() {
                list.extend(caps.map(|c| json!(c)));
            }
        }
        if let Some(mounts) = c["mounts"].as_array_mut() {
            for m in mounts.iter_mut() {
                if m["destination"] == "/sys/fs/cgroup" {
                    m["options"] = json!(["nosuid", "noexec", "nodev", "rw"]);
                }
            }
            mounts.push(json!({"destination": "/ovl", "type": "tmpfs", "source": "tmpfs"}));
        }
    })?;
    let features = r["kernel_features"]
        .as_object()
        .ok_or_else(|| anyhow::anyhow!("no kernel_features in the report"))?;
    let failed: Vec<String> = features
        .iter()
        .filter(|(_, v)| v["ok"] != true)
        .map(|(k, v)| format!("{k}: {}", v["detail"]))
        .collect();
    ensure!(
        failed.is_empty(),
        "{} (uid {}, CapEff {})",
        failed.join("; "),
        r["uid"],
        r["status"]["CapEff"]
    );
    ensure!(features.len() == 4, "features reported: {features:?}");
    Ok(())
}

fn mount_proc(ctx: &mut Ctx) -> Result<()> {
    let r = ctx.checker_report(&[], |_| {})?;
    let m = mount(&r, "/proc").ok_or_else(|| anyhow::anyhow!("no /proc mount"))?;
    ensure!(m["fstype"] == "proc", "/proc fstype {}", m["fstype"]);
    ensure!(
        r["pid"] == 1,
        "the main process is pid {} in its pid namespace, want 1",
        r["pid"]
    );
    Ok(())
}
