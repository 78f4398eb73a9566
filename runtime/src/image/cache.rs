//! The guest-image cache: where it lives, content keys, and build-then-rename under a lock.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

use crate::error::IoContext;
use crate::{Error, Result};

/// `$KRUN_OCI_CACHE`, else `/var/lib/krun-oci` for root, else `$XDG_CACHE_HOME/krun-oci`
/// (`~/.cache/krun-oci`).
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KRUN_OCI_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/krun-oci");
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("krun-oci")
}

/// [`sha256_file`], remembered in `<cache>/hashes/` under the file's identity
/// (path, device, inode, size, mtime and ctime to the nanosecond: ctime changes
/// with any write and cannot be set back). Every create hashes the 4-5 MB
/// guest-init; from the second one on this is a stat and a small read.
pub fn sha256_file_memo(cache_dir: &Path, path: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(path).ctx(|| format!("stat {}", path.display()))?;
    let identity = format!(
        "{}|{}|{}|{}|{}.{}|{}.{}",
        path.display(),
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec()
    );
    let memo = cache_dir.join("hashes").join(key(&[&identity]));
    if let Ok(h) = fs::read_to_string(&memo) {
        if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(h);
        }
    }
    let h = sha256_file(path)?;
    // Best effort: a cache that cannot be written only costs the next hash.
    if fs::create_dir_all(cache_dir.join("hashes")).is_ok() {
        let _ = crate::state::write_atomic(&memo, h.as_bytes());
    }
    Ok(h)
}

/// Hex SHA-256 of a file's contents.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).ctx(|| format!("open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f
            .read(&mut buf)
            .ctx(|| format!("read {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A short content key over ordered parts (parts are separated, so ("ab","c") != ("a","bc")).
pub fn key(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    hex(&h.finalize()[..10])
}

/// Exclusive lock over the whole cache, held while anything in it is built.
pub struct CacheLock {
    _lock: Flock<File>,
}

pub fn lock(cache: &Path) -> Result<CacheLock> {
    fs::create_dir_all(cache).ctx(|| format!("create cache dir {}", cache.display()))?;
    let path = cache.join(".lock");
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .ctx(|| format!("open {}", path.display()))?;
    let lock = Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| Error::Io {
        context: format!("lock {}", path.display()),
        source: e.into(),
    })?;
    Ok(CacheLock { _lock: lock })
}

/// Makes `dest` (a directory) exist: if it does not, takes the cache lock, builds it
/// with `build(tmp)` in a fresh sibling temp dir and renames that into place, so
/// readers never see a half-built entry and concurrent builders build it once.
pub fn build_once(
    cache: &Path,
    dest: &Path,
    build: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    if dest.is_dir() {
        return Ok(());
    }
    let _lock = lock(cache)?;
    if dest.is_dir() {
        return Ok(());
    }
    let parent = dest.parent().expect("cache entries have a parent");
    fs::create_dir_all(parent).ctx(|| format!("create {}", parent.display()))?;
    remove_stale_temps(parent);
    let name = dest
        .file_name()
        .expect("cache entries have a name")
        .to_string_lossy();
    let tmp = parent.join(format!(".tmp-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir(&tmp).ctx(|| format!("create {}", tmp.display()))?;
    let built = build(&tmp)
        .and_then(|()| fs::rename(&tmp, dest).ctx(|| format!("rename into {}", dest.display())));
    if built.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    built
}

/// Temp dirs left by builders that died; only called with the cache lock held.
fn remove_stale_temps(dir: &Path) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        if e.file_name().to_string_lossy().starts_with(".tmp-") {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_depends_on_every_part() {
        let k = key(&["kernel-a", "init-1"]);
        assert_eq!(k, key(&["kernel-a", "init-1"]));
        assert_ne!(k, key(&["kernel-b", "init-1"]));
        assert_ne!(k, key(&["kernel-a", "init-2"]));
        assert_ne!(key(&["ab", "c"]), key(&["a", "bc"]));
    }

    #[test]
    fn a_remembered_hash_follows_the_file() {
        let d = tempfile::tempdir().unwrap();
        let (cache, f) = (d.path().join("cache"), d.path().join("init"));
        fs::write(&f, "one").unwrap();
        let first = sha256_file_memo(&cache, &f).unwrap();
        assert_eq!(first, sha256_file(&f).unwrap());
        assert_eq!(fs::read_dir(cache.join("hashes")).unwrap().count(), 1);
        assert_eq!(sha256_file_memo(&cache, &f).unwrap(), first);
        // Same size, rewritten: its ctime moved, so it is hashed again.
        std::thread::sleep(std::time::Duration::from_millis(10));
        fs::write(&f, "two").unwrap();
        assert_eq!(
            sha256_file_memo(&cache, &f).unwrap(),
            sha256_file(&f).unwrap()
        );
        assert_ne!(sha256_file_memo(&cache, &f).unwrap(), first);
    }

    #[test]
    fn build_once_builds_once_and_cleans_up_failures() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("images/x");
        let err = build_once(d.path(), &dest, |tmp| {
            fs::write(tmp.join("f"), "1").unwrap();
            Err(Error::Vm("boom".into()))
        });
        assert!(err.is_err());
        assert!(!dest.exists());
        assert_eq!(fs::read_dir(d.path().join("images")).unwrap().count(), 0);
        build_once(d.path(), &dest, |tmp| {
            fs::write(tmp.join("f"), "2").ctx(|| "w".into())
        })
        .unwrap();
        build_once(d.path(), &dest, |_| panic!("must not rebuild")).unwrap();
        assert_eq!(fs::read_to_string(dest.join("f")).unwrap(), "2");
    }

    #[test]
    fn concurrent_builders_build_once() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("e");
        let count = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (c, dest, cache) = (count.clone(), dest.clone(), d.path().to_owned());
                std::thread::spawn(move || {
                    build_once(&cache, &dest, |tmp| {
                        c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        fs::write(tmp.join("f"), "x").ctx(|| "w".into())
                    })
                    .unwrap()
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
