//! The tests. Names are stable (`group/name`): the expected-differences list and docs refer to them.
use crate::harness::{Ctx, Out};
use anyhow::{ensure, Result};
use serde_json::{json, Value};

mod cli;
mod exec;
mod hooks;
mod lifecycle;
mod process;

pub struct Test {
    pub name: &'static str,
    pub run: fn(&mut Ctx) -> Result<()>,
}

pub fn all() -> Vec<Test> {
    let mut v = Vec::new();
    v.extend(lifecycle::tests());
    v.extend(hooks::tests());
    v.extend(exec::tests());
    v.extend(cli::tests());
    v.extend(process::tests());
    v
}

/// One trivial container, create to exit (see `run --preflight`).
pub fn preflight(ctx: &mut Ctx) -> Result<()> {
    let b = ctx.bundle(|_| {})?;
    let (exit, _) = ctx.run_to_exit(&b)?;
    ensure!(exit.code() == 0, "the trivial container exited {exit:?}");
    Ok(())
}

/// A main that runs until killed.
pub fn sleeper(c: &mut Value) {
    c["process"]["args"] = json!(["sleep", "100000"]);
}

/// The command failed (non-zero) and its stderr says `needle`.
pub fn fails_with(out: &Out, needle: &str) -> Result<()> {
    ensure!(
        !out.ok() && !out.timed_out,
        "expected failure, got {}",
        out.brief()
    );
    ensure!(
        out.stderr.contains(needle),
        "stderr lacks {needle:?}: {:?}",
        out.stderr.trim()
    );
    Ok(())
}

/// The command failed (non-zero, not a timeout).
pub fn fails(out: &Out) -> Result<()> {
    ensure!(
        !out.ok() && !out.timed_out,
        "expected failure, got {}",
        out.brief()
    );
    Ok(())
}

macro_rules! tests {
    ($($name:literal => $f:path),* $(,)?) => {
        vec![$(crate::suite::Test { name: $name, run: $f }),*]
    };
}
pub(crate) use tests;
