//! Results, TAP and JSON output, the expected-differences list, and the side-by-side table.
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail(String),
    Skip(String),
}

#[derive(Debug, Clone)]
pub struct TestResult {
    pub name: String,
    pub outcome: Outcome,
    pub millis: u128,
}

/// One line of the expected-differences file:
/// `TEST RUNTIME KIND REASON...` where KIND is vm | runc-deviates | bug | host, RUNTIME is a
/// runtime name (basename of --runtime unless --runtime-name) or `*`, TEST may end in `*`.
#[derive(Debug, Clone)]
pub struct Expected {
    pub test: String,
    pub runtime: String,
    pub kind: String,
    pub reason: String,
}

pub const KINDS: [&str; 4] = ["vm", "runc-deviates", "bug", "host"];

pub fn parse_expected(text: &str) -> Result<Vec<Expected>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut rest = line;
        let mut field = || {
            let t = rest.trim_start();
            let end = t.find(char::is_whitespace).unwrap_or(t.len());
            let (f, r) = t.split_at(end);
            rest = r;
            (!f.is_empty()).then_some(f)
        };
        let (Some(test), Some(runtime), Some(kind)) = (field(), field(), field()) else {
            bail!("line {}: want `TEST RUNTIME KIND REASON`", n + 1);
        };
        let reason = rest.trim();
        if reason.is_empty() {
            bail!("line {}: a reason is required", n + 1);
        }
        if !KINDS.contains(&kind) {
            bail!("line {}: kind {kind:?} is not one of {KINDS:?}", n + 1);
        }
        out.push(Expected {
            test: test.into(),
            runtime: runtime.into(),
            kind: kind.into(),
            reason: reason.into(),
        });
    }
    Ok(out)
}

pub fn load_expected(path: &Path) -> Result<Vec<Expected>> {
    parse_expected(&fs::read_to_string(path).with_context(|| format!("{}", path.display()))?)
}

/// `*` anywhere matches any run of characters; otherwise an exact name.
pub fn glob(pat: &str, name: &str) -> bool {
    let parts: Vec<&str> = pat.split('*').collect();
    if parts.len() == 1 {
        return pat == name;
    }
    let mut rest = name;
    for (i, p) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(p) else {
                return false;
            };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.ends_with(p);
        } else if let Some(at) = rest.find(p) {
            rest = &rest[at + p.len()..];
        } else {
            return false;
        }
    }
    true
}

pub fn lookup<'a>(exp: &'a [Expected], runtime: &str, test: &str) -> Option<&'a Expected> {
    exp.iter()
        .find(|e| (e.runtime == runtime || e.runtime == "*") && glob(&e.test, test))
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A TAP line for test number `n`.
pub fn tap_line(n: usize, r: &TestResult, expected: Option<&Expected>) -> String {
    match (&r.outcome, expected) {
        (Outcome::Pass, _) => format!("ok {n} - {}", r.name),
        (Outcome::Skip(why), _) => format!("ok {n} - {} # SKIP {}", r.name, one_line(why)),
        (Outcome::Fail(why), Some(e)) => format!(
            "not ok {n} - {} # TODO expected ({}: {}) {}",
            r.name,
            e.kind,
            e.reason,
            one_line(why)
        ),
        (Outcome::Fail(why), None) => format!("not ok {n} - {} # {}", r.name, one_line(why)),
    }
}

pub struct Summary {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
    pub expected_failures: usize,
    pub unexpected_failures: Vec<String>,
    pub listed_but_passing: Vec<String>,
}

pub fn summarize(results: &[TestResult], exp: Option<&[Expected]>, runtime: &str) -> Summary {
    let mut s = Summary {
        passed: 0,
        failed: 0,
        skipped: 0,
        expected_failures: 0,
        unexpected_failures: Vec::new(),
        listed_but_passing: Vec::new(),
    };
    for r in results {
        let listed = exp.and_then(|e| lookup(e, runtime, &r.name));
        match &r.outcome {
            Outcome::Pass => {
                s.passed += 1;
                if listed.is_some() {
                    s.listed_but_passing.push(r.name.clone());
                }
            }
            Outcome::Skip(_) => s.skipped += 1,
            Outcome::Fail(_) => {
                s.failed += 1;
                if listed.is_some() {
                    s.expected_failures += 1;
                } else {
                    s.unexpected_failures.push(r.name.clone());
                }
            }
        }
    }
    s
}

pub fn to_json(runtime: &str, results: &[TestResult], exp: Option<&[Expected]>) -> Value {
    let s = summarize(results, exp, runtime);
    let tests: Vec<Value> = results
        .iter()
        .map(|r| {
            let (result, reason) = match &r.outcome {
                Outcome::Pass => ("pass", None),
                Outcome::Fail(w) => ("fail", Some(w.clone())),
                Outcome::Skip(w) => ("skip", Some(w.clone())),
            };
            let e = exp.and_then(|e| lookup(e, runtime, &r.name));
            json!({
                "name": r.name, "result": result, "reason": reason, "millis": r.millis as u64,
                "expected": e.map(|e| json!({"kind": e.kind, "reason": e.reason})),
            })
        })
        .collect();
    json!({
        "runtime": runtime,
        "tests": tests,
        "summary": {
            "passed": s.passed, "failed": s.failed, "skipped": s.skipped,
            "expected_failures": s.expected_failures,
            "unexpected_failures": s.unexpected_failures,
            "listed_but_passing": s.listed_but_passing,
        },
    })
}

