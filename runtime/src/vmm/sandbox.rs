//! The sandbox backend: no VM. guest-init runs on the host in its host-sandbox
//! mode (fresh pid, mount, uts and ipc namespaces via `unshare`, the container's
//! rootfs as its root, unix sockets for the vsock ports), so the monitor, the
//! lifecycle verbs, exec and the shim can be tested end to end without QEMU.
//!
//! It isolates nothing like a VM does: it is chosen only with `--vmm sandbox`
//! (hidden from `--help`), and only when [`ALLOW_ENV`] is `1`.

use std::path::PathBuf;
use std::process::Command;

use crate::guest::GuestLink;
use crate::supervise::{self, WaitedChild};
use crate::vmm::{Vm, VmExit, VmSpec, Vmm};
use crate::{Error, Result};

/// Must be `1` for the sandbox backend to run.
pub const ALLOW_ENV: &str = "KRUN_OCI_ALLOW_SANDBOX";

/// guest-init's log (its "console"), in the run dir.
const LOG_FILE: &str = "sandbox-init.log";

pub struct SandboxVmm {
    init: PathBuf,
}

impl SandboxVmm {
    /// `init`: the guest-init binary to run on the host.
    pub fn new(init: PathBuf) -> Result<Self> {
        if std::env::var(ALLOW_ENV).as_deref() != Ok("1") {
            return Err(Error::InvalidInput(format!(
                "--vmm sandbox runs the container without a VM (for tests); set {ALLOW_ENV}=1 to allow it"
            )));
        }
        Ok(Self { init })
    }
}

impl Vmm for SandboxVmm {
    fn name(&self) -> &'static str {
        "sandbox"
    }

    fn link(&self, spec: &VmSpec) -> GuestLink {
        GuestLink::PortSockets {
            dir: spec.run_dir.clone(),
        }
    }

    fn has_network(&self) -> bool {
        false
    }

    fn launch(&self, spec: &VmSpec) -> Result<Box<dyn Vm>> {
        if spec.mounts.is_some() {
            return Err(Error::InvalidInput(
                "the sandbox backend does not serve bind mounts".into(),
            ));
        }
        let log = spec.run_dir.join(LOG_FILE);
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--pid",
            "--mount",
            "--uts",
            "--ipc",
            "--fork",
            "--kill-child",
        ])
        .arg(&self.init)
        .env("KRUN_OCI_INIT_SANDBOX", &spec.run_dir)
        .env("KRUN_OCI_INIT_ROOTFS", &spec.rootfs);
        supervise::supervised(&mut cmd, &log)?;
        let name = format!("sandbox-{}", spec.id.chars().take(7).collect::<String>());
        let child = WaitedChild::spawn(&name, cmd)
            .map_err(|e| Error::Vm(format!("starting guest-init in a sandbox: {e}")))?;
        Ok(Box::new(SandboxVm {
            child,
            run_dir: spec.run_dir.clone(),
            log,
        }))
    }
}

struct SandboxVm {
    child: WaitedChild,
    run_dir: PathBuf,
    log: PathBuf,
}

impl Vm for SandboxVm {
    fn link(&self) -> GuestLink {
        GuestLink::PortSockets {
            dir: self.run_dir.clone(),
        }
    }

    fn pids(&self) -> Vec<i32> {
        vec![self.child.pid]
    }

    fn try_wait(&mut self) -> std::io::Result<Option<VmExit>> {
        Ok(self
            .child
            .exit()
            .map(|status| super::exit_of("sandbox", status)))
    }

    fn kill(&mut self) {
        // `--kill-child`: guest-init and everything in its pid namespace go with it.
        self.child.kill();
    }

    fn console_tail(&self, max: usize) -> String {
        supervise::tail(&self.log, max)
    }
}

impl Drop for SandboxVm {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_unless_allowed() {
        // The variable is never set in unit tests.
        let e = SandboxVmm::new("/init".into()).err().unwrap();
        assert!(e.to_string().contains(ALLOW_ENV), "{e}");
    }
}
