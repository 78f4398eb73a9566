//! The libkrun backend: the VMM of the `libkrun` crate, built from source and
//! linked into this binary (no system libkrun).
//!
//! `krun_start_enter` takes the calling thread and `_exit`s the process when the
//! guest stops, so the monitor does not call it itself: `launch` re-executes this
//! binary as the hidden `krun-oci libkrun-vmm --config <run_dir>/libkrun.json`, a
//! child that configures a context from that file ([`LibkrunConfig::apply`]) and
//! enters the VM. The monitor supervises that pid like qemu: `PR_SET_PDEATHSIG`
//! (SIGKILL), its own process group, a pidfd for `kill`, a waiter thread for
//! `try_wait`. Why a child and not the monitor's own thread: docs/vmm.md.
//!
//! The configuration is pure data ([`LibkrunConfig::new`]), unit-tested without KVM;
//! only [`LibkrunConfig::apply`] and [`vmm_main`] touch libkrun.

use std::ffi::{CString, OsStr};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use krun_oci_protocol as proto;
use serde::{Deserialize, Serialize};

use crate::error::IoContext;
use crate::guest::GuestLink;
use crate::image::{GuestImage, KernelOrigin};
use crate::vmm::{Vm, VmExit, VmSpec, Vmm};
use crate::{Error, Result};

/// `KRUN_KERNEL_FORMAT_ELF` of libkrun.h.
pub const KRUN_KERNEL_FORMAT_ELF: u32 = 1;
/// The virtio-fs tag guest-init mounts as the container root.
pub use proto::contract::ROOT_TAG;
/// The virtio-fs tag the libkrunfw kernel mounts as `/` (`root=/dev/root rootfstype=virtiofs`).
pub const LIBKRUNFW_ROOT_TAG: &str = "/dev/root";
/// The init the libkrunfw command line names (`init=/init.krun`).
pub const LIBKRUNFW_INIT: &str = "init.krun";
/// The shared library holding libkrun's own kernel.
pub const LIBKRUNFW: &str = "libkrunfw.so.5";
/// Guest ports the host connects to (guest-init listens).
pub const GUEST_PORTS: [u32; 3] = [proto::CONTROL_PORT, proto::EXEC_PORT, proto::PTY_PORT];
/// Guest connect-outs (to CID 2) the host accepts: the ready beacon / events stream.
pub const HOST_PORTS: [u32; 1] = [proto::HOST_EVENTS_PORT];
/// File the helper reads its configuration from, in the run dir.
pub const CONFIG_FILE: &str = "libkrun.json";
/// Log of the VMM helper (libkrun's own messages), in the run dir.
pub const LOG_FILE: &str = "libkrun.log";

/// Base command line for an external kernel. libkrun appends its `virtio_mmio.device=`
/// parameters; `reboot=k` + `krun_oci.halt=reboot`: guest-init reboots instead of
/// powering off (libkrun has no ACPI power-off; an i8042 reset ends the VMM).
pub const BASE_CMDLINE: &str =
    "reboot=k panic=-1 panic_print=0 console=hvc0 quiet no-kvmapf krun_oci.halt=reboot";

/// Whether `libkrunfw.so.5` can be loaded by this process.
pub fn libkrunfw_available() -> bool {
    let name = CString::new(LIBKRUNFW).expect("no NUL");
    // SAFETY: dlopen/dlclose with a valid C string; the handle is closed at once.
    unsafe {
        let h = libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
        if h.is_null() {
            return false;
        }
        libc::dlclose(h);
    }
    true
}

/// Where the guest kernel comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelSource {
    /// `krun_set_kernel(ctx, kernel, format, initrd, cmdline)`.
    External {
        kernel: PathBuf,
        format: u32,
        initrd: PathBuf,
        cmdline: String,
    },
    /// libkrunfw's bundled kernel (no initramfs: guest-init comes in as an overlay
    /// file of a virtual root filesystem, see [`LibkrunConfig::new`]).
    Libkrunfw,
}

