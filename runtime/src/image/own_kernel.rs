//! krun-oci's own guest kernel: built by `kernel/build.sh` (`make kernel`) from
//! the distribution's kernel source package and the project's config fragment
//! `kernel/krun-oci.config`, and stored in the guest-image cache as
//! `<cache>/kernel/own/<source version>-<fragment hash>/vmlinux`.
//!
//! The key computed here must match the one `kernel/build.sh` computes:
//! the installed version of the source package (`dpkg-query`, status
//! `installed`) and the first 16 hex digits of the SHA-256 of the fragment's
//! exact bytes. The fragment is embedded at compile time, so a binary only
//! picks up kernels built from the fragment it was compiled with.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The Debian package whose tarball the kernel is built from.
pub const SOURCE_PACKAGE: &str = "linux-source-6.12";

/// The config fragment, byte for byte as committed.
pub const FRAGMENT: &str = include_str!("../../../kernel/krun-oci.config");

/// Number of hex digits of the fragment's SHA-256 used in the key.
const HASH_HEX_DIGITS: usize = 16;

/// First 16 hex digits of the SHA-256 of `bytes` (what `sha256sum | cut -c1-16` prints).
pub fn short_sha256(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut hex = String::with_capacity(HASH_HEX_DIGITS);
    for byte in digest.iter().take(HASH_HEX_DIGITS / 2) {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

/// Hash of the embedded fragment.
pub fn fragment_hash() -> String {
    short_sha256(FRAGMENT.as_bytes())
}

/// Cache key for a given source package version: `<version>-<fragment hash>`.
/// Characters outside `[A-Za-z0-9.+~-]` (an epoch's `:`, which `make` cannot
/// handle in paths) become `_`, as in build.sh.
pub fn key_for_version(version: &str) -> String {
    let version: String = version
        .chars()
        .map(|c| match c {
            'A'..='Z' | 'a'..='z' | '0'..='9' | '.' | '+' | '~' | '-' => c,
            _ => '_',
        })
        .collect();
    format!("{version}-{}", fragment_hash())
}

/// dpkg's database of installed packages.
const DPKG_STATUS: &str = "/var/lib/dpkg/status";

/// The version of `package` in a dpkg status file when it is installed
/// (`Status: install ok installed`), `None` otherwise (not known, removed with
/// config files left, half-installed, ...): what `dpkg-query -W
/// -f='${db:Status-Status}\t${Version}'` tells, read without starting dpkg-query
/// (that costs every create tens of milliseconds).
fn parse_dpkg_status(status: &str, package: &str) -> Option<String> {
    status.split("\n\n").find_map(|stanza| {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name).map(str::trim))
        };
        if field("Package:")? != package {
            return None;
        }
        let installed = field("Status:")?.split_whitespace().nth(2) == Some("installed");
        let version = field("Version:")?;
        (installed && !version.is_empty()).then(|| version.to_string())
    })
}

/// Installed version of [`SOURCE_PACKAGE`], `None` if it is not installed or
/// there is no dpkg database.
pub fn source_version() -> Option<String> {
    parse_dpkg_status(&std::fs::read_to_string(DPKG_STATUS).ok()?, SOURCE_PACKAGE)
}

/// The cache key of the kernel this binary would use: source package version
/// plus fragment hash. `None` when the source package is not installed.
pub fn key() -> Option<String> {
    source_version().map(|v| key_for_version(&v))
}

/// Where the kernel for `key` lives (or would live) in the cache.
pub fn vmlinux_path(cache_dir: &Path, key: &str) -> PathBuf {
    cache_dir
        .join("kernel")
        .join("own")
        .join(key)
        .join("vmlinux")
}

/// The built vmlinux for the current key, if it is in the cache.
pub fn cached(cache_dir: &Path) -> Option<PathBuf> {
    let path = vmlinux_path(cache_dir, &key()?);
    path.is_file().then_some(path)
}

/// One line for `krun-oci check`: which own kernel would be used, or why not.
pub fn explain(cache_dir: &Path) -> String {
    explain_with(cache_dir, source_version().as_deref())
}

