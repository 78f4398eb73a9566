//! The containerd Task service over [`Instance`]s.

use std::collections::HashMap;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use containerd_shim::api;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::topics;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Context, ExitSignal, TtrpcContext, TtrpcResult};
use krun_oci::state::Status;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::error::{Error, Result};
use crate::exits::{Exit, Exits};
use crate::instance::{Instance, InstanceConfig, KrunInstance};
use crate::stdio::{self, StdioHandle, StdioPaths};

/// Version reported by Connect.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Where the shim keeps krun-oci state: `<base>/<namespace>`.
pub const DEFAULT_STATE_BASE: &str = "/run/containerd/krun-oci";
/// Overrides [`DEFAULT_STATE_BASE`] (tests, non-standard installs).
pub const STATE_BASE_ENV: &str = "KRUN_OCI_SHIM_ROOT";
/// Names the krun-oci binary; else the one next to the shim, else `krun-oci` on PATH.
pub const BINARY_ENV: &str = "KRUN_OCI_BINARY";

pub fn state_base() -> PathBuf {
    std::env::var_os(STATE_BASE_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| DEFAULT_STATE_BASE.into(), PathBuf::from)
}

pub fn state_root(namespace: &str) -> PathBuf {
    state_base().join(namespace)
}

/// The krun-oci binary the shim drives.
pub fn krun_oci_binary() -> PathBuf {
    if let Some(p) = std::env::var_os(BINARY_ENV).filter(|v| !v.is_empty()) {
        return p.into();
    }
    if let Some(sibling) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("krun-oci")))
    {
        if sibling.is_file() {
            return sibling;
        }
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("krun-oci"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| "krun-oci".into())
}

fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

/// Where task events go: containerd ([`Events`]), or a test's recorder.
pub trait EventSink: Send + Sync {
    fn publish(&self, topic: &str, event: Box<dyn MessageDyn>);
}

/// Publishes task events to containerd.
pub struct Events {
    namespace: String,
    publisher: Mutex<RemotePublisher>,
}

impl EventSink for Events {
    fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(e) = self.publisher.lock().unwrap().publish(
            Context::default(),
            topic,
            &self.namespace,
            event,
        ) {
            log::warn!("publishing {topic}: {e}");
        }
    }
}

/// An exec'd process: `krun-oci exec --detach` leaves a host relay whose pid
/// stands for the guest process (it forwards signals and exits with its code).
struct ExecProcess {
    paths: StdioPaths,
    spec: Vec<u8>,
    /// 0 until started, then the relay's pid; [`EXEC_FAILED`] if the start failed.
    pid: Mutex<i32>,
    /// Signalled when `pid` leaves 0 (Wait may come before Start: ctr sends both at once).
    started: Condvar,
    /// The exit reported for an exec whose start failed.
    start_failure: Mutex<Option<Exit>>,
    stdio: Mutex<Option<StdioHandle>>,
}

/// `ExecProcess::pid` of an exec whose start failed.
const EXEC_FAILED: i32 = -1;

impl ExecProcess {
    fn pid(&self) -> i32 {
        *self.pid.lock().unwrap()
    }

    fn set_pid(&self, pid: i32) {
        *self.pid.lock().unwrap() = pid;
        self.started.notify_all();
    }

    /// The exit, if the exec ended (or never could start).
    fn exit(&self, exits: &Exits) -> Option<Exit> {
        match self.pid() {
            0 => None,
            EXEC_FAILED => *self.start_failure.lock().unwrap(),
            pid => exits.get(pid),
        }
    }

    /// Waits for the start, then for the exit.
    fn wait(&self, exits: &Exits) -> Exit {
        let mut pid = self.pid.lock().unwrap();
        while *pid == 0 {
            pid = self.started.wait(pid).unwrap();
        }
        let pid = *pid;
        if pid == EXEC_FAILED {
            return self.start_failure.lock().unwrap().unwrap_or(Exit {
                status: 255,
                at: SystemTime::now(),
            });
        }
        exits.wait(pid)
    }
}

struct Task<I> {
    id: String,
    bundle: String,
    paths: StdioPaths,
    instance: I,
    stdio: StdioHandle,
    rootfs_mounted: Option<PathBuf>,
    exit_published: AtomicBool,
    execs: Mutex<HashMap<String, Arc<ExecProcess>>>,
}