/// One `krun_add_virtiofs` (path `None`: a virtual-only filesystem).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioFs {
    pub tag: String,
    pub path: Option<PathBuf>,
}

/// One `krun_fs_add_overlay_dir` / `krun_fs_add_overlay_file` (file: contents read from `source`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overlay {
    pub tag: String,
    pub path: String,
    pub mode: u32,
    /// `None`: a directory.
    pub source: Option<PathBuf>,
}

/// One `krun_add_vsock_port2`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockPort {
    pub port: u32,
    pub path: PathBuf,
    /// true: libkrun binds `path`, host connections reach the guest's listener on `port`.
    /// false: a guest connection to (CID 2, `port`) is connected to `path`, where the host listens.
    pub listen: bool,
}

/// Everything the helper tells libkrun, as data: the calls [`LibkrunConfig::apply`] makes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LibkrunConfig {
    pub vcpus: u8,
    pub ram_mib: u32,
    pub kernel: KernelSource,
    pub virtiofs: Vec<VirtioFs>,
    pub overlays: Vec<Overlay>,
    /// Extra kernel command-line words through `krun_set_env` (libkrunfw only, where
    /// the command line is libkrun's; libkrun quotes each word).
    pub cmdline_env: Vec<String>,
    /// `krun_add_vsock(ctx, tsi_features)` after `krun_disable_implicit_vsock`: 0 = no
    /// TSI (our kernel has no AF_TSI; guest-init speaks plain AF_VSOCK).
    pub tsi_features: u32,
    pub vsock_ports: Vec<VsockPort>,
    pub console_output: PathBuf,
    /// Bind mounts the helper makes in its own mount namespace before libkrun
    /// serves the staging directory (one of `virtiofs`, tag `krun-mounts`).
    #[serde(default)]
    pub mounts: Option<crate::mounts::MountsShare>,
    /// One `krun_add_net_tap` per NIC: persistent taps the monitor made in the
    /// container's network namespace (network.rs), opened by name.
    #[serde(default)]
    pub nics: Vec<NetTap>,
}

/// One `krun_add_net_tap(ctx, tap, mac, NET_FEATURES, 0)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetTap {
    pub tap: String,
    pub mac: [u8; 6],
}

/// virtio-net offloads libkrun negotiates on the tap (its `NET_FEATURE_*`, the
/// virtio-net feature bits): checksum offload and TSO both ways, as QEMU's tap
/// backend offers. TSO needs the tap's vnet header, which network.rs sets.
pub const NET_FEATURES: u32 = 1 // CSUM
    | 1 << 1 // GUEST_CSUM
    | 1 << 7 // GUEST_TSO4
    | 1 << 8 // GUEST_TSO6
    | 1 << 11 // HOST_TSO4
    | 1 << 12; // HOST_TSO6

