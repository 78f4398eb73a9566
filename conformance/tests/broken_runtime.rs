//! The suite must catch a broken runtime: these tests run the `conformance` runner against
//! deliberately wrong runtimes (shell scripts) and assert that it reports failures.
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn run(runtime: &Path, filter: &str, extra: &[&str]) -> (Output, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_conformance"))
        .args(["run", "--runtime"])
        .arg(runtime)
        .args(["--filter", filter, "--timeout", "20"])
        .args(extra)
        .output()
        .expect("run conformance");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out, stdout)
}

fn line<'a>(tap: &'a str, test: &str) -> &'a str {
    tap.lines()
        .find(|l| l.ends_with(&format!(" - {test}")) || l.contains(&format!(" - {test} #")))
        .unwrap_or_else(|| panic!("no TAP line for {test} in:\n{tap}"))
}

fn summary(tap: &str) -> (usize, usize) {
    let last = tap.lines().last().unwrap_or("");
    let nums: Vec<usize> = last
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect();
    assert!(
        last.contains(" passed, ") && last.contains(" failed"),
        "summary line: {last:?}"
    );
    (nums[0], nums[1])
}

fn root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn a_runtime_that_does_nothing_fails() {
    let dir = tempfile::tempdir().unwrap();
    let noop = script(dir.path(), "noop-runtime", "exit 0");
    let filter = "create/pid-file-format,create/duplicate-id,state/unknown,start/unknown,\
                  delete/missing,list/empty-is-null,features/json,spec/default,log/json-format";
    let (out, tap) = run(&noop, filter, &[]);
    assert_eq!(out.status.code(), Some(1), "runner must exit 1:\n{tap}");
    for t in [
        "create/pid-file-format",
        "state/unknown",
        "start/unknown",
        "list/empty-is-null",
        "spec/default",
    ] {
        assert!(
            line(&tap, t).starts_with("not ok "),
            "{t} passed against a no-op runtime:\n{tap}"
        );
    }
    let (passed, failed) = summary(&tap);
    assert_eq!(passed, 0, "{tap}");
    assert_eq!(failed, 9, "{tap}");
}

#[test]
fn expected_failures_file_decides_the_exit_status() {
    let dir = tempfile::tempdir().unwrap();
    let noop = script(dir.path(), "noop-runtime", "exit 0");
    let list = dir.path().join("expected.txt");
    fs::write(&list, "state/unknown noop-runtime bug listed\n").unwrap();
    let arg = list.display().to_string();
    let (out, tap) = run(&noop, "state/unknown", &["--expected-failures", &arg]);
    assert_eq!(out.status.code(), Some(0), "{tap}");
    assert!(
        line(&tap, "state/unknown").contains("# TODO expected"),
        "{tap}"
    );
    let (out, tap) = run(
        &noop,
        "state/unknown,start/unknown",
        &["--expected-failures", &arg],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "an unlisted failure must fail the run:\n{tap}"
    );
    assert_eq!(summary(&tap), (0, 1), "{tap}");
    // The list only shrinks: a listed test that passes fails the run.
    fs::write(&list, "delete/force-missing noop-runtime bug listed\n").unwrap();
    let (out, tap) = run(
        &noop,
        "delete/force-missing",
        &["--expected-failures", &arg],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "a listed test that passes must fail the run:\n{tap}"
    );
    assert!(tap.contains("listed but now passing"), "{tap}");
}

/// A runc wrapper that spoils the pid file after a successful create.
fn spoiled_runc(dir: &Path, name: &str, spoil: &str) -> Option<PathBuf> {
    let runc = ["/usr/sbin/runc", "/usr/bin/runc"]
        .into_iter()
        .find(|p| Path::new(p).exists())?;
    if !root() {
        return None;
    }
    let body = format!(
        r#"pf=""; prev=""; cmd=""
for a in "$@"; do
  case "$prev" in --pid-file) pf="$a";; esac
  case "$a" in --pid-file=*) pf="${{a#--pid-file=}}";; create) cmd=create;; esac
  prev="$a"
done
{runc} "$@" || exit $?
if [ "$cmd" = create ] && [ -n "$pf" ]; then {spoil}; fi
exit 0"#
    );
    Some(script(dir, name, &body))
}

#[test]
fn a_pid_file_with_a_trailing_newline_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let Some(rt) = spoiled_runc(dir.path(), "newline-runtime", r#"printf '\n' >> "$pf""#) else {
        eprintln!("skipped: needs runc and root");
        return;
    };
    let (out, tap) = run(&rt, "create/pid-file-format,state/unknown", &[]);
    assert_eq!(out.status.code(), Some(1), "{tap}");
    let l = line(&tap, "create/pid-file-format");
    assert!(
        l.starts_with("not ok ") && l.contains("no newline"),
        "{tap}"
    );
    assert!(
        line(&tap, "state/unknown").starts_with("ok "),
        "the wrapper itself works:\n{tap}"
    );
}

#[test]
fn a_pid_file_with_wrong_content_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let Some(rt) = spoiled_runc(dir.path(), "wrongpid-runtime", r#"printf '1' > "$pf""#) else {
        eprintln!("skipped: needs runc and root");
        return;
    };
    let (out, tap) = run(&rt, "create/pid-file-format,pidfile/wait-exit-code", &[]);
    assert_eq!(out.status.code(), Some(1), "{tap}");
    assert!(
        line(&tap, "create/pid-file-format").starts_with("not ok "),
        "{tap}"
    );
    assert!(
        line(&tap, "pidfile/wait-exit-code").starts_with("not ok "),
        "{tap}"
    );
    let empty = spoiled_runc(dir.path(), "emptypid-runtime", r#": > "$pf""#).unwrap();
    let (_, tap) = run(&empty, "create/pid-file-format", &[]);
    assert!(
        line(&tap, "create/pid-file-format").starts_with("not ok "),
        "{tap}"
    );
}

/// `--format json`: one document with each test's result and the summary.
#[test]
fn json_format_reports_each_test_and_the_summary() {
    let dir = tempfile::tempdir().unwrap();
    let noop = script(dir.path(), "noop-runtime", "exit 0");
    let (out, text) = run(
        &noop,
        "state/unknown,delete/force-missing",
        &["--format", "json"],
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).expect("one JSON document");
    assert_eq!(v["runtime"], "noop-runtime");
    let result = |name: &str| {
        v["tests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing: {text}"))["result"]
            .clone()
    };
    assert_eq!(result("state/unknown"), "fail");
    assert_eq!(result("delete/force-missing"), "pass");
    assert_eq!(
        (&v["summary"]["passed"], &v["summary"]["failed"]),
        (&serde_json::json!(1), &serde_json::json!(1))
    );
}
