//! Facts about host processes, read from /proc.

use std::fs;

/// Start time (clock ticks since boot, field 22 of /proc/PID/stat), or `None`
/// if the process does not exist.
pub fn start_time(pid: i32) -> Option<u64> {
    if pid <= 0 {
        return None;
    }
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: skip past the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // rest starts at field 3 (state); field 22 is the 20th after it.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Process state letter (field 3), e.g. 'Z' for a zombie.
pub fn state_letter(pid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

/// True if `pid` still runs the same process that had `start_time` (and is not a zombie).
pub fn is_alive(pid: i32, start: u64) -> bool {
    start_time(pid) == Some(start) && state_letter(pid) != Some('Z')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive() {
        let me = std::process::id() as i32;
        let st = start_time(me).unwrap();
        assert!(is_alive(me, st));
        assert!(!is_alive(me, st + 1));
        assert!(!is_alive(0, st));
        assert_eq!(start_time(-5), None);
    }
}
