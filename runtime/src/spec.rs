//! `krun-oci spec` and `krun-oci features`: the default config.json and the
//! runtime-spec features document.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::Path;

use oci_spec::runtime::{
    Arch, CgroupBuilder, Features, FeaturesBuilder, LinuxFeatureBuilder, LinuxNamespaceType,
    LinuxSeccompAction, SeccompBuilder, Spec,
};

use crate::error::{Error, IoContext, Result};

/// Annotation selecting the VMM (`auto`, `libkrun`, `qemu`).
pub const ANNOTATION_VMM: &str = "krun-oci.vmm";
/// Annotation overriding the vCPU count.
pub const ANNOTATION_CPUS: &str = "krun-oci.cpus";
/// Annotation overriding the VM's RAM in MiB.
pub const ANNOTATION_RAM_MIB: &str = "krun-oci.ram_mib";
/// Annotation overriding where the json-file log is written.
pub const ANNOTATION_LOG_PATH: &str = "krun-oci.log_path";
/// `false`: never take a pooled VM, always boot cold.
pub const ANNOTATION_POOL: &str = "krun-oci.pool";
/// crun-krun's spellings, accepted so its users can switch.
pub const ANNOTATION_CRUN_CPUS: &str = "krun.cpus";
pub const ANNOTATION_CRUN_RAM_MIB: &str = "krun.ram_mib";

/// The runtime-spec version krun-oci implements.
pub const OCI_VERSION: &str = "1.2.0";
/// Oldest config version accepted.
pub const OCI_VERSION_MIN: &str = "1.0.0";

/// The default config: runc's defaults (process `sh` on a terminal, the usual
/// mounts, readonly root) with a hostname that says where it runs.
pub fn default_spec(rootless: bool) -> Spec {
    let mut spec = if rootless {
        Spec::rootless(
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        )
    } else {
        Spec::default()
    };
    spec.set_hostname(Some("krun-oci".into()));
    // runc's default: an interactive shell on a terminal.
    if let Some(process) = spec.process_mut() {
        process.set_terminal(Some(true));
    }
    spec
}

/// Writes `config.json` into `bundle`, refusing to overwrite one (runc's wording).
pub fn write_default_spec(bundle: &Path, rootless: bool) -> Result<()> {
    let path = bundle.join("config.json");
    let json = serde_json::to_vec_pretty(&default_spec(rootless))?;
    let mut f = match OpenOptions::new().write(true).create_new(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(Error::ConfigExists),
        Err(e) => return Err(e).ctx(|| format!("creating {}", path.display())),
    };
    f.write_all(&json)
        .ctx(|| format!("writing {}", path.display()))
}

