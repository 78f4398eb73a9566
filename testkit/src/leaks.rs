//! The leak check: what the host holds that a container's lifecycle could leave
//! behind (VMM and helper processes, zombies, run dirs, mounts, network links,
//! qdiscs, cgroups), compared with a snapshot taken before.
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::procs::{descendants, processes};
use crate::wait;

/// The commands (`comm`, 15 characters at most) of VMMs, their helpers and
/// krun-oci itself (monitors, exec relays).
pub const WATCHED: [&str; 4] = [
    "qemu-system-x86",
    "virtiofsd",
    "vhost-device-vs",
    "krun-oci",
];

/// What the host holds now.
pub struct Snapshot {
    /// (pid, comm) of every watched process, but those below `daemon`.
    pub processes: BTreeSet<(i32, String)>,
    pub zombies: usize,
    pub run_dirs: usize,
    pub mounts: usize,
    pub links: usize,
    pub qdiscs: usize,
    /// Open fds of the long-lived daemon (a pool), when there is one.
    pub daemon_fds: Option<usize>,
}

impl Snapshot {
    /// `daemon` and what runs below it are the daemon's own: not counted.
    pub fn take(daemon: Option<i32>) -> Snapshot {
        let all = processes();
        let daemon_side = daemon.map(|d| descendants(d, &all)).unwrap_or_default();
        let mut watched = BTreeSet::new();
        let mut zombies = 0;
        for p in all {
            if p.state == 'Z' {
                zombies += 1;
            } else if WATCHED.contains(&p.comm.as_str()) && !daemon_side.contains(&p.pid) {
                watched.insert((p.pid, p.comm));
            }
        }
        let count = |p: &str| fs::read_dir(p).map(|d| d.count()).unwrap_or(0);
        let lines = |p: &str| {
            fs::read_to_string(p)
                .map(|t| t.lines().count())
                .unwrap_or(0)
        };
        let qdiscs = Command::new("tc")
            .args(["qdisc", "show"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
            .unwrap_or(0);
        Snapshot {
            processes: watched,
            zombies,
            run_dirs: count("/run/krun-oci-vm"),
            mounts: lines("/proc/self/mountinfo"),
            links: count("/sys/class/net"),
            qdiscs,
            daemon_fds: daemon.map(|d| count(&format!("/proc/{d}/fd"))),
        }
    }

    /// What is here now and was not in `before`.
    pub fn grown_since(&self, before: &Snapshot) -> Vec<String> {
        let mut out: Vec<String> = self
            .processes
            .difference(&before.processes)
            .map(|(pid, comm)| format!("process {pid} ({comm})"))
            .collect();
        let grew = |what: &str, b: usize, a: usize| (a > b).then(|| format!("{what}: {b} -> {a}"));
        out.extend(grew("zombies", before.zombies, self.zombies));
        out.extend(grew(
            "run dirs in /run/krun-oci-vm",
            before.run_dirs,
            self.run_dirs,
        ));
        out.extend(grew("mounts", before.mounts, self.mounts));
        out.extend(grew("network links", before.links, self.links));
        out.extend(grew("qdiscs", before.qdiscs, self.qdiscs));
        if let (Some(b), Some(a)) = (before.daemon_fds, self.daemon_fds) {
            out.extend(grew("daemon fds", b, a));
        }
        out
    }
}

/// The leaks since `before`, after giving exiting processes a moment (15 s at
/// most): `also` runs first in every round (reaping, checks of the caller's own)
/// and adds what it finds.
pub fn leaks(
    before: &Snapshot,
    daemon: Option<i32>,
    mut also: impl FnMut() -> Vec<String>,
) -> Vec<String> {
    let mut found = Vec::new();
    wait::within(Duration::from_secs(15), Duration::from_millis(250), || {
        found = also();
        found.extend(Snapshot::take(daemon).grown_since(before));
        found.is_empty()
    });
    found
}

/// Every cgroup directory at most `depth` levels below /sys/fs/cgroup, in the
/// v1 controllers and the v2 tree alike (symlinked controllers skipped).
pub fn cgroup_dirs(depth: usize) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![PathBuf::from("/sys/fs/cgroup")];
    for _ in 0..depth {
        let mut next = Vec::new();
        for d in dirs {
            for e in fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() && !p.is_symlink() {
                    found.push(p.clone());
                    next.push(p);
                }
            }
        }
        dirs = next;
    }
    found
}

/// Cgroups whose name starts with `prefix` (an [`crate::ids::prefix`]), where
/// `/ID` and `/parent/ID` cgroup paths land: two levels below each hierarchy.
pub fn cgroups_named(prefix: &str) -> Vec<String> {
    cgroup_dirs(3)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        })
        .map(|p| format!("cgroup {}", p.display()))
        .collect()
}

/// The names in `dir` (none when it is missing), but those `ignored`.
pub fn entries(dir: &Path, ignored: impl Fn(&str) -> bool) -> Vec<String> {
    fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !ignored(n))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_watched_process_is_a_leak() {
        let before = Snapshot::take(None);
        let mut now = Snapshot::take(None);
        now.processes.insert((i32::MAX, "krun-oci".into()));
        now.zombies = before.zombies + 1;
        let grown = now.grown_since(&before);
        assert!(grown.iter().any(|l| l.contains("krun-oci")), "{grown:?}");
        assert!(grown.iter().any(|l| l.starts_with("zombies")), "{grown:?}");
    }
}