/// The task service, generic over the container behind each task (krun-oci's
/// [`KrunInstance`]; a stub in the tests).
pub struct Service<I = KrunInstance> {
    root: PathBuf,
    exe: PathBuf,
    exits: Arc<Exits>,
    events: Arc<dyn EventSink>,
    shutdown: Arc<ExitSignal>,
    tasks: Mutex<HashMap<String, Arc<Task<I>>>>,
    counter: AtomicU64,
}

impl Service {
    pub fn new(namespace: &str, publisher: RemotePublisher, shutdown: Arc<ExitSignal>) -> Self {
        let events = Arc::new(Events {
            namespace: namespace.to_string(),
            publisher: Mutex::new(publisher),
        });
        Self::with_parts(
            state_root(namespace),
            krun_oci_binary(),
            Exits::start(),
            events,
            shutdown,
        )
    }
}

impl<I: Instance<Config = InstanceConfig>> Service<I> {
    /// A service over `root` (krun-oci's state), `exe` (the krun-oci binary),
    /// the shim's child exits and an event sink.
    pub fn with_parts(
        root: PathBuf,
        exe: PathBuf,
        exits: Arc<Exits>,
        events: Arc<dyn EventSink>,
        shutdown: Arc<ExitSignal>,
    ) -> Self {
        Self {
            root,
            exe,
            exits,
            events,
            shutdown,
            tasks: Mutex::new(HashMap::new()),
            counter: AtomicU64::new(0),
        }
    }

