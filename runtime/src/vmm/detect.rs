//! Which accelerator and backend can run a VM on this host.
//!
//! `/dev/kvm` existing is not enough: on hosts that offer nested virtualization
//! through PVM (`kvm_pvm`), `KVM_CREATE_VM` succeeds but only PVM-built guest
//! kernels boot; stock kernels hang right after "Probing EDD". Hardware KVM counts
//! as usable only with `kvm_intel`/`kvm_amd` (or a vmx/svm CPU flag) and without
//! `kvm_pvm` (see docs/vmm.md and VM-BOOT-FACTS.md).

use std::fmt;
use std::fs;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::image::GuestImage;
use crate::vmm::libkrun::{self, LibkrunVmm};
use crate::vmm::qemu::{Accel, QemuVmm};
use crate::vmm::sandbox::SandboxVmm;
use crate::vmm::{Vmm, VmmChoice};
use crate::{Error, Result};

/// Raw facts about the host, gathered once; [`assess_kvm`] interprets them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// `Ok` when `/dev/kvm` opened read-write and answered `KVM_GET_API_VERSION` with 12.
    pub dev_kvm: std::result::Result<(), String>,
    /// Which of `kvm_intel`, `kvm_amd`, `kvm_pvm` are loaded (from `/sys/module`).
    pub kvm_modules: Vec<String>,
    /// `vmx` or `svm` when /proc/cpuinfo lists it.
    pub virt_flag: Option<String>,
}

/// Whether hardware KVM can boot a stock guest kernel here, and why (not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmAssessment {
    pub usable: bool,
    pub reason: String,
}

impl fmt::Display for KvmAssessment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.usable { "usable" } else { "not usable" };
        write!(f, "hardware KVM {verdict}: {}", self.reason)
    }
}

/// The `vmx`/`svm` flag of the first `flags` line of /proc/cpuinfo, if any.
pub fn parse_virt_flag(cpuinfo: &str) -> Option<String> {
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags"))?;
    let (_, list) = flags.split_once(':')?;
    list.split_whitespace()
        .find(|f| *f == "vmx" || *f == "svm")
        .map(str::to_owned)
}

fn probe_dev_kvm(path: &Path) -> std::result::Result<(), String> {
    const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an int.
    let v = unsafe { libc::ioctl(f.as_raw_fd(), KVM_GET_API_VERSION as _, 0) };
    if v != 12 {
        return Err(format!(
            "{}: KVM_GET_API_VERSION returned {v}, expected 12",
            path.display()
        ));
    }
    Ok(())
}

impl HostFacts {
    /// Reads /dev/kvm, /sys/module and /proc/cpuinfo.
    pub fn probe() -> HostFacts {
        let kvm_modules = ["kvm_intel", "kvm_amd", "kvm_pvm"]
            .iter()
            .filter(|m| Path::new("/sys/module").join(m).exists())
            .map(|m| m.to_string())
            .collect();
        let virt_flag = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| parse_virt_flag(&c));
        HostFacts {
            dev_kvm: probe_dev_kvm(Path::new("/dev/kvm")),
            kvm_modules,
            virt_flag,
        }
    }

    fn has_module(&self, m: &str) -> bool {
        self.kvm_modules.iter().any(|x| x == m)
    }
}

/// Decides whether hardware KVM can boot stock guest kernels.
pub fn assess_kvm(facts: &HostFacts) -> KvmAssessment {
    let no = |reason: String| KvmAssessment {
        usable: false,
        reason,
    };
    if let Err(e) = &facts.dev_kvm {
        return no(e.clone());
    }
    if facts.has_module("kvm_pvm") {
        return no(
            "/dev/kvm is backed by PVM (module kvm_pvm loaded): only PVM-built guest \
                   kernels run there, stock kernels hang at boot"
                .into(),
        );
    }
    let vendor = ["kvm_intel", "kvm_amd"]
        .into_iter()
        .find(|m| facts.has_module(m));
    match (vendor, &facts.virt_flag) {
        (Some(m), _) => KvmAssessment {
            usable: true,
            reason: format!("/dev/kvm works and {m} is loaded"),
        },
        (None, Some(flag)) => KvmAssessment {
            usable: true,
            reason: format!("/dev/kvm works and the CPU has {flag}"),
        },
        (None, None) => no(
            "/dev/kvm works but neither kvm_intel/kvm_amd is loaded nor does the CPU \
                            list vmx/svm (nested or paravirtualized KVM)"
                .into(),
        ),
    }
}

