//! The shim's view of one container, in runwasi's `Instance` shape: a small
//! trait the task service drives, implemented over krun-oci's lifecycle
//! library — the same code the `krun-oci` CLI runs, not a second copy.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use krun_oci::container::Container;
use krun_oci::lifecycle::{self, CreateOptions};
use krun_oci::state::{StateStore, Status};

use crate::error::{Error, Result};
use crate::exits::{Exit, Exits};

/// What the task service needs from a container.
pub trait Instance: Sized + Send + Sync + 'static {
    type Config;
    /// Creates the container: the VM boots, the workload does not run yet.
    fn new(id: String, cfg: Self::Config) -> Result<Self>;
    /// The container pid containerd sees (the VM monitor).
    fn pid(&self) -> u32;
    /// Runs the workload; returns the pid.
    fn start(&self) -> Result<u32>;
    /// Signals the workload (`all`: every process in the container).
    fn kill(&self, signal: u32, all: bool) -> Result<()>;
    /// Removes what create made; the container must not be running.
    fn delete(&self) -> Result<()>;
    /// Blocks until the workload ended.
    fn wait(&self) -> Exit;
    /// The exit, if the workload ended.
    fn try_wait(&self) -> Option<Exit>;
    /// Lifecycle status, `None` once the container is gone.
    fn status(&self) -> Option<Status>;
    /// Whether the guest's OOM killer ran while the workload ran.
    fn oom_killed(&self) -> bool;
}

/// Where and how a container is created (what the task service knows at Create).
pub struct InstanceConfig {
    /// krun-oci state root (one per containerd namespace).
    pub root: PathBuf,
    pub bundle: PathBuf,
    /// The krun-oci binary, re-executed as the VM monitor.
    pub exe: PathBuf,
    pub stdio: [Arc<OwnedFd>; 3],
    pub console_socket: Option<PathBuf>,
    pub exits: Arc<Exits>,
}

pub struct KrunInstance {
    id: String,
    store: StateStore,
    pid: i32,
    exits: Arc<Exits>,
    exit: Mutex<Option<Exit>>,
}

/// How often `wait` looks for the code the monitor records before it tears the
/// VM down (it wakes at once when the monitor itself exits).
const RECORDED_CODE_POLL: Duration = Duration::from_millis(50);

impl Instance for KrunInstance {
    type Config = InstanceConfig;

    fn new(id: String, cfg: InstanceConfig) -> Result<Self> {
        let store = StateStore::open(&cfg.root)?;
        let opts = CreateOptions {
            bundle: cfg.bundle,
            pid_file: None,
            console_socket: cfg.console_socket,
            // The host's choice (KRUN_OCI_VMM, /etc/krun-oci/config.toml), as the CLI.
            vmm: krun_oci::host_config::default_vmm()?,
            exe: cfg.exe,
            stdio: Some(cfg.stdio),
            systemd_cgroup: false,
        };
        let container = lifecycle::create(&store, &id, &opts)?;
        Ok(Self {
            id,
            store,
            pid: container.record.pid,
            exits: cfg.exits,
            exit: Mutex::new(None),
        })
    }

    fn pid(&self) -> u32 {
        self.pid as u32
    }

    fn start(&self) -> Result<u32> {
        lifecycle::start(&self.store, &self.id)?;
        Ok(self.pid())
    }

    fn kill(&self, signal: u32, all: bool) -> Result<()> {
        if self.try_wait().is_some() {
            return Err(Error::NotFound(format!(
                "process {}: already finished",
                self.id
            )));
        }
        match lifecycle::kill(&self.store, &self.id, signal as i32, all) {
            // containerd treats NotFound as "already finished", which it is.
            Err(krun_oci::Error::NotRunning) | Err(krun_oci::Error::NotExist) => Err(
                Error::NotFound(format!("process {}: already finished", self.id)),
            ),
            other => Ok(other?),
        }
    }

    fn delete(&self) -> Result<()> {
        match lifecycle::delete(&self.store, &self.id, false) {
            Ok(()) | Err(krun_oci::Error::NotExist) => {}
            Err(e) => return Err(e.into()),
        }
        // delete stopped the monitor if it still ran (a created task): its status
        // arrives through the reaper.
        if self.try_wait().is_none() {
            if let Some(exit) = self.exits.wait_timeout(self.pid, Duration::from_secs(10)) {
                self.exit.lock().unwrap().get_or_insert(exit);
            }
        }
        Ok(())
    }

    fn wait(&self) -> Exit {
        loop {
            if let Some(e) = self.try_wait() {
                return e;
            }
            self.exits.wait_timeout(self.pid, RECORDED_CODE_POLL);
        }
    }

    fn try_wait(&self) -> Option<Exit> {
        let mut cached = self.exit.lock().unwrap();
        if let Some(e) = *cached {
            return Some(e);
        }
        // The monitor records the code before it tears the VM down: report it
        // then, not seconds later when the monitor exits.
        let recorded = self
            .store
            .get(&self.id)
            .ok()
            .and_then(|d| d.recorded_exit_code());
        let exit = match (recorded, self.exits.get(self.pid)) {
            (Some(code), reaped) => Exit {
                status: (code & 0xff) as u32,
                at: reaped.map_or_else(SystemTime::now, |e| e.at),
            },
            (None, Some(reaped)) => reaped,
            (None, None) => return None,
        };
        *cached = Some(exit);
        Some(exit)
    }

    fn status(&self) -> Option<Status> {
        if self.try_wait().is_some() {
            return Some(Status::Stopped);
        }
        Container::load(&self.store, &self.id)
            .ok()
            .map(|c| c.status())
    }

    fn oom_killed(&self) -> bool {
        Container::load(&self.store, &self.id).is_ok_and(|c| c.dir.oom_killed())
    }
}
