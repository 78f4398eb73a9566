//! Process listing from /proc (the guest's, or the sandbox namespace's).

use krun_oci_protocol::GuestProcess;

const PF_KTHREAD: u64 = 0x0020_0000;

/// One /proc entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcEntry {
    pub pid: i32,
    pub ppid: i32,
    pub state: char,
    pub kernel_thread: bool,
}

/// Parses /proc/PID/stat (the command name may hold spaces and parentheses).
pub fn parse_stat(pid: i32, stat: &str) -> Option<ProcEntry> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(0) ppid(1) pgrp(2) session(3) tty_nr(4) tpgid(5) flags(6)
    let state = f.first()?.chars().next()?;
    let ppid = f.get(1)?.parse().ok()?;
    let flags: u64 = f.get(6)?.parse().ok()?;
    Some(ProcEntry {
        pid,
        ppid,
        state,
        kernel_thread: flags & PF_KTHREAD != 0,
    })
}

/// All user-space processes (kernel threads left out).
pub fn entries() -> Vec<ProcEntry> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            parse_stat(pid, &stat)
        })
        .filter(|e| !e.kernel_thread)
        .collect()
}

/// The child of `parent`, a process with one child (a relay). Pids are handed
/// out in order and the relay forks at once: its child is nearly always the next
/// pid, checked by its ppid; else the whole of /proc is read (which under TCG
/// costs milliseconds).
pub fn only_child_of(parent: i32) -> Option<i32> {
    let next = parent + 1;
    let is_child = |e: &ProcEntry| e.ppid == parent && e.state != 'Z';
    std::fs::read_to_string(format!("/proc/{next}/stat"))
        .ok()
        .and_then(|stat| parse_stat(next, &stat))
        .filter(is_child)
        .or_else(|| entries().into_iter().find(is_child))
        .map(|e| e.pid)
}

/// Pids of every live (non-zombie) user process except init itself.
pub fn others() -> Vec<i32> {
    entries()
        .into_iter()
        .filter(|e| e.pid != 1 && e.pid != std::process::id() as i32 && e.state != 'Z')
        .map(|e| e.pid)
        .collect()
}

fn uid_of(pid: i32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn cmd_of(pid: i32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let parts: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    if !parts.is_empty() {
        return parts.join(" ");
    }
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    format!("[{}]", comm.trim())
}

/// The `ps` answer: every user process, init included, zombies included.
pub fn list() -> Vec<GuestProcess> {
    entries()
        .into_iter()
        .map(|e| GuestProcess {
            pid: e.pid,
            ppid: e.ppid,
            uid: uid_of(e.pid),
            cmd: cmd_of(e.pid),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing() {
        let s = "42 (a (weird) name) S 1 42 42 0 -1 4194560 100 0 0 0";
        assert_eq!(
            parse_stat(42, s),
            Some(ProcEntry {
                pid: 42,
                ppid: 1,
                state: 'S',
                kernel_thread: false
            })
        );
        let k = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0";
        assert!(parse_stat(2, k).unwrap().kernel_thread);
        assert_eq!(parse_stat(1, "garbage"), None);
    }

    #[test]
    fn finds_the_only_child() {
        use std::io::BufRead;
        // A relay of our own (other tests may have children of this process).
        let mut relay = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & echo $!; wait"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(relay.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let child: i32 = line.trim().parse().unwrap();
        assert_eq!(only_child_of(relay.id() as i32), Some(child));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        // Either way it has ended: the reaper's test in this process waits for
        // any child (`waitpid(-1)`) and may have reaped it first (ECHILD here).
        let _ = relay.wait();
        assert_eq!(only_child_of(relay.id() as i32), None);
    }

    #[test]
    fn lists_ourselves() {
        let me = std::process::id() as i32;
        assert!(list().iter().any(|p| p.pid == me));
    }
}