    fn task(&self, id: &str) -> Result<Arc<Task<I>>> {
        self.tasks
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("task {id}")))
    }

    fn exec(&self, id: &str, exec_id: &str) -> Result<(Arc<Task<I>>, Arc<ExecProcess>)> {
        let task = self.task(id)?;
        let exec = task.execs.lock().unwrap().get(exec_id).cloned();
        exec.map(|e| (task, e))
            .ok_or_else(|| Error::NotFound(format!("exec {exec_id} of task {id}")))
    }

    /// A short, unique path for a console socket (sun_path holds 108 bytes).
    fn socket_dir(&self) -> PathBuf {
        state_base().join("sockets")
    }

    fn unique(&self) -> String {
        format!(
            "{}-{}",
            std::process::id(),
            self.counter.fetch_add(1, Ordering::SeqCst)
        )
    }

    fn do_create(&self, req: api::CreateTaskRequest) -> Result<u32> {
        let id = req.id.clone();
        if self.tasks.lock().unwrap().contains_key(&id) {
            return Err(Error::AlreadyExists(format!("task {id}")));
        }
        if !req.checkpoint.is_empty() {
            return Err(Error::Unimplemented(
                "checkpoint/restore is not supported by krun-oci".into(),
            ));
        }
        let rootfs_mounted = mount_rootfs(&req)?;
        let paths = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let result = (|| {
            let mut prepared = stdio::prepare(&paths, &self.socket_dir(), &self.unique())?;
            if let Some(console) = prepared.console_socket.as_mut() {
                console.serve(&paths, &prepared.handle);
            }
            let cfg = InstanceConfig {
                root: self.root.clone(),
                bundle: PathBuf::from(&req.bundle),
                exe: self.exe.clone(),
                stdio: prepared.fds.clone(),
                console_socket: prepared.console_socket.as_ref().map(|c| c.path.clone()),
                exits: self.exits.clone(),
            };
            match I::new(id.clone(), cfg) {
                Ok(instance) => Ok((instance, prepared.handle)),
                Err(e) => {
                    if let Some(c) = &prepared.console_socket {
                        c.cancel();
                    }
                    prepared.handle.close_stdin();
                    Err(e)
                }
            }
            // `prepared.fds` drop here: only the monitor holds the fifos now, so
            // the client sees EOF when it exits.
        })();
        let (instance, handle) = match result {
            Ok(r) => r,
            Err(e) => {
                if let Some(target) = &rootfs_mounted {
                    unmount(target);
                }
                return Err(e);
            }
        };
        let pid = instance.pid();
        let task = Arc::new(Task {
            id: id.clone(),
            bundle: req.bundle.clone(),
            paths,
            instance,
            stdio: handle,
            rootfs_mounted,
            exit_published: AtomicBool::new(false),
            execs: Mutex::new(HashMap::new()),
        });
        self.tasks.lock().unwrap().insert(id.clone(), task.clone());
        self.events.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                pid,
                ..Default::default()
            }),
        );
        // TaskExit goes out as soon as the workload's code is known.
        let events = self.events.clone();
        std::thread::spawn(move || {
            task.instance.wait();
            publish_task_exit(events.as_ref(), &task);
        });
        Ok(pid)
    }

    fn do_start(&self, req: api::StartRequest) -> Result<u32> {
        if !req.exec_id.is_empty() {
            return self.start_exec(&req.id, &req.exec_id);
        }
        let task = self.task(&req.id)?;
        let pid = task.instance.start()?;
        self.events.publish(
            topics::TASK_START_EVENT_TOPIC,
            Box::new(TaskStart {
                container_id: req.id.clone(),
                pid,
                ..Default::default()
            }),
        );
        Ok(pid)
    }

    fn do_delete(&self, req: api::DeleteRequest) -> Result<api::DeleteResponse> {
        if !req.exec_id.is_empty() {
            let (task, exec) = self.exec(&req.id, &req.exec_id)?;
            let pid = exec.pid();
            let exit = exec.exit(&self.exits);
            if pid > 0 && exit.is_none() {
                return Err(Error::FailedPrecondition(format!(
                    "exec {} is still running",
                    req.exec_id
                )));
            }
            task.execs.lock().unwrap().remove(&req.exec_id);
            if pid > 0 {
                self.exits.forget(pid);
            }
            return Ok(api::DeleteResponse {
                pid: pid.max(0) as u32,
                exit_status: exit.map_or(0, |e| e.status),
                exited_at: MessageField::some(timestamp(
                    exit.map_or_else(SystemTime::now, |e| e.at),
                )),
                ..Default::default()
            });
        }
        let task = self.task(&req.id)?;
        task.instance.delete()?;
        // Execs go with their container; waiters of never-started ones wake up.
        for (_, exec) in task.execs.lock().unwrap().drain() {
            if exec.pid() == 0 {
                *exec.start_failure.lock().unwrap() = Some(Exit {
                    status: 255,
                    at: SystemTime::now(),
                });
                exec.set_pid(EXEC_FAILED);
            }
        }
        // A task deleted before it ran still ends with an exit (of its monitor).
        let exit = task.instance.try_wait().unwrap_or(Exit {
            status: 137,
            at: SystemTime::now(),
        });
        publish_task_exit(self.events.as_ref(), &task);
        if let Some(target) = &task.rootfs_mounted {
            unmount(target);
        }
        self.tasks.lock().unwrap().remove(&req.id);
        self.exits.forget(task.instance.pid() as i32);
        self.events.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: req.id.clone(),
                id: req.id.clone(),
                pid: task.instance.pid(),
                exit_status: exit.status,
                exited_at: MessageField::some(timestamp(exit.at)),
                ..Default::default()
            }),
        );
        Ok(api::DeleteResponse {
            pid: task.instance.pid(),
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    fn do_exec(&self, req: api::ExecProcessRequest) -> Result<()> {
        let task = self.task(&req.id)?;
        if task.instance.try_wait().is_some() {
            return Err(Error::FailedPrecondition(format!(
                "task {} has stopped",
                req.id
            )));
        }
        let mut execs = task.execs.lock().unwrap();
        if execs.contains_key(&req.exec_id) {
            return Err(Error::AlreadyExists(format!("exec {}", req.exec_id)));
        }
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        if spec.is_empty() {
            return Err(Error::InvalidArgument("exec without a process spec".into()));
        }
        execs.insert(
            req.exec_id.clone(),
            Arc::new(ExecProcess {
                paths: StdioPaths {
                    stdin: req.stdin,
                    stdout: req.stdout,
                    stderr: req.stderr,
                    terminal: req.terminal,
                },
                spec,
                pid: Mutex::new(0),
                started: Condvar::new(),
                start_failure: Mutex::new(None),
                stdio: Mutex::new(None),
            }),
        );
        drop(execs);
        self.events.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: req.id,
                exec_id: req.exec_id,
                ..Default::default()
            }),
        );
        Ok(())
    }

    /// Starts the exec under a detached relay (krun-oci's exec library, the
    /// code `krun-oci exec --detach` runs); the relay's pid stands for the guest
    /// process from then on.
    fn start_exec(&self, id: &str, exec_id: &str) -> Result<u32> {
        let (task, exec) = self.exec(id, exec_id)?;
        if exec.pid() != 0 {
            return Err(Error::FailedPrecondition(format!(
                "exec {exec_id} was already started"
            )));
        }
        let fail = |e: Error| {
            *exec.start_failure.lock().unwrap() = Some(Exit {
                status: 255,
                at: SystemTime::now(),
            });
            exec.set_pid(EXEC_FAILED);
            e
        };
        let process: krun_oci::exec::ProcessSource = match serde_json::from_slice(&exec.spec) {
            Ok(p) => krun_oci::exec::ProcessSource::Given(Box::new(p)),
            Err(e) => {
                return Err(fail(Error::InvalidArgument(format!(
                    "exec {exec_id}: the process spec: {e}"
                ))))
            }
        };
        let store = self.store()?;
        let process = krun_oci::container::Container::load(&store, id)
            .and_then(|c| krun_oci::exec::process_for(&c, process))
            .map_err(|e| fail(e.into()))?;
        std::fs::create_dir_all(self.socket_dir())?;
        let mut prepared = stdio::prepare(&exec.paths, &self.socket_dir(), &self.unique())?;
        if let Some(console) = prepared.console_socket.as_mut() {
            console.serve(&exec.paths, &prepared.handle);
        }
        let [i, o, e] = &prepared.fds;
        let how = krun_oci::exec::DetachedExec {
            exe: &self.exe,
            stdio: Some([i.try_clone()?, o.try_clone()?, e.try_clone()?]),
            console_socket: prepared.console_socket.as_ref().map(|c| c.path.as_path()),
        };
        let started = krun_oci::exec::spawn_detached(&store, id, &process, how);
        drop(prepared.fds);
        let pid = match started {
            Ok(pid) => pid,
            Err(e) => {
                if let Some(c) = &prepared.console_socket {
                    c.cancel();
                }
                prepared.handle.close_stdin();
                return Err(fail(e.into()));
            }
        };
        *exec.stdio.lock().unwrap() = Some(prepared.handle);
        exec.set_pid(pid);
        self.events.publish(
            topics::TASK_EXEC_STARTED_EVENT_TOPIC,
            Box::new(TaskExecStarted {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
                pid: pid as u32,
                ..Default::default()
            }),
        );
        let (events, exits, container_id, exec_id) = (
            self.events.clone(),
            self.exits.clone(),
            task.id.clone(),
            exec_id.to_string(),
        );
        std::thread::spawn(move || {
            let exit = exits.wait(pid);
            events.publish(
                topics::TASK_EXIT_EVENT_TOPIC,
                Box::new(TaskExit {
                    container_id,
                    id: exec_id,
                    pid: pid as u32,
                    exit_status: exit.status,
                    exited_at: MessageField::some(timestamp(exit.at)),
                    ..Default::default()
                }),
            );
        });
        Ok(pid as u32)
    }

    fn do_state(&self, req: api::StateRequest) -> Result<api::StateResponse> {
        let task = self.task(&req.id)?;
        if !req.exec_id.is_empty() {
            let (_, exec) = self.exec(&req.id, &req.exec_id)?;
            let pid = exec.pid();
            let exit = exec.exit(&self.exits);
            let status = match (pid, exit) {
                (_, Some(_)) => api::Status::STOPPED,
                (0, _) => api::Status::CREATED,
                _ => api::Status::RUNNING,
            };
            return Ok(api::StateResponse {
                id: req.exec_id.clone(),
                exec_id: req.exec_id,
                bundle: task.bundle.clone(),
                pid: pid.max(0) as u32,
                status: status.into(),
                stdin: exec.paths.stdin.clone(),
                stdout: exec.paths.stdout.clone(),
                stderr: exec.paths.stderr.clone(),
                terminal: exec.paths.terminal,
                exit_status: exit.map_or(0, |e| e.status),
                exited_at: exit
                    .map_or_else(MessageField::none, |e| MessageField::some(timestamp(e.at))),
                ..Default::default()
            });
        }
        let exit = task.instance.try_wait();
        let status = match task.instance.status() {
            _ if exit.is_some() => api::Status::STOPPED,
            Some(Status::Created) | Some(Status::Creating) => api::Status::CREATED,
            Some(Status::Running) => api::Status::RUNNING,
            Some(Status::Paused) => api::Status::PAUSED,
            Some(Status::Stopped) => api::Status::STOPPED,
            None => api::Status::UNKNOWN,
        };
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: task.bundle.clone(),
            pid: task.instance.pid(),
            status: status.into(),
            stdin: task.paths.stdin.clone(),
            stdout: task.paths.stdout.clone(),
            stderr: task.paths.stderr.clone(),
            terminal: task.paths.terminal,
            exit_status: exit.map_or(0, |e| e.status),
            exited_at: exit
                .map_or_else(MessageField::none, |e| MessageField::some(timestamp(e.at))),
            ..Default::default()
        })
    }

    fn store(&self) -> Result<krun_oci::state::StateStore> {
        Ok(krun_oci::state::StateStore::open(&self.root)?)
    }

    /// Freezes (the whole VM stops) or thaws the task's host cgroup, then
    /// publishes TaskPaused or TaskResumed.
    /// containerd sends the new `LinuxResources` as JSON in an `Any`.
    fn do_update(&self, req: &api::UpdateTaskRequest) -> Result<api::Empty> {
        self.task(&req.id)?;
        let any = req
            .resources
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("update without resources".into()))?;
        let resources: oci_spec::runtime::LinuxResources = serde_json::from_slice(&any.value)
            .map_err(|e| Error::InvalidArgument(format!("update resources: {e}")))?;
        krun_oci::lifecycle::update(&self.store()?, &req.id, &resources)?;
        Ok(api::Empty::default())
    }

    fn do_set_paused(&self, id: String, paused: bool) -> Result<()> {
        self.task(&id)?;
        let store = self.store()?;
        if paused {
            krun_oci::lifecycle::pause(&store, &id)?;
            let event = TaskPaused {
                container_id: id,
                ..Default::default()
            };
            self.events
                .publish(topics::TASK_PAUSED_EVENT_TOPIC, Box::new(event));
        } else {
            krun_oci::lifecycle::resume(&store, &id)?;
            let event = TaskResumed {
                container_id: id,
                ..Default::default()
            };
            self.events
                .publish(topics::TASK_RESUMED_EVENT_TOPIC, Box::new(event));
        }
        Ok(())
    }

    fn do_kill(&self, req: api::KillRequest) -> Result<()> {
        if req.exec_id.is_empty() {
            return self.task(&req.id)?.instance.kill(req.signal, req.all);
        }
        let (_, exec) = self.exec(&req.id, &req.exec_id)?;
        let pid = exec.pid();
        if pid <= 0 || self.exits.get(pid).is_some() {
            return Err(Error::NotFound(format!(
                "exec {}: process already finished",
                req.exec_id
            )));
        }
        let sig = Signal::try_from(req.signal as i32)
            .map_err(|_| Error::InvalidArgument(format!("invalid signal {}", req.signal)))?;
        // The relay forwards what it receives into the guest.
        nix::sys::signal::kill(Pid::from_raw(pid), sig)?;
        Ok(())
    }

    fn do_wait(&self, req: api::WaitRequest) -> Result<api::WaitResponse> {
        let exit = if req.exec_id.is_empty() {
            self.task(&req.id)?.instance.wait()
        } else {
            let (_, exec) = self.exec(&req.id, &req.exec_id)?;
            exec.wait(&self.exits)
        };
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    fn stdio_of<R>(
        &self,
        id: &str,
        exec_id: &str,
        f: impl FnOnce(&StdioHandle, i32) -> R,
    ) -> Result<R> {
        if exec_id.is_empty() {
            let task = self.task(id)?;
            return Ok(f(&task.stdio, task.instance.pid() as i32));
        }
        let (_, exec) = self.exec(id, exec_id)?;
        let pid = exec.pid();
        let stdio = exec.stdio.lock().unwrap();
        match stdio.as_ref() {
            Some(s) => Ok(f(s, pid)),
            None => Err(Error::FailedPrecondition(format!(
                "exec {exec_id} has not started"
            ))),
        }
    }
}

