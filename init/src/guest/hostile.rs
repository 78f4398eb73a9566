//! A hostile guest, for the host's tests only: compiled with `--features hostile`
//! (`make hostile-init`), never into the init that ships. A main whose args are
//! `/hostile MODE [ARG...]` is not run as asked: `SpawnMain` is answered as usual,
//! then the guest attacks the host the way a compromised guest kernel could, over
//! the links the host really reads (runtime/tests/hostile.rs checks the host).
//!
//! Modes:
//! - `oversized`: a frame header announcing 4 GiB, then junk.
//! - `truncated`: a header announcing a full frame, a few bytes of it, then the
//!   stream closed.
//! - `malformed`: a Message frame that is not JSON, then one of an unknown kind.
//! - `lying-exit`: `MainExited` with a code no process can have, then power-off.
//! - `init-dies CMD...`: runs CMD as the real main, then guest-init exits.
//! - `flood CMD...`: runs CMD as the real main and, until it exits, floods the
//!   host with output frames (no newlines) and unexpected 256 KiB messages.
//! - `plant-symlinks TARGET_FILE TARGET_DIR [BIND...]`: replaces `/.a3s_exit_code` with a
//!   symlink to TARGET_FILE (a host path), plants symlinks to TARGET_DIR and
//!   TARGET_FILE in the bind-mounts share's root (the host's staging directory;
//!   the container's BIND destinations are unmounted for that), then powers off
//!   without reporting.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use krun_oci_protocol::{self as proto, Frame, Message, Process, MAX_DATA_CHUNK};

use super::{lock, Guest};

/// The mode a `/hostile` main asks for, with its arguments.
pub fn requested(process: &Process) -> Option<Vec<String>> {
    let args = process.args().as_ref()?;
    (args.first().map(String::as_str) == Some("/hostile")).then(|| args[1..].to_vec())
}

/// Answers `SpawnMain` for a `/hostile` main and starts the attack.
pub fn attack(g: &Arc<Guest>, process: &Process, args: Vec<String>) -> Result<Message, String> {
    let mode = args.first().cloned().unwrap_or_default();
    log::warn!("hostile guest: {mode}");
    if mode == "flood" || mode == "init-dies" {
        let mut real = process.clone();
        real.set_args(Some(args[1..].to_vec()));
        let (main, note) = g.claim_main(Some(&real)).map_err(|e| e.reason)?;
        let reply = Message::MainStarted { pid: main.pid() };
        g.watch_main(g.release_main(main), note);
        let g = g.clone();
        thread::spawn(move || {
            if mode == "flood" {
                flood(&g)
            } else {
                // PID 1 ends while the main runs: the guest kernel panics
                // ("Attempted to kill init") and the VM is gone.
                thread::sleep(Duration::from_millis(500));
                std::process::exit(3)
            }
        });
        return Ok(reply);
    }
    let raw = lock(&g.events)
        .as_ref()
        .and_then(|s| s.try_clone().ok())
        .ok_or("no events stream")?;
    let g = g.clone();
    thread::spawn(move || {
        // After the reply to SpawnMain has gone out.
        thread::sleep(Duration::from_millis(200));
        match mode.as_str() {
            "oversized" => oversized(raw),
            "truncated" => truncated(raw),
            "malformed" => malformed(raw),
            "lying-exit" => {
                g.send_event(&Frame::Message(Message::MainExited {
                    code: 70_000,
                    oom_killed: false,
                }));
                g.power_off(0);
            }
            "plant-symlinks" => plant_symlinks(&g, &args[1..]),
            other => log::error!("hostile guest: no mode {other:?}"),
        }
        // Stay up: the host must end the VM on its own.
        loop {
            thread::park();
        }
    });
    Ok(Message::MainStarted { pid: 1 })
}

fn oversized(mut s: UnixStream) {
    let _ = s.write_all(&u32::MAX.to_be_bytes());
    let junk = vec![0x5a; MAX_DATA_CHUNK];
    // The host should drop the link at the header; keep writing until it does.
    for _ in 0..64 {
        if s.write_all(&junk).is_err() {
            break;
        }
    }
}

