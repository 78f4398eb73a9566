//! Host-wide settings: `/etc/krun-oci/config.toml`, or the file `KRUN_OCI_CONFIG`
//! names. Clients such as podman and containerd start the runtime with their own
//! flags, so a setting that must hold for every container on a host lives here.
//!
//! ```toml
//! vmm = "qemu"   # auto | libkrun | qemu; --vmm and KRUN_OCI_VMM win over it
//! rootfs_cache = "auto"   # always (default) | auto: the guest's cache of the rootfs
//!
//! [pool]          # krun-oci pool serve (its flags win)
//! min_idle = 2
//! ram_mib = 512
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::vmm::{RootfsCache, VmmChoice};

/// Where the file is read from when `KRUN_OCI_CONFIG` is not set.
pub const DEFAULT_PATH: &str = "/etc/krun-oci/config.toml";

/// The settings; every one is optional.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// The VMM when neither `--vmm` nor `KRUN_OCI_VMM` chooses one.
    pub vmm: Option<VmmChoice>,
    /// `krun-oci pool serve`'s settings (its flags win).
    pub pool: Option<crate::pool::PoolSettings>,
    /// How the guest caches container root filesystems (QEMU).
    pub rootfs_cache: Option<RootfsCache>,
}

/// The file in use: `KRUN_OCI_CONFIG` if set, else [`DEFAULT_PATH`].
pub fn path() -> PathBuf {
    std::env::var_os("KRUN_OCI_CONFIG")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PATH))
}

/// Reads the settings; a missing file means none, a malformed one is an error.
pub fn load_from(path: &Path) -> Result<HostConfig> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HostConfig::default()),
        Err(e) => {
            return Err(Error::InvalidInput(format!(
                "reading {}: {e}",
                path.display()
            )))
        }
    };
    toml::from_str(&text).map_err(|e| Error::InvalidInput(format!("{}: {e}", path.display())))
}

/// [`load_from`] of [`path`].
pub fn load() -> Result<HostConfig> {
    load_from(&path())
}

/// The VMM when no `--vmm` flag chooses one: `KRUN_OCI_VMM`, else the file's
/// `vmm`, else auto. The CLI and the shim both ask here, so containerd and
/// podman get the same engine on one host.
pub fn default_vmm() -> Result<VmmChoice> {
    if let Some(v) = std::env::var("KRUN_OCI_VMM").ok().filter(|v| !v.is_empty()) {
        return <VmmChoice as clap::ValueEnum>::from_str(&v, true)
            .map_err(|e| Error::InvalidInput(format!("KRUN_OCI_VMM={v:?}: {e}")));
    }
    Ok(load()?.vmm.unwrap_or_default())
}

/// The rootfs cache policy: the file's `rootfs_cache`, else [`RootfsCache::Always`].
/// Read by `create` (for the monitor) and by the pool (its VMs' shape).
pub fn rootfs_cache() -> Result<RootfsCache> {
    Ok(load()?.rootfs_cache.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_file_is_no_settings_and_bad_ones_are_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("config.toml");
        assert_eq!(load_from(&p).unwrap(), HostConfig::default());
        std::fs::write(&p, "vmm = \"qemu\"\n").unwrap();
        assert_eq!(load_from(&p).unwrap().vmm, Some(VmmChoice::Qemu));
        std::fs::write(&p, "vmm = \"firecracker\"\n").unwrap();
        assert!(load_from(&p)
            .unwrap_err()
            .to_string()
            .contains("config.toml"));
        std::fs::write(&p, "rootfs_cache = \"auto\"\n").unwrap();
        assert_eq!(load_from(&p).unwrap().rootfs_cache, Some(RootfsCache::Auto));
        std::fs::write(&p, "rootfs_cache = \"none\"\n").unwrap();
        assert!(load_from(&p).is_err());
        std::fs::write(&p, "vmn = \"qemu\"\n").unwrap();
        assert!(
            load_from(&p).is_err(),
            "an unknown key is a mistake to report"
        );
    }
}
