//! Helpers for unit tests.

use oci_spec::runtime::Spec;

/// The default spec with its top-level `field` replaced by `value`.
pub fn spec_with(field: &str, value: serde_json::Value) -> Spec {
    let mut v = serde_json::to_value(Spec::default()).unwrap();
    v[field] = value;
    serde_json::from_value(v).unwrap()
}

/// A VM spec as the backends' configuration tests use it.
pub fn vm_spec() -> crate::vmm::VmSpec {
    crate::vmm::VmSpec {
        id: "c1".into(),
        run_dir: "/run/k/c1".into(),
        rootfs: "/b/rootfs".into(),
        vcpus: 2,
        ram_mib: 256,
        mounts: None,
        nics: Vec::new(),
        deferred_root: false,
        rootfs_cache: Default::default(),
    }
}