/// docs/conformance.md: one row per test, both results, and the listed reason for every
/// difference or failure.
pub fn compare_markdown(a: &Value, b: &Value, exp: &[Expected]) -> Result<String> {
    let name_a = a["runtime"].as_str().unwrap_or("A").to_string();
    let name_b = b["runtime"].as_str().unwrap_or("B").to_string();
    let index = |v: &Value| -> BTreeMap<String, (String, String)> {
        v["tests"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                (
                    t["name"].as_str().unwrap_or("").to_string(),
                    (
                        t["result"].as_str().unwrap_or("").to_string(),
                        t["reason"].as_str().unwrap_or("").to_string(),
                    ),
                )
            })
            .collect()
    };
    let (ia, ib) = (index(a), index(b));
    let mut names: Vec<&String> = ia.keys().chain(ib.keys()).collect();
    names.sort();
    names.dedup();
    let mut md = String::new();
    md.push_str("# Conformance: runc and krun-oci side by side\n\n");
    md.push_str(
        "Generated by `scripts/conformance.sh` (the `conformance` runner in `conformance/`); do not \
         edit by hand. Reasons come from `conformance/expected-differences.txt` \
         (kinds: `vm` — a VM makes it meaningless or different; `runc-deviates` — runc departs from \
         the spec or the client contract; `bug` — ours to fix; `host` — this machine).\n\n",
    );
    let count = |v: &Value, k: &str| v["summary"][k].as_u64().unwrap_or(0);
    for (n, v) in [(&name_a, a), (&name_b, b)] {
        md.push_str(&format!(
            "- **{n}**: {} passed, {} failed, {} skipped\n",
            count(v, "passed"),
            count(v, "failed"),
            count(v, "skipped")
        ));
    }
    for (n, v) in [(&name_a, a), (&name_b, b)] {
        if let Some(e) = v["preflight"].as_str().filter(|e| *e != "ok") {
            md.push_str(&format!(
                "\n**{n}: the preflight container failed** ({}), so every test that needs a \
                 running container is reported failed without running.\n",
                one_line(e)
            ));
        }
    }
    md.push_str(&format!(
        "\n| test | {name_a} | {name_b} | reason |\n|---|---|---|---|\n"
    ));
    let cell = |r: Option<&(String, String)>| r.map(|r| r.0.clone()).unwrap_or("—".into());
    for n in names {
        let (ra, rb) = (ia.get(n), ib.get(n));
        let mut reasons = Vec::new();
        for (rt, r) in [(&name_a, ra), (&name_b, rb)] {
            if let Some((res, why)) = r {
                if res != "pass" {
                    match lookup(exp, rt, n) {
                        Some(e) => reasons.push(format!("{rt}: {} — {}", e.kind, e.reason)),
                        None if res == "skip" => {
                            reasons.push(format!("{rt}: skipped — {}", one_line(why)))
                        }
                        None => reasons.push(format!("{rt}: UNLISTED — {}", one_line(why))),
                    }
                }
            }
        }
        md.push_str(&format!(
            "| `{n}` | {} | {} | {} |\n",
            cell(ra),
            cell(rb),
            reasons.join("; ").replace('|', "\\|")
        ));
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("exec/*", "exec/exit-code"));
        assert!(!glob("exec/*", "create/x"));
        assert!(glob("create/basic", "create/basic"));
        assert!(glob("*/json", "list/json"));
    }

    #[test]
    fn expected_file_parses_and_rejects_bad_kinds() {
        let e =
            parse_expected("# c\nstate/exit-code runc runc-deviates no exitCode in 1.1\n").unwrap();
        assert_eq!(e[0].reason, "no exitCode in 1.1");
        assert!(parse_expected("a b nonsense why").is_err());
        assert!(parse_expected("a b").is_err());
    }

    #[test]
    fn tap_lines() {
        let r = TestResult {
            name: "a/b".into(),
            outcome: Outcome::Fail("x\ny".into()),
            millis: 1,
        };
        assert_eq!(tap_line(3, &r, None), "not ok 3 - a/b # x y");
    }

    #[test]
    fn compare_lists_reasons_and_unlisted_failures() {
        let a = json!({"runtime": "runc", "summary": {}, "tests": [
            {"name": "x/one", "result": "pass"}, {"name": "x/two", "result": "fail", "reason": "r"}]});
        let b = json!({"runtime": "krun-oci", "preflight": "boom", "summary": {}, "tests": [
            {"name": "x/one", "result": "fail", "reason": "broke"}, {"name": "x/two", "result": "pass"}]});
        let exp = parse_expected("x/two runc runc-deviates because\n").unwrap();
        let md = compare_markdown(&a, &b, &exp).unwrap();
        assert!(
            md.contains("| `x/one` | pass | fail | krun-oci: UNLISTED — broke |"),
            "{md}"
        );
        assert!(
            md.contains("| `x/two` | fail | pass | runc: runc-deviates — because |"),
            "{md}"
        );
        assert!(
            md.contains("krun-oci: the preflight container failed"),
            "{md}"
        );
    }

    #[test]
    fn expected_failures_split_from_unexpected() {
        let r = |n: &str, o: Outcome| TestResult {
            name: n.into(),
            outcome: o,
            millis: 0,
        };
        let results = [
            r("a/x", Outcome::Fail("f".into())),
            r("a/y", Outcome::Fail("f".into())),
            r("b/z", Outcome::Pass),
        ];
        let exp = parse_expected("a/x rt bug r\nb/* rt bug r\n").unwrap();
        let s = summarize(&results, Some(&exp), "rt");
        assert_eq!(s.expected_failures, 1);
        assert_eq!(s.unexpected_failures, ["a/y"]);
        assert_eq!(s.listed_but_passing, ["b/z"]);
        let other = summarize(&results, Some(&exp), "runc");
        assert_eq!(other.unexpected_failures.len(), 2);
    }
}
