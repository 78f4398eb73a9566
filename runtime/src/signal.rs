//! Signal names and numbers as `kill` accepts them: `9`, `KILL`, `SIGKILL`.

use std::str::FromStr;

use nix::sys::signal::Signal;

use crate::error::{Error, Result};

/// Parses a signal given as a number, a name, or a SIG-prefixed name.
pub fn parse_signal(s: &str) -> Result<i32> {
    let bad = || Error::InvalidInput(format!("unknown signal {s:?}"));
    if let Ok(n) = s.parse::<i32>() {
        // Real-time signals have no nix name; accept the whole valid range.
        return if (1..=libc::SIGRTMAX()).contains(&n) {
            Ok(n)
        } else {
            Err(bad())
        };
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    Signal::from_str(&name).map(|s| s as i32).map_err(|_| bad())
}

/// Signals an exec relay passes into its guest process: every catchable one, the
/// real-time ones included, except those about the relay itself (CHLD, PIPE) and
/// the synchronous faults (ILL, TRAP, BUS, FPE, SEGV, SYS), which no one sends on
/// purpose and a handler must not swallow.
pub fn relayed_signals() -> Vec<i32> {
    use libc::*;
    let own = [
        SIGKILL, SIGSTOP, SIGCHLD, SIGPIPE, SIGILL, SIGTRAP, SIGBUS, SIGFPE, SIGSEGV, SIGSYS,
    ];
    (1..32)
        .filter(|s| !own.contains(s))
        .chain(SIGRTMIN()..=SIGRTMAX())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        assert_eq!(parse_signal("9").unwrap(), 9);
        assert_eq!(parse_signal("KILL").unwrap(), 9);
        assert_eq!(parse_signal("SIGKILL").unwrap(), 9);
        assert_eq!(parse_signal("term").unwrap(), 15);
        assert_eq!(parse_signal("SIGUSR1").unwrap(), libc::SIGUSR1);
        assert_eq!(parse_signal("34").unwrap(), 34);
        for bad in ["0", "-1", "999", "NOPE", "SIG", ""] {
            assert!(parse_signal(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn relayed_signals_are_every_catchable_one() {
        let s = relayed_signals();
        for want in [
            libc::SIGTERM,
            libc::SIGUSR1,
            libc::SIGALRM,
            libc::SIGTSTP,
            libc::SIGWINCH,
        ] {
            assert!(s.contains(&want), "{want}");
        }
        assert!(s.contains(&libc::SIGRTMIN()) && s.contains(&libc::SIGRTMAX()));
        for never in [libc::SIGKILL, libc::SIGSTOP, libc::SIGCHLD, libc::SIGSEGV] {
            assert!(!s.contains(&never), "{never}");
        }
        // signal-hook refuses the forbidden ones: registering the set must work.
        signal_hook::iterator::Signals::new(&s).unwrap();
    }
}
