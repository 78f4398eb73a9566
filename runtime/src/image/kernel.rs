//! Guest kernels: turning a bzImage into the vmlinux ELF that `-M microvm` boots
//! through its PVH note, and fetching the distro kernel without installing it.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use super::cache::{self, build_once};
use super::initramfs::{resolve_modules, NEEDED_MODULES};
use crate::error::IoContext;
use crate::{Error, Result};

const ELF_MAGIC: &[u8] = b"\x7fELF";
const XZ_MAGIC: &[u8] = &[0xFD, b'7', b'z', b'X', b'Z', 0x00];

/// Returns the vmlinux ELF held by `image`: `image` itself when it already is an
/// ELF, else the first XZ stream inside it (Debian's bzImage payload) that
/// decompresses to an ELF. Bytes after the stream (bzImage trailer) are ignored.
pub fn extract_vmlinux(image: &[u8]) -> Result<Vec<u8>> {
    if image.starts_with(ELF_MAGIC) {
        return Ok(image.to_vec());
    }
    let mut from = 0;
    while let Some(pos) = find(&image[from..], XZ_MAGIC) {
        let start = from + pos;
        let mut out = Vec::with_capacity(image.len() * 4);
        // One stream; liblzma stops at its end, so the bzImage trailer is ignored.
        // (lzma-rs cannot be used: the kernel's stream carries the x86 BCJ filter.)
        let mut dec = liblzma::read::XzDecoder::new(&image[start..]);
        if std::io::Read::read_to_end(&mut dec, &mut out).is_ok() && out.starts_with(ELF_MAGIC) {
            return Ok(out);
        }
        from = start + 1;
    }
    Err(Error::InvalidInput(
        "kernel image is neither an ELF vmlinux nor a bzImage with an XZ-compressed payload \
         (gzip/zstd/bzip2 payloads: pass an uncompressed vmlinux via KRUN_OCI_KERNEL)"
            .into(),
    ))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Whether the file at `path` starts with the ELF magic.
pub fn is_elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .map(|()| magic == ELF_MAGIC)
        .unwrap_or(false)
}

/// Whether the ELF file at `path` names a program interpreter (is dynamically
/// linked). `None` when it is not an ELF64 file (e.g. a script).
pub fn elf_has_interpreter(path: &Path) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    // The program headers follow the ELF header in any binary we build: the first
    // pages hold both, so a multi-MiB init is not read whole at every create.
    const HEAD: u64 = 64 * 1024;
    let mut data = Vec::new();
    fs::File::open(path)
        .ok()?
        .take(HEAD)
        .read_to_end(&mut data)
        .ok()?;
    if !data.starts_with(ELF_MAGIC) || data.get(4) != Some(&2) {
        return None;
    }
    let u16_at = |o: usize| {
        data.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let phoff = usize::try_from(u64::from_le_bytes(data.get(0x20..0x28)?.try_into().ok()?)).ok()?;
    let (phentsize, phnum) = (u16_at(0x36)?, u16_at(0x38)?);
    // A header past what was read: unknown (None), not "static".
    let types = (0..phnum)
        .map(|i| {
            let o = phoff.checked_add(i.checked_mul(phentsize)?)?;
            data.get(o..o.checked_add(4)?)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        })
        .collect::<Option<Vec<u32>>>()?;
    Some(types.contains(&PT_INTERP))
}

/// A kernel unpacked into the cache: `vmlinux`, and for modular kernels the
/// modules guest-init must load, in `modules/` with their load order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KernelDir {
    pub dir: PathBuf,
    /// Identity used in image keys (package and version, or path and mtime).
    pub identity: String,
    /// Module paths relative to `dir/modules`, in load order (empty: all built in).
    pub modules: Vec<String>,
}

impl KernelDir {
    pub fn vmlinux(&self) -> PathBuf {
        self.dir.join("vmlinux")
    }
    pub fn modules_root(&self) -> PathBuf {
        self.dir.join("modules")
    }
}

/// Extracts a configured non-ELF kernel (bzImage) into the cache once per file version.
pub fn unpack_configured(cache_dir: &Path, kernel: &Path, identity: &str) -> Result<KernelDir> {
    let dest = cache_dir
        .join("kernels")
        .join(format!("configured-{}", cache::key(&[identity])));
    build_once(cache_dir, &dest, |tmp| {
        let data = fs::read(kernel).ctx(|| format!("read kernel {}", kernel.display()))?;
        let elf = extract_vmlinux(&data)?;
        fs::write(tmp.join("vmlinux"), elf).ctx(|| "write vmlinux".into())
    })?;
    Ok(KernelDir {
        dir: dest,
        identity: identity.to_owned(),
        modules: Vec::new(),
    })
}

