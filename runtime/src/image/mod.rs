//! The guest image: a kernel the VMM boots directly (vmlinux ELF, PVH) and an
//! initramfs with krun-oci-init as `/init`. Built by the project, cached, rebuilt
//! when an input changes. See docs/vmm.md for the pipeline and the cache layout.

pub mod cache;
pub mod initramfs;
pub mod kernel;
pub mod own_kernel;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::IoContext;
use crate::{Error, Result};
use kernel::KernelDir;

/// Bumped whenever the initramfs layout changes, so cached images are rebuilt.
const IMAGE_FORMAT: &str = "krun-oci-initramfs-v1";

/// Where the guest kernel came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KernelOrigin {
    /// `KRUN_OCI_KERNEL` or an explicit option.
    Configured,
    /// The kernel bundled in libkrunfw (libkrun backend only).
    Libkrunfw,
    /// Our own minimal kernel (drivers built in, `VIRTIO_MMIO_CMDLINE_DEVICES`).
    OwnBuilt,
    /// The distro's stock kernel package, unpacked into the cache.
    DistroStock,
}

impl std::fmt::Display for KernelOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KernelOrigin::Configured => "configured (KRUN_OCI_KERNEL)",
            KernelOrigin::Libkrunfw => "libkrunfw",
            KernelOrigin::OwnBuilt => "krun-oci's own kernel",
            KernelOrigin::DistroStock => "distro stock kernel (modules in the initramfs)",
        })
    }
}

/// Which kernel the search of [`resolve_kernel`] may pick when none is configured
/// (`KRUN_OCI_KERNEL_SOURCE`). For comparing kernels (`make bench`) and for
/// debugging a boot with the other kernel; `Auto` is what containers want.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KernelSource {
    /// Our own kernel when it is built, else the distro's stock kernel.
    #[default]
    Auto,
    /// Only our own kernel: an error when it is not built.
    Own,
    /// Only the distro's stock kernel, even when our own is built.
    Distro,
}

impl std::str::FromStr for KernelSource {
    type Err = Error;
    fn from_str(s: &str) -> Result<KernelSource> {
        match s {
            "" | "auto" => Ok(KernelSource::Auto),
            "own" => Ok(KernelSource::Own),
            "distro" => Ok(KernelSource::Distro),
            other => Err(Error::InvalidInput(format!(
                "KRUN_OCI_KERNEL_SOURCE={other:?}: expected auto, own or distro"
            ))),
        }
    }
}

/// A bootable guest: kernel, initramfs and what the kernel command line must add.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestImage {
    /// Uncompressed vmlinux ELF with a PVH note.
    pub kernel: PathBuf,
    /// Uncompressed newc cpio.
    pub initrd: PathBuf,
    pub kernel_origin: KernelOrigin,
    /// Appended to the VMM's base command line.
    pub cmdline_extra: String,
}

/// Inputs of [`ensure`].
#[derive(Debug, Clone, Default)]
pub struct ImageOptions {
    /// Cache directory; [`cache::default_cache_dir`] when `None`.
    pub cache_dir: Option<PathBuf>,
    /// Kernel to use (vmlinux ELF, or a bzImage with an XZ payload); overrides the search.
    pub kernel: Option<PathBuf>,
    /// The guest init binary; [`locate_init`] when `None`.
    pub init: Option<PathBuf>,
    /// Extra files (guest path, host file) put into the initramfs, mode 0755.
    /// For debugging and tests (e.g. a shell); containers never need them.
    pub extra_files: Vec<(String, PathBuf)>,
    /// Restricts the kernel search when `kernel` is `None`.
    pub kernel_source: KernelSource,
}

impl ImageOptions {
    /// Options from the environment: `KRUN_OCI_CACHE`, `KRUN_OCI_KERNEL`, `KRUN_OCI_INIT`,
    /// `KRUN_OCI_KERNEL_SOURCE` (`auto`, `own`, `distro`; anything else is an error).
    pub fn from_env() -> Result<ImageOptions> {
        let path = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let kernel_source = std::env::var("KRUN_OCI_KERNEL_SOURCE")
            .unwrap_or_default()
            .parse()?;
        Ok(ImageOptions {
            cache_dir: path("KRUN_OCI_CACHE"),
            kernel: path("KRUN_OCI_KERNEL"),
            init: path("KRUN_OCI_INIT"),
            extra_files: Vec::new(),
            kernel_source,
        })
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.cache_dir
            .clone()
            .unwrap_or_else(cache::default_cache_dir)
    }
}

/// Candidate locations of krun-oci-init, in search order: `$KRUN_OCI_INIT`, next to
/// the running executable, `../lib/krun-oci/krun-oci-init` relative to it (installed
/// layout), and the static build of a source tree (`make build`).
pub fn init_candidates(exe: Option<&Path>) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(p) = std::env::var_os("KRUN_OCI_INIT").filter(|p| !p.is_empty()) {
        v.push(PathBuf::from(p));
    }
    if let Some(dir) = exe.and_then(Path::parent) {
        v.push(dir.join("krun-oci-init"));
        v.push(dir.join("../lib/krun-oci/krun-oci-init"));
        v.push(dir.join("../x86_64-unknown-linux-gnu/release/krun-oci-init"));
    }
    v
}

