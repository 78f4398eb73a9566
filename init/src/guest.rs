//! The running guest: shared state, the events stream, the control service,
//! exec/pty sessions and the end of the container.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use krun_oci_protocol::{
    self as proto, Frame, Message, Process, ProtocolError, SignalTarget, MAX_DATA_CHUNK,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::procfs;
use crate::reaper::Reaper;
use crate::spawn::{self, set_winsize, StdioMode};

/// How "power off" is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Halt {
    PowerOff,
    /// `krun_oci.halt=reboot` (acpi=off microvm; QEMU runs with -no-reboot).
    Reboot,
    /// Host-sandbox harness: just exit.
    Exit,
}

/// `main_pid` sentinel values (positive = the running main's pid).
const MAIN_NONE: i32 = 0;
const MAIN_SPAWNING: i32 = -1;
const MAIN_EXITED: i32 = -2;

/// How long remaining processes get between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(2);

/// The main's exit code in the container root, a fallback for the host.
use krun_oci_protocol::contract::EXIT_CODE_FILE;

#[cfg(feature = "hostile")]
mod hostile;

/// Main stdin: what the host sent on the events stream.
enum StdinChunk {
    Data(Vec<u8>),
    Close,
}

pub struct Guest {
    pub reaper: Reaper,
    pub halt: Halt,
    /// Directory handle of the container root (for `/.a3s_exit_code`); unset
    /// until `Setup` on a VM booted with a deferred root (a pooled VM).
    root: std::sync::OnceLock<OwnedFd>,
    /// The `rootfs` share's tag when the root is deferred.
    deferred_root_tag: Option<String>,
    /// A detached, writable clone of the root mount, taken before a read-only
    /// root is remounted: the exit code can still be written, and the container
    /// cannot see or reach it.
    root_rw: std::sync::OnceLock<OwnedFd>,
    main_pid: AtomicI32,
    main_pty: Mutex<Option<File>>,
    main_stdin_tx: SyncSender<StdinChunk>,
    main_stdin_rx: Mutex<Option<Receiver<StdinChunk>>>,
    events: Mutex<Option<UnixStream>>,
    /// Set when the host's side of the events stream is gone (its reader ended).
    events_ended: (Mutex<bool>, std::sync::Condvar),
    execs: Mutex<HashMap<String, i32>>,
    finishing: AtomicBool,
    /// seccomp filter and resource cgroup from Setup, for the main and every exec.
    confinement: std::sync::OnceLock<spawn::Confinement>,
    /// The kernel's OOM-kill count when the main started.
    oom_kills_at_start: std::sync::atomic::AtomicU64,
    /// `spec.process` of `Setup`: what a `SpawnMain` naming no process runs.
    setup_process: std::sync::OnceLock<Process>,
    /// Where the host found that process's program (`Setup.main_program`).
    setup_program: std::sync::OnceLock<PathBuf>,
    /// The main, being forked and set up after `Setup`; `SpawnMain` releases it.
    prepared_main: Mutex<Option<PreparingMain>>,
    /// Whether the main's pid is its relay's (`spawn::Spawned::relayed`).
    main_relayed: AtomicBool,
    /// The main's namespaces, open for the execs to join, with the main's pid.
    main_namespaces: Mutex<Option<(i32, Arc<spawn::MainNamespaces>)>>,
}

/// The main's fork and setup, run in a thread of its own (the host's create goes
/// on meanwhile), with the process it is prepared from.
struct PreparingMain {
    process: Process,
    /// The thread's result. Not joined: under TCG a join cost 0.2–3 ms of `start`.
    job: mpsc::Receiver<Preparation>,
    /// The result once received (`None` also when the thread died without one).
    done: Option<Option<Preparation>>,
}

/// What the preparing thread hands over, its last act. Its log line is written
/// by whoever takes it, later: written by the thread, it delayed the answer to
/// a `start` that was waiting.
struct Preparation {
    main: Result<spawn::Prepared, spawn::SpawnError>,
    /// Its log line, for whoever takes it to write once the hurry is over.
    note: String,
}

impl PreparingMain {
    /// Forks and sets up `process` in the background; `label` names it in the log.
    fn start(
        guest: &Arc<Guest>,
        label: &'static str,
        process: Process,
        program: Option<PathBuf>,
        stdio: StdioMode,
        confinement: spawn::Confinement,
    ) -> io::Result<Self> {
        let g = guest.clone();
        let wanted = process.clone();
        let (done, job) = mpsc::sync_channel(1);
        thread::Builder::new()
            .name("prepare-main".into())
            .spawn(move || {
                let t0 = Instant::now();
                let prepared = spawn::prepare(
                    &process,
                    stdio,
                    &g.reaper,
                    confinement,
                    None,
                    program.as_deref(),
                );
                let found = match program {
                    Some(_) => "found by the host",
                    None => "looked up here",
                };
                let note = format!(
                    "{label} prepared in {} ms (program {found})",
                    t0.elapsed().as_millis()
                );
                let _ = done.send(Preparation {
                    main: prepared,
                    note,
                });
            })?;
        Ok(Self {
            process: wanted,
            job,
            done: None,
        })
    }

    /// Waits for the thread's result (once).
    fn result(&mut self) -> Option<&Preparation> {
        self.done
            .get_or_insert_with(|| self.job.recv().ok())
            .as_ref()
    }