fn truncated(mut s: UnixStream) {
    let _ = s.write_all(&proto::MAX_FRAME_LEN.to_be_bytes());
    let _ = s.write_all(&[1u8; 100]);
    // Both ways: a half-close alone does not reach the host's end of the socket.
    let _ = s.shutdown(std::net::Shutdown::Both);
}

fn malformed(mut s: UnixStream) {
    let not_json = b"\x00{\"type\":\"main_exited\",\"code\":";
    let _ = s.write_all(&(not_json.len() as u32).to_be_bytes());
    let _ = s.write_all(not_json);
    let _ = s.write_all(&[0, 0, 0, 3, 0xee, 1, 2]);
}

/// Output and unexpected messages as fast as the link takes them, until the main
/// (which the host can kill) has exited.
fn flood(g: &Arc<Guest>) {
    let out = vec![b'x'; MAX_DATA_CHUNK];
    let noise = Frame::Message(Message::nack("n".repeat(256 * 1024)));
    for i in 0u64.. {
        if g.finishing.load(Ordering::SeqCst) {
            return;
        }
        let frame = match i % 4 {
            0 => Frame::Stderr(out.clone()),
            1 => noise.clone(),
            _ => Frame::Stdout(out.clone()),
        };
        if !g.send_event(&frame) {
            return;
        }
    }
}

fn plant_symlinks(g: &Arc<Guest>, targets: &[String]) {
    let (Some(file), Some(dir)) = (targets.first(), targets.get(1)) else {
        log::error!("hostile guest: plant-symlinks needs TARGET_FILE TARGET_DIR [BIND...]");
        return;
    };
    let binds = &targets[2..];
    if let Some(root) = g.root_rw.get().or(g.root.get()) {
        let _ = nix::unistd::unlinkat(
            root,
            proto::contract::EXIT_CODE_FILE,
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
        if let Err(e) = nix::unistd::symlinkat(file.as_str(), root, proto::contract::EXIT_CODE_FILE)
        {
            log::error!("hostile guest: symlink /.a3s_exit_code: {e}");
        }
    }
    // A new mount of the share takes the superblock of a live bind from it (and
    // shows that bind's entry): unmount the container's binds first, so
    // the share's own root, the host's staging directory, is what mounts.
    // The prepared main holds them too, in its own mount namespace, and so do
    // the handles kept for the execs to join it: they go first.
    if let Some(mut preparing) = lock(&g.prepared_main).take() {
        // Waited for (create's `AwaitMain` may have taken the result already),
        // then dropped with it: the child exits unreleased.
        preparing.result();
        drop(preparing);
        thread::sleep(Duration::from_millis(300));
    }
    lock(&g.main_namespaces).take();
    for dest in binds {
        if let Err(e) = nix::mount::umount(dest.as_str()) {
            report(g, &format!("umount {dest}: {e}"));
        }
    }
    let share = Path::new("/dev/.hostile-share");
    if let Err(e) = std::fs::create_dir_all(share) {
        report(g, &format!("mkdir {}: {e}", share.display()));
    }
    match nix::mount::mount(
        Some(proto::mounts::MOUNTS_TAG),
        share,
        Some("virtiofs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    ) {
        Ok(()) => {
            for (name, target) in [("planted-dir", dir), ("planted-file", file)] {
                if let Err(e) = std::os::unix::fs::symlink(target, share.join(name)) {
                    report(g, &format!("symlink {name}: {e}"));
                }
            }
            let _ = std::fs::create_dir(share.join("nest"));
            let _ = std::os::unix::fs::symlink(dir, share.join("nest/deeper"));
            let _ = nix::mount::umount(share);
        }
        Err(e) => report(g, &format!("mounting the mounts share: {e}")),
    }
    g.power_off(0);
}

/// What went wrong, where the test reads it: `/.hostile-errors` in the container
/// root (the guest's console log ends once the container's /dev is mounted).
fn report(g: &Guest, what: &str) {
    log::error!("hostile guest: {what}");
    let Some(root) = g.root_rw.get().or(g.root.get()) else {
        return;
    };
    use nix::fcntl::{openat, OFlag};
    if let Ok(fd) = openat(
        root,
        ".hostile-errors",
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_APPEND | OFlag::O_NOFOLLOW,
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    ) {
        let _ = std::fs::File::from(fd).write_all(format!("{what}\n").as_bytes());
    }
}