impl LibkrunConfig {
    /// The configuration for one VM. `init` is guest-init (needed with libkrunfw only).
    pub fn new(spec: &VmSpec, kernel: &KernelSource, init: Option<&Path>) -> Result<LibkrunConfig> {
        let link = GuestLink::PortSockets {
            dir: spec.run_dir.clone(),
        };
        let mut vsock_ports: Vec<VsockPort> = GUEST_PORTS
            .iter()
            .map(|&port| VsockPort {
                port,
                path: link.guest_port_path(port).expect("port sockets"),
                listen: true,
            })
            .collect();
        vsock_ports.extend(HOST_PORTS.iter().map(|&port| VsockPort {
            port,
            path: link.host_port_path(port),
            listen: false,
        }));
        let mut virtiofs = vec![VirtioFs {
            tag: ROOT_TAG.into(),
            path: Some(spec.rootfs.clone()),
        }];
        if let Some(m) = &spec.mounts {
            virtiofs.push(VirtioFs {
                tag: crate::mounts::MOUNTS_TAG.into(),
                path: Some(m.staging.clone()),
            });
        }
        let mut overlays = Vec::new();
        let mut cmdline_env = Vec::new();
        if *kernel == KernelSource::Libkrunfw {
            let init = init
                .ok_or_else(|| Error::Vm("libkrunfw boot needs the krun-oci-init binary".into()))?;
            // The kernel mounts a virtual root holding only guest-init and the mount
            // points it uses; guest-init then moves the container root over it.
            virtiofs.insert(
                0,
                VirtioFs {
                    tag: LIBKRUNFW_ROOT_TAG.into(),
                    path: None,
                },
            );
            for d in ["dev", "proc", "sys", "newroot"] {
                overlays.push(Overlay {
                    tag: LIBKRUNFW_ROOT_TAG.into(),
                    path: d.into(),
                    mode: 0o755,
                    source: None,
                });
            }
            overlays.push(Overlay {
                tag: LIBKRUNFW_ROOT_TAG.into(),
                path: LIBKRUNFW_INIT.into(),
                mode: 0o755,
                source: Some(init.to_owned()),
            });
            cmdline_env.push(proto::contract::CMDLINE_HALT_REBOOT.into());
        }
        Ok(LibkrunConfig {
            vcpus: u8::try_from(spec.vcpus.clamp(1, 255)).unwrap_or(1),
            ram_mib: spec.ram_mib.max(64),
            kernel: kernel.clone(),
            virtiofs,
            overlays,
            cmdline_env,
            tsi_features: 0,
            vsock_ports,
            console_output: spec.run_dir.join("console.log"),
            mounts: spec.mounts.clone(),
            nics: spec
                .nics
                .iter()
                .map(|n| NetTap {
                    tap: n.tap_name.clone(),
                    mac: n.mac,
                })
                .collect(),
        })
    }

    /// Sockets libkrun binds (must not exist before the VM starts; removed after).
    pub fn listen_sockets(&self) -> Vec<PathBuf> {
        self.vsock_ports
            .iter()
            .filter(|p| p.listen)
            .map(|p| p.path.clone())
            .collect()
    }

