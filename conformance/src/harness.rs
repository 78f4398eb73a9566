//! What every test uses: running the runtime's command line with timeouts, building bundles,
//! waiting on pids (the runner is a child subreaper), and tracking what to clean up.
use anyhow::{anyhow, bail, ensure, Context, Result};
use krun_oci_testkit::procs::processes;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde_json::{json, Value};
use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Returned (inside anyhow) by a test that cannot run here; reported as a TAP SKIP.
#[derive(Debug)]
pub struct Skip(pub String);
impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
impl std::error::Error for Skip {}

pub fn skip<T>(why: impl Into<String>) -> Result<T> {
    Err(anyhow!(Skip(why.into())))
}

/// Settings shared by all tests of one run.
#[derive(Clone)]
pub struct Config {
    pub runtime: PathBuf,
    pub checker: Option<PathBuf>,
    pub cmd_timeout: Duration,
    /// Set when the preflight container could not run: tests that need a bundle fail at once
    /// with this reason instead of each waiting out its timeouts.
    pub preflight_error: Option<String>,
    /// One `--root` for every test (`run --pool`: the pool serves one root).
    pub shared_root: Option<PathBuf>,
}

/// The pool daemon's pid (`run --pool`): not an orphan to kill between tests.
pub static POOL_DAEMON: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);
/// Container IDs are `conf<our pid>-N`: unique across tests that share one root,
/// and the soak's leak check knows its cgroups by the prefix.
pub const ID_STEM: &str = "conf";

impl Config {
    /// The `--root` of a test whose directory is `dir`.
    pub fn state_root(&self, dir: &Path) -> PathBuf {
        self.shared_root.clone().unwrap_or_else(|| dir.join("root"))
    }
}

/// What a test created, so cleanup can undo it even after a failure or a timeout.
#[derive(Default)]
pub struct Tracked {
    pub ids: Vec<String>,
    pub pids: Vec<i32>,
}

/// The result of one command line.
#[derive(Debug, Clone)]
pub struct Out {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
    /// The file that received stdout; a created container keeps writing here (runc semantics).
    pub stdout_path: PathBuf,
}

impl Out {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }
    /// One line for failure messages.
    pub fn brief(&self) -> String {
        let err = self.stderr.trim().lines().last().unwrap_or("").to_string();
        if self.timed_out {
            format!("timed out; stderr: {err}")
        } else {
            format!("exit {:?}; stderr: {err}", self.code)
        }
    }
}

/// How a waited-for process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    /// The container exit code as clients compute it (128+signal for a signal death).
    pub fn code(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
        }
    }
}

/// Name of the `--log` file in a test's directory.
pub const RUNTIME_LOG: &str = "runtime.log";

/// Every line of a `--log-format json` file is one JSON object with string `level`,
/// `msg` and an RFC3339 `time` (containerd parses each line); returns them.
pub fn check_log_lines(path: &Path) -> Result<Vec<Value>> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context("reading the --log file"),
    };
    text.lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line)
                .with_context(|| format!("log line is not one JSON object: {line:?}"))?;
            for k in ["level", "msg", "time"] {
                ensure!(v[k].is_string(), "log line lacks string {k:?}: {line}");
            }
            let t = v["time"].as_str().unwrap_or("");
            chrono::DateTime::parse_from_rfc3339(t)
                .with_context(|| format!("log time {t:?} is not RFC3339"))?;
            Ok(v)
        })
        .collect()
}

pub struct Ctx {
    pub cfg: Arc<Config>,
    pub dir: PathBuf,
    pub root: PathBuf,
    pub track: Arc<Mutex<Tracked>>,
    seq: usize,
}

impl Ctx {
    pub fn new(cfg: Arc<Config>, dir: PathBuf, track: Arc<Mutex<Tracked>>) -> Result<Ctx> {
        let root = cfg.state_root(&dir);
        fs::create_dir_all(&root)?;
        Ok(Ctx {
            cfg,
            dir,
            root,
            track,
            seq: 0,
        })
    }

    fn next(&mut self) -> usize {
        self.seq += 1;
        self.seq
    }

    /// A fresh path under the test's directory.
    pub fn path(&mut self, stem: &str) -> PathBuf {
        let n = self.next();
        self.dir.join(format!("{stem}{n}"))
    }

    /// A fresh container ID, tracked for cleanup.
    pub fn new_id(&mut self) -> String {
        let id = krun_oci_testkit::ids::unique(ID_STEM);
        self.track.lock().unwrap().ids.push(id.clone());
        id
    }

    pub fn track_pid(&self, pid: i32) {
        self.track.lock().unwrap().pids.push(pid);
    }

    /// The `--log` file [`Ctx::rt`] passes, checked after each test ([`check_log_lines`]).
    pub fn log_file(&self) -> PathBuf {
        self.dir.join(RUNTIME_LOG)
    }