/// The backend and accelerator a choice resolves to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Libkrun,
    Qemu(Accel),
    /// guest-init on the host, no VM (tests).
    Sandbox,
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Engine::Libkrun => f.write_str("libkrun (KVM)"),
            Engine::Qemu(Accel::Kvm) => f.write_str("qemu + KVM"),
            Engine::Qemu(Accel::Tcg) => f.write_str("qemu + TCG (software emulation)"),
            Engine::Sandbox => f.write_str("sandbox (no VM)"),
        }
    }
}

/// Inputs of the selection besides the user's choice.
#[derive(Debug, Clone)]
pub struct SelectionInputs {
    pub kvm: KvmAssessment,
    /// This build carries the libkrun backend.
    pub libkrun_built: bool,
    /// A kernel libkrun can boot exists (libkrunfw, or a kernel with
    /// `VIRTIO_MMIO_CMDLINE_DEVICES`, i.e. not the stock distro kernel).
    pub libkrun_kernel: bool,
}

/// Resolves a choice to an engine, with the reason in words. Pure: see [`select`].
pub fn plan(choice: VmmChoice, inputs: &SelectionInputs) -> Result<(Engine, String)> {
    let qemu_accel = if inputs.kvm.usable {
        Accel::Kvm
    } else {
        Accel::Tcg
    };
    let libkrun_blocker = if !inputs.kvm.usable {
        Some(format!(
            "libkrun needs hardware KVM, which is not usable here: {}",
            inputs.kvm.reason
        ))
    } else if !inputs.libkrun_built {
        Some("this build has no libkrun backend".to_string())
    } else if !inputs.libkrun_kernel {
        Some(
            "no kernel libkrun can boot (no libkrunfw; the stock distro kernel lacks \
              VIRTIO_MMIO_CMDLINE_DEVICES): run `make kernel`, or install libkrunfw"
                .to_string(),
        )
    } else {
        None
    };
    match choice {
        VmmChoice::Libkrun => match libkrun_blocker {
            None => Ok((Engine::Libkrun, "libkrun requested".into())),
            Some(why) => Err(Error::Vm(format!("--vmm libkrun cannot run here: {why}"))),
        },
        VmmChoice::Qemu => Ok((
            Engine::Qemu(qemu_accel),
            format!("qemu requested; {}", inputs.kvm),
        )),
        VmmChoice::Sandbox => Ok((Engine::Sandbox, "sandbox requested (no VM)".into())),
        VmmChoice::Auto => match libkrun_blocker {
            None => Ok((Engine::Libkrun, format!("auto: {}", inputs.kvm))),
            Some(why) => Ok((
                Engine::Qemu(qemu_accel),
                format!("auto: not libkrun because {why}"),
            )),
        },
    }
}

/// The chosen backend, ready to launch VMs, and why it was chosen.
pub struct Selection {
    pub vmm: Box<dyn Vmm>,
    pub engine: Engine,
    pub explanation: String,
}