    /// Configures libkrun context `ctx` (the FFI calls; needs no KVM until start).
    pub fn apply(&self, ctx: u32) -> Result<()> {
        use krun::*;
        let check = |what: &str, rc: i32| -> Result<()> {
            if rc < 0 {
                Err(Error::Vm(format!(
                    "libkrun {what}: {}",
                    io::Error::from_raw_os_error(-rc)
                )))
            } else {
                Ok(())
            }
        };
        check(
            "krun_set_vm_config",
            krun_set_vm_config(ctx, self.vcpus, self.ram_mib),
        )?;
        if let KernelSource::External {
            kernel,
            format,
            initrd,
            cmdline,
        } = &self.kernel
        {
            let (k, i, c) = (cpath(kernel)?, cpath(initrd)?, cstr(cmdline)?);
            // SAFETY: valid NUL-terminated strings that outlive the call (libkrun copies them).
            check("krun_set_kernel", unsafe {
                krun_set_kernel(ctx, k.as_ptr(), *format, i.as_ptr(), c.as_ptr())
            })?;
        }
        for fs in &self.virtiofs {
            let tag = cstr(&fs.tag)?;
            let path = fs.path.as_deref().map(cpath).transpose()?;
            let p = path.as_ref().map_or(std::ptr::null(), |p| p.as_ptr());
            // SAFETY: valid strings (or NULL path = virtual-only fs, documented by libkrun).
            check("krun_add_virtiofs", unsafe {
                krun_add_virtiofs(ctx, tag.as_ptr(), p)
            })?;
        }
        for o in &self.overlays {
            let (tag, path) = (cstr(&o.tag)?, cstr(&o.path)?);
            match &o.source {
                None => {
                    // SAFETY: valid strings.
                    check("krun_fs_add_overlay_dir", unsafe {
                        krun_fs_add_overlay_dir(ctx, tag.as_ptr(), path.as_ptr(), o.mode)
                    })?
                }
                Some(src) => {
                    let data = fs::read(src).ctx(|| format!("read {}", src.display()))?;
                    // libkrun keeps the pointer for the VM's lifetime, which is this process's.
                    let data: &'static [u8] = Vec::leak(data);
                    // SAFETY: valid strings; `data` lives until the process exits.
                    check("krun_fs_add_overlay_file", unsafe {
                        krun_fs_add_overlay_file(
                            ctx,
                            tag.as_ptr(),
                            path.as_ptr(),
                            data.as_ptr(),
                            data.len(),
                            o.mode,
                            false,
                        )
                    })?
                }
            }
        }
        if !self.cmdline_env.is_empty() {
            let words = self
                .cmdline_env
                .iter()
                .map(|w| cstr(w))
                .collect::<Result<Vec<_>>>()?;
            let mut ptrs: Vec<*const libc::c_char> = words.iter().map(|w| w.as_ptr()).collect();
            ptrs.push(std::ptr::null());
            // SAFETY: a NULL-terminated array of valid strings.
            check("krun_set_env", unsafe { krun_set_env(ctx, ptrs.as_ptr()) })?;
        }
        check(
            "krun_disable_implicit_vsock",
            krun_disable_implicit_vsock(ctx),
        )?;
        check("krun_add_vsock", krun_add_vsock(ctx, self.tsi_features))?;
        for p in &self.vsock_ports {
            let path = cpath(&p.path)?;
            // SAFETY: valid string.
            check("krun_add_vsock_port2", unsafe {
                krun_add_vsock_port2(ctx, p.port, path.as_ptr(), p.listen)
            })?;
        }
        for n in &self.nics {
            let tap = cstr(&n.tap)?;
            // SAFETY: a valid string and a 6-byte MAC, both read during the call.
            check("krun_add_net_tap", unsafe {
                krun_add_net_tap(ctx, tap.as_ptr(), n.mac.as_ptr(), NET_FEATURES, 0)
            })?;
        }
        let console = cpath(&self.console_output)?;
        // SAFETY: valid string.
        check("krun_set_console_output", unsafe {
            krun_set_console_output(ctx, console.as_ptr())
        })?;
        Ok(())
    }
}

fn cstr(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::Vm(format!("NUL byte in {s:?}")))
}

fn cpath(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::Vm(format!("NUL byte in {}", p.display())))
}

/// The hidden `krun-oci libkrun-vmm --config FILE`: configure and enter the VM.
/// Returns only on failure (libkrun exits the process when the guest stops).
pub fn vmm_main(config: &Path) -> Result<i32> {
    let cfg: LibkrunConfig =
        serde_json::from_slice(&fs::read(config).ctx(|| format!("read {}", config.display()))?)?;
    for s in cfg.listen_sockets() {
        let _ = fs::remove_file(s);
    }
    // Before libkrun starts threads: unshare(CLONE_NEWNS) needs a single thread.
    if let Some(m) = &cfg.mounts {
        m.ops()?
            .apply()
            .map_err(|e| Error::Vm(format!("bind mounts for the guest: {e}")))?;
    }
    let ctx = krun::krun_create_ctx();
    if ctx < 0 {
        return Err(Error::Vm(format!(
            "krun_create_ctx: {}",
            io::Error::from_raw_os_error(-ctx)
        )));
    }
    cfg.apply(ctx as u32)?;
    let rc = krun::krun_start_enter(ctx as u32);
    Err(Error::Vm(format!(
        "krun_start_enter: {}",
        io::Error::from_raw_os_error(-rc)
    )))
}

/// The libkrun backend for one guest image.
#[derive(Debug, Clone)]
pub struct LibkrunVmm {
    pub kernel: KernelSource,
    /// guest-init, for the libkrunfw boot (no initramfs there).
    pub init: Option<PathBuf>,
    /// This binary (re-executed as the VMM helper).
    pub exe: PathBuf,
}