    /// The global flags containerd passes: `--root`, and `--log` in JSON.
    fn global_flags(&self) -> Vec<String> {
        let (root, log) = (self.root.display(), self.log_file().display().to_string());
        [
            "--root",
            &root.to_string(),
            "--log",
            &log,
            "--log-format",
            "json",
        ]
        .map(String::from)
        .to_vec()
    }

    /// The runtime with the global flags first, then `args`.
    pub fn rt(&mut self, args: &[&str]) -> Result<Out> {
        let global = self.global_flags();
        let mut full: Vec<&str> = global.iter().map(String::as_str).collect();
        full.extend_from_slice(args);
        self.raw(&full)
    }

    /// The runtime with exactly `args`.
    pub fn raw(&mut self, args: &[&str]) -> Result<Out> {
        let n = self.next();
        let runtime = self.cfg.runtime.clone();
        run_command(&runtime, args, &self.dir, n, self.cfg.cmd_timeout, None)
    }

    /// The runtime with the global flags first, then `args`, with `fd3` as its fd 3 (`--preserve-fds`).
    pub fn rt_with_fd3(&mut self, args: &[&str], fd3: &fs::File) -> Result<Out> {
        let n = self.next();
        let global = self.global_flags();
        let mut full: Vec<&str> = global.iter().map(String::as_str).collect();
        full.extend_from_slice(args);
        let runtime = self.cfg.runtime.clone();
        run_command(
            &runtime,
            &full,
            &self.dir,
            n,
            self.cfg.cmd_timeout,
            Some(fd3),
        )
    }

    /// A bundle: busybox rootfs plus `RUNTIME spec`, edited for tests (no terminal, writable
    /// root, a shell main), then `edit`.
    pub fn bundle(&mut self, edit: impl FnOnce(&mut Value)) -> Result<PathBuf> {
        let bundle = self.path("bundle");
        let rootfs = bundle.join("rootfs");
        make_rootfs(&rootfs)?;
        let b = bundle.display().to_string();
        let out = self.rt(&["spec", "--bundle", &b])?;
        ensure!(out.ok(), "`spec --bundle` failed: {}", out.brief());
        let cfg_path = bundle.join("config.json");
        let text = fs::read_to_string(&cfg_path).context("spec wrote no config.json")?;
        let mut cfg: Value = serde_json::from_str(&text).context("spec's config.json")?;
        cfg["process"]["terminal"] = json!(false);
        cfg["process"]["args"] = json!(["sh", "-c", "exit 0"]);
        cfg["root"] = json!({"path": "rootfs", "readonly": false});
        edit(&mut cfg);
        write_json(&cfg_path, &cfg)?;
        Ok(bundle)
    }

    /// Fails at once when the preflight container could not run: for tests whose create is
    /// meant to get as far as a running container (or a hook), which would each wait out the
    /// timeouts. Tests of create's refusals run anyway.
    pub fn require_container(&self) -> Result<()> {
        if let Some(e) = &self.cfg.preflight_error {
            bail!("not run: the preflight container failed: {e}");
        }
        Ok(())
    }

    /// Copies the checker into the bundle's rootfs; skips the test when there is no static checker.
    pub fn install_checker(&self, bundle: &Path) -> Result<()> {
        let Some(checker) = &self.cfg.checker else {
            return skip("no static conformance-checker (pass --checker or build it)");
        };
        let dst = bundle.join("rootfs/bin/conformance-checker");
        fs::copy(checker, &dst).context("copy checker")?;
        fs::set_permissions(&dst, fs::Permissions::from_mode(0o755))?;
        Ok(())
    }

    /// `create --bundle B --pid-file P ID` (+extra); fails the test unless it succeeds.
    pub fn create(&mut self, bundle: &Path, id: &str, extra: &[&str]) -> Result<Created> {
        self.require_container()?;
        let pid_file = self.path("pid");
        let (b, p) = (bundle.display().to_string(), pid_file.display().to_string());
        let mut args = vec!["create", "--bundle", b.as_str(), "--pid-file", p.as_str()];
        args.extend_from_slice(extra);
        args.push(id);
        let out = self.rt(&args)?;
        ensure!(out.ok(), "create failed: {}", out.brief());
        let text = fs::read_to_string(&pid_file).context("create returned without a pid file")?;
        let pid: i32 = text
            .parse()
            .with_context(|| format!("pid file content {text:?} is not a bare decimal pid"))?;
        self.track_pid(pid);
        Ok(Created { pid, out })
    }

    pub fn start(&mut self, id: &str) -> Result<()> {
        let out = self.rt(&["start", id])?;
        ensure!(out.ok(), "start failed: {}", out.brief());
        Ok(())
    }