    /// Waits for the setup: the child, with its log line, if it was prepared
    /// from the process `asked` for (`None`: the spec's, as prepared) and still
    /// waits; else `None` (a child dropped here exits unreleased).
    fn finish(mut self, asked: Option<&Process>) -> Option<(spawn::Prepared, String)> {
        self.result();
        let Some(Some(Preparation { main, note })) = self.done.take() else {
            log::warn!("preparing the main panicked; forking it again");
            return None;
        };
        // The prepared process is the spec's, which `SpawnMain` names by naming none.
        let same = asked.is_none_or(|p| *p == self.process);
        match main {
            Ok(p) if same && p.waiting() => Some((p, note)),
            Ok(_) => None,
            Err(e) => {
                log::warn!("the prepared main failed ({e}); forking it again");
                None
            }
        }
    }
}

impl Guest {
    /// `root`: the container root already switched into; `Err(tag)`: deferred,
    /// the root is the share `tag`'s entry that `Setup` names.
    pub fn new(halt: Halt, root: Result<OwnedFd, String>) -> Arc<Self> {
        let (tx, rx) = mpsc::sync_channel(64);
        let (root, deferred_root_tag) = match root {
            Ok(fd) => (std::sync::OnceLock::from(fd), None),
            Err(tag) => (std::sync::OnceLock::new(), Some(tag)),
        };
        Arc::new(Self {
            reaper: Reaper::default(),
            halt,
            root,
            deferred_root_tag,
            root_rw: std::sync::OnceLock::new(),
            main_pid: AtomicI32::new(MAIN_NONE),
            main_pty: Mutex::new(None),
            main_stdin_tx: tx,
            main_stdin_rx: Mutex::new(Some(rx)),
            events: Mutex::new(None),
            events_ended: (Mutex::new(false), std::sync::Condvar::new()),
            execs: Mutex::new(HashMap::new()),
            finishing: AtomicBool::new(false),
            confinement: std::sync::OnceLock::new(),
            oom_kills_at_start: std::sync::atomic::AtomicU64::new(0),
            setup_process: std::sync::OnceLock::new(),
            setup_program: std::sync::OnceLock::new(),
            prepared_main: Mutex::new(None),
            main_relayed: AtomicBool::new(false),
            main_namespaces: Mutex::new(None),
        })
    }

    /// Sends a frame on the events stream; false once the stream is gone.
    fn send_event(&self, frame: &Frame) -> bool {
        let mut ev = lock(&self.events);
        let Some(s) = ev.as_mut() else {
            return false;
        };
        if let Err(e) = proto::write_frame(s, frame) {
            log::warn!("events stream: {e}");
            *ev = None;
            return false;
        }
        true
    }

    /// Takes over the events stream (after Ready) and serves what the host sends on it.
    pub fn attach_events(self: &Arc<Self>, stream: UnixStream) -> io::Result<()> {
        let mut reader = stream.try_clone()?;
        *lock(&self.events) = Some(stream);
        let g = self.clone();
        thread::Builder::new()
            .name("events-in".into())
            .spawn(move || {
                g.read_events(&mut reader);
                *lock(&g.events_ended.0) = true;
                g.events_ended.1.notify_all();
            })?;
        Ok(())
    }

    /// What the host sends on the events stream, until it ends.
    fn read_events(&self, reader: &mut UnixStream) {
        loop {
            match proto::read_frame(reader) {
                Ok(Frame::Stdin(d)) => {
                    let _ = self.main_stdin_tx.send(StdinChunk::Data(d));
                }
                Ok(Frame::StdinClose) => {
                    let _ = self.main_stdin_tx.send(StdinChunk::Close);
                }
                Ok(Frame::Message(Message::Heartbeat)) => {
                    self.send_event(&Frame::Message(Message::HeartbeatAck));
                }
                Ok(other) => log::warn!("events stream: ignoring {other:?}"),
                Err(ProtocolError::Malformed(e)) => log::warn!("events stream: {e}"),
                Err(ProtocolError::UnknownKind(k)) => log::warn!("events stream: kind {k}"),
                Err(e) => {
                    log::info!("events stream from host ended: {e}");
                    break;
                }
            }
        }
    }

    /// Waits until the host's side of the events stream is gone, at most `limit`.
    fn await_events_end(&self, limit: Duration) {
        let (ended, cv) = &self.events_ended;
        let _ = cv.wait_timeout_while(lock(ended), limit, |ended| !*ended);
    }

    /// A pooled VM, before it reports Ready: walk the guest kernel paths its
    /// setup and spawn will take (warm.rs). False where there is nothing to warm
    /// (a VM booted into its container's root).
    pub fn warm_up(self: &Arc<Self>) -> bool {
        let Some(tag) = &self.deferred_root_tag else {
            return false;
        };
        crate::warm::warm_up(self, tag);
        true
    }

    /// A pooled VM's root: the host has attached the container's root at
    /// `entry` of the rootfs share; switch into it, as a cold boot does at boot.
    fn switch_to_deferred_root(&self, entry: Option<&str>) -> Result<(), String> {
        match (&self.deferred_root_tag, entry) {
            (None, None) => Ok(()),
            (None, Some(_)) => {
                Err("this VM booted into its root; no deferred root to attach".into())
            }
            (Some(_), None) => Err("this VM's root is deferred and setup named none".into()),
            (Some(_), Some(_)) if self.root.get().is_some() => {
                Err("the deferred root is already attached".into())
            }
            (Some(tag), Some(entry)) => {
                crate::boot::switch_to_share_entry(tag, entry)
                    .map_err(|e| format!("switching to the container's root: {e}"))?;
                let root =
                    File::open("/").map_err(|e| format!("opening the container's root: {e}"))?;
                let _ = self.root.set(OwnedFd::from(root));
                Ok(())
            }
        }
    }

