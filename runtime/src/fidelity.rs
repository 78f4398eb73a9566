//! What of config.json a microVM does not apply, said out loud at create (a
//! logged warning, where runc users expect tolerance: podman and containerd
//! send these on every container) instead of being dropped in silence. The
//! full table is docs/config.md.

use oci_spec::runtime::{LinuxNamespaceType, Spec};

/// One warning per config field that is set and not applied.
pub fn unapplied(spec: &Spec) -> Vec<String> {
    let mut out = Vec::new();
    let Some(linux) = spec.linux() else {
        return out;
    };
    if let Some(r) = linux.resources() {
        let mut rest = Vec::new();
        if r.hugepage_limits().as_ref().is_some_and(|h| !h.is_empty()) {
            rest.push("hugepageLimits");
        }
        if r.network().is_some() {
            rest.push("network");
        }
        if r.rdma().as_ref().is_some_and(|m| !m.is_empty()) {
            rest.push("rdma");
        }
        if r.unified().as_ref().is_some_and(|m| !m.is_empty()) {
            rest.push("unified");
        }
        if !rest.is_empty() {
            out.push(format!(
                "linux.resources.{{{}}} are not applied to a microVM",
                rest.join(",")
            ));
        }
    }
    for ns in linux.namespaces().iter().flatten() {
        // A network namespace path is joined by the VM monitor (monitor.rs).
        if let (Some(path), false) = (ns.path(), ns.typ() == LinuxNamespaceType::Network) {
            out.push(format!(
                "namespace {:?} path {}: not joined (the workload runs in the VM's own namespaces)",
                ns.typ(),
                path.display()
            ));
        }
    }
    let user_ns = linux
        .namespaces()
        .iter()
        .flatten()
        .any(|n| n.typ() == LinuxNamespaceType::User && n.path().is_none());
    if linux.uid_mappings().as_ref().is_some_and(|m| !m.is_empty()) && !user_ns {
        out.push(
            "linux.uidMappings/gidMappings without a user namespace in linux.namespaces: not applied"
                .into(),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(linux: serde_json::Value) -> Spec {
        crate::testutil::spec_with("linux", linux)
    }

    #[test]
    fn set_and_unapplied_fields_are_named() {
        let w = unapplied(&spec(serde_json::json!({
            "cgroupsPath": "/libpod_parent/libpod-abc",
            "resources": {"hugepageLimits": [{"pageSize": "2MB", "limit": 0}], "pids": {"limit": 10}},
            "namespaces": [{"type": "network", "path": "/run/netns/cni-1"}, {"type": "ipc", "path": "/proc/1/ns/ipc"}]
        })));
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("hugepageLimits") && !w[0].contains("pids"));
        assert!(w[1].contains("/proc/1/ns/ipc") && !w.iter().any(|x| x.contains("cni-1")));
    }

    #[test]
    fn nothing_to_say_about_a_plain_config() {
        let w = unapplied(&spec(serde_json::json!({
            "namespaces": [{"type": "pid"}, {"type": "mount"}],
            "resources": {"memory": {"limit": 268435456}}
        })));
        assert!(w.is_empty(), "{w:?}");
    }
}