    pub fn state(&mut self, id: &str) -> Result<Value> {
        let out = self.rt(&["state", id])?;
        ensure!(out.ok(), "state failed: {}", out.brief());
        serde_json::from_str(&out.stdout)
            .with_context(|| format!("state output is not JSON: {:?}", out.stdout))
    }

    pub fn status(&mut self, id: &str) -> Result<String> {
        let s = self.state(id)?;
        Ok(s["status"].as_str().unwrap_or("").to_string())
    }

    /// Polls `state` until the status is `want` (bounded).
    pub fn wait_status(&mut self, id: &str, want: &str) -> Result<()> {
        let deadline = Instant::now() + self.cfg.cmd_timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            last = self.status(id)?;
            if last == want {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("status stayed {last:?}, wanted {want:?}")
    }

    /// waitpid on a container or exec pid (the runner is a subreaper, so orphans are ours).
    pub fn wait_pid(&self, pid: i32) -> Result<Exit> {
        wait_pid(pid, self.cfg.cmd_timeout)
    }

    /// Create and start `bundle`, wait for its pid, return (exit, stdout of create).
    pub fn run_to_exit(&mut self, bundle: &Path) -> Result<(Exit, String)> {
        let id = self.new_id();
        let c = self.create(bundle, &id, &[])?;
        self.start(&id)?;
        let exit = self.wait_pid(c.pid)?;
        let out = fs::read_to_string(&c.out.stdout_path).unwrap_or_default();
        Ok((exit, out))
    }

    /// Runs the checker as the container main with `edit` applied and returns its report.
    pub fn checker_report(
        &mut self,
        extra_args: &[&str],
        edit: impl FnOnce(&mut Value),
    ) -> Result<Value> {
        let bundle = self.bundle(|c| {
            let mut args = vec!["/bin/conformance-checker".to_string()];
            args.extend(extra_args.iter().map(|s| s.to_string()));
            c["process"]["args"] = json!(args);
            edit(c);
        })?;
        self.install_checker(&bundle)?;
        let (exit, out) = self.run_to_exit(&bundle)?;
        let line = out
            .lines()
            .rev()
            .find(|l| l.contains("\"conformance_checker\""))
            .ok_or_else(|| anyhow!("no checker report on stdout ({exit:?}): {out:?}"))?;
        serde_json::from_str(line).context("checker report")
    }
}

pub struct Created {
    pub pid: i32,
    pub out: Out,
}

/// After a failed create: `state` fails and the state root holds nothing for `id`.
pub fn no_trace(ctx: &mut Ctx, id: &str) -> Result<()> {
    let out = ctx.rt(&["state", id])?;
    ensure!(
        !out.ok(),
        "state still answers for {id} after the failed create"
    );
    let left: Vec<String> = fs::read_dir(&ctx.root)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(id))
        .collect();
    ensure!(
        left.is_empty(),
        "the failed create left {left:?} in the state root"
    );
    Ok(())
}

pub fn write_json(path: &Path, v: &Value) -> Result<()> {
    fs::write(path, serde_json::to_vec_pretty(v)?)?;
    Ok(())
}