/// Publishes the task's TaskExit once (by the waiter, or by Delete if it is first).
fn publish_task_exit<I: Instance>(events: &dyn EventSink, task: &Task<I>) {
    let Some(exit) = task.instance.try_wait() else {
        return;
    };
    if task.exit_published.swap(true, Ordering::SeqCst) {
        return;
    }
    // As containerd's runc shim: the OOM event, then the exit it caused.
    if task.instance.oom_killed() {
        events.publish(
            topics::TASK_OOM_EVENT_TOPIC,
            Box::new(TaskOOM {
                container_id: task.id.clone(),
                ..Default::default()
            }),
        );
    }
    events.publish(
        topics::TASK_EXIT_EVENT_TOPIC,
        Box::new(TaskExit {
            container_id: task.id.clone(),
            id: task.id.clone(),
            pid: task.instance.pid(),
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        }),
    );
}

/// Mounts containerd's rootfs mounts (images) at `<bundle>/rootfs`. `ctr run
/// --rootfs DIR` sends none: config.json names the directory itself.
fn mount_rootfs(req: &api::CreateTaskRequest) -> Result<Option<PathBuf>> {
    if req.rootfs.is_empty() {
        return Ok(None);
    }
    let target = Path::new(&req.bundle).join("rootfs");
    std::fs::create_dir_all(&target)?;
    for m in &req.rootfs {
        containerd_shim::mount::mount_rootfs(
            Some(m.type_.as_str()),
            Some(m.source.as_str()),
            &m.options,
            &target,
        )
        .map_err(|e| {
            unmount(&target);
            Error::Internal(format!(
                "mounting {} ({}) at {}: {e}",
                m.source,
                m.type_,
                target.display()
            ))
        })?;
    }
    Ok(Some(target))
}

