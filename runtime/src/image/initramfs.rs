//! The guest initramfs: a newc cpio with `/init` (krun-oci-init) and, for a modular
//! kernel, exactly the modules it needs under `/krun-oci/` plus the list
//! `/krun-oci/modules` (one path per line, relative to `/krun-oci/`, load order).

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::IoContext;
use crate::{Error, Result};

/// Drivers a microVM guest needs: virtio-mmio transport, virtio-fs root, vsock, console
/// ports. Their dependencies (virtio, virtio_ring, fuse, vsock, ...) follow from modules.dep.
pub const NEEDED_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtiofs",
    "vmw_vsock_virtio_transport",
    "virtio_console",
];

/// Where modules and their list live inside the initramfs (guest-init's contract).
pub const MODULES_DIR: &str = "krun-oci";
pub const MODULES_LIST: &str = "krun-oci/modules";

/// `kernel/fs/fuse/fuse.ko.xz` -> `fuse`; `-` and `_` are the same in module names.
pub fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let base = base.split(".ko").next().unwrap_or(base);
    base.replace('-', "_")
}

/// Resolves `wanted` module names to module paths (as written in modules.dep) in an
/// order where every module comes after its dependencies. Built-in modules are
/// skipped; a module that is neither in modules.dep nor built in is an error.
pub fn resolve_modules(
    modules_dep: &str,
    modules_builtin: &str,
    wanted: &[&str],
) -> Result<Vec<String>> {
    let mut deps: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for line in modules_dep.lines() {
        let Some((path, rest)) = line.split_once(':') else {
            continue;
        };
        let path = path.trim();
        let d = rest.split_whitespace().map(str::to_owned).collect();
        deps.insert(module_name(path), (path.to_owned(), d));
    }
    let builtin: BTreeSet<String> = modules_builtin
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(module_name)
        .collect();

    fn visit(
        name: &str,
        deps: &HashMap<String, (String, Vec<String>)>,
        builtin: &BTreeSet<String>,
        stack: &mut Vec<String>,
        out: &mut Vec<String>,
    ) -> Result<()> {
        let Some((path, ds)) = deps.get(name) else {
            if builtin.contains(name) {
                return Ok(());
            }
            return Err(Error::Vm(format!(
                "kernel module {name} is neither in modules.dep nor built in"
            )));
        };
        if out.contains(path) {
            return Ok(());
        }
        if stack.iter().any(|s| s == name) {
            return Err(Error::Vm(format!("module dependency cycle through {name}")));
        }
        stack.push(name.to_owned());
        for d in ds {
            visit(&module_name(d), deps, builtin, stack, out)?;
        }
        stack.pop();
        out.push(path.clone());
        Ok(())
    }

    let mut out = Vec::new();
    for w in wanted {
        visit(&module_name(w), &deps, &builtin, &mut Vec::new(), &mut out)?;
    }
    Ok(out)
}

/// Where an initramfs entry's content comes from.
#[derive(Debug, Clone)]
pub enum Content {
    File(PathBuf),
    Bytes(Vec<u8>),
    /// A character device node (major, minor).
    CharDev(u32, u32),
}

/// One entry; parent directories are added automatically.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Path inside the guest, without a leading `/`.
    pub path: String,
    /// Permission bits (the file type comes from `content`).
    pub perm: u32,
    pub content: Content,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

/// Writes a newc cpio (uncompressed: the kernel unpacks it fastest) to `out`.
pub fn write_cpio(out: &Path, entries: &[Entry]) -> Result<()> {
    let f = File::create(out).ctx(|| format!("create {}", out.display()))?;
    let w = write_cpio_to(BufWriter::new(f), entries).ctx(|| format!("write {}", out.display()))?;
    w.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .ctx(|| format!("flush {}", out.display()))
}

fn write_cpio_to<W: Write>(mut w: W, entries: &[Entry]) -> io::Result<W> {
    let mut dirs = BTreeSet::new();
    for e in entries {
        let mut p = Path::new(&e.path).parent();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(d.to_string_lossy().into_owned());
            p = d.parent();
        }
    }
    let mut ino = 1u32;
    // BTreeSet order puts every parent before its children.
    for d in &dirs {
        w = cpio::newc::Builder::new(d)
            .ino(ino)
            .mode(S_IFDIR | 0o755)
            .nlink(2)
            .write(w, 0)
            .finish()?;
        ino += 1;
    }
    for e in entries {
        let b = cpio::newc::Builder::new(&e.path).ino(ino).nlink(1);
        ino += 1;
        w = match &e.content {
            Content::CharDev(maj, min) => b
                .mode(S_IFCHR | e.perm)
                .rdev_major(*maj)
                .rdev_minor(*min)
                .write(w, 0)
                .finish()?,
            Content::Bytes(data) => {
                let mut fw = b.mode(S_IFREG | e.perm).write(w, len32(data.len() as u64)?);
                fw.write_all(data)?;
                fw.finish()?
            }
            Content::File(src) => {
                let mut f = File::open(src).map_err(|err| {
                    io::Error::new(err.kind(), format!("{}: {err}", src.display()))
                })?;
                let len = f.metadata()?.len();
                let mut fw = b.mode(S_IFREG | e.perm).write(w, len32(len)?);
                io::copy(&mut f, &mut fw)?;
                fw.finish()?
            }
        };
    }
    cpio::newc::trailer(w)
}

