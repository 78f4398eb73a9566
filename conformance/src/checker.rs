//! `conformance-checker`: the container's main process in the config-fidelity tests.
//!
//! Prints ONE line of JSON describing what the workload observes, then exits 0. Uses only std and
//! libc so the static build stays small. Arguments: `--probe PATH` (repeatable) reports existence,
//! content and writability of PATH; `--exit N` exits with N after reporting.
use serde_json::{json, Map, Value};
use std::ffi::CStr;
use std::fs;

fn status_fields() -> Map<String, Value> {
    let mut m = Map::new();
    let text = fs::read_to_string("/proc/self/status").unwrap_or_default();
    for line in text.lines() {
        if let Some((k, v)) = line.split_once(':') {
            if matches!(
                k,
                "CapInh"
                    | "CapPrm"
                    | "CapEff"
                    | "CapBnd"
                    | "CapAmb"
                    | "NoNewPrivs"
                    | "Seccomp"
                    | "Umask"
                    | "Groups"
            ) {
                m.insert(k.to_string(), Value::String(v.trim().to_string()));
            }
        }
    }
    m
}

fn rlimits() -> Map<String, Value> {
    let list: [(&str, libc::__rlimit_resource_t); 8] = [
        ("RLIMIT_NOFILE", libc::RLIMIT_NOFILE),
        ("RLIMIT_NPROC", libc::RLIMIT_NPROC),
        ("RLIMIT_CORE", libc::RLIMIT_CORE),
        ("RLIMIT_STACK", libc::RLIMIT_STACK),
        ("RLIMIT_MEMLOCK", libc::RLIMIT_MEMLOCK),
        ("RLIMIT_FSIZE", libc::RLIMIT_FSIZE),
        ("RLIMIT_CPU", libc::RLIMIT_CPU),
        ("RLIMIT_AS", libc::RLIMIT_AS),
    ];
    let mut m = Map::new();
    for (name, res) in list {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we own.
        if unsafe { libc::getrlimit(res, &mut r) } == 0 {
            m.insert(
                name.to_string(),
                json!({"soft": r.rlim_cur, "hard": r.rlim_max}),
            );
        }
    }
    m
}

fn mountinfo() -> Vec<Value> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.split(' ').collect();
            Some(json!({
                "mountpoint": pre.get(4)?,
                "options": pre.get(5)?,
                "fstype": post.first()?,
                "source": post.get(1).unwrap_or(&""),
                "super_options": post.get(2).unwrap_or(&""),
            }))
        })
        .collect()
}

fn try_write(path: &str) -> Result<(), String> {
    let probe = if fs::metadata(path).map(|m| m.is_dir()).unwrap_or(false) {
        format!(
            "{}/.conformance-probe-{}",
            path.trim_end_matches('/'),
            std::process::id()
        )
    } else {
        path.to_string()
    };
    let is_probe = probe != path;
    let r = fs::OpenOptions::new()
        .create(is_probe)
        .append(true)
        .open(&probe)
        .map(|_| ())
        .map_err(|e| e.to_string());
    if is_probe && r.is_ok() {
        let _ = fs::remove_file(&probe);
    }
    r
}

fn probe(path: &str) -> Value {
    let meta = fs::metadata(path);
    let content = fs::read(path)
        .ok()
        .map(|b| String::from_utf8_lossy(&b[..b.len().min(4096)]).into_owned());
    let w = try_write(path);
    json!({
        "exists": meta.is_ok(),
        "is_dir": meta.as_ref().map(|m| m.is_dir()).unwrap_or(false),
        "content": content,
        "writable": w.is_ok(),
        "write_error": w.err(),
    })
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    let mut probes = Map::new();
    let mut exit = 0;
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--probe" => {
                if let Some(p) = it.next() {
                    probes.insert(p.clone(), probe(p));
                }
            }
            "--exit" => exit = it.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            _ => {}
        }
    }
    // SAFETY: plain libc getters; umask is set back to the value it had.
    let (uid, gid, euid, egid, umask) = unsafe {
        let m = libc::umask(0);
        libc::umask(m);
        (
            libc::getuid(),
            libc::getgid(),
            libc::geteuid(),
            libc::getegid(),
            m,
        )
    };
    let mut groups = vec![0 as libc::gid_t; 256];
    // SAFETY: the buffer holds 256 entries and we pass that length.
    let n = unsafe { libc::getgroups(256, groups.as_mut_ptr()) };
    groups.truncate(n.max(0) as usize);
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname fills the struct; nodename is NUL-terminated.
    let hostname = unsafe {
        libc::uname(&mut uts);
        CStr::from_ptr(uts.nodename.as_ptr())
            .to_string_lossy()
            .into_owned()
    };
    let env: Map<String, Value> = std::env::vars_os()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                Value::String(v.to_string_lossy().into_owned()),
            )
        })
        .collect();
    let mem_total_kib = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
    let oom = fs::read_to_string("/proc/self/oom_score_adj")
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok());
    let root_write = try_write("/");
    let report = json!({
        "conformance_checker": 1,
        "argv": argv,
        "pid": std::process::id(),
        "hostname": hostname,
        "uid": uid, "gid": gid, "euid": euid, "egid": egid,
        "groups": groups,
        "umask": umask,
        "cwd": std::env::current_dir().ok().map(|p| p.display().to_string()),
        "env": env,
        "rlimits": rlimits(),
        "status": status_fields(),
        "oom_score_adj": oom,
        "mounts": mountinfo(),
        "root_writable": root_write.is_ok(),
        "root_write_error": root_write.err(),
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "mem_total_kib": mem_total_kib,
        "probes": probes,
    });
    println!("{report}");
    std::process::exit(exit);
}