fn unmount(target: &Path) {
    if let Err(e) = containerd_shim::mount::umount_recursive(target.to_str(), libc::MNT_DETACH) {
        log::warn!("unmounting {}: {e}", target.display());
    }
}

impl<I: Instance<Config = InstanceConfig>> containerd_shim::Task for Service<I> {
    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        Ok(self.do_state(req)?)
    }

    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let pid = self.do_create(req)?;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let pid = self.do_start(req)?;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        Ok(self.do_delete(req)?)
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let task = self.task(&req.id)?;
        if task.instance.try_wait().is_some() {
            return Ok(api::PidsResponse::default());
        }
        let processes = krun_oci::lifecycle::ps(&self.store()?, &req.id).map_err(Error::from)?;
        Ok(api::PidsResponse {
            processes: processes
                .into_iter()
                .map(|p| containerd_shim::protos::types::task::ProcessInfo {
                    pid: p.pid as u32,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.do_set_paused(req.id, true)?;
        Ok(api::Empty::default())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        self.do_set_paused(req.id, false)?;
        Ok(api::Empty::default())
    }

    fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(Error::Unimplemented("checkpoint is not supported by krun-oci".into()).into())
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        self.do_kill(req)?;
        Ok(api::Empty::default())
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        self.do_exec(req)?;
        Ok(api::Empty::default())
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let resized = self.stdio_of(&req.id, &req.exec_id, |s, pid| {
            s.resize(req.width, req.height).map(|r| (r, pid))
        })??;
        // The monitor (or exec relay) reads the new size from its pty on SIGWINCH
        // and passes it into the guest.
        if let (true, pid) = resized {
            if pid > 0 {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGWINCH);
            }
        }
        Ok(api::Empty::default())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        if req.stdin {
            self.stdio_of(&req.id, &req.exec_id, |s, _| s.close_stdin())?;
        }
        Ok(api::Empty::default())
    }

    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        Ok(self.do_update(&req)?)
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        Ok(self.do_wait(req)?)
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        self.task(&req.id)?;
        Err(Error::Unimplemented("stats are not implemented yet for krun-oci VMs".into()).into())
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self
            .tasks
            .lock()
            .unwrap()
            .get(&req.id)
            .map_or(0, |t| t.instance.pid());
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: VERSION.to_string(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        if !req.now && !self.tasks.lock().unwrap().is_empty() {
            return Ok(api::Empty::default());
        }
        remove_own_socket();
        self.shutdown.signal();
        Ok(api::Empty::default())
    }
}

