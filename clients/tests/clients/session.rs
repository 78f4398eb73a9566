//! The run's world: a busybox rootfs, a containerd of its own, podman with its
//! own storage; the leak check after each scenario; and the teardown that ends
//! all of it on every way out (return, panic, SIGINT/SIGTERM).
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use krun_oci_clients::command::{self, Ran};
use krun_oci_testkit::leaks::cgroup_dirs;
use krun_oci_testkit::procs::command_lines;
use krun_oci_testkit::{ids, rootfs, wait::Poll, which};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};

use crate::check::SETTLE;

/// Why the run cannot happen here (printed as `SKIP: ...`).
pub struct NotHere(pub String);

/// Every container id the scenarios give containerd: their shims' sockets are
/// named after them.
pub const CONTAINER_IDS: [&str; 15] = [
    "bad1", "k1", "r1", "kt", "kk", "ke", "kty", "ki", "ri", "kp", "rp", "kc", "rc", "ko", "khc",
];

/// What the leak check looks for by command line.
const WATCHED_COMMANDS: [&str; 6] = [
    "qemu-system",
    "virtiofsd",
    "vhost-device-vsock",
    "containerd-shim",
    "krun-oci",
    "conmon",
];

/// A containerd runtime and the flags that pick it for `ctr run`.
#[derive(Clone, Copy)]
pub enum Shim {
    /// containerd-shim-krun-v2.
    Krun,
    /// The stock runc shim, with `--runc-binary` krun-oci.
    Runc,
}

pub struct Session {
    pub work: PathBuf,
    /// containerd's namespace, unique to this run.
    pub ns: String,
    pub krun_oci: PathBuf,
    pub rootfs: PathBuf,
    /// containerd's socket.
    pub sock: PathBuf,
    containerd_log: PathBuf,
    /// The host config file the shims (and the krun-oci they run) read: empty = defaults.
    pub host_config: PathBuf,
    /// The shims' state (KRUN_OCI_SHIM_ROOT).
    pub shim_state: PathBuf,
    /// What podman runs as its runtime (a wrapper that carries KRUN_OCI_INIT).
    podman_runtime: PathBuf,
    containerd: Mutex<Option<Child>>,
    /// Containers podman made: the leak check looks for their processes, state and cgroups.
    podman_ids: Mutex<Vec<String>>,
    pub network: crate::network::HostNetwork,
    /// Taken by the first teardown; a second one waits for it.
    torn_down: Mutex<bool>,
}

impl Session {
    pub fn start() -> Result<Session, NotHere> {
        let skip = |why: String| Err(NotHere(why));
        if !nix::unistd::Uid::effective().is_root() {
            return skip("needs root (containerd, podman and VMs run as root here)".into());
        }
        for tool in ["containerd", "ctr", "podman"] {
            if which(tool).is_none() {
                return skip(format!("{tool} is not installed"));
            }
        }
        let Some(bin_dir) = crate::bin_dir() else {
            return skip("no KRUN_OCI_BIN_DIR and no target directory above this test".into());
        };
        for bin in ["krun-oci", "containerd-shim-krun-v2"] {
            let path = bin_dir.join(bin);
            if !path.is_file() {
                return skip(format!("{} is not built", path.display()));
            }
        }
        let work = std::env::temp_dir().join(ids::unique("krun-clients."));
        let krun_oci = bin_dir.join("krun-oci");
        let cdir = work.join("containerd");
        let mut session = Session {
            ns: ids::unique("krun-test-"),
            rootfs: work.join("rootfs"),
            sock: cdir.join("containerd.sock"),
            containerd_log: cdir.join("containerd.log"),
            host_config: work.join("krun-config.toml"),
            shim_state: work.join("shim-state"),
            podman_runtime: krun_oci.clone(),
            krun_oci,
            containerd: Mutex::new(None),
            podman_ids: Mutex::new(Vec::new()),
            network: crate::network::HostNetwork::new(&work),
            torn_down: Mutex::new(false),
            work,
        };
        let started = session
            .prepare(&bin_dir, &cdir)
            .map_err(|e| NotHere(format!("{e:#}")))
            .and_then(|()| session.start_containerd(&bin_dir, &cdir));
        if let Err(e) = started {
            session.teardown(false);
            return Err(e);
        }
        Ok(session)
    }