/// Kernel command line for an external kernel.
pub fn kernel_cmdline(image: &GuestImage) -> String {
    let mut c = String::from(BASE_CMDLINE);
    if !image.cmdline_extra.is_empty() {
        c.push(' ');
        c.push_str(&image.cmdline_extra);
    }
    c
}

/// Chooses the kernel: a configured one; else libkrunfw if loadable; else our own
/// kernel. Debian's stock kernel is refused: libkrun announces its devices with
/// `virtio_mmio.device=`, which needs `VIRTIO_MMIO_CMDLINE_DEVICES`.
pub fn choose_kernel(image: &GuestImage, libkrunfw: bool) -> Result<KernelSource> {
    let external = || KernelSource::External {
        kernel: image.kernel.clone(),
        format: KRUN_KERNEL_FORMAT_ELF,
        initrd: image.initrd.clone(),
        cmdline: kernel_cmdline(image),
    };
    match image.kernel_origin {
        KernelOrigin::Configured => Ok(external()),
        _ if libkrunfw => Ok(KernelSource::Libkrunfw),
        KernelOrigin::OwnBuilt => Ok(external()),
        KernelOrigin::Libkrunfw | KernelOrigin::DistroStock => Err(Error::Vm(format!(
            "libkrun cannot boot the stock distro kernel {} (it lacks \
             CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, which libkrun's virtio_mmio.device= \
             parameters need) and {LIBKRUNFW} is not installed: build our own kernel \
             with `make kernel`, set KRUN_OCI_KERNEL, install libkrunfw, or use --vmm qemu",
            image.kernel.display()
        ))),
    }
}

impl LibkrunVmm {
    pub fn new(image: &GuestImage) -> Result<LibkrunVmm> {
        let kernel = choose_kernel(image, libkrunfw_available())?;
        let init = match kernel {
            KernelSource::Libkrunfw => Some(crate::image::locate_init()?),
            KernelSource::External { .. } => None,
        };
        Ok(LibkrunVmm {
            kernel,
            init,
            exe: std::env::current_exe().ctx(|| "locate the krun-oci binary".into())?,
        })
    }
}

impl Vmm for LibkrunVmm {
    fn name(&self) -> &'static str {
        "libkrun"
    }

    fn link(&self, spec: &VmSpec) -> GuestLink {
        GuestLink::PortSockets {
            dir: spec.run_dir.clone(),
        }
    }

    fn opens_taps_by_name(&self) -> bool {
        true
    }

    fn launch(&self, spec: &VmSpec) -> Result<Box<dyn Vm>> {
        fs::create_dir_all(&spec.run_dir).ctx(|| format!("create {}", spec.run_dir.display()))?;
        let cfg = LibkrunConfig::new(spec, &self.kernel, self.init.as_deref())?;
        let cfg_path = spec.run_dir.join(CONFIG_FILE);
        fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg)?)
            .ctx(|| format!("write {}", cfg_path.display()))?;
        for s in cfg.listen_sockets() {
            let _ = fs::remove_file(s);
        }
        let _ = fs::remove_file(&cfg.console_output);
        let mut cmd = Command::new(&self.exe);
        cmd.args(helper_args(&cfg_path));
        let vm = LibkrunVm::start(&spec.id, cmd, &spec.run_dir, cfg)?;
        Ok(Box::new(vm))
    }
}

/// A running libkrun VMM helper.
pub struct LibkrunVm {
    child: crate::supervise::WaitedChild,
    run_dir: PathBuf,
    cfg: LibkrunConfig,
}

impl LibkrunVm {
    /// Spawns `cmd` (the VMM helper), watched by a thread of its own.
    fn start(id: &str, mut cmd: Command, run_dir: &Path, cfg: LibkrunConfig) -> Result<LibkrunVm> {
        crate::supervise::supervised(&mut cmd, &run_dir.join(LOG_FILE))?;
        cmd.env("HOSTNAME", id);
        let name = format!("libkrun-{}", id.chars().take(7).collect::<String>());
        let child = crate::supervise::WaitedChild::spawn(&name, cmd)
            .map_err(|e| Error::Vm(format!("start the libkrun VMM helper: {e}")))?;
        Ok(LibkrunVm {
            child,
            run_dir: run_dir.to_owned(),
            cfg,
        })
    }

