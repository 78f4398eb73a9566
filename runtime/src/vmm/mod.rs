//! VMM backends. Everything that knows which VMM runs lives under this module;
//! the rest of the runtime sees only [`Vmm`] and [`Vm`].

pub mod detect;
pub mod libkrun;
pub mod qemu;
pub mod sandbox;

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
    /// No VM: guest-init in host namespaces ([`sandbox`]); for tests only.
    #[value(hide = true)]
    Sandbox,
}

/// How the guest caches the container's root filesystem (QEMU's virtiofsd
/// `--cache`; libkrun and the sandbox have no such choice). The binds share is
/// always `auto`: it is the host's and other containers' data too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum RootfsCache {
    /// Data, names and attributes kept in the guest (virtiofsd `always`): a
    /// program's pages are read through FUSE once, not at every exec, which
    /// halves `exec` and `start` under TCG. A file the host changes in place
    /// while the container runs may be seen stale.
    #[default]
    Always,
    /// Names and attributes for 1 s, data dropped at each open (virtiofsd
    /// `auto`): host changes to the rootfs show within a second.
    Auto,
}

impl RootfsCache {
    /// The value as the config file and `--rootfs-cache` spell it.
    pub fn name(self) -> &'static str {
        match self {
            RootfsCache::Always => "always",
            RootfsCache::Auto => "auto",
        }
    }

    pub fn virtiofsd_arg(self) -> &'static str {
        match self {
            RootfsCache::Always => "--cache=always",
            RootfsCache::Auto => "--cache=auto",
        }
    }
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
    pub rootfs_cache: RootfsCache,
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

/// How a VMM or helper process ended (`None`: it could not be waited for).
pub(crate) fn exit_of(component: &str, status: Option<std::process::ExitStatus>) -> VmExit {
    use std::os::unix::process::ExitStatusExt;
    VmExit::Exited {
        component: component.to_owned(),
        status: status.and_then(|s| s.code()),
        signal: status.and_then(|s| s.signal()),
    }
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
    /// Whether the guest can have NICs (the sandbox has loopback only).
    fn has_network(&self) -> bool {
        true
    }
}
