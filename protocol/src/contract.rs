//! What host and guest agree on outside messages: file and socket names, the
//! virtio-fs tags, the kernel command-line keys guest-init reads, the default
//! PATH. One place, so neither side can drift from the other.

/// The main's exit code, written by guest-init into the container's root (a
/// decimal number) before it powers off; read by the host when the VM ends
/// without reporting it.
pub const EXIT_CODE_FILE: &str = ".a3s_exit_code";

/// virtio-fs tag of the container's root filesystem.
pub const ROOT_TAG: &str = "rootfs";

/// Command-line key naming another root tag (`krun_oci.root_tag=TAG`).
pub const CMDLINE_ROOT_TAG: &str = "krun_oci.root_tag=";
/// Command-line word: boot without a root, it is attached later (a pooled VM).
pub const CMDLINE_ROOT_DEFERRED: &str = "krun_oci.root=deferred";
/// Command-line word: power-off must be a reboot (VMMs without ACPI power-off).
pub const CMDLINE_HALT_REBOOT: &str = "krun_oci.halt=reboot";

/// The PATH a process without one gets, and the one its program is looked up
/// in (runc's default, the same on both sides).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where guest-init mounts filesystems of its own in every container root,
/// before the config's mounts (which replace those at the same place). What
/// lies below them in the root filesystem is hidden from the container.
pub const GUEST_MOUNTS: [&str; 7] = [
    "/proc",
    "/dev",
    "/dev/pts",
    "/dev/shm",
    "/run",
    "/sys",
    "/sys/fs/cgroup",
];

/// With one unix socket per vsock port (libkrun, the host-sandbox harness):
/// the socket of guest port `port` in the link's directory.
pub fn guest_port_socket(port: u32) -> String {
    format!("guest-{port}.sock")
}

/// With one unix socket per vsock port: where a guest connection to host port
/// `port` arrives, in the link's directory.
pub fn host_port_socket(port: u32) -> String {
    format!("host-{port}.sock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_names_per_port() {
        assert_eq!(guest_port_socket(1024), "guest-1024.sock");
        assert_eq!(host_port_socket(1025), "host-1025.sock");
    }
}