/// Finds the static krun-oci-init binary (see [`init_candidates`]); dynamically
/// linked builds (a plain `cargo build` puts one next to krun-oci) are skipped.
pub fn locate_init() -> Result<PathBuf> {
    let exe = std::env::current_exe().ok();
    let candidates = init_candidates(exe.as_deref());
    candidates
        .iter()
        .find(|p| p.is_file() && kernel::elf_has_interpreter(p) == Some(false))
        .cloned()
        .ok_or_else(|| {
            let list: Vec<_> = candidates.iter().map(|p| p.display().to_string()).collect();
            Error::Vm(format!(
                "no static krun-oci-init found (looked at: {}); build it with `make build` or set KRUN_OCI_INIT",
                list.join(", ")
            ))
        })
}

/// Cheap identity of a file the user points at: path, size, mtime, inode.
fn file_identity(path: &Path) -> Result<String> {
    let m = fs::metadata(path).ctx(|| format!("stat {}", path.display()))?;
    Ok(format!(
        "{}:{}:{}.{}:{}",
        path.display(),
        m.len(),
        m.mtime(),
        m.mtime_nsec(),
        m.ino()
    ))
}

/// Why [`resolve_kernel`] picked a kernel of `origin` under `source`, for `krun-oci check`.
pub fn kernel_choice_reason(origin: KernelOrigin, source: KernelSource) -> &'static str {
    match (origin, source) {
        (KernelOrigin::Configured, _) => "KRUN_OCI_KERNEL names it",
        (KernelOrigin::Libkrunfw, _) => "libkrunfw is installed (libkrun's own kernel)",
        (KernelOrigin::OwnBuilt, KernelSource::Own) => "KRUN_OCI_KERNEL_SOURCE=own",
        (KernelOrigin::OwnBuilt, _) => {
            "preferred: it is built (faster boot, less memory, no modules)"
        }
        (KernelOrigin::DistroStock, KernelSource::Distro) => "KRUN_OCI_KERNEL_SOURCE=distro",
        (KernelOrigin::DistroStock, _) => "fallback: our own kernel is not built (see below)",
    }
}

/// Resolves the kernel: configured path, then our own built kernel, then the distro's
/// (the last two as `opts.kernel_source` allows).
pub fn resolve_kernel(
    opts: &ImageOptions,
    cache_dir: &Path,
) -> Result<(KernelDir, PathBuf, KernelOrigin)> {
    if let Some(k) = &opts.kernel {
        let identity = format!("configured:{}", file_identity(k)?);
        if kernel::is_elf(k) {
            let dir = KernelDir {
                dir: PathBuf::new(),
                identity,
                modules: Vec::new(),
            };
            return Ok((dir, k.clone(), KernelOrigin::Configured));
        }
        let dir = kernel::unpack_configured(cache_dir, k, &identity)?;
        let vmlinux = dir.vmlinux();
        return Ok((dir, vmlinux, KernelOrigin::Configured));
    }
    let own = match opts.kernel_source {
        KernelSource::Distro => None,
        // Our own kernel when it is built (faster boot, half the memory, no
        // modules); otherwise the distro's stock kernel.
        KernelSource::Auto => own_kernel::cached(cache_dir),
        KernelSource::Own => Some(own_kernel::cached(cache_dir).ok_or_else(|| {
            Error::Vm(format!(
                "KRUN_OCI_KERNEL_SOURCE=own but {}",
                own_kernel::explain(cache_dir)
            ))
        })?),
    };
    if let Some(own) = own {
        let dir = KernelDir {
            dir: PathBuf::new(),
            identity: format!("own:{}", file_identity(&own)?),
            modules: vec![],
        };
        return Ok((dir, own, KernelOrigin::OwnBuilt));
    }
    let dir = kernel::distro_kernel(cache_dir)?;
    let vmlinux = dir.vmlinux();
    Ok((dir, vmlinux, KernelOrigin::DistroStock))
}

