//! OCI hooks run on the host: the container's state JSON on stdin, `timeout` honoured.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::Hook;

use crate::error::{Error, Result};

/// Runs `hooks` in order; the first failure stops the sequence.
pub fn run_hooks(kind: &str, hooks: Option<&Vec<Hook>>, state_json: &[u8]) -> Result<()> {
    for hook in hooks.map(|h| h.as_slice()).unwrap_or_default() {
        run_hook(hook, state_json).map_err(|reason| Error::HookFailed {
            hook: kind.to_string(),
            path: hook.path().display().to_string(),
            reason,
        })?;
    }
    Ok(())
}

fn run_hook(hook: &Hook, state_json: &[u8]) -> std::result::Result<(), String> {
    let mut cmd = Command::new(hook.path());
    if let Some(args) = hook.args() {
        if let Some((arg0, rest)) = args.split_first() {
            cmd.arg0(arg0).args(rest);
        }
    }
    cmd.env_clear();
    for kv in hook.env().as_deref().unwrap_or_default() {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    // Own process group, so a timeout kills whatever the hook started too; and
    // it dies with us, so an interrupted create leaves no hook behind.
    cmd.process_group(0);
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            Ok(())
        });
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| e.to_string())?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its stdin is fine.
        let _ = stdin.write_all(state_json);
    }
    let deadline = hook
        .timeout()
        .filter(|t| *t > 0)
        .map(|t| Instant::now() + Duration::from_secs(t as u64));
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            if status.success() {
                return Ok(());
            }
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = (&mut e).take(4096).read_to_string(&mut err);
            }
            return Err(format!("{status}: {}", err.trim()));
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = child.wait();
            return Err(format!(
                "timed out after {}s",
                hook.timeout().unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::HookBuilder;

    fn hook(script: &str, timeout: Option<i64>) -> Hook {
        let mut b = HookBuilder::default().path("/bin/sh").args(vec![
            "sh".to_string(),
            "-c".to_string(),
            script.to_string(),
        ]);
        if let Some(t) = timeout {
            b = b.timeout(t);
        }
        b.build().unwrap()
    }

    #[test]
    fn hooks_get_state_on_stdin_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let hooks = vec![
            hook(
                &format!("cat >> {}; echo one >> {}", out.display(), out.display()),
                None,
            ),
            hook(&format!("echo two >> {}", out.display()), Some(5)),
        ];
        run_hooks("prestart", Some(&hooks), b"{\"id\":\"x\"}\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "{\"id\":\"x\"}\none\ntwo\n"
        );
    }

    #[test]
    fn failure_and_timeout_are_errors() {
        let e = run_hooks(
            "createRuntime",
            Some(&vec![hook("echo bad >&2; exit 3", None)]),
            b"{}",
        )
        .unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::HookFailed);
        let e = e.to_string();
        assert!(e.contains("createRuntime") && e.contains("bad"), "{e}");
        let e = run_hooks("poststart", Some(&vec![hook("sleep 30", Some(1))]), b"{}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("timed out"), "{e}");
    }
}