    /// The rootfs, containerd's config, and podman's runtime wrapper.
    fn prepare(&mut self, bin_dir: &Path, cdir: &Path) -> anyhow::Result<()> {
        fs::create_dir_all(cdir)?;
        rootfs::busybox(&self.rootfs)?;
        let sock = self.sock.display();
        let disabled = [
            "io.containerd.grpc.v1.cri",
            "io.containerd.snapshotter.v1.btrfs",
            "io.containerd.snapshotter.v1.zfs",
            "io.containerd.snapshotter.v1.devmapper",
            "io.containerd.snapshotter.v1.aufs",
            "io.containerd.internal.v1.tracing",
        ]
        .map(|p| format!("\"{p}\""))
        .join(", ");
        fs::write(
            cdir.join("config.toml"),
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
                 disabled_plugins = [{disabled}]\n\
                 [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\
                 [debug]\n  level = \"debug\"\n",
                root = cdir.join("root").display(),
                state = cdir.join("state").display(),
            ),
        )?;
        fs::write(&self.host_config, "")?;
        // podman passes the runtime a scrubbed environment: a wrapper (same
        // basename, podman goes by it) carries KRUN_OCI_INIT for builds that are
        // not installed.
        if let Some(init) = std::env::var_os("KRUN_OCI_INIT") {
            let wrapper = self.work.join("bin/krun-oci");
            fs::create_dir_all(self.work.join("bin"))?;
            fs::write(
                &wrapper,
                format!(
                    "#!/bin/sh\nKRUN_OCI_INIT={} exec {} \"$@\"\n",
                    shell_quote(&PathBuf::from(init)),
                    shell_quote(&bin_dir.join("krun-oci")),
                ),
            )?;
            fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755))?;
            self.podman_runtime = wrapper;
        }
        Ok(())
    }

    /// containerd with the shim's directory first on its PATH and the shims'
    /// settings in its environment (it passes them on); answering on `sock`.
    fn start_containerd(&self, bin_dir: &Path, cdir: &Path) -> Result<(), NotHere> {
        let log = fs::File::create(&self.containerd_log).map_err(|e| NotHere(e.to_string()))?;
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let child = Command::new("containerd")
            .arg("--config")
            .arg(cdir.join("config.toml"))
            .env("PATH", path)
            .env("KRUN_OCI_SHIM_ROOT", &self.shim_state)
            .env("KRUN_OCI_BINARY", &self.krun_oci)
            .env("KRUN_OCI_CONFIG", &self.host_config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| NotHere(e.to_string()))?)
            .stderr(log)
            .spawn()
            .map_err(|e| NotHere(format!("containerd: {e}")))?;
        *self.containerd.lock().unwrap() = Some(child);
        let mut exited = false;
        let answered = SETTLE.until(|| {
            if let Some(c) = self.containerd.lock().unwrap().as_mut() {
                exited = !matches!(c.try_wait(), Ok(None));
            }
            !exited && command::output(&mut self.ctr(&["version"])).ok()
        });
        if answered {
            return Ok(());
        }
        let tail = self.containerd_log_tail(20).join("\n");
        Err(NotHere(if exited {
            format!("containerd did not start:\n{tail}")
        } else {
            format!(
                "containerd did not answer on {}:\n{tail}",
                self.sock.display()
            )
        }))
    }

    /// `ctr` on our containerd, in our namespace.
    pub fn ctr(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(&self.sock)
            .args(["--namespace", &self.ns])
            .args(args);
        c
    }

    /// `ctr ARGS` with stderr into stdout.
    pub fn ctr_run(&self, args: &[&str]) -> Ran {
        command::combined(&mut self.ctr(args))
    }

    /// The `ctr run` flags that pick `shim`.
    pub fn runtime_flags(&self, shim: Shim) -> Vec<String> {
        match shim {
            Shim::Krun => vec!["--runtime".into(), "io.containerd.krun.v2".into()],
            Shim::Runc => vec![
                "--runtime".into(),
                "io.containerd.runc.v2".into(),
                "--runc-binary".into(),
                self.krun_oci.display().to_string(),
            ],
        }
    }

    /// podman on its own storage.
    pub fn podman(&self, args: &[&str]) -> Command {
        let mut c = Command::new("podman");
        c.arg("--root")
            .arg(self.work.join("podman/root"))
            .arg("--runroot")
            .arg(self.work.join("podman/run"))
            .args(["--cgroup-manager", "cgroupfs", "--events-backend", "file"])
            .args(args);
        c
    }

    /// The runtime and ulimit flags of every podman run (the default limits can
    /// exceed the host's hard ones), with `--network none` where `isolated`.
    /// `--rootfs` is a switch whose path is the first positional argument: last.
    pub fn podman_run_flags(&self, isolated: bool) -> Vec<String> {
        let mut flags = vec![
            "--runtime".into(),
            self.podman_runtime.display().to_string(),
        ];
        if isolated {
            flags.extend(["--network".into(), "none".into()]);
        }
        flags.extend(
            [
                "--ulimit",
                "nofile=1024:1024",
                "--ulimit",
                "nproc=1024:1024",
                "--rootfs",
            ]
            .map(String::from),
        );
        flags.push(self.rootfs.display().to_string());
        flags
    }

    /// A container podman made, for the leak checks.
    pub fn track_podman_id(&self, cid: &str) {
        if !cid.is_empty() {
            self.podman_ids.lock().unwrap().push(cid.to_string());
        }
    }

    /// Whether a VM boots at all here (if not, every VM scenario would fail for
    /// that one reason); the reason when none does.
    pub fn vm_probe(&self) -> Result<(), String> {
        let bundle = self.work.join("probe");
        let state = self.work.join("probe-state");
        let prepared = (|| -> anyhow::Result<()> {
            fs::create_dir_all(&bundle)?;
            std::os::unix::fs::symlink(&self.rootfs, bundle.join("rootfs"))?;
            let spec = command::output(
                Command::new(&self.krun_oci)
                    .args(["spec", "--bundle"])
                    .arg(&bundle),
            );
            anyhow::ensure!(spec.ok(), "krun-oci spec: {}", spec.stderr);
            let path = bundle.join("config.json");
            let mut config: serde_json::Value = serde_json::from_slice(&fs::read(&path)?)?;
            config["process"]["terminal"] = false.into();
            config["process"]["args"] = serde_json::json!(["true"]);
            fs::write(&path, serde_json::to_vec(&config)?)?;
            Ok(())
        })();
        prepared.map_err(|e| format!("{e:#}"))?;
        let krun_oci = |args: &[&str]| {
            command::combined(
                Command::new(&self.krun_oci)
                    .arg("--root")
                    .arg(&state)
                    .args(args),
            )
        };
        let run = krun_oci(&["run", "--bundle", &bundle.display().to_string(), "probe"]);
        if run.ok() {
            return Ok(());
        }
        krun_oci(&["delete", "--force", "probe"]);
        let lines: Vec<&str> = run.stdout.lines().collect();
        Err(lines[lines.len().saturating_sub(3)..].join("\n"))
    }

    /// What marks a process as ours: the work dir, the namespace, podman's ids.
    fn markers(&self) -> Vec<String> {
        let mut markers = vec![self.work.display().to_string(), self.ns.clone()];
        markers.extend(self.podman_ids.lock().unwrap().iter().cloned());
        markers
    }

    /// VMMs, helpers, shims, krun-oci and conmon processes of ours (pid and command line).
    fn leftover_processes(&self) -> Vec<String> {
        let markers = self.markers();
        let me = std::process::id() as i32;
        command_lines()
            .into_iter()
            .filter(|(pid, line)| {
                *pid != me
                    && WATCHED_COMMANDS.iter().any(|c| line.contains(c))
                    && markers.iter().any(|m| line.contains(m.as_str()))
            })
            .map(|(pid, line)| format!("{pid} {line}"))
            .collect()
    }

    /// Cgroup directories that name one of our containers: the ctr ids live under
    /// the namespace (cgroupsPath /<namespace>/<id>), podman's are named after the
    /// container ID (libpod_parent/libpod-<ID>). On hybrid hosts the v1
    /// controllers and the v2 tree sit side by side: one walk covers both.
    fn leftover_cgroups(&self) -> Vec<String> {
        let under_ns = format!("/{}/", self.ns);
        let podman_ids = self.podman_ids.lock().unwrap().clone();
        cgroup_dirs(5)
            .into_iter()
            .map(|p| p.display().to_string())
            .filter(|p| p.contains(&under_ns) || podman_ids.iter().any(|c| p.contains(c)))
            .collect()
    }

    /// The shims' sockets: both name them sha256("<containerd address>/<namespace>/<id>")
    /// in /run/containerd/s, which other containerds share.
    fn shim_socket(&self, id: &str) -> PathBuf {
        let name = format!("{}/{}/{id}", self.sock.display(), self.ns);
        let hex: String = Sha256::digest(name.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        PathBuf::from("/run/containerd/s").join(hex)
    }

    /// What the last scenario left behind, once teardown (TaskDelete, shim
    /// Shutdown, VM power-off: asynchronous) has had its bounded time to settle.
    pub fn leftovers(&self) -> Vec<String> {
        let mut out = Vec::new();
        let processes = SETTLE.settle(|| self.leftover_processes());
        if !processes.is_empty() {
            out.push(format!("processes left: {}", processes.join("\n")));
        }
        let cgroups = SETTLE.settle(|| self.leftover_cgroups());
        if !cgroups.is_empty() {
            out.push(format!("cgroups left: {}", cgroups.join(" ")));
        }
        let runc_root = PathBuf::from("/run/containerd/runc").join(&self.ns);
        for dir in [self.shim_state.join(&self.ns), runc_root] {
            let left = krun_oci_testkit::leaks::entries(&dir, |_| false);
            if !left.is_empty() {
                out.push(format!(
                    "state left in {}: {}",
                    dir.display(),
                    left.join(" ")
                ));
            }
        }
        let sockets = krun_oci_testkit::leaks::entries(&self.shim_state.join("sockets"), |_| false);
        if !sockets.is_empty() {
            out.push(format!(
                "files left in the shim's socket dir: {}",
                sockets.join(" ")
            ));
        }
        for id in CONTAINER_IDS {
            let socket = self.shim_socket(id);
            if socket.exists() {
                out.push(format!("shim socket of {id} left: {}", socket.display()));
            }
        }
        for cid in self.podman_ids.lock().unwrap().iter() {
            let state = Path::new("/run/krun-oci").join(cid);
            if state.exists() {
                out.push(format!("krun-oci state left: {}", state.display()));
            }
        }
        out
    }

    fn containerd_log_tail(&self, n: usize) -> Vec<String> {
        let log = fs::read_to_string(&self.containerd_log).unwrap_or_default();
        let lines: Vec<String> = log.lines().map(String::from).collect();
        lines[lines.len().saturating_sub(n)..].to_vec()
    }

    /// The last `n` warnings and errors of containerd's log, each cut to 600 bytes.
    pub fn containerd_complaints(&self, n: usize) -> Vec<String> {
        let log = fs::read_to_string(&self.containerd_log).unwrap_or_default();
        let complaints: Vec<String> = log
            .lines()
            .filter(|l| {
                ["level=warning", "level=error", "level=fatal"]
                    .iter()
                    .any(|lvl| l.contains(lvl))
            })
            .map(|l| l.chars().take(600).collect())
            .collect();
        complaints[complaints.len().saturating_sub(n)..].to_vec()
    }

    /// Ends what is still running (ours only: matched by our markers), then
    /// removes what the run made. Once; a second caller waits for the first.
    pub fn teardown(&self, interrupted: bool) {
        let mut done = self.torn_down.lock().unwrap();
        if *done {
            return;
        }
        *done = true;
        let containerd = self.containerd.lock().unwrap().take();
        if containerd.is_some() {
            for task in command::output(&mut self.ctr(&["task", "ls", "-q"]))
                .stdout
                .lines()
            {
                command::output(&mut self.ctr(&["task", "kill", "-s", "SIGKILL", task]));
                command::output(&mut self.ctr(&["task", "rm", "-f", task]));
            }
        }
        let podman_left = command::output(&mut self.podman(&["ps", "-aq", "--no-trunc"]));
        for cid in podman_left.stdout.lines() {
            command::output(&mut self.podman(&["rm", "-f", "-t", "0", cid]));
        }
        let me = std::process::id() as i32;
        let containerd_pid = containerd.as_ref().map(|c| c.id() as i32);
        let markers = self.markers();
        for (pid, line) in command_lines() {
            if pid != me
                && Some(pid) != containerd_pid
                && markers.iter().any(|m| line.contains(m.as_str()))
            {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        if let Some(mut containerd) = containerd {
            let _ = kill(Pid::from_raw(containerd.id() as i32), Signal::SIGTERM);
            let ended = Poll::new(300, Duration::from_millis(100))
                .until(|| !matches!(containerd.try_wait(), Ok(None)));
            if !ended {
                let _ = containerd.kill();
                let _ = containerd.wait();
            }
        }
        // podman's containers live in krun-oci's default root: a killed monitor
        // leaves its state and cgroup there.
        for cid in self.podman_ids.lock().unwrap().iter() {
            command::output(Command::new(&self.krun_oci).args([
                "--root",
                "/run/krun-oci",
                "delete",
                "--force",
                cid,
            ]));
        }
        self.network.clean_up();
        // podman's and containerd's mounts under the work dir (shm, snapshots),
        // deepest first.
        let mut mounts: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(String::from))
            .filter(|m| Path::new(m).starts_with(&self.work))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for mount in mounts {
            let _ = nix::mount::umount2(mount.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = fs::remove_dir_all(&self.work);
        // Shims killed above leave their sockets (ours only: see shim_socket).
        if interrupted {
            for id in CONTAINER_IDS {
                let _ = fs::remove_file(self.shim_socket(id));
            }
        }
        // The runc shim leaves its (empty) per-namespace root behind; a runtime
        // that creates cgroups may leave the (empty) per-namespace parent, and a
        // monitor killed above its container's cgroup: children first.
        let _ = fs::remove_dir(Path::new("/run/containerd/runc").join(&self.ns));
        let mut ours: Vec<PathBuf> = cgroup_dirs(5)
            .into_iter()
            .filter(|d| d.components().any(|c| c.as_os_str() == self.ns.as_str()))
            .collect();
        ours.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for dir in ours {
            let _ = fs::remove_dir(dir);
        }
    }
}

/// Tears the session down when it goes out of scope, a panic's unwinding included.
pub struct TeardownOnDrop(pub Arc<Session>);

impl Drop for TeardownOnDrop {
    fn drop(&mut self) {
        self.0.teardown(false);
    }
}

/// On SIGINT or SIGTERM: tear down, then exit 130 as an interrupted shell would.
pub fn teardown_on_signals(session: &Arc<Session>) {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) {
        Ok(s) => s,
        Err(e) => {
            println!("  (no teardown on signals: {e})");
            return;
        }
    };
    let session = session.clone();
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            println!("clients: interrupted by signal {signal}: tearing down");
            session.teardown(true);
            std::process::exit(130);
        }
    });
}

/// `path` as one shell word.
fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}