/// Returns the guest image for `opts`, building what is missing or stale.
pub fn ensure(opts: &ImageOptions) -> Result<GuestImage> {
    let cache_dir = opts.cache_dir();
    let init = match &opts.init {
        Some(p) => p.clone(),
        None => locate_init()?,
    };
    if kernel::elf_has_interpreter(&init) == Some(true) {
        return Err(Error::Vm(format!(
            "{} is dynamically linked; the guest has no libc: build krun-oci-init static (musl)",
            init.display()
        )));
    }
    let (kdir, vmlinux, origin) = resolve_kernel(opts, &cache_dir)?;

    let init_hash = cache::sha256_file_memo(&cache_dir, &init)?;
    let mut parts = vec![
        IMAGE_FORMAT.to_owned(),
        kdir.identity.clone(),
        init_hash,
        kdir.modules.join(","),
    ];
    for (guest, host) in &opts.extra_files {
        parts.push(format!("{guest}={}", cache::sha256_file(host)?));
    }
    let key = cache::key(&parts.iter().map(String::as_str).collect::<Vec<_>>());
    let dest = cache_dir.join("images").join(&key);
    cache::build_once(&cache_dir, &dest, |tmp| {
        let entries = initramfs::image_entries(
            &init,
            &kdir.modules_root(),
            &kdir.modules,
            &opts.extra_files,
        );
        initramfs::write_cpio(&tmp.join("initrd.cpio"), &entries)?;
        let desc = serde_json::json!({
            "kernel": vmlinux, "kernel_origin": origin, "kernel_identity": kdir.identity,
            "init": init, "modules": kdir.modules,
        });
        fs::write(tmp.join("image.json"), serde_json::to_vec_pretty(&desc)?)
            .ctx(|| "write image.json".into())
    })?;
    Ok(GuestImage {
        kernel: vmlinux,
        initrd: dest.join("initrd.cpio"),
        kernel_origin: origin,
        cmdline_extra: String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_lookup_order() {
        let c = init_candidates(Some(Path::new("/opt/k/bin/krun-oci")));
        let tail: Vec<_> = c.iter().rev().take(3).rev().cloned().collect();
        assert_eq!(
            tail,
            [
                PathBuf::from("/opt/k/bin/krun-oci-init"),
                PathBuf::from("/opt/k/bin/../lib/krun-oci/krun-oci-init"),
                PathBuf::from("/opt/k/bin/../x86_64-unknown-linux-gnu/release/krun-oci-init"),
            ]
        );
    }

    #[test]
    fn image_key_changes_with_inputs_and_image_is_reused() {
        let d = tempfile::tempdir().unwrap();
        let kernel = d.path().join("vmlinux");
        fs::write(&kernel, b"\x7fELF fake").unwrap();
        let init = d.path().join("init");
        fs::write(&init, b"init v1").unwrap();
        let opts = ImageOptions {
            cache_dir: Some(d.path().join("cache")),
            kernel: Some(kernel.clone()),
            init: Some(init.clone()),
            extra_files: vec![],
            kernel_source: KernelSource::Auto,
        };
        let a = ensure(&opts).unwrap();
        assert_eq!(a.kernel, kernel);
        assert_eq!(a.kernel_origin, KernelOrigin::Configured);
        assert!(a.initrd.is_file());
        assert_eq!(ensure(&opts).unwrap(), a, "same inputs, same image");
        fs::write(&init, b"init v2").unwrap();
        let b = ensure(&opts).unwrap();
        assert_ne!(a.initrd, b.initrd, "new init, new image");
        // A changed kernel file (different size/mtime) also changes the key.
        std::thread::sleep(std::time::Duration::from_millis(10));
        fs::write(&kernel, b"\x7fELF fake, rebuilt").unwrap();
        let c = ensure(&opts).unwrap();
        assert_ne!(b.initrd, c.initrd, "new kernel, new image");
    }

    #[test]
    fn kernel_source_values() {
        assert_eq!("".parse::<KernelSource>().unwrap(), KernelSource::Auto);
        assert_eq!("auto".parse::<KernelSource>().unwrap(), KernelSource::Auto);
        assert_eq!("own".parse::<KernelSource>().unwrap(), KernelSource::Own);
        assert_eq!(
            "distro".parse::<KernelSource>().unwrap(),
            KernelSource::Distro
        );
        let e = "stock".parse::<KernelSource>().unwrap_err().to_string();
        assert!(e.contains("KRUN_OCI_KERNEL_SOURCE"), "{e}");
    }

    #[test]
    fn kernel_source_own_without_own_kernel_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let opts = ImageOptions {
            kernel_source: KernelSource::Own,
            ..Default::default()
        };
        let e = resolve_kernel(&opts, d.path()).unwrap_err().to_string();
        assert!(e.contains("KRUN_OCI_KERNEL_SOURCE=own"), "{e}");
    }

    #[test]
    fn configured_kernel_wins_over_kernel_source() {
        let d = tempfile::tempdir().unwrap();
        let kernel = d.path().join("vmlinux");
        fs::write(&kernel, b"\x7fELF fake").unwrap();
        for source in [KernelSource::Own, KernelSource::Distro] {
            let opts = ImageOptions {
                kernel: Some(kernel.clone()),
                kernel_source: source,
                ..Default::default()
            };
            let (_, path, origin) = resolve_kernel(&opts, d.path()).unwrap();
            assert_eq!((path, origin), (kernel.clone(), KernelOrigin::Configured));
        }
    }
}
