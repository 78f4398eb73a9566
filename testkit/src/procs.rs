//! The host's processes as /proc shows them.
use std::collections::BTreeSet;
use std::fs;

/// One line of `/proc/PID/stat`, the fields we use.
pub struct ProcStat {
    pub pid: i32,
    pub comm: String,
    /// `R`, `S`, `Z`, ...
    pub state: char,
    pub ppid: i32,
}

fn pids() -> impl Iterator<Item = i32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
}

/// Every process now.
pub fn processes() -> Vec<ProcStat> {
    pids().filter_map(stat).collect()
}

/// `pid`'s `/proc/PID/stat`, if it exists.
pub fn stat(pid: i32) -> Option<ProcStat> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may hold spaces and parentheses: it ends at the last ')'.
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let mut rest = stat[close + 1..].split_whitespace();
    let state = rest.next().and_then(|f| f.chars().next()).unwrap_or('?');
    let ppid = rest.next().and_then(|f| f.parse().ok()).unwrap_or(0);
    Some(ProcStat {
        pid,
        comm: stat[open + 1..close].to_string(),
        state,
        ppid,
    })
}

/// Whether `pid` runs; a zombie counts as gone.
pub fn alive(pid: i32) -> bool {
    stat(pid).is_some_and(|s| s.state != 'Z')
}

/// Makes this process the subreaper of the processes it starts (monitors,
/// container pids the runtime double-forked), so it can `waitpid` them as
/// conmon and the shims do.
pub fn become_subreaper() -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// (pid, command line with spaces between the arguments) of every process
/// that has one (kernel threads and zombies have none): what `pgrep -af` sees.
pub fn command_lines() -> Vec<(i32, String)> {
    pids()
        .filter_map(|pid| {
            let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let line = String::from_utf8_lossy(&raw)
                .trim_end_matches('\0')
                .replace('\0', " ");
            (!line.is_empty()).then_some((pid, line))
        })
        .collect()
}

/// `pid` and every process below it, in `all`.
pub fn descendants(pid: i32, all: &[ProcStat]) -> BTreeSet<i32> {
    let mut set = BTreeSet::from([pid]);
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for child in all.iter().filter(|c| c.ppid == p) {
            if set.insert(child.pid) {
                frontier.push(child.pid);
            }
        }
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_listed_under_its_parent() {
        let all = processes();
        let me = std::process::id() as i32;
        let parent = all.iter().find(|p| p.pid == me).unwrap().ppid;
        assert!(descendants(parent, &all).contains(&me));
        assert!(command_lines().iter().any(|(pid, _)| *pid == me));
        assert!(alive(me));
        assert!(!alive(i32::MAX));
    }
}