    /// `root.readonly`: keep a detached writable clone of the root mount for the
    /// exit-code file, then remount the container's root read-only.
    fn apply_readonly_root(&self, spec: &oci_spec::runtime::Spec) -> Result<(), String> {
        if !spec
            .root()
            .as_ref()
            .and_then(|r| r.readonly())
            .unwrap_or(false)
            || self.root_rw.get().is_some()
        {
            return Ok(());
        }
        const OPEN_TREE_CLONE: libc::c_uint = 1;
        // SAFETY: open_tree with a NUL-terminated path and flags; returns a new fd or -1.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_open_tree,
                libc::AT_FDCWD,
                c"/".as_ptr(),
                OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(format!(
                "cloning the root mount: {}",
                spawn::errno_text(&io::Error::last_os_error())
            ));
        }
        // SAFETY: the syscall returned a fresh fd that nothing else owns.
        let clone = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
        nix::mount::mount(
            None::<&str>,
            "/",
            None::<&str>,
            nix::mount::MsFlags::MS_REMOUNT
                | nix::mount::MsFlags::MS_BIND
                | nix::mount::MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(|e| format!("remounting the root read-only: {}", e.desc().to_lowercase()))?;
        let _ = self.root_rw.set(clone);
        Ok(())
    }

    // ---- control service ------------------------------------------------

    /// One control connection: Hello, then requests answered in order.
    pub fn serve_control(self: &Arc<Self>, mut conn: UnixStream) {
        if let Err(e) = hello(&mut conn) {
            log::warn!("control: {e}");
            return;
        }
        loop {
            let reply = match proto::read_frame(&mut conn) {
                Ok(Frame::Message(Message::Shutdown)) => {
                    let _ = proto::send(&mut conn, Message::Ack);
                    let g = self.clone();
                    thread::spawn(move || g.shutdown());
                    return;
                }
                Ok(Frame::Message(Message::SpawnMain { process })) => {
                    if self.serve_spawn_main(&mut conn, process.as_ref()) {
                        continue;
                    }
                    return;
                }
                Ok(Frame::Message(m)) => self.handle_control(m),
                Ok(other) => nack(format!(
                    "unexpected frame on the control port: {:?}",
                    kind_of(&other)
                )),
                // The frame was consumed whole: answer and keep going.
                Err(e @ (ProtocolError::Malformed(_) | ProtocolError::UnknownKind(_))) => {
                    nack(e.to_string())
                }
                Err(ProtocolError::Closed) => return,
                // Framing is lost (bad length, truncated): answer if possible, then drop.
                Err(e) => {
                    let _ = proto::send(&mut conn, nack(e.to_string()));
                    log::warn!("control: dropping connection: {e}");
                    return;
                }
            };
            if proto::send(&mut conn, reply).is_err() {
                return;
            }
        }
    }

    fn handle_control(self: &Arc<Self>, msg: Message) -> Message {
        let result = match msg {
            Message::Heartbeat => return Message::HeartbeatAck,
            Message::AwaitMain => return self.await_main(),
            Message::Setup {
                spec,
                seccomp,
                network,
                deferred_root,
                prepare_main,
                main_program,
            } => seccomp
                .as_ref()
                .map(spawn::Seccomp::decode)
                .transpose()
                .and_then(|filter| {
                    // Each step's time in the log, as boot's are (docs/guest-init.md).
                    let mut t = crate::boot::Timings::new(std::time::Instant::now());
                    self.switch_to_deferred_root(deferred_root.as_deref())?;
                    t.mark("setup: root");
                    crate::network::apply(&network)?;
                    t.mark("setup: network");
                    // Before the config's mounts, which may make /sys/fs/cgroup read-only.
                    // The host-sandbox harness shares the host's cgroups: none of its own.
                    let cgroup = match self.halt {
                        Halt::Exit => None,
                        _ => crate::resources::apply(&spec)?,
                    };
                    t.mark("setup: resources");
                    apply_setup(&spec)?;
                    t.mark("setup: mounts and the rest of the config");
                    self.apply_readonly_root(&spec)?;
                    let namespaces = spawn::Namespaces::from_spec(&spec)?;
                    t.mark("setup: namespaces");
                    let _ = self.confinement.set(spawn::Confinement {
                        seccomp: filter.map(Arc::new),
                        cgroup: cgroup.map(Arc::new),
                        namespaces: Some(Arc::new(namespaces)),
                    });
                    if let Some(p) = main_program.map(PathBuf::from).filter(|p| p.is_absolute()) {
                        let _ = self.setup_program.set(p);
                    }
                    if let Some(process) = spec.process().clone() {
                        let _ = self.setup_process.set(process.clone());
                        if prepare_main {
                            self.prepare_main(process);
                        }
                    }
                    Ok(Message::Ack)
                }),
            Message::ConfigureNetwork { network } => {
                crate::network::apply(&network).map(|()| Message::Ack)
            }
            Message::Signal { target, signal } => {
                self.signal(&target, signal).map(|()| Message::Ack)
            }
            Message::Resize { rows, cols } => match lock(&self.main_pty).as_ref() {
                Some(pty) => set_winsize(pty, rows, cols)
                    .map(|()| Message::Ack)
                    .map_err(|e| format!("resize: {}", spawn::errno_text(&e))),
                None => Err("the main process has no terminal".into()),
            },
            Message::UpdatePids { limit } => {
                crate::resources::update_pids(self.cgroup_dir(), limit).map(|()| Message::Ack)
            }
            Message::Ps => Ok(Message::Processes {
                processes: procfs::list(),
            }),
            other => Err(format!(
                "unexpected message on the control port: {}",
                name_of(&other)
            )),
        };
        result.unwrap_or_else(nack)
    }

