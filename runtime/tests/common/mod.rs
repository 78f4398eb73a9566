//! Shared harness of the end-to-end tests: busybox bundles, the krun-oci
//! binary driven exactly as a user would, and checks that nothing is left behind.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

pub mod pool;

pub const KRUN_OCI: &str = env!("CARGO_BIN_EXE_krun-oci");

/// True when real VMs can boot here. Otherwise prints why and returns false —
/// unless KRUN_OCI_REQUIRE_VM=1 (as `make test` and CI set), where it fails.
pub fn vm_available(test: &str) -> bool {
    let missing: Vec<String> = [
        ("qemu-system-x86_64", "apt-get install qemu-system-x86"),
        ("virtiofsd", "cargo install --locked virtiofsd"),
        ("vhost-device-vsock", "cargo install --locked vhost-device-vsock"),
        ("busybox", "apt-get install busybox-static"),
    ]
    .iter()
    .filter(|(bin, _)| which(bin).is_none())
    .map(|(bin, fix)| format!("{bin} missing ({fix})"))
    .chain(match std::env::var_os("KRUN_OCI_INIT") {
        Some(p) if Path::new(&p).exists() => None,
        _ => Some("static krun-oci-init not built (run `make build`, which sets KRUN_OCI_INIT for `make test`)".to_string()),
    })
    .collect();
    runnable(test, "VM", &missing)
}

/// True when nothing is `missing`; else prints why `test` skips and returns
/// false, or fails where KRUN_OCI_REQUIRE_VM=1 says the tests must run.
fn runnable(test: &str, kind: &str, missing: &[String]) -> bool {
    if missing.is_empty() {
        return true;
    }
    let why = missing.join("; ");
    if std::env::var("KRUN_OCI_REQUIRE_VM").as_deref() == Ok("1") {
        panic!("{test}: {kind} tests required but cannot run: {why}");
    }
    eprintln!("SKIPPED {test}: {why}");
    false
}

/// True when the sandbox backend can run here (root, `unshare`, busybox, the
/// static init); otherwise prints why and returns false, or fails where
/// KRUN_OCI_REQUIRE_VM=1 says the end-to-end tests must run.
pub fn sandbox_available(test: &str) -> bool {
    let mut missing: Vec<String> = [
        ("unshare", "apt-get install util-linux"),
        ("busybox", "apt-get install busybox-static"),
    ]
    .iter()
    .filter(|(bin, _)| which(bin).is_none())
    .map(|(bin, fix)| format!("{bin} missing ({fix})"))
    .collect();
    if !nix::unistd::Uid::effective().is_root() {
        missing.push("not root (namespaces and mounts need it)".into());
    }
    if !std::env::var_os("KRUN_OCI_INIT").is_some_and(|p| Path::new(&p).exists()) {
        missing.push(
            "static krun-oci-init not built (`make init`; `make test` sets KRUN_OCI_INIT)".into(),
        );
    }
    runnable(test, "sandbox", &missing)
}

pub use krun_oci_testkit::which;

pub use krun_oci_testkit::procs::alive;

/// This test process as the subreaper of the monitors it creates.
pub fn become_subreaper() {
    krun_oci_testkit::procs::become_subreaper().expect("PR_SET_CHILD_SUBREAPER");
}

/// A bundle with a busybox-static rootfs.
pub struct TestBundle {
    pub dir: tempfile::TempDir,
}

impl TestBundle {
    pub fn new(args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        krun_oci_testkit::rootfs::busybox(&dir.path().join("rootfs")).unwrap();
        let b = TestBundle { dir };
        b.write_config(|c| {
            c["process"]["args"] = serde_json::json!(args);
        });
        b
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    /// Rewrites config.json: starts from `krun-oci spec` with terminal off and a writable root.
    pub fn write_config(&self, edit: impl FnOnce(&mut Value)) {
        let cfg_path = self.path().join("config.json");
        let mut cfg: Value = match fs::read(&cfg_path) {
            Ok(d) => serde_json::from_slice(&d).unwrap(),
            Err(_) => {
                let out = Command::new(KRUN_OCI)
                    .args(["spec", "--bundle"])
                    .arg(self.path())
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "spec: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let mut v: Value = serde_json::from_slice(&fs::read(&cfg_path).unwrap()).unwrap();
                v["process"]["terminal"] = Value::Bool(false);
                v["root"]["readonly"] = Value::Bool(false);
                v
            }
        };
        edit(&mut cfg);
        fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    }
}

/// krun-oci with its own `--root`.
pub struct Runtime {
    pub root: tempfile::TempDir,
    /// The guest init its VMs boot, when not `KRUN_OCI_INIT`'s.
    pub init: Option<PathBuf>,
    /// `--vmm sandbox`: guest-init on the host, no VM.
    pub sandbox: bool,
    /// The host config file (`KRUN_OCI_CONFIG`), when not the machine's.
    pub host_config: Option<PathBuf>,
    /// Extra guest kernel arguments (`KRUN_OCI_KERNEL_CMDLINE`, docs/vmm.md).
    pub kernel_cmdline: Option<String>,
}

impl Runtime {
    pub fn new() -> Self {
        Runtime {
            root: tempfile::tempdir().unwrap(),
            init: None,
            sandbox: false,
            host_config: None,
            kernel_cmdline: None,
        }
    }

