//! The test kit shared by the runtime's end-to-end tests, the conformance suite
//! (and its soak) and the client tests: one busybox rootfs builder, unique
//! container ids, the process and cgroup views the leak checks use, and bounded
//! waiting.
pub mod ids;
pub mod leaks;
pub mod procs;
pub mod rootfs;
pub mod wait;

use std::path::PathBuf;

/// `bin` on `PATH`, in `~/.cargo/bin` (the helpers `make deps` installs),
/// `/usr/local/bin` or `/bin`.
pub fn which(bin: &str) -> Option<PathBuf> {
    let home = std::env::var("HOME").unwrap_or_default();
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .chain([
            PathBuf::from(format!("{home}/.cargo/bin")),
            PathBuf::from("/usr/local/bin"),
            PathBuf::from("/bin"),
        ])
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}