    /// The container cgroup's directory, once `Setup` made it.
    fn cgroup_dir(&self) -> Option<&OwnedFd> {
        let cgroup = self.confinement.get().and_then(|c| c.cgroup.as_ref());
        cgroup.map(|c| &c.dir)
    }

    /// The container's OOM kills so far (`resources::oom_kills`).
    fn oom_kills(&self) -> u64 {
        crate::resources::oom_kills(self.cgroup_dir())
    }

    fn confinement(&self) -> spawn::Confinement {
        self.confinement.get().cloned().unwrap_or_default()
    }

    /// The namespaces of the main `main` for an exec to join: opened once per main
    /// (by its watcher after `start`, or by an exec that comes first).
    fn main_namespaces(&self, main: i32) -> Result<Arc<spawn::MainNamespaces>, String> {
        let mut cached = lock(&self.main_namespaces);
        if let Some((_, namespaces)) = cached.as_ref().filter(|(pid, _)| *pid == main) {
            return Ok(namespaces.clone());
        }
        let namespaces = Arc::new(
            self.confinement()
                .namespaces
                .unwrap_or_default()
                .open_main(main, self.main_relayed.load(Ordering::SeqCst))?,
        );
        *cached = Some((main, namespaces.clone()));
        Ok(namespaces)
    }

    /// `AwaitMain`: the main prepared after `Setup`, waited for; its failure in
    /// `SpawnMain`'s words. Nothing prepared (create-time hooks): nothing to wait for.
    fn await_main(&self) -> Message {
        let mut prepared = lock(&self.prepared_main);
        let Some(job) = prepared.as_mut() else {
            return Message::Ack;
        };
        match job.result() {
            Some(Preparation { main: Ok(_), .. }) => Message::Ack,
            Some(Preparation { main: Err(e), .. }) => e.clone().into_nack(),
            None => nack("preparing the main panicked".into()),
        }
    }

    /// Forks and sets up the main in the background (the host's create goes on
    /// meanwhile); `SpawnMain` waits for it and releases it.
    fn prepare_main(self: &Arc<Self>, process: Process) {
        let stdio = main_stdio(&process);
        let program = self.setup_program.get().cloned();
        match PreparingMain::start(self, "main", process, program, stdio, self.confinement()) {
            Ok(job) => *lock(&self.prepared_main) = Some(job),
            // Nothing lost: SpawnMain forks it then.
            Err(e) => log::warn!("preparing the main: {e}"),
        }
    }

    /// The warm-up's run of the main's own path (warm.rs), guest-init's code
    /// included: `process` prepared in the background as after `Setup`, then
    /// taken, answered for and released before its exec as at `SpawnMain`.
    pub fn rehearse_main(
        self: &Arc<Self>,
        process: Process,
        program: PathBuf,
        confinement: spawn::Confinement,
    ) -> Result<spawn::Spawned, String> {
        let job = PreparingMain::start(
            self,
            "warm-up child",
            process.clone(),
            Some(program),
            StdioMode::Pipes,
            confinement,
        )
        .map_err(|e| e.to_string())?;
        let (prepared, note) = job.finish(None).ok_or("not prepared")?;
        log::info!("{note}");
        Frame::Message(Message::MainStarted {
            pid: prepared.pid(),
        })
        .encode()
        .map_err(|e| e.to_string())?;
        Ok(prepared.release_before_exec())
    }

    /// `SpawnMain`: answers, then releases the main and starts its pumps and
    /// watcher (the pipes hold what the main writes meanwhile, and its exit
    /// waits in the reaper's channel).
    ///
    /// The answer goes before the word: the guest's vCPUs share one host thread
    /// under TCG, and a main released first took it for its exec before the
    /// answer left (1–4 ms of a `start`). The answer's write kicks the vsock
    /// queue itself (the kernel's fast path), so it is on its way to the host
    /// when the word is written, right after, by this same thread.
    fn serve_spawn_main(self: &Arc<Self>, conn: &mut UnixStream, asked: Option<&Process>) -> bool {
        #[cfg(feature = "hostile")]
        if let Some((process, args)) = asked
            .or(self.setup_process.get())
            .and_then(|p| Some((p, hostile::requested(p)?)))
        {
            let reply = hostile::attack(self, process, args).unwrap_or_else(nack);
            return proto::send(conn, reply).is_ok();
        }
        match self.claim_main(asked) {
            Ok((main, note)) => {
                let sent = proto::send(conn, Message::MainStarted { pid: main.pid() }).is_ok();
                self.watch_main(self.release_main(main), note);
                sent
            }
            Err(e) => proto::send(conn, e.into_nack()).is_ok(),
        }
    }