    /// A runtime on the sandbox backend (no VM; krun-oci-init in host namespaces).
    pub fn sandbox() -> Self {
        Runtime {
            sandbox: true,
            ..Runtime::new()
        }
    }

    /// A runtime whose VMs boot `init` (e.g. the hostile test guest).
    pub fn with_init(init: PathBuf) -> Self {
        Runtime {
            init: Some(init),
            ..Runtime::new()
        }
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(KRUN_OCI);
        c.arg("--root").arg(self.root.path());
        if self.sandbox {
            c.args(["--vmm", "sandbox"])
                .env(krun_oci::vmm::sandbox::ALLOW_ENV, "1");
        }
        c.args(args);
        if let Some(init) = &self.init {
            c.env("KRUN_OCI_INIT", init);
        }
        if let Some(config) = &self.host_config {
            c.env("KRUN_OCI_CONFIG", config);
        }
        if let Some(args) = &self.kernel_cmdline {
            c.env("KRUN_OCI_KERNEL_CMDLINE", args);
        }
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).stdin(Stdio::null()).output().unwrap()
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "krun-oci {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `create` with the container's stdout/stderr going to files; returns the monitor pid.
    pub fn create(&self, id: &str, bundle: &TestBundle, out: &Path, err: &Path) -> i32 {
        let pid_file = bundle.path().join(format!("{id}.pid"));
        let status = self
            .cmd(&[
                "create",
                "--bundle",
                bundle.path().to_str().unwrap(),
                "--pid-file",
                pid_file.to_str().unwrap(),
                id,
            ])
            .stdin(Stdio::null())
            .stdout(fs::File::create(out).unwrap())
            .stderr(fs::File::create(err).unwrap())
            .status()
            .unwrap();
        assert!(
            status.success(),
            "create failed: {}",
            fs::read_to_string(err).unwrap_or_default()
        );
        let pid = fs::read_to_string(&pid_file).unwrap();
        assert!(
            !pid.ends_with('\n'),
            "pid file must have no trailing newline"
        );
        pid.parse().unwrap()
    }

    pub fn state(&self, id: &str) -> Value {
        serde_json::from_str(&self.ok(&["state", id])).unwrap()
    }

    /// Helper pids (VMM and its helpers) recorded for `id`.
    pub fn helper_pids(&self, id: &str) -> Vec<i32> {
        let v: Value = serde_json::from_slice(
            &fs::read(self.root.path().join(id).join("state.json")).unwrap(),
        )
        .unwrap();
        v["helper_pids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_i64().unwrap() as i32)
            .collect()
    }
}

/// Waits (as subreaper) for a monitor and returns its exit status as a shell would.
pub fn wait_exit(pid: i32) -> i32 {
    match nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None).unwrap() {
        nix::sys::wait::WaitStatus::Exited(_, c) => c,
        nix::sys::wait::WaitStatus::Signaled(_, s, _) => 128 + s as i32,
        other => panic!("unexpected wait status {other:?}"),
    }
}

/// Polls until `f` is true (bounded; failing the test if never).
pub fn eventually(what: &str, limit: Duration, f: impl FnMut() -> bool) {
    assert!(
        krun_oci_testkit::wait::within(limit, Duration::from_millis(50), f),
        "timed out waiting for: {what}"
    );
}

/// Asserts nothing of the container remains: state dir, VMM and helpers.
pub fn assert_cleaned_up(rt: &Runtime, id: &str, pids: &[i32]) {
    assert!(
        !rt.root.path().join(id).exists(),
        "state dir of {id} left behind"
    );
    let dir = krun_oci::state::ContainerDir {
        id: id.to_string(),
        path: rt.root.path().join(id),
    };
    assert!(
        !dir.run_dir().exists(),
        "run dir {} of {id} left behind",
        dir.run_dir().display()
    );
    for &p in pids {
        eventually(
            &format!("pid {p} of {id} to go away"),
            Duration::from_secs(10),
            || !alive(p),
        );
    }
}

/// The resident memory of `pid`, in kB (0 once it is gone).
pub fn rss_kb(pid: i32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
