//! krun-oci-init: PID 1 inside a krun-oci microVM.
//!
//! Boot order (VM): devtmpfs/proc/sysfs, kernel modules, vsock listeners bound,
//! virtio-fs root mounted and switched into, ready beacon dialed to the host,
//! then the control/exec/pty services. See docs/guest-init.md.
//!
//! With `KRUN_OCI_INIT_SANDBOX=<dir>` and `KRUN_OCI_INIT_ROOTFS=<dir>` it runs as
//! the host-sandbox TEST HARNESS (unix sockets, a plain directory as root, "power
//! off" = exit). That mode is for tests only; it isolates nothing by itself.

mod boot;
mod guest;
mod logger;
mod mounts;
mod network;
mod procfs;
mod reaper;
mod resources;
mod spawn;
mod transport;
mod warm;

use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use krun_oci_protocol::{
    self as proto, Message, CONTROL_PORT, EXEC_PORT, HOST_EVENTS_PORT, PTY_PORT,
};

use boot::Timings;
use guest::{Guest, Halt};
use transport::{Listener, Transport};

const SANDBOX_ENV: &str = "KRUN_OCI_INIT_SANDBOX";
const ROOTFS_ENV: &str = "KRUN_OCI_INIT_ROOTFS";

/// How long the guest keeps retrying its dial to the host before giving up.
const DIAL_ATTEMPTS: u32 = 300;

enum Mode {
    Vm,
    Sandbox { dir: PathBuf, rootfs: PathBuf },
}

fn main() {
    if std::env::var_os(warm::WARM_ENV).is_some() {
        // The warm-up's spawn (warm.rs): it only had to get here.
        std::process::exit(0);
    }
    let start = Instant::now();
    logger::init();
    // A panicking service thread dies alone; the panic is logged, PID 1 lives on.
    std::panic::set_hook(Box::new(|info| log::error!("panic: {info}")));
    reaper::block_sigchld();

    let mode = match (std::env::var_os(SANDBOX_ENV), std::env::var_os(ROOTFS_ENV)) {
        (Some(dir), Some(rootfs)) => Mode::Sandbox {
            dir: dir.into(),
            rootfs: rootfs.into(),
        },
        _ => Mode::Vm,
    };
    let fallback_halt = match mode {
        Mode::Vm => Halt::PowerOff,
        Mode::Sandbox { .. } => Halt::Exit,
    };
    let result = std::panic::catch_unwind(move || run(mode, start));
    match result {
        Ok(Err(e)) => log::error!("fatal: {e}"),
        Ok(Ok(())) => {}
        Err(_) => log::error!("fatal: panic in init"),
    }
    // Never let PID 1 return (the guest kernel would panic): power off instead.
    guest::power_off(fallback_halt, 255);
}

fn run(mode: Mode, start: Instant) -> io::Result<()> {
    let mut t = Timings::new(start);
    if std::process::id() != 1 {
        // Not PID 1 (a sandbox run without a pid namespace): still collect orphans.
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    }
    let (transport, listeners, halt, root) = match mode {
        Mode::Vm => {
            boot::early_mounts()?;
            boot::ensure_std_fds();
            let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
            logger::use_kmsg(&cmdline);
            t.mark("early-mounts");
            let n = boot::load_modules()?;
            t.mark(&format!("modules ({n})"));
            let transport = Transport::Vsock;
            let listeners = bind_all(&transport)?;
            t.mark("listeners");
            // A pooled VM boots before its container: the root comes with Setup.
            let tag = boot::root_tag(&cmdline);
            let root = if boot::root_is_deferred(&cmdline) {
                Err(tag)
            } else {
                boot::switch_to_virtiofs_root(&tag)?;
                t.mark("root");
                Ok(())
            };
            let halt = if boot::halt_is_reboot(&cmdline) {
                Halt::Reboot
            } else {
                Halt::PowerOff
            };
            (transport, listeners, halt, root)
        }
        Mode::Sandbox { dir, rootfs } => {
            let transport = Transport::unix(dir)?;
            let listeners = bind_all(&transport)?;
            t.mark("listeners");
            boot::switch_to_sandbox_root(&rootfs)?;
            t.mark("root");
            (transport, listeners, Halt::Exit, Ok(()))
        }
    };
    let root = match root {
        Ok(()) => Ok(OwnedFd::from(std::fs::File::open("/")?)),
        Err(tag) => Err(tag),
    };
    let guest = Guest::new(halt, root);
    {
        let g = guest.clone();
        thread::Builder::new()
            .name("reaper".into())
            .spawn(move || g.reaper.run())?;
    }

    let mut events = dial_host(&transport)?;
    t.mark("host-dialed");
    proto::send(
        &mut events,
        Message::Hello {
            version: proto::PROTOCOL_VERSION,
        },
    )
    .and_then(|()| proto::expect_hello(proto::recv(&mut events)?))
    .map_err(|e| io::Error::other(format!("events stream handshake: {e}")))?;
    // A pooled VM is claimable once Ready: warmed before, a claim never waits for it.
    if guest.warm_up() {
        t.mark("warm-up");
    }
    t.mark("ready");
    logger::quiet_console();
    proto::send(
        &mut events,
        Message::Ready {
            init_version: env!("CARGO_PKG_VERSION").to_string(),
            timings: t.steps.clone(),
        },
    )
    .map_err(|e| io::Error::other(format!("sending ready: {e}")))?;
    guest.attach_events(events)?;

    for l in listeners {
        let g = guest.clone();
        thread::Builder::new()
            .name(format!("accept-{}", l.port))
            .spawn(move || accept_loop(g, l))?;
    }
    loop {
        thread::park();
    }
}

fn bind_all(transport: &Transport) -> io::Result<Vec<Listener>> {
    [CONTROL_PORT, EXEC_PORT, PTY_PORT]
        .into_iter()
        .map(|p| {
            transport
                .listen(p)
                .map_err(|e| io::Error::other(format!("listening on port {p}: {e}")))
        })
        .collect()
}

fn dial_host(transport: &Transport) -> io::Result<std::os::unix::net::UnixStream> {
    let mut last = None;
    for attempt in 0..DIAL_ATTEMPTS {
        match transport.dial_host(HOST_EVENTS_PORT) {
            Ok(s) => return Ok(s),
            Err(e) => {
                if attempt == 0 {
                    log::warn!("dialing the host: {e}; retrying");
                }
                last = Some(e);
                thread::sleep(Duration::from_millis(10 + 10 * attempt.min(9) as u64));
            }
        }
    }
    Err(io::Error::other(format!(
        "host port {HOST_EVENTS_PORT} unreachable: {}",
        last.map(|e| e.to_string()).unwrap_or_default()
    )))
}

fn accept_loop(guest: Arc<Guest>, listener: Listener) {
    loop {
        match listener.accept() {
            Ok(conn) => {
                let g = guest.clone();
                let port = listener.port;
                let spawned =
                    thread::Builder::new()
                        .name(format!("conn-{port}"))
                        .spawn(move || match port {
                            CONTROL_PORT => g.serve_control(conn),
                            PTY_PORT => g.serve_exec(conn, true),
                            _ => g.serve_exec(conn, false),
                        });
                if let Err(e) = spawned {
                    log::error!("port {port}: no thread for a connection: {e}");
                }
            }
            Err(e) => {
                log::warn!("accept on port {}: {e}", listener.port);
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}