    /// The main, set up and waiting for the word to exec: the prepared one, or
    /// forked now from the process `asked` for (`None`: the spec's of `Setup`).
    /// From here it is the container's main (its pid, its terminal): once
    /// released, its exec failing is its own failure (exit status 126, or 127
    /// when not found, the reason on its stderr, as under runc).
    /// With it, the log line of its preparation in the background, if it had one.
    fn claim_main(
        self: &Arc<Self>,
        asked: Option<&Process>,
    ) -> Result<(spawn::Prepared, Option<String>), spawn::SpawnError> {
        let Some(process) = asked.or(self.setup_process.get()) else {
            return Err("no process to run: SpawnMain named none and no Setup gave one".into());
        };
        if self
            .main_pid
            .compare_exchange(MAIN_NONE, MAIN_SPAWNING, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return Err("the main process was already started".into());
        }
        // None: the main is forked afresh.
        let prepared = lock(&self.prepared_main)
            .take()
            .and_then(|job| job.finish(asked));
        let (prepared, note) = match prepared {
            Some((p, note)) => (Ok(p), Some(note)),
            None => (
                spawn::prepare(
                    process,
                    main_stdio(process),
                    &self.reaper,
                    self.confinement(),
                    None,
                    // The host found the program of the spec's process.
                    asked
                        .map_or(self.setup_program.get(), |_| None)
                        .map(PathBuf::as_path),
                ),
                None,
            ),
        };
        let main = match prepared {
            Ok(p) => p,
            Err(reason) => {
                // Nothing ran: a later spawn-main may try again.
                self.main_pid.store(MAIN_NONE, Ordering::SeqCst);
                return Err(reason);
            }
        };
        self.main_relayed.store(main.relayed(), Ordering::SeqCst);
        self.main_pid.store(main.pid(), Ordering::SeqCst);
        *lock(&self.main_pty) = main.pty().and_then(|p| p.try_clone().ok());
        Ok((main, note))
    }

    /// Lets the claimed main go on into its exec, the container's OOM-kill
    /// count taken first (what the main's exit compares with; read here, after
    /// `SpawnMain`'s answer: under TCG the read takes 1-3 ms).
    pub fn release_main(&self, main: spawn::Prepared) -> spawn::Spawned {
        self.oom_kills_at_start
            .store(self.oom_kills(), Ordering::SeqCst);
        main.release_before_exec()
    }

    /// The released main's output pumps, stdin feeder and exit watcher.
    /// `note`: the log line of its preparation.
    fn watch_main(self: &Arc<Self>, spawned: spawn::Spawned, note: Option<String>) {
        // Here, after the answer: a log line costs ~0.5 ms under TCG.
        if let Some(note) = note {
            log::info!("{note}");
        }
        log::info!("main process started: pid {}", spawned.pid);
        let mut pumps = Vec::new();
        let tty = spawned.pty.is_some();
        if let Some(out) = spawned.stdout {
            let g = self.clone();
            pumps.push(pump(out, move |d| g.send_event(&Frame::Stdout(d.to_vec()))));
        }
        if let Some(err) = spawned.stderr {
            let g = self.clone();
            pumps.push(pump(err, move |d| g.send_event(&Frame::Stderr(d.to_vec()))));
        }
        if let (Some(stdin), Some(rx)) = (spawned.stdin, lock(&self.main_stdin_rx).take()) {
            let g_ack = self.clone();
            thread::spawn(move || {
                let mut stdin = Some(stdin);
                while let Ok(chunk) = rx.recv() {
                    match chunk {
                        StdinChunk::Data(d) => {
                            if stdin.as_mut().is_some_and(|s| s.write_all(&d).is_err()) {
                                stdin = None;
                            }
                            // Acknowledged even when dropped, so the host's window reopens.
                            g_ack.send_event(&Frame::Message(Message::StdinAck {
                                bytes: d.len() as u32,
                            }));
                        }
                        // A terminal has no separate input to close.
                        StdinChunk::Close if tty => {}
                        StdinChunk::Close => stdin = None,
                    }
                }
            });
        }
        let g = self.clone();
        let exit = spawned.exit;
        let pid = spawned.pid;
        let watcher = thread::Builder::new()
            .name("main-watch".into())
            .spawn(move || {
                // The main's namespaces, opened now for the execs to join (after
                // `start` has its answer): the first exec does not pay for it.
                if let Err(e) = g.main_namespaces(pid) {
                    log::debug!("the main's namespaces: {e}");
                }
                let code = exit.recv().unwrap_or(255);
                g.main_exited(code, pumps);
            });
        if let Err(e) = watcher {
            // Its exit could never be reported: end it and the VM, as a lost exit.
            log::error!("starting the main watcher: {e}");
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            self.power_off(255);
        }
    }

    fn signal(&self, target: &SignalTarget, signal: i32) -> Result<(), String> {
        let sig = Signal::try_from(signal).map_err(|_| format!("invalid signal {signal}"))?;
        let send = |pid: i32| {
            kill(Pid::from_raw(pid), sig)
                .map_err(|e| format!("kill {pid}: {}", e.desc().to_lowercase()))
        };
        match target {
            SignalTarget::Main => match self.main_pid.load(Ordering::SeqCst) {
                pid if pid > 0 => send(pid),
                _ => Err("the main process is not running".into()),
            },
            SignalTarget::All => {
                for pid in procfs::others() {
                    let _ = send(pid);
                }
                Ok(())
            }
            SignalTarget::Exec(id) => match lock(&self.execs).get(id) {
                Some(&pid) if pid > 0 => send(pid),
                _ => Err(format!("no exec session {id:?}")),
            },
        }
    }