/// The features document: only what krun-oci really honours.
pub fn features() -> Result<Features> {
    let annotations: HashMap<String, String> = [
        (
            ANNOTATION_VMM,
            "VMM for this container: auto, libkrun or qemu",
        ),
        (ANNOTATION_CPUS, "number of vCPUs of the container's VM"),
        (ANNOTATION_RAM_MIB, "RAM of the container's VM in MiB"),
        (ANNOTATION_LOG_PATH, "path of the container's json-file log"),
        (
            ANNOTATION_POOL,
            "false: boot the container's own VM even when a warm pool serves the root",
        ),
        (
            crate::network::ANNOTATION_NETWORK,
            "how the network namespace reaches the VM: auto (its links become NICs when a \
             namespace path is given), tap (the same, required), none (loopback only)",
        ),
        (
            ANNOTATION_CRUN_CPUS,
            "alias of krun-oci.cpus (crun-krun compatibility)",
        ),
        (
            ANNOTATION_CRUN_RAM_MIB,
            "alias of krun-oci.ram_mib (crun-krun compatibility)",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let linux = LinuxFeatureBuilder::default()
        // Inside a VM the guest kernel gives the workload its own instance of each.
        .namespaces(vec![
            LinuxNamespaceType::Pid,
            LinuxNamespaceType::Network,
            LinuxNamespaceType::Ipc,
            LinuxNamespaceType::Uts,
            LinuxNamespaceType::Mount,
            LinuxNamespaceType::Cgroup,
        ])
        .capabilities(
            caps_all()
                .into_iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>(),
        )
        // The VM monitor enters the host cgroup (youki's libcgroups: v1, v2, systemd).
        .cgroup(
            CgroupBuilder::default()
                .v1(true)
                .v2(true)
                .systemd(true)
                .systemd_user(false)
                .rdma(false)
                .build()?,
        )
        // Compiled on the host with libseccomp, installed in the guest; a notify
        // listener cannot cross the VM boundary.
        .seccomp(
            SeccompBuilder::default()
                .enabled(true)
                .actions(vec![
                    LinuxSeccompAction::ScmpActKill,
                    LinuxSeccompAction::ScmpActKillThread,
                    LinuxSeccompAction::ScmpActKillProcess,
                    LinuxSeccompAction::ScmpActTrap,
                    LinuxSeccompAction::ScmpActErrno,
                    LinuxSeccompAction::ScmpActTrace,
                    LinuxSeccompAction::ScmpActLog,
                    LinuxSeccompAction::ScmpActAllow,
                ])
                .operators(
                    [
                        "SCMP_CMP_NE",
                        "SCMP_CMP_LT",
                        "SCMP_CMP_LE",
                        "SCMP_CMP_EQ",
                        "SCMP_CMP_GE",
                        "SCMP_CMP_GT",
                        "SCMP_CMP_MASKED_EQ",
                    ]
                    .map(String::from)
                    .to_vec(),
                )
                .archs(vec![
                    Arch::ScmpArchX86_64,
                    Arch::ScmpArchX86,
                    Arch::ScmpArchX32,
                ])
                .build()?,
        )
        .build()?;
    Ok(FeaturesBuilder::default()
        .oci_version_min(OCI_VERSION_MIN)
        .oci_version_max(OCI_VERSION)
        .hooks(
            [
                "prestart",
                "createRuntime",
                "createContainer",
                "startContainer",
                "poststart",
                "poststop",
            ]
            .map(String::from)
            .to_vec(),
        )
        .mount_options(
            ["ro", "rw", "bind", "rbind", "nosuid", "nodev", "noexec"]
                .map(String::from)
                .to_vec(),
        )
        .linux(linux)
        .annotations(annotations)
        .build()?)
}

fn caps_all() -> Vec<&'static str> {
    vec![
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_DAC_READ_SEARCH",
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_KILL",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETPCAP",
        "CAP_LINUX_IMMUTABLE",
        "CAP_NET_BIND_SERVICE",
        "CAP_NET_BROADCAST",
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_IPC_LOCK",
        "CAP_IPC_OWNER",
        "CAP_SYS_MODULE",
        "CAP_SYS_RAWIO",
        "CAP_SYS_CHROOT",
        "CAP_SYS_PTRACE",
        "CAP_SYS_PACCT",
        "CAP_SYS_ADMIN",
        "CAP_SYS_BOOT",
        "CAP_SYS_NICE",
        "CAP_SYS_RESOURCE",
        "CAP_SYS_TIME",
        "CAP_SYS_TTY_CONFIG",
        "CAP_MKNOD",
        "CAP_LEASE",
        "CAP_AUDIT_WRITE",
        "CAP_AUDIT_CONTROL",
        "CAP_SETFCAP",
        "CAP_MAC_OVERRIDE",
        "CAP_MAC_ADMIN",
        "CAP_SYSLOG",
        "CAP_WAKE_ALARM",
        "CAP_BLOCK_SUSPEND",
        "CAP_AUDIT_READ",
        "CAP_PERFMON",
        "CAP_BPF",
        "CAP_CHECKPOINT_RESTORE",
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        write_default_spec(dir.path(), false).unwrap();
        let spec: Spec =
            serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap())
                .unwrap();
        assert_eq!(
            spec.process().as_ref().unwrap().args().as_ref().unwrap(),
            &vec!["sh".to_string()]
        );
        assert!(spec.process().as_ref().unwrap().terminal().unwrap_or(false));
        let err = write_default_spec(dir.path(), false).unwrap_err();
        assert_eq!(err.to_string(), "File config.json exists. Remove it first");
        assert_eq!(err.kind(), crate::error::ErrorKind::AlreadyExists);
    }

    #[test]
    fn features_json_names_our_annotations() {
        let v = serde_json::to_value(features().unwrap()).unwrap();
        assert_eq!(v["ociVersionMax"], OCI_VERSION);
        assert!(v["annotations"][ANNOTATION_RAM_MIB].is_string());
        assert!(v["annotations"][crate::network::ANNOTATION_NETWORK].is_string());
        assert!(v["hooks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h == "createRuntime"));
        assert!(v["linux"]["namespaces"].as_array().unwrap().len() >= 5);
        assert_eq!(v["linux"]["cgroup"]["v2"], true);
        assert_eq!(v["linux"]["seccomp"]["enabled"], true);
        let actions = v["linux"]["seccomp"]["actions"].as_array().unwrap();
        assert!(!actions.iter().any(|a| a == "SCMP_ACT_NOTIFY"));
    }
}
