//! Warming a pooled VM while it waits for its container. Under TCG the first
//! run of any guest path, kernel or guest-init's own, is slow (QEMU translates
//! it first), and a pooled VM's first paths would otherwise be its container's
//! setup and spawn. So, idle, it walks them once: `lo` up (which Setup would
//! do), the filesystems a setup mounts (the rootfs share included, mounted and
//! dropped before its root entry is ever looked up), a bind made read-only, a
//! `Setup` frame decoded, and the main's own path through fresh namespaces:
//! prepared in the background, taken, released before its exec, answered for.
//! Nothing else of it stays. It runs before the VM reports Ready, so
//! the pool counts a VM idle only once it is warm, and a claim never waits for it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use krun_oci_protocol::{Frame, Message};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::guest::Guest;
use crate::spawn;

/// Set in the environment of the spawned warm-up child: it exits at once.
pub const WARM_ENV: &str = "KRUN_OCI_INIT_WARM";
const DIR: &str = "/warm";

pub fn warm_up(guest: &Arc<Guest>, root_tag: &str) {
    let t0 = Instant::now();
    // `lo` comes up at Setup in any case (the VM's network is the container's):
    // now, the first inet socket and interface ioctls are off the claim's path.
    if let Err(e) = crate::network::apply(&[]) {
        log::warn!("warm-up: {e}");
    }
    if let Err(e) = filesystems(root_tag) {
        log::warn!("warm-up: {e}");
    }
    let _ = umount2(DIR, MntFlags::MNT_DETACH);
    let _ = std::fs::remove_dir(DIR);
    if let Err(e) = main_path(guest) {
        log::warn!("warm-up: spawn: {e}");
    }
    log::info!("warm-up: {} ms", t0.elapsed().as_millis());
}

fn filesystems(root_tag: &str) -> Result<(), String> {
    let m = |src: &str, target: &str, fstype: Option<&str>, flags: MsFlags, data: Option<&str>| {
        let _ = std::fs::create_dir_all(target);
        mount(Some(src), target, fstype, flags, data).map_err(|e| format!("{target}: {}", e.desc()))
    };
    m(
        "tmpfs",
        DIR,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )?;
    let none = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let mounts = [
        ("proc", "proc", "proc", None),
        ("sysfs", "sys", "sysfs", None),
        (
            "devpts",
            "pts",
            "devpts",
            Some("newinstance,ptmxmode=0666,mode=0620"),
        ),
        ("shm", "shm", "tmpfs", Some("mode=1777")),
        ("mqueue", "mq", "mqueue", None),
        ("cgroup2", "cg", "cgroup2", crate::resources::cgroup2_data()),
        (root_tag, "share", "virtiofs", None),
    ];
    for (src, dir, fstype, data) in mounts {
        // Best effort: a kernel without one of them only warms less.
        if let Err(e) = m(src, &format!("{DIR}/{dir}"), Some(fstype), none, data) {
            log::debug!("warm-up: {e}");
        }
    }
    let bind = format!("{DIR}/bind");
    m(
        &format!("{DIR}/shm"),
        &bind,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    m(
        "none",
        &bind,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None,
    )?;
    Ok(())
}

/// The main's own path, guest-init's code included (TCG translates user space
/// on first run too, and a start paid ~2 ms for code it ran first: comparing
/// the process with the prepared one, joining the preparing thread): a `Setup`
/// frame decoded (the JSON and the spec's types), then a child through the
/// steps of a main with the namespaces and process settings of a default spec.
/// The child is guest-init itself, which exits at once.
fn main_path(guest: &Arc<Guest>) -> Result<(), String> {
    let spec = oci_spec::runtime::Spec::default();
    let setup = Frame::Message(Message::Setup {
        spec: Box::new(spec.clone()),
        seccomp: None,
        network: Vec::new(),
        deferred_root: None,
        prepare_main: true,
        main_program: Some("/init".into()),
    })
    .encode()
    .map_err(|e| e.to_string())?;
    Frame::decode_body(&setup[4..]).map_err(|e| e.to_string())?;
    let mut process = spec.process().clone().unwrap_or_default();
    process.set_args(Some(vec!["/init".into()]));
    process.set_env(Some(vec![format!("{WARM_ENV}=1")]));
    process.set_cwd("/".into());
    let confinement = spawn::Confinement {
        namespaces: Some(Arc::new(spawn::Namespaces::from_spec(&spec)?)),
        ..Default::default()
    };
    guest
        .rehearse_main(process, "/init".into(), confinement)?
        .exit
        .recv_timeout(Duration::from_secs(5))
        .map(drop)
        .map_err(|e| e.to_string())
}