    // ---- exec / pty sessions ------------------------------------------------

    /// One exec session per connection (`pty`: the pty port, always a terminal).
    pub fn serve_exec(self: &Arc<Self>, mut conn: UnixStream, pty: bool) {
        if let Err(e) = hello(&mut conn) {
            log::warn!("exec: {e}");
            return;
        }
        let req = match proto::read_frame(&mut conn) {
            Ok(Frame::Message(Message::Exec(req))) => req,
            Ok(other) => {
                let _ = proto::send(
                    &mut conn,
                    nack(format!(
                        "expected an exec request, got {:?}",
                        kind_of(&other)
                    )),
                );
                return;
            }
            Err(e) => {
                let _ = proto::send(&mut conn, nack(e.to_string()));
                return;
            }
        };
        {
            let mut execs = lock(&self.execs);
            if execs.contains_key(&req.id) {
                let _ = proto::send(
                    &mut conn,
                    nack(format!("exec id {:?} is already in use", req.id)),
                );
                return;
            }
            execs.insert(req.id.clone(), 0);
        }
        let forget = |g: &Guest| {
            lock(&g.execs).remove(&req.id);
        };
        let mode = if pty || req.tty || req.process.terminal().unwrap_or(false) {
            let (rows, cols) = req
                .size
                .filter(|&(r, c)| r > 0 && c > 0)
                .unwrap_or((24, 80));
            StdioMode::Pty {
                rows,
                cols,
                console: false,
            }
        } else {
            StdioMode::Pipes
        };
        // An exec joins the main's namespaces (before the main, e.g. startContainer
        // hooks, it runs in guest-init's).
        let main = self.main_pid.load(Ordering::SeqCst);
        let joined = match (main > 0).then(|| self.main_namespaces(main)).transpose() {
            Ok(joined) => joined,
            Err(reason) => {
                forget(self);
                let _ = proto::send(&mut conn, nack(reason));
                return;
            }
        };
        let spawned = match spawn::spawn(
            &req.process,
            mode,
            &self.reaper,
            self.confinement(),
            joined.as_deref(),
        ) {
            Ok(s) => s,
            Err(reason) => {
                forget(self);
                let _ = proto::send(&mut conn, reason.into_nack());
                return;
            }
        };
        lock(&self.execs).insert(req.id.clone(), spawned.pid);
        let writer = match conn.try_clone() {
            Ok(w) => Arc::new(Mutex::new(w)),
            Err(e) => {
                log::warn!("exec: {e}");
                let _ = kill(Pid::from_raw(spawned.pid), Signal::SIGKILL);
                let _ = spawned.exit.recv();
                forget(self);
                return;
            }
        };
        let sent = proto::send(
            &mut *lock(&writer),
            Message::ExecStarted { pid: spawned.pid },
        );
        let mut pumps = Vec::new();
        for (src, stderr) in [(spawned.stdout, false), (spawned.stderr, true)] {
            if let Some(src) = src {
                let w = writer.clone();
                pumps.push(pump(src, move |d| {
                    let f = if stderr {
                        Frame::Stderr(d.to_vec())
                    } else {
                        Frame::Stdout(d.to_vec())
                    };
                    proto::write_frame(&mut *lock(&w), &f).is_ok()
                }));
            }
        }
        if sent.is_ok() {
            let mut stdin = spawned.stdin;
            let pty_master = spawned.pty;
            let mut reader = conn;
            let ack_writer = writer.clone();
            thread::spawn(move || loop {
                match proto::read_frame(&mut reader) {
                    Ok(Frame::Stdin(d)) => {
                        if let Some(s) = stdin.as_mut() {
                            if s.write_all(&d).is_err() {
                                stdin = None;
                            }
                        }
                        // Acknowledged even when dropped, so the host's window reopens.
                        let ack = Message::StdinAck {
                            bytes: d.len() as u32,
                        };
                        let _ = proto::send(&mut *lock(&ack_writer), ack);
                    }
                    Ok(Frame::StdinClose) => {
                        if pty_master.is_none() {
                            stdin = None;
                        }
                    }
                    Ok(Frame::Message(Message::Resize { rows, cols })) => {
                        if let Some(m) = &pty_master {
                            let _ = set_winsize(m, rows, cols);
                        }
                    }
                    Ok(_)
                    | Err(ProtocolError::Malformed(_))
                    | Err(ProtocolError::UnknownKind(_)) => {}
                    Err(_) => break,
                }
            });
        }
        let code = spawned.exit.recv().unwrap_or(255);
        for p in pumps {
            let _ = p.join();
        }
        forget(self);
        let mut w = lock(&writer);
        let _ = proto::send(&mut *w, Message::ExecExited { code });
        let _ = w.shutdown(std::net::Shutdown::Write);
    }

    // ---- the end ----------------------------------------------------------------

