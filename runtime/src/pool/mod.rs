//! The warm pool: VMs booted before any container asks for one (POOL.md).
//!
//! `krun-oci pool serve` ([`daemon`]) keeps idle VMs of one shape, each run by
//! its own pool member process ([`member`]): the member booted the VM with a
//! deferred root (the guest waits in its initramfs) and a spare NIC in a
//! holding network namespace. A container's monitor asks the daemon for a VM of
//! its shape and, on a hit, claims it from the member ([`adopt`]): it hands over
//! detached clones of the container's root and bind mounts, its network
//! namespace and a lifeline, and gets back the guest link, the events stream
//! and the pids. From then on the member only keeps the VM's processes alive
//! and ends them when the lifeline closes; the daemon never touches it again.
//! A miss, another shape, or any error before the claim: the cold path.

pub mod adopt;
pub mod daemon;
pub mod member;
pub mod wire;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::state::ContainerDir;

/// What a VM is fixed to at boot; a container takes a pooled VM only of its own
/// shape. Kernel and initrd are the image's (content-addressed) paths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    pub vcpus: u32,
    pub ram_mib: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Fixed by the share's virtiofsd, which runs from boot.
    pub rootfs_cache: crate::vmm::RootfsCache,
}

/// The daemon's settings: `[pool]` in the host config file, flags over it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolSettings {
    /// Idle VMs kept ready.
    pub min_idle: u32,
    /// Idle VMs kept while creates miss (demand), never more.
    pub max_idle: u32,
    /// An idle VM older than this is replaced by a fresh one.
    pub ttl_secs: u64,
    pub vcpus: u32,
    pub ram_mib: u32,
    /// Guest RAM all idle and booting VMs together may take (0: no limit).
    pub memory_budget_mib: u64,
    /// How often each idle VM's guest is asked whether it still answers.
    pub health_secs: u64,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            min_idle: 1,
            max_idle: 4,
            ttl_secs: 600,
            vcpus: crate::lifecycle::DEFAULT_VCPUS,
            ram_mib: crate::lifecycle::DEFAULT_RAM_MIB,
            memory_budget_mib: 0,
            health_secs: 30,
        }
    }
}

impl PoolSettings {
    pub fn validate(&self) -> Result<()> {
        if self.max_idle < self.min_idle || self.max_idle == 0 {
            return Err(Error::InvalidInput(format!(
                "pool: max_idle ({}) must be at least min_idle ({}) and above 0",
                self.max_idle, self.min_idle
            )));
        }
        if self.vcpus == 0 || self.ram_mib < crate::lifecycle::MIN_RAM_MIB {
            return Err(Error::InvalidInput(format!(
                "pool: a VM needs at least 1 vCPU and {} MiB",
                crate::lifecycle::MIN_RAM_MIB
            )));
        }
        Ok(())
    }
}

/// Where one root's pool lives: member state under `<root>/.pool`, sockets in
/// the short run directory (sockaddr_un holds 108 bytes).
#[derive(Debug, Clone)]
pub struct PoolPaths {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub lock: PathBuf,
}

/// The pool's directory name under the root (not a valid container's: no state.json).
pub const POOL_DIR: &str = ".pool";

impl PoolPaths {
    pub fn for_root(root: &Path) -> PoolPaths {
        let dir = root.join(POOL_DIR);
        let run = ContainerDir {
            id: POOL_DIR.into(),
            path: dir.clone(),
        }
        .run_dir();
        PoolPaths {
            socket: run.join("pool.sock"),
            lock: dir.join("serve.lock"),
            dir,
        }
    }

    /// One member's state directory (its run directory derives from it).
    pub fn member(&self, name: &str) -> ContainerDir {
        ContainerDir {
            id: name.into(),
            path: self.dir.join(name),
        }
    }
}

/// Requests to the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// A VM of this shape for a container's monitor.
    Acquire {
        shape: Shape,
    },
    Status,
}

/// The daemon's answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// Claim it from the member listening at `socket`; nobody else will get it.
    Hit {
        member: String,
        socket: PathBuf,
    },
    Miss {
        reason: String,
    },
    Status(Box<PoolStatus>),
}

/// What `krun-oci pool status` shows.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PoolStatus {
    pub pid: i32,
    pub shape: Option<Shape>,
    pub settings: Option<PoolSettings>,
    pub idle: u32,
    pub booting: u32,
    /// Handed out and still running (the daemon no longer manages them).
    pub claimed: u32,
    pub hits: u64,
    pub misses: u64,
    pub boot_failures: u64,
    /// Seconds until the next boot is allowed after repeated failures.
    pub backoff_secs: u64,
    pub members: Vec<MemberStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberStatus {
    pub name: String,
    pub pid: i32,
    pub state: String,
    pub age_secs: u64,
}

/// How long a client waits for the daemon's answer.
const DAEMON_TIMEOUT: Duration = Duration::from_secs(5);

/// One request to the daemon of `root`'s pool.
pub fn ask(root: &Path, request: &Request) -> Result<Reply> {
    let paths = PoolPaths::for_root(root);
    let sock = wire::connect(&paths.socket, DAEMON_TIMEOUT).map_err(|e| Error::NoPool {
        root: root.to_owned(),
        reason: e.to_string(),
    })?;
    wire::send(&sock, request, &[])?;
    Ok(wire::recv::<Reply>(&sock)?.0)
}

/// `krun-oci pool status`.
pub fn status(root: &Path) -> Result<PoolStatus> {
    match ask(root, &Request::Status)? {
        Reply::Status(s) => Ok(*s),
        other => Err(Error::Pool(format!(
            "unexpected answer to status: {other:?}"
        ))),
    }
}

/// The shape of the VMs a pool of `settings` boots, the image built if needed.
pub fn shape_for(vcpus: u32, ram_mib: u32) -> Result<Shape> {
    let image = crate::image::ensure(&crate::boot::image_options(crate::vmm::VmmChoice::Qemu)?)?;
    Ok(Shape {
        vcpus,
        ram_mib,
        kernel: image.kernel,
        initrd: image.initrd,
        rootfs_cache: crate::host_config::rootfs_cache()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_from_toml_and_validation() {
        let s: PoolSettings = toml::from_str("min_idle = 2\nram_mib = 256\n").unwrap();
        assert_eq!(s.min_idle, 2);
        assert_eq!(s.ram_mib, 256);
        assert_eq!(s.max_idle, PoolSettings::default().max_idle);
        s.validate().unwrap();
        assert!(toml::from_str::<PoolSettings>("min = 2\n").is_err());
        let bad = PoolSettings {
            min_idle: 3,
            max_idle: 2,
            ..PoolSettings::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn paths_are_short_and_per_root() {
        let a = PoolPaths::for_root(Path::new("/run/containerd/runc/k8s.io"));
        let b = PoolPaths::for_root(Path::new("/run/krun-oci"));
        assert_ne!(a.socket, b.socket);
        assert!(a.socket.as_os_str().len() < 100);
        assert_eq!(a.dir, Path::new("/run/containerd/runc/k8s.io/.pool"));
    }
}