/// Probes the host and builds the backend `choice` resolves to for `image`.
/// `image`: the guest image, which every engine but the sandbox boots.
pub fn select(choice: VmmChoice, image: Option<&GuestImage>) -> Result<Selection> {
    let inputs = SelectionInputs {
        kvm: assess_kvm(&HostFacts::probe()),
        libkrun_built: true,
        libkrun_kernel: image.is_some_and(|image| {
            libkrun::choose_kernel(image, libkrun::libkrunfw_available()).is_ok()
        }),
    };
    let (engine, explanation) = plan(choice, &inputs)?;
    let image = || image.ok_or_else(|| Error::Vm(format!("{engine} needs a guest image")));
    let vmm: Box<dyn Vmm> = match engine {
        Engine::Qemu(accel) => Box::new(QemuVmm::new(image()?.clone(), accel)?),
        Engine::Libkrun => Box::new(LibkrunVmm::new(image()?)?),
        Engine::Sandbox => Box::new(SandboxVmm::new(crate::image::locate_init()?)?),
    };
    Ok(Selection {
        vmm,
        engine,
        explanation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(dev: bool, mods: &[&str], flag: Option<&str>) -> HostFacts {
        HostFacts {
            dev_kvm: if dev {
                Ok(())
            } else {
                Err("cannot open /dev/kvm: No such file".into())
            },
            kvm_modules: mods.iter().map(|s| s.to_string()).collect(),
            virt_flag: flag.map(str::to_owned),
        }
    }

    #[test]
    fn cpuinfo_parsing() {
        let ci = "processor\t: 0\ncpu MHz\t\t: 2199.998\nflags\t\t: fpu vme sse2 vmx ssse3\n";
        assert_eq!(parse_virt_flag(ci).as_deref(), Some("vmx"));
        let ci = "cpu MHz : 3000.000\nflags : fpu svm\n";
        assert_eq!(parse_virt_flag(ci).as_deref(), Some("svm"));
        assert_eq!(parse_virt_flag("flags : fpu vmxe svmx\n"), None);
    }

    #[test]
    fn kvm_assessment() {
        assert!(assess_kvm(&facts(true, &["kvm_intel"], None)).usable);
        assert!(assess_kvm(&facts(true, &[], Some("svm"))).usable);
        let pvm = assess_kvm(&facts(true, &["kvm_pvm"], None));
        assert!(!pvm.usable);
        assert!(pvm.reason.contains("PVM"), "{}", pvm.reason);
        // kvm_pvm wins even when a vendor module shows up too.
        assert!(!assess_kvm(&facts(true, &["kvm_intel", "kvm_pvm"], Some("vmx"))).usable);
        assert!(!assess_kvm(&facts(false, &["kvm_intel"], Some("vmx"))).usable);
        assert!(!assess_kvm(&facts(true, &[], None)).usable);
    }

    #[test]
    fn planning() {
        let hw = KvmAssessment {
            usable: true,
            reason: "ok".into(),
        };
        let none = KvmAssessment {
            usable: false,
            reason: "PVM".into(),
        };
        let inputs = |kvm: &KvmAssessment, built, kernel| SelectionInputs {
            kvm: kvm.clone(),
            libkrun_built: built,
            libkrun_kernel: kernel,
        };
        assert_eq!(
            plan(VmmChoice::Auto, &inputs(&hw, true, true)).unwrap().0,
            Engine::Libkrun
        );
        assert_eq!(
            plan(VmmChoice::Auto, &inputs(&hw, true, false)).unwrap().0,
            Engine::Qemu(Accel::Kvm)
        );
        assert_eq!(
            plan(VmmChoice::Auto, &inputs(&hw, false, true)).unwrap().0,
            Engine::Qemu(Accel::Kvm)
        );
        let (e, why) = plan(VmmChoice::Auto, &inputs(&none, true, true)).unwrap();
        assert_eq!(e, Engine::Qemu(Accel::Tcg));
        assert!(why.contains("PVM"), "{why}");
        assert_eq!(
            plan(VmmChoice::Qemu, &inputs(&hw, true, true)).unwrap().0,
            Engine::Qemu(Accel::Kvm)
        );
        assert!(plan(VmmChoice::Libkrun, &inputs(&none, true, true)).is_err());
    }
}