    fn main_exited(&self, code: i32, pumps: Vec<JoinHandle<()>>) {
        self.main_pid.store(MAIN_EXITED, Ordering::SeqCst);
        self.finishing.store(true, Ordering::SeqCst);
        // No exec joins it any more; its mounts need not outlive it.
        lock(&self.main_namespaces).take();
        log::info!("main process exited with {code}");
        match self.root_rw.get().or(self.root.get()) {
            Some(root) => {
                if let Err(e) = write_exit_code(root, code) {
                    log::error!("writing /.a3s_exit_code: {e}");
                }
            }
            None => log::error!("no container root for /.a3s_exit_code"),
        }
        let all_ended = terminate_all();
        for p in pumps {
            let _ = p.join();
        }
        // The VM runs only this container: any OOM kill in it is the container's.
        let oom_killed = self.oom_kills() > self.oom_kills_at_start.load(Ordering::SeqCst);
        if oom_killed {
            log::warn!("the OOM killer ran while the main process ran");
        }
        // The host stops the VM as soon as it has the report, and nothing of the
        // container's data waits in the guest: its shares are write-through (no
        // virtiofsd --writeback) and FUSE writes a shared mapping's dirty pages
        // back when the mapping goes, at the latest when its process exits. No
        // sync, then, which would also make virtiofsd syncfs the host's
        // filesystem at every container exit; only if a process outlived SIGKILL.
        if !all_ended {
            nix::unistd::sync();
        }
        // The host ends the VM once it has read this report, and with it every
        // frame before it. Powering off first could lose the last ones: vsock
        // sends as the host's credit allows, after write() returned.
        if self.send_event(&Frame::Message(Message::MainExited { code, oom_killed })) {
            self.await_events_end(HOST_TAKES_REPORT);
        }
        halt(self.halt, code);
    }

    /// `Shutdown` from the host: stop everything; if a main runs, its watcher
    /// reports and powers off, else power off here.
    fn shutdown(&self) {
        log::info!("shutdown requested");
        let main_running = self.main_pid.load(Ordering::SeqCst) != MAIN_NONE;
        terminate_all();
        if !main_running {
            self.power_off(0);
        }
    }

    pub fn power_off(&self, code: i32) -> ! {
        power_off(self.halt, code)
    }
}

/// Syncs, then ends the VM (see [`halt`]).
pub fn power_off(how: Halt, code: i32) -> ! {
    nix::unistd::sync();
    halt(how, code)
}

/// How long guest-init waits, after its last report, for the host to end the VM
/// (it does so on reading it) before powering off itself.
const HOST_TAKES_REPORT: Duration = Duration::from_secs(10);

/// Ends the VM: `reboot(2)` (power-off, or a reboot that QEMU's `-no-reboot`
/// turns into its exit), or `exit` in the sandbox.
fn halt(halt: Halt, code: i32) -> ! {
    match halt {
        Halt::Exit => std::process::exit(code),
        Halt::PowerOff | Halt::Reboot => {
            let mode = if halt == Halt::Reboot {
                nix::sys::reboot::RebootMode::RB_AUTOBOOT
            } else {
                nix::sys::reboot::RebootMode::RB_POWER_OFF
            };
            let _ = nix::sys::reboot::reboot(mode);
            log::error!("reboot(2) returned; halting here");
            loop {
                thread::park();
            }
        }
    }
}

/// How the main's stdio is wired: its own pty (bound to `/dev/console`) or pipes.
fn main_stdio(process: &Process) -> StdioMode {
    if !process.terminal().unwrap_or(false) {
        return StdioMode::Pipes;
    }
    let (rows, cols) = process
        .console_size()
        .map(|b| (b.height() as u16, b.width() as u16))
        .filter(|&(r, c)| r > 0 && c > 0)
        .unwrap_or((24, 80));
    StdioMode::Pty {
        rows,
        cols,
        console: true,
    }
}