/// Runs `prog args` with stdin from /dev/null and stdout/stderr to files (a created container
/// inherits them, so pipes would never reach EOF), in its own process group, killed on timeout.
pub fn run_command(
    prog: &Path,
    args: &[&str],
    dir: &Path,
    n: usize,
    timeout: Duration,
    fd3: Option<&fs::File>,
) -> Result<Out> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let stdout_path = dir.join(format!("cmd{n}.out"));
    let stderr_path = dir.join(format!("cmd{n}.err"));
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&stdout_path)?)
        .stderr(fs::File::create(&stderr_path)?)
        .process_group(0);
    if let Some(f) = fd3 {
        let raw = f.as_raw_fd();
        // SAFETY: dup2 and fcntl are async-signal-safe; dup2 clears FD_CLOEXEC on fd 3.
        unsafe {
            cmd.pre_exec(move || {
                // dup2(3, 3) would keep FD_CLOEXEC: clear it instead.
                let r = if raw == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0)
                } else {
                    libc::dup2(raw, 3)
                };
                if r < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawn {}", prog.display()))?;
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if Instant::now() >= deadline {
            let _ = kill(Pid::from_raw(-(child.id() as i32)), Signal::SIGKILL);
            let _ = child.wait();
            timed_out = true;
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(Out {
        code: status.and_then(|s| s.code()),
        stdout: fs::read_to_string(&stdout_path).unwrap_or_default(),
        stderr: fs::read_to_string(&stderr_path).unwrap_or_default(),
        timed_out,
        stdout_path,
    })
}

pub fn wait_pid(pid: i32, timeout: Duration) -> Result<Exit> {
    let deadline = Instant::now() + timeout;
    loop {
        match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, c)) => return Ok(Exit::Code(c)),
            Ok(WaitStatus::Signaled(_, s, _)) => return Ok(Exit::Signal(s as i32)),
            Ok(_) => {}
            Err(nix::errno::Errno::ECHILD) => {
                bail!("pid {pid} is not a child of the subreaper caller (waitpid: ECHILD)")
            }
            Err(e) => bail!("waitpid {pid}: {e}"),
        }
        if Instant::now() >= deadline {
            bail!("pid {pid} still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls for a file to exist (bounded).
pub fn wait_file(path: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if Instant::now() >= deadline {
            bail!("{} did not appear within {timeout:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

pub use krun_oci_testkit::procs::alive as pid_alive;

/// The kit's busybox rootfs, plus what the suite's checks look for: the `conf`
/// user, its home `/work`, and a marker file.
pub fn make_rootfs(rootfs: &Path) -> Result<()> {
    krun_oci_testkit::rootfs::busybox(rootfs)?;
    fs::create_dir_all(rootfs.join("work"))?;
    fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nconf:x:1000:1000::/work:/bin/sh\n",
    )?;
    fs::write(rootfs.join("etc/group"), "root:x:0:\nconf:x:1000:\n")?;
    fs::write(rootfs.join(".conformance-rootfs"), "")?;
    Ok(())
}

/// Undo what a test left: `delete --force` every tracked ID, kill tracked pids and any orphan
/// the runner inherited as subreaper, reap them. Returns notes about what had to be killed.
pub fn cleanup(cfg: &Config, root: &Path, dir: &Path, track: &Mutex<Tracked>) -> Vec<String> {
    let mut notes = Vec::new();
    let t = std::mem::take(&mut *track.lock().unwrap());
    let r = root.display().to_string();
    let delete = |id: &str, n: usize| -> Option<String> {
        let args = ["--root", r.as_str(), "delete", "--force", id];
        match run_command(&cfg.runtime, &args, dir, n, Duration::from_secs(30), None) {
            Ok(o) if o.ok() => None,
            Ok(o) => Some(o.brief()),
            Err(e) => Some(format!("{e:#}")),
        }
    };
    // A pid namespace's init can only finish dying once its zombies are reaped, and some of
    // them are ours (the subreaper): reap before, and retry the delete after killing.
    reap_zombies();
    let failed: Vec<&String> = t
        .ids
        .iter()
        .enumerate()
        .filter(|(i, id)| delete(id, 100_000 + i).is_some())
        .map(|(_, id)| id)
        .collect();
    for pid in &t.pids {
        let pid = *pid;
        // Processes of a killed pid namespace die asynchronously: give them a moment.
        let deadline = Instant::now() + Duration::from_secs(2);
        while pid > 1 && pid_alive(pid) && Instant::now() < deadline {
            reap_zombies();
            std::thread::sleep(Duration::from_millis(10));
        }
        if pid > 1 && pid_alive(pid) {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let comm = stat.split(' ').take(3).collect::<Vec<_>>().join(" ");
            notes.push(format!(
                "killed pid still alive after delete --force: {comm}"
            ));
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    kill_orphans();
    for (i, id) in failed.into_iter().enumerate() {
        if let Some(why) = delete(id, 200_000 + i) {
            notes.push(format!("delete --force {id} failed twice: {why}"));
        }
    }
    kill_orphans();
    notes
}

pub fn reap_zombies() {
    while let Ok(st) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
        if st == WaitStatus::StillAlive {
            break;
        }
    }
}

/// Our children but the pool daemon (`run --pool`): what a test left behind.
pub fn orphans() -> Vec<i32> {
    let daemon = POOL_DAEMON.load(std::sync::atomic::Ordering::Relaxed);
    children_of(std::process::id() as i32)
        .into_iter()
        .filter(|&k| k != daemon)
        .collect()
}

/// SIGKILL and reap every child of this process (orphans reparented to the subreaper), bounded.
pub fn kill_orphans() {
    for _ in 0..50 {
        let kids = orphans();
        for k in &kids {
            let _ = kill(Pid::from_raw(*k), Signal::SIGKILL);
        }
        reap_zombies();
        if kids.is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn children_of(ppid: i32) -> Vec<i32> {
    processes()
        .into_iter()
        .filter(|p| p.ppid == ppid)
        .map(|p| p.pid)
        .collect()
}

/// Become a child subreaper so container pids (double-forked by the runtime) are ours to waitpid.
pub fn become_subreaper() -> Result<()> {
    krun_oci_testkit::procs::become_subreaper().context("PR_SET_CHILD_SUBREAPER")
}

/// A host shell hook entry.
pub fn sh_hook(script: &str) -> Value {
    json!({"path": "/bin/sh", "args": ["sh", "-c", script]})
}