    fn remove_sockets(&self) {
        for s in self.cfg.listen_sockets() {
            let _ = fs::remove_file(s);
        }
    }
}

impl Vm for LibkrunVm {
    fn link(&self) -> GuestLink {
        GuestLink::PortSockets {
            dir: self.run_dir.clone(),
        }
    }

    fn pids(&self) -> Vec<i32> {
        vec![self.child.pid]
    }

    fn try_wait(&mut self) -> io::Result<Option<VmExit>> {
        Ok(self
            .child
            .exit()
            .map(|status| super::exit_of("libkrun", status)))
    }

    fn kill(&mut self) {
        self.child.kill();
        self.remove_sockets();
    }

    fn console_tail(&self, max: usize) -> String {
        let mut s = crate::supervise::tail(&self.cfg.console_output, max);
        let log = crate::supervise::tail(&self.run_dir.join(LOG_FILE), max);
        if !log.trim().is_empty() {
            s.push_str("\n[libkrun] ");
            s.push_str(log.trim());
        }
        s
    }
}

impl Drop for LibkrunVm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Arguments of this binary that make it the VMM helper for `config`.
pub fn helper_args(config: &Path) -> Vec<&OsStr> {
    vec![
        OsStr::new("libkrun-vmm"),
        OsStr::new("--config"),
        config.as_os_str(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(origin: KernelOrigin) -> GuestImage {
        GuestImage {
            kernel: "/c/vmlinux".into(),
            initrd: "/c/img/initrd.cpio".into(),
            kernel_origin: origin,
            cmdline_extra: "foo=1".into(),
        }
    }

    use crate::testutil::vm_spec as spec;

    #[test]
    fn kernel_choice() {
        // Our own kernel: krun_set_kernel with the ELF, the initramfs and our command line.
        let k = choose_kernel(&image(KernelOrigin::OwnBuilt), false).unwrap();
        let KernelSource::External {
            kernel,
            format,
            initrd,
            cmdline,
        } = &k
        else {
            panic!("{k:?}")
        };
        assert_eq!(kernel, Path::new("/c/vmlinux"));
        assert_eq!(*format, KRUN_KERNEL_FORMAT_ELF);
        assert_eq!(initrd, Path::new("/c/img/initrd.cpio"));
        let words: Vec<&str> = cmdline.split(' ').collect();
        for want in [
            "krun_oci.halt=reboot",
            "reboot=k",
            "panic=-1",
            "console=hvc0",
            "foo=1",
        ] {
            assert!(words.contains(&want), "{want} missing in {cmdline}");
        }
        // libkrunfw beats our own kernel, a configured kernel beats libkrunfw.
        assert_eq!(
            choose_kernel(&image(KernelOrigin::OwnBuilt), true).unwrap(),
            KernelSource::Libkrunfw
        );
        assert!(matches!(
            choose_kernel(&image(KernelOrigin::Configured), true).unwrap(),
            KernelSource::External { .. }
        ));
        assert_eq!(
            choose_kernel(&image(KernelOrigin::DistroStock), true).unwrap(),
            KernelSource::Libkrunfw
        );
        // The stock kernel alone is refused, saying why and what to do.
        let e = choose_kernel(&image(KernelOrigin::DistroStock), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("VIRTIO_MMIO_CMDLINE_DEVICES"), "{e}");
        assert!(e.contains("make kernel"), "{e}");
    }

    #[test]
    fn config_with_external_kernel() {
        let k = choose_kernel(&image(KernelOrigin::OwnBuilt), false).unwrap();
        let c = LibkrunConfig::new(&spec(), &k, None).unwrap();
        assert_eq!((c.vcpus, c.ram_mib), (2, 256));
        assert_eq!(c.kernel, k);
        assert_eq!(
            c.virtiofs,
            vec![VirtioFs {
                tag: "rootfs".into(),
                path: Some("/b/rootfs".into())
            }]
        );
        assert!(c.overlays.is_empty() && c.cmdline_env.is_empty());
        assert_eq!(c.tsi_features, 0);
        let port = |port: u32, path: &str, listen: bool| VsockPort {
            port,
            path: path.into(),
            listen,
        };
        assert_eq!(
            c.vsock_ports,
            vec![
                port(1024, "/run/k/c1/guest-1024.sock", true),
                port(1025, "/run/k/c1/guest-1025.sock", true),
                port(1026, "/run/k/c1/guest-1026.sock", true),
                port(1030, "/run/k/c1/host-1030.sock", false),
            ]
        );
        assert_eq!(c.console_output, Path::new("/run/k/c1/console.log"));
        assert_eq!(c.listen_sockets().len(), 3);
        // The sockets are exactly where the host side of the link looks.
        let link = GuestLink::PortSockets {
            dir: "/run/k/c1".into(),
        };
        assert_eq!(
            link.guest_port_path(proto::CONTROL_PORT).unwrap(),
            c.vsock_ports[0].path
        );
        assert_eq!(
            link.host_port_path(proto::HOST_EVENTS_PORT),
            c.vsock_ports[3].path
        );
        // What the helper reads back is what the monitor wrote.
        let json = serde_json::to_vec(&c).unwrap();
        assert_eq!(serde_json::from_slice::<LibkrunConfig>(&json).unwrap(), c);
    }

    #[test]
    fn config_with_bind_mounts() {
        let k = choose_kernel(&image(KernelOrigin::OwnBuilt), false).unwrap();
        let mut s = spec();
        let share = crate::mounts::MountsShare {
            staging: "/run/k/c1/mounts".into(),
            binds: vec![crate::mounts::SharedBind {
                source: "/srv/data".into(),
                entry: "0".into(),
                is_dir: true,
                readonly: false,
                recursive: true,
            }],
        };
        s.mounts = Some(share.clone());
        let c = LibkrunConfig::new(&s, &k, None).unwrap();
        assert_eq!(
            c.virtiofs[1],
            VirtioFs {
                tag: "krun-mounts".into(),
                path: Some("/run/k/c1/mounts".into())
            }
        );
        assert_eq!(c.mounts, Some(share));
        let json = serde_json::to_vec(&c).unwrap();
        assert_eq!(serde_json::from_slice::<LibkrunConfig>(&json).unwrap(), c);
    }

    #[test]
    fn config_with_libkrunfw() {
        assert!(LibkrunConfig::new(&spec(), &KernelSource::Libkrunfw, None).is_err());
        let c = LibkrunConfig::new(
            &spec(),
            &KernelSource::Libkrunfw,
            Some(Path::new("/x/krun-oci-init")),
        )
        .unwrap();
        assert_eq!(c.virtiofs[0].tag, "/dev/root");
        assert_eq!(c.virtiofs[0].path, None);
        assert_eq!(c.virtiofs[1].tag, "rootfs");
        let init = c.overlays.iter().find(|o| o.source.is_some()).unwrap();
        assert_eq!(
            (init.tag.as_str(), init.path.as_str(), init.mode),
            ("/dev/root", "init.krun", 0o755)
        );
        for d in ["dev", "proc", "sys", "newroot"] {
            assert!(c.overlays.iter().any(|o| o.path == d && o.source.is_none()));
        }
        assert_eq!(c.cmdline_env, vec!["krun_oci.halt=reboot".to_string()]);
    }

    #[test]
    fn the_base_cmdline_asks_guest_init_to_reboot() {
        assert!(BASE_CMDLINE
            .split(' ')
            .any(|w| w == proto::contract::CMDLINE_HALT_REBOOT));
    }

    #[test]
    fn limits_are_clamped() {
        let mut s = spec();
        s.vcpus = 0;
        s.ram_mib = 1;
        let k = choose_kernel(&image(KernelOrigin::OwnBuilt), false).unwrap();
        let c = LibkrunConfig::new(&s, &k, None).unwrap();
        assert_eq!((c.vcpus, c.ram_mib), (1, 64));
        s.vcpus = 1000;
        assert_eq!(LibkrunConfig::new(&s, &k, None).unwrap().vcpus, 255);
    }

    /// The FFI calls accept the configuration (libkrun only records it; no KVM needed
    /// until `krun_start_enter`, which is not called here).
    #[test]
    fn apply_configures_a_context() {
        let d = tempfile::tempdir().unwrap();
        let mut s = spec();
        s.run_dir = d.path().to_owned();
        s.rootfs = d.path().to_owned();
        let init = d.path().join("init");
        fs::write(&init, b"\x7fELF").unwrap();
        // krun_set_kernel looks at the initramfs (its size) right away.
        let mut img = image(KernelOrigin::OwnBuilt);
        img.kernel = d.path().join("vmlinux");
        img.initrd = d.path().join("initrd.cpio");
        fs::write(&img.kernel, b"").unwrap();
        fs::write(&img.initrd, b"").unwrap();
        for k in [choose_kernel(&img, false).unwrap(), KernelSource::Libkrunfw] {
            let mut c = LibkrunConfig::new(&s, &k, Some(&init)).unwrap();
            c.nics.push(NetTap {
                tap: "krtap0".into(),
                mac: [2, 0, 0, 0, 0, 1],
            });
            let ctx = krun::krun_create_ctx();
            assert!(ctx >= 0);
            c.apply(ctx as u32).unwrap();
            assert_eq!(krun::krun_free_ctx(ctx as u32), 0);
        }
        // A leftover listening socket path is refused by libkrun (EEXIST); vmm_main and
        // launch remove them first.
        let c = LibkrunConfig::new(&s, &choose_kernel(&img, false).unwrap(), None).unwrap();
        fs::write(&c.listen_sockets()[0], b"").unwrap();
        let ctx = krun::krun_create_ctx();
        let e = c.apply(ctx as u32).unwrap_err().to_string();
        assert!(e.contains("krun_add_vsock_port2"), "{e}");
        krun::krun_free_ctx(ctx as u32);
    }

    #[test]
    fn helper_exit_is_reported_and_kill_reaps() {
        let d = tempfile::tempdir().unwrap();
        let mut s = spec();
        s.run_dir = d.path().to_owned();
        let k = choose_kernel(&image(KernelOrigin::OwnBuilt), false).unwrap();
        let cfg = LibkrunConfig::new(&s, &k, None).unwrap();
        // Stand-ins for the helper: a child that exits 3, and one that sleeps.
        let mut sh = Command::new("/bin/sh");
        sh.args(["-c", "exit 3"]);
        let mut vm = LibkrunVm::start("t", sh, d.path(), cfg.clone()).unwrap();
        let t0 = std::time::Instant::now();
        let exit = loop {
            if let Some(e) = vm.try_wait().unwrap() {
                break e;
            }
            assert!(t0.elapsed() < std::time::Duration::from_secs(10));
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert_eq!(
            exit,
            VmExit::Exited {
                component: "libkrun".into(),
                status: Some(3),
                signal: None
            }
        );
        let mut sleep = Command::new("/bin/sleep");
        sleep.arg("30");
        let mut vm = LibkrunVm::start("t", sleep, d.path(), cfg).unwrap();
        let pid = vm.pids()[0];
        fs::write(vm.cfg.listen_sockets()[0].clone(), b"").unwrap();
        vm.kill();
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        assert!(matches!(
            vm.try_wait().unwrap(),
            Some(VmExit::Exited {
                signal: Some(9),
                ..
            })
        ));
        assert!(!vm.cfg.listen_sockets()[0].exists(), "sockets removed");
    }
}