fn explain_with(cache_dir: &Path, version: Option<&str>) -> String {
    let Some(version) = version else {
        return format!(
            "own kernel: unavailable: the source package {SOURCE_PACKAGE} is not installed \
             (apt-get install {SOURCE_PACKAGE}, then run `make kernel`)"
        );
    };
    let path = vmlinux_path(cache_dir, &key_for_version(version));
    if path.is_file() {
        format!(
            "own kernel: {} ({SOURCE_PACKAGE} {version}, fragment {})",
            path.display(),
            fragment_hash()
        )
    } else {
        format!(
            "own kernel: not built yet for {SOURCE_PACKAGE} {version} and fragment {} \
             (expected at {}): run `make kernel`",
            fragment_hash(),
            path.display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_sha256_known_vectors() {
        assert_eq!(short_sha256(b""), "e3b0c44298fc1c14");
        assert_eq!(short_sha256(b"abc"), "ba7816bf8f01cfea");
    }

    #[test]
    fn fragment_hash_is_hash_of_file_on_disk() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../kernel/krun-oci.config");
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(fragment_hash(), short_sha256(&bytes));
        assert_eq!(fragment_hash().len(), 16);
        assert!(fragment_hash().bytes().all(|b| b.is_ascii_hexdigit()));
    }

    /// build.sh hashes with `sha256sum | cut -c1-16`: the same digits.
    #[test]
    fn fragment_hash_matches_sha256sum() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../kernel/krun-oci.config");
        let Ok(out) = std::process::Command::new("sha256sum").arg(path).output() else {
            return; // coreutils absent: nothing to compare with
        };
        let text = String::from_utf8(out.stdout).unwrap();
        assert_eq!(&text[..16], fragment_hash());
    }

    #[test]
    fn key_joins_version_and_hash() {
        assert_eq!(
            key_for_version("6.12.117-1~deb12u1"),
            format!("6.12.117-1~deb12u1-{}", fragment_hash())
        );
        assert_eq!(
            key_for_version("1:2.0+b1"),
            format!("1_2.0+b1-{}", fragment_hash())
        );
    }

    #[test]
    fn dpkg_status_parsing() {
        let db = "Package: linux-source-6.12-foo\nStatus: install ok installed\nVersion: 9\n\n\
                  Package: linux-source-6.12\nStatus: install ok installed\nPriority: optional\n\
                  Version: 6.12.117-1~deb12u1\nDescription: x\n more\n\n\
                  Package: gone\nStatus: deinstall ok config-files\nVersion: 1.0\n";
        assert_eq!(
            parse_dpkg_status(db, "linux-source-6.12").as_deref(),
            Some("6.12.117-1~deb12u1")
        );
        assert_eq!(parse_dpkg_status(db, "gone"), None);
        assert_eq!(parse_dpkg_status(db, "absent"), None);
        assert_eq!(parse_dpkg_status("", "linux-source-6.12"), None);
        // The same answer as dpkg-query on this machine, where dpkg is there.
        if let Ok(out) = std::process::Command::new("dpkg-query")
            .args(["-W", "-f=${db:Status-Status}\t${Version}", SOURCE_PACKAGE])
            .output()
        {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let want = text
                .split_once('\t')
                .filter(|(st, v)| *st == "installed" && !v.is_empty())
                .map(|(_, v)| v.to_string());
            assert_eq!(source_version(), want, "dpkg-query said {text:?}");
        }
    }

    #[test]
    fn cached_and_explain_follow_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let none = explain_with(dir.path(), None);
        assert!(none.contains("not installed"), "{none}");

        let missing = explain_with(dir.path(), Some("1.0-1"));
        assert!(missing.contains("make kernel"), "{missing}");

        let path = vmlinux_path(dir.path(), &key_for_version("1.0-1"));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"\x7fELF").unwrap();
        let found = explain_with(dir.path(), Some("1.0-1"));
        assert!(
            found.starts_with(&format!("own kernel: {}", path.display())),
            "{found}"
        );
        assert!(path.ends_with(format!("kernel/own/1.0-1-{}/vmlinux", fragment_hash())));
    }
}
