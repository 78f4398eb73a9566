//! `krun-oci check`: what this host offers, which engine `auto` picks and why, and
//! for anything missing the command that installs it.

use std::fmt;
use std::path::PathBuf;

use crate::image::{self, GuestImage, ImageOptions};
use crate::vmm::detect::{self, assess_kvm, Engine, HostFacts, KvmAssessment, SelectionInputs};
use crate::vmm::qemu::{self, Program};
use crate::vmm::VmmChoice;

/// One external program the QEMU backend runs.
#[derive(Debug, Clone)]
pub struct ProgramStatus {
    pub name: &'static str,
    pub path: Option<PathBuf>,
    pub version: Option<String>,
    pub install: &'static str,
}

impl ProgramStatus {
    fn probe(p: &Program) -> ProgramStatus {
        let path = qemu::find_program(p);
        let version = path.as_deref().and_then(qemu::program_version);
        ProgramStatus {
            name: p.name,
            path,
            version,
            install: p.install,
        }
    }
}

/// Everything `krun-oci check` found.
#[derive(Debug)]
pub struct CheckReport {
    pub kvm: KvmAssessment,
    pub programs: Vec<ProgramStatus>,
    /// `Ok`: the image (built now if it was missing); `Err`: why there is none.
    pub image: std::result::Result<GuestImage, String>,
    pub libkrun: std::result::Result<(), String>,
    /// What the given choice resolves to, or why it cannot run.
    pub engine: std::result::Result<(Engine, String), String>,
    /// Why our own kernel is (not) the one in use.
    pub own_kernel: String,
    /// The kernel search the image was resolved with.
    pub kernel_source: crate::image::KernelSource,
}

impl CheckReport {
    pub fn qemu_ready(&self) -> bool {
        self.programs.iter().all(|p| p.path.is_some()) && self.image.is_ok()
    }

    /// At least one backend can run a container (the CLI exits 0 iff true).
    pub fn can_run(&self) -> bool {
        self.qemu_ready() || self.libkrun.is_ok()
    }
}

/// Probes the host and the guest image (building the image if it is missing).
pub fn report(choice: VmmChoice, opts: &ImageOptions) -> CheckReport {
    let kvm = assess_kvm(&HostFacts::probe());
    let programs = [qemu::QEMU, qemu::VIRTIOFSD, qemu::VHOST_VSOCK]
        .iter()
        .map(ProgramStatus::probe)
        .collect();
    let image = image::ensure(opts).map_err(|e| e.to_string());
    let inputs = SelectionInputs {
        kvm: kvm.clone(),
        libkrun_built: true,
        libkrun_kernel: image.as_ref().is_ok_and(|i| {
            crate::vmm::libkrun::choose_kernel(i, crate::vmm::libkrun::libkrunfw_available())
                .is_ok()
        }),
    };
    let libkrun = detect::plan(VmmChoice::Libkrun, &inputs)
        .map(|_| ())
        .map_err(|e| {
            e.to_string()
                .replace("vm: --vmm libkrun cannot run here: ", "")
        });
    let engine = detect::plan(choice, &inputs).map_err(|e| e.to_string());
    CheckReport {
        kvm,
        programs,
        image,
        libkrun,
        engine,
        own_kernel: crate::image::own_kernel::explain(&opts.cache_dir()),
        kernel_source: opts.kernel_source,
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = |ok: bool| if ok { "ok  " } else { "MISSING" };
        writeln!(f, "KVM: {}", self.kvm)?;
        writeln!(f)?;
        writeln!(
            f,
            "qemu backend: {}",
            if self.qemu_ready() {
                "ready"
            } else {
                "not ready"
            }
        )?;
        for p in &self.programs {
            match &p.path {
                Some(path) => writeln!(
                    f,
                    "  {} {:<20} {} ({})",
                    mark(true),
                    p.name,
                    path.display(),
                    p.version.as_deref().unwrap_or("version unknown")
                )?,
                None => writeln!(f, "  {} {:<20} install: {}", mark(false), p.name, p.install)?,
            }
        }
        match &self.image {
            Ok(img) => {
                writeln!(
                    f,
                    "  {} {:<20} {} [{}]",
                    mark(true),
                    "kernel",
                    img.kernel.display(),
                    img.kernel_origin
                )?;
                writeln!(
                    f,
                    "  {:<25} {}",
                    "",
                    crate::image::kernel_choice_reason(img.kernel_origin, self.kernel_source)
                )?;
                writeln!(
                    f,
                    "  {} {:<20} {}",
                    mark(true),
                    "initramfs",
                    img.initrd.display()
                )?;
            }
            Err(e) => writeln!(f, "  {} {:<20} {e}", mark(false), "guest image")?,
        }
        writeln!(f, "  {}", self.own_kernel)?;
        writeln!(f)?;
        match &self.libkrun {
            Ok(()) => writeln!(f, "libkrun backend: ready")?,
            Err(e) => writeln!(f, "libkrun backend: not ready: {e}")?,
        }
        writeln!(f)?;
        match &self.engine {
            Ok((engine, why)) => writeln!(f, "engine: {engine} ({why})")?,
            Err(e) => writeln!(f, "engine: none: {e}")?,
        }
        if !self.can_run() {
            writeln!(f, "no backend can run a container on this host yet")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_missing_installs_and_engine() {
        let r = CheckReport {
            kvm: KvmAssessment {
                usable: false,
                reason: "/dev/kvm is backed by PVM".into(),
            },
            programs: vec![
                ProgramStatus {
                    name: "qemu-system-x86_64",
                    path: Some("/usr/bin/qemu-system-x86_64".into()),
                    version: Some("QEMU emulator version 7.2.22".into()),
                    install: qemu::QEMU.install,
                },
                ProgramStatus {
                    name: "virtiofsd",
                    path: None,
                    version: None,
                    install: qemu::VIRTIOFSD.install,
                },
            ],
            image: Err("krun-oci-init not found".into()),
            libkrun: Err("libkrun needs hardware KVM".into()),
            engine: Ok((
                Engine::Qemu(qemu::Accel::Tcg),
                "auto: not libkrun because PVM".into(),
            )),
            own_kernel: "own kernel: not built yet: run `make kernel`".into(),
            kernel_source: Default::default(),
        };
        let s = r.to_string();
        assert!(
            s.contains("hardware KVM not usable: /dev/kvm is backed by PVM"),
            "{s}"
        );
        assert!(s.contains("cargo install --locked virtiofsd"), "{s}");
        assert!(s.contains("engine: qemu + TCG"), "{s}");
        assert!(s.contains("run `make kernel`"), "{s}");
        assert!(!r.can_run());
    }
}