/// SIGTERM to everything but init, a grace period (ends early when nothing is
/// left), then SIGKILL and wait until all are gone. False if some outlived it.
pub fn terminate_all() -> bool {
    // As PID 1 (of the VM, or of the sandbox's pid namespace), kill(-1) reaches
    // every process but us, and every process is our descendant (orphans come to
    // PID 1): none is left when we have no child. No /proc scan, which under TCG
    // costs milliseconds on the main's exit path. Anywhere else kill(-1) would
    // reach the whole host: the scan then.
    let pid1 = std::process::id() == 1;
    let signal_all = |sig| {
        if pid1 {
            return kill(Pid::from_raw(-1), sig).is_ok();
        }
        let pids = procfs::others();
        for &pid in &pids {
            let _ = kill(Pid::from_raw(pid), sig);
        }
        !pids.is_empty()
    };
    let none_left = || {
        // A child not reaped yet still counts; the reaper takes it at once.
        if pid1 {
            no_children()
        } else {
            procfs::others().is_empty()
        }
    };
    let wait_empty = |limit: Duration| {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if none_left() {
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        false
    };
    if !signal_all(Signal::SIGTERM) || wait_empty(GRACE) {
        return true;
    }
    for _ in 0..50 {
        signal_all(Signal::SIGKILL);
        if wait_empty(Duration::from_millis(100)) {
            return true;
        }
    }
    log::warn!("processes survived SIGKILL: {:?}", procfs::others());
    false
}

/// Whether this process has no child, running or exited (peeked: the reaper
/// still reaps them).
fn no_children() -> bool {
    // SAFETY: siginfo_t is plain data that waitid fills.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: WNOWAIT only looks; `info` is a valid siginfo_t.
    let r = unsafe {
        libc::waitid(
            libc::P_ALL,
            0,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    r == -1 && io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD)
}

/// Writes `code` as decimal text to `.a3s_exit_code` in the container root
/// (never through a symlink). No fsync: the share is write-through (virtiofsd
/// without `--writeback`), so the host sees the file once the write returns.
pub fn write_exit_code(root: &OwnedFd, code: i32) -> io::Result<()> {
    use nix::fcntl::{openat, OFlag};
    use nix::sys::stat::Mode;
    let fd = openat(
        root.as_fd(),
        EXIT_CODE_FILE,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o644),
    )
    .map_err(io::Error::from)?;
    let mut f = File::from(fd);
    f.write_all(code.to_string().as_bytes())
}

/// Copies `src` to `sink` in chunks until EOF (EIO on a pty master means the
/// slave side is gone: also EOF). Keeps draining when the sink fails so the
/// writer never blocks on a full pipe.
fn pump(mut src: File, sink: impl Fn(&[u8]) -> bool + Send + 'static) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = vec![0u8; MAX_DATA_CHUNK];
        let mut open = true;
        loop {
            match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if open {
                        open = sink(&buf[..n]);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    })
}

fn hello(conn: &mut UnixStream) -> proto::Result<()> {
    proto::send(
        conn,
        Message::Hello {
            version: proto::PROTOCOL_VERSION,
        },
    )?;
    let first = proto::recv(conn)?;
    if let Err(e) = proto::expect_hello(first) {
        let _ = proto::send(conn, nack(e.to_string()));
        return Err(e);
    }
    Ok(())
}

fn nack(reason: String) -> Message {
    Message::nack(reason)
}

fn kind_of(f: &Frame) -> &'static str {
    match f {
        Frame::Message(_) => "message",
        Frame::Stdout(_) => "stdout",
        Frame::Stderr(_) => "stderr",
        Frame::Stdin(_) => "stdin",
        Frame::StdinClose => "stdin-close",
    }
}

fn name_of(m: &Message) -> String {
    serde_json::to_value(m)
        .ok()
        .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Per-container guest setup from the OCI spec, in runc's order: mounts,
/// hostname, domainname, sysctls, read-only and masked paths.
fn apply_setup(spec: &oci_spec::runtime::Spec) -> Result<(), String> {
    crate::mounts::apply_mounts(spec)?;
    crate::mounts::apply_rootfs_propagation(spec)?;
    if let Some(h) = spec.hostname().as_deref().filter(|h| !h.is_empty()) {
        nix::unistd::sethostname(h)
            .map_err(|e| format!("sethostname {h:?}: {}", e.desc().to_lowercase()))?;
    }
    if let Some(d) = spec.domainname().as_deref().filter(|d| !d.is_empty()) {
        // SAFETY: pointer and length of a live string.
        let r = unsafe { libc::setdomainname(d.as_ptr().cast(), d.len()) };
        if r < 0 {
            return Err(format!(
                "setdomainname {d:?}: {}",
                spawn::errno_text(&io::Error::last_os_error())
            ));
        }
    }
    if let Some(sysctls) = spec.linux().as_ref().and_then(|l| l.sysctl().as_ref()) {
        for (key, value) in sysctls {
            let path = sysctl_path(key)?;
            std::fs::write(&path, value.as_bytes())
                .map_err(|e| format!("sysctl {key}={value}: {}", spawn::errno_text(&e)))?;
        }
    }
    crate::mounts::apply_path_restrictions(spec)
}

/// `net.ipv4.ip_forward` -> `/proc/sys/net/ipv4/ip_forward`; no escaping /proc/sys.
pub fn sysctl_path(key: &str) -> Result<String, String> {
    if key.is_empty() || key.split(['.', '/']).any(|p| p.is_empty() || p == "..") {
        return Err(format!("invalid sysctl name {key:?}"));
    }
    Ok(format!("/proc/sys/{}", key.replace('.', "/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctl_paths() {
        assert_eq!(
            sysctl_path("net.ipv4.ip_forward").unwrap(),
            "/proc/sys/net/ipv4/ip_forward"
        );
        assert_eq!(
            sysctl_path("kernel/shmmax").unwrap(),
            "/proc/sys/kernel/shmmax"
        );
        assert!(sysctl_path("net..x").is_err());
        assert!(sysctl_path("../etc").is_err());
        assert!(sysctl_path("").is_err());
    }

    #[test]
    fn exit_code_file() {
        let d = tempfile::tempdir().unwrap();
        let root = OwnedFd::from(File::open(d.path()).unwrap());
        write_exit_code(&root, 137).unwrap();
        assert_eq!(
            std::fs::read_to_string(d.path().join(".a3s_exit_code")).unwrap(),
            "137"
        );
        write_exit_code(&root, 0).unwrap();
        assert_eq!(
            std::fs::read_to_string(d.path().join(".a3s_exit_code")).unwrap(),
            "0"
        );
        // Never through a symlink.
        std::fs::remove_file(d.path().join(".a3s_exit_code")).unwrap();
        std::os::unix::fs::symlink("/tmp/elsewhere", d.path().join(".a3s_exit_code")).unwrap();
        assert!(write_exit_code(&root, 1).is_err());
    }
}