/// Removes the shim's socket before Shutdown answers. containerd deletes the
/// bundle, and the `address` file in it, as soon as Shutdown returns; the crate
/// reads that file only after its server has stopped, and when the bundle is
/// already gone it exits without removing the socket (the Go shims remove it in
/// their Shutdown handler too). Open connections outlive the unlink.
fn remove_own_socket() {
    let Ok(address) = containerd_shim::util::read_address() else {
        return;
    };
    let path = Path::new(address.strip_prefix("unix://").unwrap_or(&address));
    if path.metadata().is_ok_and(|m| m.file_type().is_socket()) {
        if let Err(e) = std::fs::remove_file(path) {
            log::warn!("removing {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    //! The task service over a stub instance: its bookkeeping, events and error
    //! codes, with no VM and no krun-oci underneath.
    use super::*;
    use containerd_shim::protos::ttrpc::Code;
    use std::time::Duration;

    /// A container that is created, started and killed in memory.
    struct StubInstance {
        state: Mutex<(Status, Option<Exit>)>,
        changed: Condvar,
    }

    const STUB_PID: u32 = 4242;

    impl Instance for StubInstance {
        type Config = InstanceConfig;

        fn new(id: String, cfg: InstanceConfig) -> Result<Self> {
            if id == "boot-fails" {
                return Err(krun_oci::Error::BootFailed {
                    reason: "the VM stopped before the guest was ready".into(),
                    console_tail: String::new(),
                }
                .into());
            }
            assert!(cfg.bundle.is_dir(), "{}", cfg.bundle.display());
            Ok(Self {
                state: Mutex::new((Status::Created, None)),
                changed: Condvar::new(),
            })
        }
        fn pid(&self) -> u32 {
            STUB_PID
        }
        fn start(&self) -> Result<u32> {
            let mut s = self.state.lock().unwrap();
            match s.0 {
                Status::Created => s.0 = Status::Running,
                Status::Stopped => return Err(krun_oci::Error::StartStopped.into()),
                _ => return Err(krun_oci::Error::AlreadyRunning.into()),
            }
            Ok(STUB_PID)
        }
        fn kill(&self, signal: u32, _all: bool) -> Result<()> {
            let mut s = self.state.lock().unwrap();
            if s.1.is_some() {
                return Err(Error::NotFound("process: already finished".into()));
            }
            *s = (
                Status::Stopped,
                Some(Exit {
                    status: 128 + signal,
                    at: SystemTime::now(),
                }),
            );
            self.changed.notify_all();
            Ok(())
        }
        fn delete(&self) -> Result<()> {
            match self.state.lock().unwrap().0 {
                Status::Running => Err(krun_oci::Error::NotStopped {
                    id: "stub".into(),
                    status: "running".into(),
                }
                .into()),
                _ => Ok(()),
            }
        }
        fn wait(&self) -> Exit {
            let mut s = self.state.lock().unwrap();
            loop {
                if let Some(e) = s.1 {
                    return e;
                }
                s = self.changed.wait(s).unwrap();
            }
        }
        fn try_wait(&self) -> Option<Exit> {
            self.state.lock().unwrap().1
        }
        fn status(&self) -> Option<Status> {
            Some(self.state.lock().unwrap().0)
        }
        fn oom_killed(&self) -> bool {
            false
        }
    }

    #[derive(Default)]
    struct Recorded(Mutex<Vec<(String, u32)>>);

    impl EventSink for Recorded {
        fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
            // The exit status where the event has one (TaskExit, TaskDelete).
            let status = event
                .downcast_box::<TaskExit>()
                .map(|e| e.exit_status)
                .unwrap_or(0);
            self.0.lock().unwrap().push((topic.to_string(), status));
        }
    }

    impl Recorded {
        fn topics(&self) -> Vec<String> {
            self.0
                .lock()
                .unwrap()
                .iter()
                .map(|(t, _)| t.clone())
                .collect()
        }
    }

    fn service(events: Arc<Recorded>) -> (Service<StubInstance>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let svc = Service::with_parts(
            dir.path().join("state"),
            "/nonexistent/krun-oci".into(),
            Arc::new(Exits::default()),
            events,
            Arc::new(ExitSignal::default()),
        );
        (svc, dir)
    }

    fn create_req(id: &str, bundle: &Path) -> api::CreateTaskRequest {
        api::CreateTaskRequest {
            id: id.into(),
            bundle: bundle.to_string_lossy().into_owned(),
            ..Default::default()
        }
    }

    fn status_of(svc: &Service<StubInstance>, id: &str) -> Result<api::Status> {
        let state = svc.do_state(api::StateRequest {
            id: id.into(),
            ..Default::default()
        })?;
        Ok(state.status.enum_value_or_default())
    }

    #[test]
    fn create_start_kill_wait_delete_over_a_stub() {
        let events = Arc::new(Recorded::default());
        let (svc, dir) = service(events.clone());
        let bundle = dir.path().join("bundle");
        std::fs::create_dir_all(&bundle).unwrap();

        assert_eq!(svc.do_create(create_req("a", &bundle)).unwrap(), STUB_PID);
        assert_eq!(status_of(&svc, "a").unwrap(), api::Status::CREATED);
        let again = svc.do_create(create_req("a", &bundle)).unwrap_err();
        assert_eq!(again.code(), Code::ALREADY_EXISTS);

        let start = |id: &str| {
            svc.do_start(api::StartRequest {
                id: id.into(),
                ..Default::default()
            })
        };
        assert_eq!(start("a").unwrap(), STUB_PID);
        assert_eq!(status_of(&svc, "a").unwrap(), api::Status::RUNNING);
        assert_eq!(start("a").unwrap_err().code(), Code::FAILED_PRECONDITION);
        let delete = |id: &str| {
            svc.do_delete(api::DeleteRequest {
                id: id.into(),
                ..Default::default()
            })
        };
        assert_eq!(delete("a").unwrap_err().code(), Code::FAILED_PRECONDITION);

        let kill = |id: &str| {
            svc.do_kill(api::KillRequest {
                id: id.into(),
                signal: libc::SIGTERM as u32,
                ..Default::default()
            })
        };
        kill("a").unwrap();
        let waited = svc
            .do_wait(api::WaitRequest {
                id: "a".into(),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(waited.exit_status, 143);
        assert_eq!(status_of(&svc, "a").unwrap(), api::Status::STOPPED);
        // A finished process is NotFound to containerd.
        assert_eq!(kill("a").unwrap_err().code(), Code::NOT_FOUND);

        // TaskExit, once, from the waiter thread.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !events
            .topics()
            .iter()
            .any(|t| t == topics::TASK_EXIT_EVENT_TOPIC)
        {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                events.topics()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(delete("a").unwrap().exit_status, 143);
        assert_eq!(status_of(&svc, "a").unwrap_err().code(), Code::NOT_FOUND);
        let recorded = events.0.lock().unwrap().clone();
        let exits: Vec<_> = recorded
            .iter()
            .filter(|(t, _)| t == topics::TASK_EXIT_EVENT_TOPIC)
            .collect();
        assert_eq!(exits.len(), 1, "{recorded:?}");
        assert_eq!(exits[0].1, 143);
        assert_eq!(
            events.topics(),
            [
                topics::TASK_CREATE_EVENT_TOPIC,
                topics::TASK_START_EVENT_TOPIC,
                topics::TASK_EXIT_EVENT_TOPIC,
                topics::TASK_DELETE_EVENT_TOPIC,
            ]
        );
        assert_eq!(start("a").unwrap_err().code(), Code::NOT_FOUND);
    }

    #[test]
    fn a_failed_boot_is_internal_and_leaves_no_task() {
        let events = Arc::new(Recorded::default());
        let (svc, dir) = service(events.clone());
        let e = svc
            .do_create(create_req("boot-fails", dir.path()))
            .unwrap_err();
        assert_eq!(e.code(), Code::INTERNAL, "{e}");
        assert!(e.to_string().contains("before the guest was ready"), "{e}");
        assert_eq!(
            status_of(&svc, "boot-fails").unwrap_err().code(),
            Code::NOT_FOUND
        );
        assert!(events.topics().is_empty(), "{:?}", events.topics());
    }
}