fn len32(len: u64) -> io::Result<u32> {
    u32::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large for cpio newc"))
}

/// The entries of a krun-oci initramfs: `/init`, the console node, the modules and
/// their list, and any extra files.
pub fn image_entries(
    init: &Path,
    modules_root: &Path,
    modules: &[String],
    extra: &[(String, PathBuf)],
) -> Vec<Entry> {
    let mut v = vec![
        Entry {
            path: "init".into(),
            perm: 0o755,
            content: Content::File(init.to_owned()),
        },
        Entry {
            path: "dev/console".into(),
            perm: 0o600,
            content: Content::CharDev(5, 1),
        },
    ];
    if !modules.is_empty() {
        for m in modules {
            v.push(Entry {
                path: format!("{MODULES_DIR}/{m}"),
                perm: 0o644,
                content: Content::File(modules_root.join(m)),
            });
        }
        let mut list = modules.join("\n");
        list.push('\n');
        v.push(Entry {
            path: MODULES_LIST.into(),
            perm: 0o644,
            content: Content::Bytes(list.into_bytes()),
        });
    }
    for (path, src) in extra {
        v.push(Entry {
            path: path.trim_start_matches('/').to_owned(),
            perm: 0o755,
            content: Content::File(src.clone()),
        });
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/fs/fuse/fuse.ko:
kernel/fs/fuse/virtiofs.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko kernel/fs/fuse/fuse.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/vmw_vsock/vsock.ko:
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/net/vmw_vsock/vsock.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/dummy.ko:
";

    #[test]
    fn modules_in_dependency_order() {
        let got = resolve_modules(DEP, "", NEEDED_MODULES).unwrap();
        let names: Vec<_> = got.iter().map(|p| module_name(p)).collect();
        assert_eq!(
            names,
            [
                "virtio_ring",
                "virtio",
                "virtio_mmio",
                "fuse",
                "virtiofs",
                "vsock",
                "vmw_vsock_virtio_transport_common",
                "vmw_vsock_virtio_transport",
                "virtio_console"
            ]
        );
        // Every module comes after each of its dependencies.
        for (i, p) in got.iter().enumerate() {
            let line = DEP
                .lines()
                .find(|l| l.starts_with(&format!("{p}:")))
                .unwrap();
            for d in line.split_once(':').unwrap().1.split_whitespace() {
                assert!(got[..i].iter().any(|x| x == d), "{d} must precede {p}");
            }
        }
    }

    #[test]
    fn builtin_modules_are_skipped_and_unknown_ones_fail() {
        let dep =
            "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vsock.ko\n";
        let builtin = "kernel/net/vmw_vsock/vsock.ko\nkernel/drivers/virtio/virtio_mmio.ko\n";
        let got =
            resolve_modules(dep, builtin, &["virtio_mmio", "vmw_vsock_virtio_transport"]).unwrap();
        assert_eq!(got, ["kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko"]);
        assert!(resolve_modules(dep, builtin, &["virtiofs"]).is_err());
        assert_eq!(module_name("kernel/x/foo-bar.ko.xz"), "foo_bar");
    }

    #[test]
    fn cpio_roundtrip() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("init"), b"#!init").unwrap();
        std::fs::create_dir_all(d.path().join("m/kernel/fs")).unwrap();
        std::fs::write(d.path().join("m/kernel/fs/fuse.ko"), b"ko").unwrap();
        let entries = image_entries(
            &d.path().join("init"),
            &d.path().join("m"),
            &["kernel/fs/fuse.ko".to_string()],
            &[],
        );
        let out = d.path().join("initrd");
        write_cpio(&out, &entries).unwrap();

        let mut r = io::Cursor::new(std::fs::read(&out).unwrap());
        let mut seen = Vec::new();
        loop {
            let rd = cpio::NewcReader::new(r).unwrap();
            if rd.entry().is_trailer() {
                break;
            }
            let (name, mode) = (rd.entry().name().to_owned(), rd.entry().mode());
            let rdev = (rd.entry().rdev_major(), rd.entry().rdev_minor());
            let mut data = Vec::new();
            let mut rd = rd;
            io::Read::read_to_end(&mut rd, &mut data).unwrap();
            seen.push((name, mode, rdev, data));
            r = rd.finish().unwrap();
        }
        let get = |n: &str| {
            seen.iter()
                .find(|e| e.0 == n)
                .unwrap_or_else(|| panic!("{n} missing"))
        };
        assert_eq!(get("init").1, S_IFREG | 0o755);
        assert_eq!(get("init").3, b"#!init");
        assert_eq!(get("dev").1, S_IFDIR | 0o755);
        assert_eq!(get("dev/console").1, S_IFCHR | 0o600);
        assert_eq!(get("dev/console").2, (5, 1));
        assert_eq!(get("krun-oci/kernel/fs/fuse.ko").3, b"ko");
        assert_eq!(get(MODULES_LIST).3, b"kernel/fs/fuse.ko\n");
        // Parents precede children.
        let pos = |n: &str| seen.iter().position(|e| e.0 == n).unwrap();
        assert!(
            pos("krun-oci") < pos("krun-oci/kernel")
                && pos("krun-oci/kernel/fs") < pos("krun-oci/kernel/fs/fuse.ko")
        );
    }
}