/// The Debian architecture name of this host, for `linux-image-<arch>`.
fn deb_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn run_capture(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().ctx(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        return Err(Error::Vm(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The concrete kernel package the `linux-image-<arch>` meta package depends on.
pub fn parse_meta_depends(apt_cache_depends: &str) -> Option<String> {
    apt_cache_depends.lines().find_map(|l| {
        let dep = l.trim().strip_prefix("Depends:")?.trim();
        let dep = dep.trim_start_matches('<').trim_end_matches('>');
        dep.starts_with("linux-image-").then(|| dep.to_owned())
    })
}

/// The `Version:` field of `apt-cache show --no-all-versions` output.
pub fn parse_version(apt_cache_show: &str) -> Option<String> {
    apt_cache_show
        .lines()
        .find_map(|l| l.strip_prefix("Version:").map(|v| v.trim().to_owned()))
}

/// Which distro kernel package and version apt would install now.
fn resolve_distro_package() -> Result<(String, String)> {
    let package = match std::env::var("KRUN_OCI_KERNEL_PACKAGE") {
        Ok(p) if !p.is_empty() => p,
        _ => {
            let meta = format!("linux-image-{}", deb_arch());
            let deps = run_capture(Command::new("apt-cache").args(["depends", &meta]))?;
            parse_meta_depends(&deps).ok_or_else(|| {
                Error::Vm(format!(
                    "apt-cache: {meta} depends on no linux-image package"
                ))
            })?
        }
    };
    let show =
        run_capture(Command::new("apt-cache").args(["show", "--no-all-versions", &package]))?;
    let version = parse_version(&show)
        .ok_or_else(|| Error::Vm(format!("apt-cache show {package}: no Version")))?;
    Ok((package, version))
}

/// Remembers what apt resolved, so later runs skip apt-cache until the package
/// lists change (`apt-get update` touches /var/lib/apt/lists).
#[derive(Debug, Serialize, Deserialize)]
struct DistroPointer {
    package: String,
    version: String,
    lists_mtime: u64,
}

fn apt_lists_mtime() -> u64 {
    fs::metadata("/var/lib/apt/lists")
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

fn find_tool(name: &str) -> PathBuf {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// The distro's stock kernel, downloaded with `apt-get download` (never installed on
/// the host), unpacked with `dpkg-deb -x`, its vmlinux extracted, `depmod` run on the
/// unpacked tree, and only the modules a microVM guest needs kept.
pub fn distro_kernel(cache_dir: &Path) -> Result<KernelDir> {
    let pointer_path = cache_dir.join("kernels").join("distro.json");
    let lists_mtime = apt_lists_mtime();
    let pointer: Option<DistroPointer> = fs::read(&pointer_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let (package, version) = match pointer {
        Some(p) if p.lists_mtime == lists_mtime => (p.package, p.version),
        _ => resolve_distro_package()?,
    };
    let modules_key = cache::key(NEEDED_MODULES);
    let identity = format!("{package}={version}");
    let dest = cache_dir
        .join("kernels")
        .join(format!("{package}_{version}_{modules_key}").replace(':', "%3a"));
    build_once(cache_dir, &dest, |tmp| {
        unpack_distro_package(tmp, &package, &version)
    })?;
    let _ = fs::create_dir_all(cache_dir.join("kernels"));
    let p = DistroPointer {
        package,
        version,
        lists_mtime,
    };
    let _ = crate::state::write_atomic(&pointer_path, &serde_json::to_vec(&p)?);
    let modules = fs::read_to_string(dest.join("modules.load"))
        .ctx(|| format!("read {}", dest.join("modules.load").display()))?
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    Ok(KernelDir {
        dir: dest,
        identity,
        modules,
    })
}

fn unpack_distro_package(out: &Path, package: &str, version: &str) -> Result<()> {
    let work = out.join("work");
    fs::create_dir(&work).ctx(|| "create work dir".into())?;
    let mut last_err = None;
    let mut deb = None;
    for candidate in [package.to_owned(), format!("{package}-unsigned")] {
        match run_capture(
            Command::new("apt-get")
                .arg("download")
                .arg(format!("{candidate}={version}"))
                .current_dir(&work),
        ) {
            Ok(_) => {
                deb = fs::read_dir(&work)
                    .ctx(|| "list download dir".into())?
                    .flatten()
                    .map(|e| e.path())
                    .find(|p| p.extension().is_some_and(|e| e == "deb"));
                break;
            }
            Err(e) => last_err = Some(e),
        }
    }
    let deb = deb.ok_or_else(|| {
        last_err
            .unwrap_or_else(|| Error::Vm(format!("apt-get download {package}: no .deb appeared")))
    })?;
    let root = work.join("root");
    run_capture(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;

    let boot = root.join("boot");
    let vmlinuz = fs::read_dir(&boot)
        .ctx(|| format!("list {}", boot.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .ok_or_else(|| Error::Vm(format!("{package}: no /boot/vmlinuz-* in the package")))?;
    let release = vmlinuz.file_name().unwrap().to_string_lossy()["vmlinuz-".len()..].to_owned();
    let data = fs::read(&vmlinuz).ctx(|| format!("read {}", vmlinuz.display()))?;
    fs::write(out.join("vmlinux"), extract_vmlinux(&data)?).ctx(|| "write vmlinux".into())?;
    fs::write(out.join("release"), &release).ctx(|| "write release".into())?;

    // The package ships no modules.dep (its postinst runs depmod): make it here.
    let moddir = root.join("lib/modules").join(&release);
    let mut modules = Vec::new();
    if moddir.is_dir() {
        run_capture(
            Command::new(find_tool("depmod"))
                .arg("-b")
                .arg(&root)
                .arg(&release),
        )
        .map_err(|e| {
            Error::Vm(format!(
                "{e} (depmod comes with kmod: apt-get install kmod)"
            ))
        })?;
        let dep =
            fs::read_to_string(moddir.join("modules.dep")).ctx(|| "read modules.dep".into())?;
        let builtin = fs::read_to_string(moddir.join("modules.builtin")).unwrap_or_default();
        modules = resolve_modules(&dep, &builtin, NEEDED_MODULES)?;
        for rel in &modules {
            let to = out.join("modules").join(rel);
            fs::create_dir_all(to.parent().unwrap()).ctx(|| "create modules dir".into())?;
            fs::copy(moddir.join(rel), &to).ctx(|| format!("copy module {rel}"))?;
        }
        fs::copy(moddir.join("modules.dep"), out.join("modules.dep"))
            .ctx(|| "copy modules.dep".into())?;
    }
    let mut list = modules.join("\n");
    list.push('\n');
    fs::write(out.join("modules.load"), list).ctx(|| "write modules.load".into())?;
    fs::remove_dir_all(&work).ctx(|| "remove work dir".into())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmlinux_from_synthetic_bzimage() {
        let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
        elf.extend((0..50_000u32).map(|i| (i % 251) as u8));
        // Compressed like the kernel's payload: x86 BCJ filter + LZMA2, CRC32.
        let mut filters = liblzma::stream::Filters::new();
        filters
            .x86()
            .lzma2(&liblzma::stream::LzmaOptions::new_preset(6).unwrap());
        let stream =
            liblzma::stream::Stream::new_stream_encoder(&filters, liblzma::stream::Check::Crc32)
                .unwrap();
        let mut xz = Vec::new();
        std::io::Read::read_to_end(
            &mut liblzma::read::XzEncoder::new_stream(&elf[..], stream),
            &mut xz,
        )
        .unwrap();
        // A fake setup header with a stray magic-like prefix, the stream, then trailer bytes.
        let mut bz = b"MZ fake setup \xFD7zXZ".to_vec();
        bz.extend_from_slice(&xz);
        bz.extend_from_slice(&[0xAA; 37]);
        assert_eq!(extract_vmlinux(&bz).unwrap(), elf);
        // An ELF passes through unchanged; garbage is refused.
        assert_eq!(extract_vmlinux(&elf).unwrap(), elf);
        assert!(extract_vmlinux(b"not a kernel").is_err());
    }

    #[test]
    fn interpreter_detection() {
        let me = std::env::current_exe().unwrap();
        // Test binaries are linked dynamically against glibc.
        assert_eq!(elf_has_interpreter(&me), Some(true));
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("s"), "#!/bin/sh\n").unwrap();
        assert_eq!(elf_has_interpreter(&d.path().join("s")), None);
        // Program headers said to lie past what is read: unknown, not static.
        let mut far = vec![0u8; 64];
        far[..4].copy_from_slice(ELF_MAGIC);
        far[4] = 2;
        far[0x20..0x28].copy_from_slice(&(1u64 << 40).to_le_bytes());
        far[0x36] = 56;
        far[0x38] = 1;
        fs::write(d.path().join("far"), &far).unwrap();
        assert_eq!(elf_has_interpreter(&d.path().join("far")), None);
        if Path::new("/bin/busybox").exists()
            && std::process::Command::new("ldd")
                .arg("/bin/busybox")
                .output()
                .is_ok_and(|o| !o.status.success())
        {
            assert_eq!(elf_has_interpreter(Path::new("/bin/busybox")), Some(false));
        }
    }

    #[test]
    fn apt_output_parsing() {
        let deps = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(
            parse_meta_depends(deps).as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        assert_eq!(parse_meta_depends("x\n  Depends: foo\n"), None);
        let show = "Package: linux-image-6.1.0-56-amd64\nVersion: 6.1.192-2\nArch: amd64\n";
        assert_eq!(parse_version(show).as_deref(), Some("6.1.192-2"));
    }
}
