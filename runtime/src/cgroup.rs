//! The host cgroup of a container: the VM monitor enters it before it starts
//! the VMM and its helpers, so the whole VM lives there (youki's libcgroups:
//! v1, v2, hybrid and systemd). Pause and resume freeze and thaw it, which stops
//! the VM whole, vCPUs and helpers alike. Only limits that mean the same for a
//! VM are applied on the host: CPU and block I/O. Memory is the VM's RAM and
//! pids are counted in the guest (QEMU's threads are not the workload's).

use std::path::PathBuf;

use libcgroups::common::{
    create_cgroup_manager, AnyCgroupManager, CgroupConfig, CgroupManager, ControllerOpt,
    FreezerState,
};
use nix_libcgroups::unistd::Pid;
use oci_spec::runtime::{LinuxResources, LinuxResourcesBuilder, Spec};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where a container's cgroup is, as the manager needs it again at delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCgroup {
    /// `linux.cgroupsPath`, or runc's default for the container.
    pub path: PathBuf,
    pub systemd: bool,
    pub id: String,
}

fn err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Vm(format!("cgroup: {what}: {e}"))
}

impl HostCgroup {
    /// The cgroup for `spec`: its `cgroupsPath`, else runc's default
    /// (`/ID`, or `system.slice:krun-oci:ID` with `--systemd-cgroup`).
    pub fn for_spec(spec: &Spec, id: &str, systemd: bool) -> HostCgroup {
        let path = spec
            .linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().clone())
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| {
                if systemd {
                    format!("system.slice:krun-oci:{id}").into()
                } else {
                    PathBuf::from("/").join(id)
                }
            });
        HostCgroup {
            path,
            systemd,
            id: id.to_string(),
        }
    }

    fn manager(&self) -> Result<AnyCgroupManager> {
        create_cgroup_manager(CgroupConfig {
            cgroup_path: self.path.clone(),
            systemd_cgroup: self.systemd,
            container_name: self.id.clone(),
        })
        .map_err(|e| err("opening the cgroup manager", e))
    }

    /// Creates the cgroup, moves `pid` (the monitor) into it and applies the
    /// host-side limits of `spec`.
    pub fn enter(&self, pid: i32, spec: &Spec) -> Result<()> {
        self.manager()?
            .add_task(Pid::from_raw(pid))
            .map_err(|e| err(&format!("entering {}", self.path.display()), e))?;
        match host_resources(spec)? {
            Some(resources) => self.apply(&resources),
            None => Ok(()),
        }
    }

    /// Moves more processes (a pooled VM's) into the cgroup (one manager:
    /// opening one costs more than moving a pid).
    pub fn add(&self, pids: &[i32]) -> Result<()> {
        let manager = self.manager()?;
        for &pid in pids {
            manager
                .add_task(Pid::from_raw(pid))
                .map_err(|e| err(&format!("moving pid {pid} into {}", self.path.display()), e))?;
        }
        Ok(())
    }

    /// Applies cpu and block I/O limits (`enter`, and `update` later).
    pub fn apply(&self, resources: &LinuxResources) -> Result<()> {
        self.manager()?
            .apply(&ControllerOpt {
                resources,
                disable_oom_killer: false,
                oom_score_adj: None,
                freezer_state: None,
            })
            .map_err(|e| err("applying cpu and block I/O limits", e))
    }

    /// The cgroup's statistics: what the whole VM (the VMM and its helpers) uses.
    pub fn stats(&self) -> Result<libcgroups::stats::Stats> {
        self.manager()?
            .stats()
            .map_err(|e| err("reading cgroup statistics", e))
    }

    /// Freezes (`true`) or thaws the whole VM.
    pub fn freeze(&self, frozen: bool) -> Result<()> {
        let state = if frozen {
            FreezerState::Frozen
        } else {
            FreezerState::Thawed
        };
        self.manager()?
            .freeze(state)
            .map_err(|e| err(if frozen { "freezing" } else { "thawing" }, e))
    }

    /// Kills whatever is still in the cgroup (as runc does at destroy), waits
    /// until it is empty, and removes it. Bounded by a count of short waits.
    pub fn remove(&self) -> Result<()> {
        let m = self.manager()?;
        let mut last = None;
        for _ in 0..250 {
            let pids = m.get_all_pids().unwrap_or_default();
            for p in &pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p.as_raw()),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            if pids.is_empty() {
                match m.remove() {
                    Ok(()) => return Ok(()),
                    // Exiting tasks may still be accounted for a moment.
                    Err(e) => last = Some(e.to_string()),
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Err(err(
            &format!("removing {}", self.path.display()),
            last.unwrap_or_else(|| "processes remain".into()),
        ))
    }
}

/// The part of `linux.resources` that applies to the VM as a whole on the host.
pub fn host_resources(spec: &Spec) -> Result<Option<LinuxResources>> {
    match spec.linux().as_ref().and_then(|l| l.resources().as_ref()) {
        Some(r) => host_part(r),
        None => Ok(None),
    }
}

/// CPU and block I/O of `r`: what the host cgroup of the VM enforces.
pub fn host_part(r: &LinuxResources) -> Result<Option<LinuxResources>> {
    if r.cpu().is_none() && r.block_io().is_none() {
        return Ok(None);
    }
    let mut b = LinuxResourcesBuilder::default();
    if let Some(cpu) = r.cpu() {
        b = b.cpu(cpu.clone());
    }
    if let Some(io) = r.block_io() {
        b = b.block_io(io.clone());
    }
    b.build().map(Some).map_err(|e| err("resources", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(linux: serde_json::Value) -> Spec {
        crate::testutil::spec_with("linux", linux)
    }

    #[test]
    fn path_from_the_spec_or_runcs_default() {
        let s = spec(serde_json::json!({"cgroupsPath": "/libpod_parent/libpod-abc"}));
        assert_eq!(
            HostCgroup::for_spec(&s, "abc", false).path,
            PathBuf::from("/libpod_parent/libpod-abc")
        );
        let s = spec(serde_json::json!({}));
        assert_eq!(
            HostCgroup::for_spec(&s, "c1", false).path,
            PathBuf::from("/c1")
        );
        assert_eq!(
            HostCgroup::for_spec(&s, "c1", true).path,
            PathBuf::from("system.slice:krun-oci:c1")
        );
    }

    #[test]
    fn only_cpu_and_block_io_go_to_the_host() {
        let s = spec(serde_json::json!({"resources": {
            "memory": {"limit": 268435456}, "pids": {"limit": 10},
            "devices": [{"allow": false, "access": "rwm"}]
        }}));
        assert!(host_resources(&s).unwrap().is_none());
        let s = spec(serde_json::json!({"resources": {
            "cpu": {"quota": 50000, "period": 100000}, "memory": {"limit": 268435456},
            "devices": [{"allow": false, "access": "rwm"}]
        }}));
        let r = host_resources(&s).unwrap().unwrap();
        assert_eq!(r.cpu().as_ref().and_then(|c| c.quota()), Some(50000));
        assert!(r.memory().is_none() && r.devices().is_none());
    }

    /// Enter, freeze, thaw, remove, on this host's real hierarchy.
    #[test]
    fn a_process_enters_freezes_and_the_cgroup_goes() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: needs root (cgroups)");
            return;
        }
        let id = format!("krun-oci-test-{}", std::process::id());
        let cg = HostCgroup::for_spec(&spec(serde_json::json!({})), &id, false);
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let r = (|| {
            cg.enter(
                pid,
                &spec(serde_json::json!({"resources": {"cpu": {"shares": 512}}})),
            )?;
            let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
            assert!(own.contains(&id), "{own}");
            cg.freeze(true)?;
            cg.freeze(false)
        })();
        let _ = child.kill();
        let _ = child.wait();
        let removed = cg.remove();
        r.unwrap();
        removed.unwrap();
        let left = std::process::Command::new("find")
            .args(["/sys/fs/cgroup", "-maxdepth", "3", "-name", &id])
            .output()
            .unwrap();
        assert!(
            left.stdout.is_empty(),
            "{}",
            String::from_utf8_lossy(&left.stdout)
        );
    }
}
