//! VMM backends. Everything that knows which VMM runs lives under this module;
//! the rest of the runtime sees only [`Vmm`] and [`Vm`].

pub mod detect;
pub mod libkrun;
pub mod qemu;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::guest::GuestLink;

/// Which VMM runs the container's VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum VmmChoice {
    /// libkrun when hardware KVM and a kernel for it are usable, else QEMU (KVM, else TCG).
    #[default]
    Auto,
    Libkrun,
    Qemu,
}

/// What a backend needs to boot one container's VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub id: String,
    /// Per-container runtime directory for sockets, console log and helper pid files.
    pub run_dir: PathBuf,
    /// The container's root filesystem on the host (shared into the guest by virtio-fs, tag `rootfs`).
    pub rootfs: PathBuf,
    pub vcpus: u32,
    pub ram_mib: u32,
    /// Bind mounts of host paths, served as a second virtio-fs share (tag
    /// `krun-mounts`); `None` when the config has none.
    pub mounts: Option<crate::mounts::MountsShare>,
    /// The VM's NICs, one tap each (empty: loopback only).
    pub nics: Vec<crate::network::Nic>,
    /// Boot without a root (`krun_oci.root=deferred`): a pooled VM, whose
    /// `rootfs` is an empty share the container's root is attached to later
    /// (`Setup.deferred_root`). QEMU only.
    pub deferred_root: bool,
}

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The VMM exited (the guest powered off, or the VMM failed) with this status.
    Exited {
        component: String,
        status: Option<i32>,
        signal: Option<i32>,
    },
}

/// A running VM and its helper processes, owned by the VM monitor.
pub trait Vm: Send {
    /// How host processes reach the guest.
    fn link(&self) -> GuestLink;
    /// Host pids of the VMM and its helpers (recorded so `delete --force` can clean up).
    fn pids(&self) -> Vec<i32>;
    /// Non-blocking: `Some` once the VMM or any helper has exited.
    fn try_wait(&mut self) -> std::io::Result<Option<VmExit>>;
    /// Stops the VMM and every helper, reaps them and removes their sockets.
    fn kill(&mut self);
    /// The last `max` bytes of the guest console.
    fn console_tail(&self, max: usize) -> String;
}

/// A VMM backend.
pub trait Vmm {
    fn name(&self) -> &'static str;
    /// The link the VM will have; known before launch so the monitor can bind the
    /// host-side event socket the guest dials as its ready beacon.
    fn link(&self, spec: &VmSpec) -> GuestLink;
    /// Starts the VM (does not wait for the guest).
    fn launch(&self, spec: &VmSpec) -> crate::Result<Box<dyn Vm>>;
    /// Whether the VMM opens its taps by name (they must then be persistent)
    /// rather than taking the open fd.
    fn opens_taps_by_name(&self) -> bool {
        false
    }
}

/// Prepares a VMM or helper process: stdout/stderr to `log`, no stdin, its own
/// process group, and `PR_SET_PDEATHSIG(SIGKILL)` so it dies with the spawning
/// thread (spawn it from a thread that lives as long as the VM).
pub(crate) fn supervised(
    cmd: &mut std::process::Command,
    log: &std::path::Path,
) -> crate::Result<()> {
    use crate::error::IoContext;
    use std::os::unix::process::CommandExt;
    let out = std::fs::File::create(log).ctx(|| format!("create {}", log.display()))?;
    let err = out.try_clone().ctx(|| "dup log fd".into())?;
    cmd.stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls (prctl, getppid) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("parent exited during spawn"));
            }
            Ok(())
        });
    }
    Ok(())
}
