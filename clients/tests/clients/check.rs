//! One scenario's checks: each failed one is printed and kept for the summary.
use std::fmt::Display;
use std::time::Duration;

use krun_oci_testkit::wait::Poll;

use crate::session::Session;

/// How long a scenario waits for a workload's output or state: 600 s.
pub const OUTPUT_WAIT: Poll = Poll::new(6000, Duration::from_millis(100));
/// How long a client may take to exit once told to: 300 s.
pub const EXIT_WAIT: Poll = Poll::new(3000, Duration::from_millis(100));
/// Asynchronous teardown and other short settling: 30 s.
pub const SETTLE: Poll = Poll::new(300, Duration::from_millis(100));

pub struct Check<'s> {
    pub s: &'s Session,
    pub failures: Vec<String>,
}

impl<'s> Check<'s> {
    pub fn new(s: &'s Session) -> Check<'s> {
        Check {
            s,
            failures: Vec::new(),
        }
    }

    pub fn fail(&mut self, why: impl Into<String>) {
        let why = why.into();
        println!("  FAIL: {why}");
        self.failures.push(why);
    }

    /// `got` (an exit code, or a value a client printed) is `want`.
    pub fn expect_code(&mut self, what: &str, got: impl Display, want: impl Display) {
        let (got, want) = (got.to_string(), want.to_string());
        if got != want {
            self.fail(format!("{what}: exit code {got}, expected {want}"));
        }
    }

    pub fn expect_out(&mut self, what: &str, out: &str, needle: &str) {
        if !out.contains(needle) {
            let head: String = out.chars().take(600).collect();
            self.fail(format!("{what}: output lacks '{needle}': {head}"));
        }
    }

    /// Waits until `output` shows `want` (the workload got that far: e.g. its
    /// trap is installed, and a signal now will not kill a shell without one).
    pub fn wait_output(&mut self, want: &str, mut output: impl FnMut() -> String) -> bool {
        let seen = OUTPUT_WAIT.until(|| output().contains(want));
        if !seen {
            self.fail(format!("never printed '{want}'"));
        }
        seen
    }
}
